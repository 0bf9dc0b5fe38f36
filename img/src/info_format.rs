//! What `img info` reports about an image, and its two renderings: qemu-img's human text
//! (`bdrv_node_info_dump`) and its JSON (`BlockGraphInfo`).

use common::ops::{BitmapInfo, Qcow2Info, SnapshotInfo};
use common::vmdk::VmdkInfo;

use crate::qjson::{to_json_pretty, QDict, QValue};
use crate::size::size_to_str;

/// Format-specific information (QAPI `ImageInfoSpecific`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum FormatSpecific {
    Qcow2(Qcow2Info),
    Vmdk(VmdkInfo),
    /// The `file` protocol node (no data on ordinary filesystems).
    File,
}

fn bitmap_dict(b: &BitmapInfo) -> QDict {
    let mut d = QDict::new();
    d.put_str("name", &b.name);
    d.put_int("granularity", b.granularity as i64);
    let mut flags = Vec::new();
    if b.in_use {
        flags.push(QValue::Str("in-use".to_string()));
    }
    if b.auto {
        flags.push(QValue::Str("auto".to_string()));
    }
    d.put("flags", QValue::List(flags));
    d
}

/// One node of the block graph (QAPI `BlockGraphInfo`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NodeInfo {
    pub filename: String,
    pub format: String,
    /// `None` when the format cannot tell (a raw image over NBD).
    pub dirty_flag: Option<bool>,
    pub actual_size: Option<u64>,
    pub virtual_size: u64,
    pub cluster_size: Option<u64>,
    pub encrypted: Option<bool>,
    pub backing_filename: Option<String>,
    pub full_backing_filename: Option<String>,
    pub backing_filename_format: Option<String>,
    /// Listed only when there is at least one.
    pub snapshots: Vec<SnapshotInfo>,
    pub format_specific: Option<FormatSpecific>,
    /// Child nodes by role name (`file`).
    pub children: Vec<(String, NodeInfo)>,
}

impl NodeInfo {
    /// A node with only the mandatory fields set.
    pub fn new(filename: &str, format: &str, virtual_size: u64) -> NodeInfo {
        NodeInfo {
            filename: filename.to_string(),
            format: format.to_string(),
            dirty_flag: Some(false),
            actual_size: None,
            virtual_size,
            cluster_size: None,
            encrypted: None,
            backing_filename: None,
            full_backing_filename: None,
            backing_filename_format: None,
            snapshots: Vec::new(),
            format_specific: None,
            children: Vec::new(),
        }
    }
}

// ---------------------------------------------------------------- JSON

fn snapshot_dict(s: &SnapshotInfo) -> QDict {
    let mut d = QDict::new();
    d.put_str("id", &s.id);
    d.put_str("name", &s.name);
    d.put_int("vm-state-size", s.vm_state_size as i64);
    d.put_int("date-sec", i64::from(s.date_sec));
    d.put_int("date-nsec", i64::from(s.date_nsec));
    d.put_int("vm-clock-sec", (s.vm_clock_nsec / 1_000_000_000) as i64);
    d.put_int("vm-clock-nsec", (s.vm_clock_nsec % 1_000_000_000) as i64);
    if let Some(ic) = s.icount {
        d.put_int("icount", ic as i64);
    }
    d
}

/// vmdk's `data` member (QAPI `ImageInfoSpecificVmdk`), in schema order.
fn vmdk_data(v: &VmdkInfo) -> QDict {
    let mut d = QDict::new();
    d.put_str("create-type", &v.create_type);
    d.put_int("cid", i64::from(v.cid));
    d.put_int("parent-cid", i64::from(v.parent_cid));
    let extents = v
        .extents
        .iter()
        .map(|e| {
            let mut x = QDict::new();
            x.put_str("filename", &e.filename);
            x.put_str("format", &e.format);
            x.put_int("virtual-size", e.virtual_size as i64);
            if let Some(c) = e.cluster_size {
                x.put_int("cluster-size", c as i64);
            }
            if let Some(c) = e.compressed {
                x.put_bool("compressed", c);
            }
            QValue::Dict(x)
        })
        .collect();
    d.put("extents", QValue::List(extents));
    d
}

/// The `data` member of the format-specific information, in schema order.
fn format_specific_data(f: &FormatSpecific) -> QDict {
    if let FormatSpecific::Vmdk(v) = f {
        return vmdk_data(v);
    }
    let mut d = QDict::new();
    if let FormatSpecific::Qcow2(q) = f {
        d.put_str("compat", q.compat);
        if let Some(f) = &q.data_file {
            d.put_str("data-file", f);
        }
        if let Some(v) = q.data_file_raw {
            d.put_bool("data-file-raw", v);
        }
        if let Some(v) = q.extended_l2 {
            d.put_bool("extended-l2", v);
        }
        if let Some(v) = q.lazy_refcounts {
            d.put_bool("lazy-refcounts", v);
        }
        if let Some(v) = q.corrupt {
            d.put_bool("corrupt", v);
        }
        d.put_int("refcount-bits", i64::from(q.refcount_bits));
        if !q.bitmaps.is_empty() {
            let list = q
                .bitmaps
                .iter()
                .map(|b| QValue::Dict(bitmap_dict(b)))
                .collect();
            d.put("bitmaps", QValue::List(list));
        }
        d.put_str("compression-type", q.compression_type);
    }
    d
}

fn format_specific_dict(f: &FormatSpecific) -> QDict {
    let mut d = QDict::new();
    d.put_str(
        "type",
        match f {
            FormatSpecific::Qcow2(_) => "qcow2",
            FormatSpecific::Vmdk(_) => "vmdk",
            FormatSpecific::File => "file",
        },
    );
    d.put("data", QValue::Dict(format_specific_data(f)));
    d
}

/// The node as QEMU's QAPI visitor builds it (members inserted in schema order).
pub fn node_dict(n: &NodeInfo) -> QDict {
    let mut d = QDict::new();
    d.put_str("filename", &n.filename);
    d.put_str("format", &n.format);
    if let Some(dirty) = n.dirty_flag {
        d.put_bool("dirty-flag", dirty);
    }
    if let Some(a) = n.actual_size {
        d.put_int("actual-size", a as i64);
    }
    d.put_int("virtual-size", n.virtual_size as i64);
    if let Some(c) = n.cluster_size {
        d.put_int("cluster-size", c as i64);
    }
    if let Some(e) = n.encrypted {
        d.put_bool("encrypted", e);
    }
    if let Some(b) = &n.backing_filename {
        d.put_str("backing-filename", b);
    }
    if let Some(b) = &n.full_backing_filename {
        d.put_str("full-backing-filename", b);
    }
    if let Some(b) = &n.backing_filename_format {
        d.put_str("backing-filename-format", b);
    }
    if !n.snapshots.is_empty() {
        let list = n
            .snapshots
            .iter()
            .map(|s| QValue::Dict(snapshot_dict(s)))
            .collect();
        d.put("snapshots", QValue::List(list));
    }
    if let Some(f) = &n.format_specific {
        d.put("format-specific", QValue::Dict(format_specific_dict(f)));
    }
    let children = n
        .children
        .iter()
        .map(|(name, info)| {
            let mut c = QDict::new();
            c.put_str("name", name);
            c.put("info", QValue::Dict(node_dict(info)));
            QValue::Dict(c)
        })
        .collect();
    d.put("children", QValue::List(children));
    d
}

/// `--output=json`: one object, or a list of them with `--backing-chain`.
pub fn render_json(nodes: &[NodeInfo], chain: bool) -> String {
    let v = if chain {
        QValue::List(nodes.iter().map(|n| QValue::Dict(node_dict(n))).collect())
    } else {
        QValue::Dict(node_dict(&nodes[0]))
    };
    let mut s = to_json_pretty(&v);
    s.push('\n');
    s
}

// ---------------------------------------------------------------- human

/// Local time as `%Y-%m-%d %H:%M:%S`.
pub fn local_date(secs: i64) -> String {
    // SAFETY: localtime_r only writes into the zeroed struct we own (glibc reads TZ on
    // first use, as for C programs).
    let tm = unsafe {
        let t: libc::time_t = secs as libc::time_t;
        let mut tm: libc::tm = std::mem::zeroed();
        if libc::localtime_r(&t, &mut tm).is_null() {
            return "1970-01-01 00:00:00".to_string();
        }
        tm
    };
    format!(
        "{:04}-{:02}-{:02} {:02}:{:02}:{:02}",
        tm.tm_year + 1900,
        tm.tm_mon + 1,
        tm.tm_mday,
        tm.tm_hour,
        tm.tm_min,
        tm.tm_sec
    )
}

/// The header of a snapshot table (`bdrv_snapshot_dump(NULL)`), without newline.
pub fn snapshot_header() -> String {
    format!(
        "{:<7} {:<16} {:>8} {:>19} {:>15} {:>10}",
        "ID", "TAG", "VM_SIZE", "DATE", "VM_CLOCK", "ICOUNT"
    )
}

/// One row of a snapshot table, without newline; `date` is the formatted local date.
pub fn snapshot_row(s: &SnapshotInfo, date: &str) -> String {
    let secs = s.vm_clock_nsec / 1_000_000_000;
    let clock = format!(
        "{:04}:{:02}:{:02}.{:03}",
        secs / 3600,
        (secs / 60) % 60,
        secs % 60,
        (s.vm_clock_nsec / 1_000_000) % 1000
    );
    // QEMU's bdrv_snapshot_dump prints `--` for a snapshot without an icount.
    let icount = s
        .icount
        .map_or_else(|| "--".to_string(), |i| (i as i64).to_string());
    format!(
        "{:<7} {:<16} {:>8} {:>19} {:>15} {:>10}",
        s.id,
        s.name,
        size_to_str(s.vm_state_size),
        date,
        clock,
        icount
    )
}

/// A `Snapshot list:` block (heading, header, one row per snapshot), each line prefixed
/// with `ind`; `date` formats the dates. `info` and `snapshot -l` both print it.
pub fn snapshot_list(ind: &str, snaps: &[SnapshotInfo], date: &dyn Fn(i64) -> String) -> String {
    let mut out = format!("{ind}Snapshot list:\n{ind}{}\n", snapshot_header());
    for s in snaps {
        out.push_str(&format!(
            "{ind}{}\n",
            snapshot_row(s, &date(i64::from(s.date_sec)))
        ));
    }
    out
}

/// QEMU's `dump_qdict`: `key: value` lines, dashes in keys shown as spaces.
fn dump_qdict(out: &mut String, level: usize, d: &QDict) {
    for (k, v) in d.iter_qemu_order() {
        let composite = matches!(v, QValue::Dict(_) | QValue::List(_));
        out.push_str(&" ".repeat(level * 4));
        out.push_str(&k.replace('-', " "));
        out.push(':');
        out.push(if composite { '\n' } else { ' ' });
        dump_qobject(out, level + 1, v);
    }
}

fn dump_qobject(out: &mut String, level: usize, v: &QValue) {
    match v {
        QValue::Str(s) => {
            out.push_str(s);
            out.push('\n');
        }
        QValue::Int(i) => out.push_str(&format!("{i}\n")),
        QValue::Bool(b) => out.push_str(if *b { "true\n" } else { "false\n" }),
        QValue::Dict(d) => dump_qdict(out, level, d),
        QValue::List(items) => {
            for (i, item) in items.iter().enumerate() {
                let composite = matches!(item, QValue::Dict(_) | QValue::List(_));
                out.push_str(&format!(
                    "{}[{i}]:{}",
                    " ".repeat(level * 4),
                    if composite { '\n' } else { ' ' }
                ));
                dump_qobject(out, level + 1, item);
            }
        }
    }
}

/// One node in human form, `indent` levels deep (`protocol` for child nodes).
fn node_human(
    out: &mut String,
    n: &NodeInfo,
    level: usize,
    protocol: bool,
    date: &dyn Fn(i64) -> String,
) {
    let ind = " ".repeat(level * 4);
    let disk = n
        .actual_size
        .map(size_to_str)
        .unwrap_or_else(|| "unavailable".to_string());
    let (l1, l2, l3) = if protocol {
        ("filename", "protocol type", "file length")
    } else {
        ("image", "file format", "virtual size")
    };
    out.push_str(&format!("{ind}{l1}: {}\n", n.filename));
    out.push_str(&format!("{ind}{l2}: {}\n", n.format));
    out.push_str(&format!(
        "{ind}{l3}: {} ({} bytes)\n",
        size_to_str(n.virtual_size),
        n.virtual_size
    ));
    out.push_str(&format!("{ind}disk size: {disk}\n"));
    if n.encrypted == Some(true) {
        out.push_str(&format!("{ind}encrypted: yes\n"));
    }
    if let Some(c) = n.cluster_size {
        out.push_str(&format!("{ind}cluster_size: {c}\n"));
    }
    if n.dirty_flag == Some(true) {
        out.push_str(&format!("{ind}cleanly shut down: no\n"));
    }
    if let Some(b) = &n.backing_filename {
        out.push_str(&format!("{ind}backing file: {b}"));
        match &n.full_backing_filename {
            None => out.push_str(" (cannot determine actual path)"),
            Some(full) if full != b => out.push_str(&format!(" (actual path: {full})")),
            Some(_) => {}
        }
        out.push('\n');
        if let Some(f) = &n.backing_filename_format {
            out.push_str(&format!("{ind}backing file format: {f}\n"));
        }
    }
    if !n.snapshots.is_empty() {
        out.push_str(&snapshot_list(&ind, &n.snapshots, date));
    }
    if let Some(f) = &n.format_specific {
        let data = format_specific_data(f);
        if !data.is_empty() {
            out.push_str(&format!("{ind}Format specific information:\n"));
            dump_qdict(out, level + 1, &data);
        }
    }
}

/// A node and its children, as qemu-img's `dump_human_image_info`.
fn graph_human(
    out: &mut String,
    n: &NodeInfo,
    level: usize,
    path: Option<&str>,
    date: &dyn Fn(i64) -> String,
) {
    node_human(out, n, level, path.is_some(), date);
    for (name, child) in &n.children {
        let prefix = path.unwrap_or("");
        out.push_str(&format!(
            "{}Child node '{prefix}/{name}':\n",
            " ".repeat(level * 4)
        ));
        let child_path = format!("{prefix}/{name}");
        graph_human(out, child, level + 1, Some(&child_path), date);
    }
}

/// `--output=human`: images separated by a blank line. `date` formats snapshot dates.
pub fn render_human_with(nodes: &[NodeInfo], date: &dyn Fn(i64) -> String) -> String {
    let mut out = String::new();
    for (i, n) in nodes.iter().enumerate() {
        if i > 0 {
            out.push('\n');
        }
        graph_human(&mut out, n, 0, None, date);
    }
    out
}

/// `--output=human` with snapshot dates in local time.
pub fn render_human(nodes: &[NodeInfo]) -> String {
    render_human_with(nodes, &local_date)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The overlay from `qemu-img create -f qcow2 -b base.qcow2 -F qcow2 ov.qcow2` with two
    /// snapshots, as qemu-img 10.0.2 reported it.
    fn overlay() -> NodeInfo {
        let mut file = NodeInfo::new("ov.qcow2", "file", 459264);
        file.actual_size = Some(217088);
        file.format_specific = Some(FormatSpecific::File);
        let mut n = NodeInfo::new("ov.qcow2", "qcow2", 1073741824);
        n.actual_size = Some(217088);
        n.cluster_size = Some(65536);
        n.backing_filename = Some("base.qcow2".into());
        n.full_backing_filename = Some("base.qcow2".into());
        n.backing_filename_format = Some("qcow2".into());
        n.snapshots = vec![
            SnapshotInfo {
                id: "1".into(),
                name: "snap1".into(),
                vm_state_size: 0,
                date_sec: 1795556013,
                date_nsec: 660780000,
                vm_clock_nsec: 0,
                icount: Some(0),
            },
            SnapshotInfo {
                id: "2".into(),
                name: "a longer snapshot name".into(),
                vm_state_size: 0,
                date_sec: 1795556013,
                date_nsec: 667819000,
                vm_clock_nsec: 0,
                icount: Some(0),
            },
        ];
        n.format_specific = Some(FormatSpecific::Qcow2(Qcow2Info {
            compat: "1.1",
            compression_type: "zlib",
            lazy_refcounts: Some(false),
            refcount_bits: 16,
            corrupt: Some(false),
            extended_l2: Some(false),
            data_file: None,
            data_file_raw: None,
            bitmaps: Vec::new(),
        }));
        n.children = vec![("file".into(), file)];
        n
    }

    const HUMAN: &str = "image: ov.qcow2
file format: qcow2
virtual size: 1 GiB (1073741824 bytes)
disk size: 212 KiB
cluster_size: 65536
backing file: base.qcow2
backing file format: qcow2
Snapshot list:
ID      TAG               VM_SIZE                DATE        VM_CLOCK     ICOUNT
1       snap1                 0 B 2026-11-24 21:33:33  0000:00:00.000          0
2       a longer snapshot name      0 B 2026-11-24 21:33:33  0000:00:00.000          0
Format specific information:
    compat: 1.1
    compression type: zlib
    lazy refcounts: false
    refcount bits: 16
    corrupt: false
    extended l2: false
Child node '/file':
    filename: ov.qcow2
    protocol type: file
    file length: 448 KiB (459264 bytes)
    disk size: 212 KiB
";

    const JSON: &str = r#"{
    "children": [
        {
            "name": "file",
            "info": {
                "children": [
                ],
                "virtual-size": 459264,
                "filename": "ov.qcow2",
                "format": "file",
                "actual-size": 217088,
                "format-specific": {
                    "type": "file",
                    "data": {
                    }
                },
                "dirty-flag": false
            }
        }
    ],
    "backing-filename-format": "qcow2",
    "snapshots": [
        {
            "icount": 0,
            "vm-clock-nsec": 0,
            "name": "snap1",
            "date-sec": 1795556013,
            "date-nsec": 660780000,
            "vm-clock-sec": 0,
            "id": "1",
            "vm-state-size": 0
        },
        {
            "icount": 0,
            "vm-clock-nsec": 0,
            "name": "a longer snapshot name",
            "date-sec": 1795556013,
            "date-nsec": 667819000,
            "vm-clock-sec": 0,
            "id": "2",
            "vm-state-size": 0
        }
    ],
    "virtual-size": 1073741824,
    "filename": "ov.qcow2",
    "cluster-size": 65536,
    "format": "qcow2",
    "actual-size": 217088,
    "format-specific": {
        "type": "qcow2",
        "data": {
            "compat": "1.1",
            "compression-type": "zlib",
            "lazy-refcounts": false,
            "refcount-bits": 16,
            "corrupt": false,
            "extended-l2": false
        }
    },
    "full-backing-filename": "base.qcow2",
    "backing-filename": "base.qcow2",
    "dirty-flag": false
}
"#;

    fn fixed_date(_: i64) -> String {
        "2026-11-24 21:33:33".into()
    }

    #[test]
    fn human_matches_qemu() {
        assert_eq!(render_human_with(&[overlay()], &fixed_date), HUMAN);
    }

    #[test]
    fn json_matches_qemu() {
        assert_eq!(render_json(&[overlay()], false), JSON);
    }

    #[test]
    fn v2_and_raw_and_actual_path() {
        let mut n = overlay();
        n.snapshots.clear();
        n.backing_filename = Some("v2.qcow2".into());
        n.full_backing_filename = Some("sub/v2.qcow2".into());
        n.format_specific = Some(FormatSpecific::Qcow2(Qcow2Info {
            compat: "0.10",
            compression_type: "zlib",
            lazy_refcounts: None,
            refcount_bits: 16,
            corrupt: None,
            extended_l2: None,
            data_file: None,
            data_file_raw: None,
            bitmaps: Vec::new(),
        }));
        n.dirty_flag = Some(true);
        let h = render_human_with(&[n.clone()], &fixed_date);
        assert!(h.contains(
            "cluster_size: 65536\ncleanly shut down: no\nbacking file: v2.qcow2 (actual path: sub/v2.qcow2)\n"
        ));
        assert!(h.contains(
            "Format specific information:\n    compat: 0.10\n    compression type: zlib\n    refcount bits: 16\nChild"
        ));
        let j = render_json(&[n], false);
        assert!(j.contains(
            "\"data\": {\n            \"compat\": \"0.10\",\n            \"compression-type\": \"zlib\",\n            \"refcount-bits\": 16\n        }"
        ));
        assert!(j.ends_with("\"dirty-flag\": true\n}\n"));
    }

    #[test]
    fn snapshot_rows() {
        let s = SnapshotInfo {
            id: "10".into(),
            name: "x".into(),
            vm_state_size: 1572864,
            date_sec: 0,
            date_nsec: 0,
            vm_clock_nsec: 3_723_456_000_000,
            icount: None,
        };
        assert_eq!(
            snapshot_row(&s, "1970-01-01 00:00:00"),
            "10      x                 1.5 MiB 1970-01-01 00:00:00  0001:02:03.456         --"
        );
    }
}
