//! The VM description built from the command line.

use std::path::PathBuf;

use common::format::Format;

/// Most vCPUs we describe to the guest.
pub const MAX_CPUS: u8 = 64;

/// Host cache mode requested with `cache=`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum CacheMode {
    #[default]
    Writeback,
    /// Host page cache bypassed (O_DIRECT).
    None,
    /// Every write reaches the disk before it completes.
    Writethrough,
    /// Both: O_DIRECT and every write durable.
    DirectSync,
    /// Guest flushes ignored.
    Unsafe,
}

/// One `--drive`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DriveConfig {
    pub path: PathBuf,
    /// The image format requested with `format=` (probed when not given).
    pub format: Option<Format>,
    pub read_only: bool,
    pub snapshot: bool,
    pub cache: CacheMode,
    pub serial: Option<String>,
}

/// Everything `vmm run` was asked for.
#[derive(Debug, Clone)]
pub struct VmConfig {
    /// None: boot the first disk's own boot entry.
    pub kernel: Option<PathBuf>,
    /// `--firmware`: boot the first disk through this BIOS image instead.
    pub firmware: Option<PathBuf>,
    /// `--boot-entry`: which entry of the disk (number or title).
    pub boot_entry: Option<String>,
    /// `--list-boot-entries`: print the disk's entries instead of booting.
    pub list_boot_entries: bool,
    pub initrd: Option<PathBuf>,
    pub cmdline: String,
    pub memory: u64,
    pub cpus: u8,
    pub drives: Vec<DriveConfig>,
    pub nets: Vec<NetConfig>,
    pub name: Option<String>,
}

/// Where a NIC's tap comes from.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum TapSource {
    /// Attach to (or create) the tap of this name; empty: the kernel names a new one.
    Name(String),
    /// An open tap file descriptor handed over by a management layer.
    Fd(i32),
}

/// One `--net`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NetConfig {
    pub tap: TapSource,
    /// Run with the interface name once the tap is open.
    pub script: Option<PathBuf>,
    /// Run with the interface name when vmm exits.
    pub downscript: Option<PathBuf>,
    pub mac: Option<[u8; 6]>,
}

/// Parse a MAC address `xx:xx:xx:xx:xx:xx` (or with `-`); multicast ones are refused, as
/// QEMU does.
pub fn parse_mac(s: &str) -> Result<[u8; 6], String> {
    let err = || format!("invalid MAC address '{s}'");
    let parts: Vec<&str> = s.split([':', '-']).collect();
    if parts.len() != 6 {
        return Err(err());
    }
    let mut mac = [0u8; 6];
    for (m, p) in mac.iter_mut().zip(parts) {
        if p.len() != 2 {
            return Err(err());
        }
        *m = u8::from_str_radix(p, 16).map_err(|_| err())?;
    }
    if mac[0] & 1 != 0 {
        return Err(format!("MAC address '{s}' is a multicast address"));
    }
    Ok(mac)
}

/// The MAC of each NIC: its own, or QEMU's defaults 52:54:00:12:34:56, :57, ... skipping
/// those another NIC was given, so that every NIC of the VM has a different one.
pub fn nic_macs(nets: &[NetConfig]) -> Vec<[u8; 6]> {
    let mut next = 0x56u32;
    let mut out = Vec::new();
    for n in nets {
        let mac = n.mac.unwrap_or_else(|| loop {
            let mac = [0x52, 0x54, 0x00, 0x12, 0x34 + (next >> 8) as u8, next as u8];
            next += 1;
            if !nets.iter().any(|o| o.mac == Some(mac)) {
                break mac;
            }
        });
        out.push(mac);
    }
    out
}

fn script_path(v: &str) -> Option<PathBuf> {
    (!v.is_empty() && v != "no").then(|| PathBuf::from(v))
}

/// Parse a `--net` value: `tap[,ifname=NAME][,script=PATH|no][,downscript=PATH|no]
/// [,mac=MAC][,fd=N]`. Without `script=` / `downscript=` no script runs.
pub fn parse_net(s: &str) -> Result<NetConfig, String> {
    let parts = common::option_list::split(s);
    let mut parts = parts.into_iter();
    match parts.next().as_deref() {
        Some("tap") => {}
        Some(other) => {
            return Err(format!(
                "unsupported network backend '{other}' (vmm has tap only)"
            ))
        }
        None => return Err("empty --net".into()),
    }
    let mut ifname = None;
    let mut fd = None;
    let mut n = NetConfig {
        tap: TapSource::Name(String::new()),
        script: None,
        downscript: None,
        mac: None,
    };
    for p in parts {
        let Some((k, v)) = p.split_once('=') else {
            return Err(format!("invalid net option '{p}' (expected key=value)"));
        };
        match k {
            "ifname" => ifname = Some(v.to_string()),
            "script" => n.script = script_path(v),
            "downscript" => n.downscript = script_path(v),
            "mac" => n.mac = Some(parse_mac(v)?),
            "fd" => {
                fd = Some(
                    v.parse::<i32>()
                        .ok()
                        .filter(|&f| f >= 0)
                        .ok_or_else(|| format!("invalid tap fd '{v}'"))?,
                )
            }
            _ => return Err(format!("unknown net option '{k}'")),
        }
    }
    if let Some(fd) = fd {
        if ifname.is_some() || n.script.is_some() || n.downscript.is_some() {
            return Err("ifname=, script= and downscript= are invalid with fd=".into());
        }
        n.tap = TapSource::Fd(fd);
    } else if let Some(name) = ifname {
        n.tap = TapSource::Name(name);
    }
    Ok(n)
}

/// Parse a vCPU count: one message, with the real range, for every bad value.
pub fn parse_cpus(s: &str) -> Result<u8, String> {
    s.trim()
        .parse::<u32>()
        .ok()
        .filter(|n| (1..=u32::from(MAX_CPUS)).contains(n))
        .map(|n| n as u8)
        .ok_or_else(|| format!("invalid CPU count '{s}' (vmm runs 1 to {MAX_CPUS} vCPUs)"))
}

/// Parse a memory size with a K/M/G/T (binary units) or B suffix; a bare number is MiB,
/// like QEMU's `-m`.
pub fn parse_memory(s: &str) -> Result<u64, String> {
    let t = s.trim();
    let err = || format!("invalid memory size '{s}'");
    if t.is_empty() {
        return Err(err());
    }
    let (num, mult) = match t.chars().last().unwrap().to_ascii_uppercase() {
        'K' => (&t[..t.len() - 1], 1u64 << 10),
        'M' => (&t[..t.len() - 1], 1 << 20),
        'G' => (&t[..t.len() - 1], 1 << 30),
        'T' => (&t[..t.len() - 1], 1 << 40),
        'B' => (&t[..t.len() - 1], 1),
        _ => (t, 1 << 20),
    };
    let n: u64 = num.parse().map_err(|_| err())?;
    let bytes = n.checked_mul(mult).ok_or_else(err)?;
    if bytes < (32 << 20) {
        return Err(format!("memory size '{s}' is too small (minimum 32M)"));
    }
    if bytes % 4096 != 0 {
        return Err(format!("memory size '{s}' is not a multiple of 4K"));
    }
    Ok(bytes)
}

fn on_off(key: &str, v: &str) -> Result<bool, String> {
    match v {
        "on" | "yes" | "true" | "1" => Ok(true),
        "off" | "no" | "false" | "0" => Ok(false),
        _ => Err(format!(
            "invalid value '{v}' for drive option '{key}' (use on or off)"
        )),
    }
}

/// Parse a `--drive` value: `file=PATH[,format=..][,readonly=on][,snapshot=on][,cache=..]`.
/// A comma inside the path is written `,,` as in QEMU.
pub fn parse_drive(s: &str) -> Result<DriveConfig, String> {
    let parts = common::option_list::split(s);
    let mut d = DriveConfig {
        path: PathBuf::new(),
        format: None,
        read_only: false,
        snapshot: false,
        cache: CacheMode::default(),
        serial: None,
    };
    let mut have_file = false;
    for p in parts {
        let Some((k, v)) = p.split_once('=') else {
            return Err(format!("invalid drive option '{p}' (expected key=value)"));
        };
        match k {
            "file" => {
                if v.is_empty() {
                    return Err("drive option 'file' is empty".into());
                }
                d.path = PathBuf::from(v);
                have_file = true;
            }
            "format" => {
                d.format = Some(
                    Format::from_name(v).map_err(|_| format!("unsupported drive format '{v}'"))?,
                )
            }
            "readonly" => d.read_only = on_off(k, v)?,
            "snapshot" => d.snapshot = on_off(k, v)?,
            "cache" => {
                d.cache = match v {
                    "writeback" => CacheMode::Writeback,
                    "none" => CacheMode::None,
                    "writethrough" => CacheMode::Writethrough,
                    "directsync" => CacheMode::DirectSync,
                    "unsafe" => CacheMode::Unsafe,
                    _ => {
                        return Err(format!(
                            "invalid cache mode '{v}' (use writeback, none, writethrough, \
                             directsync or unsafe)"
                        ))
                    }
                }
            }
            "serial" => {
                if v.len() > 20 {
                    return Err(format!("drive serial '{v}' is longer than 20 bytes"));
                }
                d.serial = Some(v.to_string())
            }
            "if" if v == "virtio" => {}
            _ => return Err(format!("unknown drive option '{k}'")),
        }
    }
    if !have_file {
        return Err(format!("drive '{s}' has no file="));
    }
    Ok(d)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn memory_sizes() {
        assert_eq!(parse_memory("512M").unwrap(), 512 << 20);
        assert_eq!(parse_memory("1G").unwrap(), 1 << 30);
        assert_eq!(parse_memory("256").unwrap(), 256 << 20);
        assert!(parse_memory("1K").is_err());
        assert!(parse_memory("abc").is_err());
        assert!(parse_memory("99999999999999T").is_err());
    }

    #[test]
    fn cpu_counts() {
        assert_eq!(parse_cpus("1"), Ok(1));
        assert_eq!(parse_cpus("64"), Ok(64));
        let zero = parse_cpus("0").unwrap_err();
        let big = parse_cpus("1000").unwrap_err();
        assert_eq!(zero.replace("'0'", "'1000'"), big);
        assert!(big.contains("1 to 64"), "{big}");
        assert!(parse_cpus("x").is_err() && parse_cpus("-1").is_err());
    }

    #[test]
    fn drives() {
        let d = parse_drive("file=/a,,b.img,format=qcow2,readonly=on,cache=none").unwrap();
        assert_eq!(d.path, PathBuf::from("/a,b.img"));
        assert_eq!(d.format, Some(Format::Qcow2));
        assert!(d.read_only);
        assert_eq!(d.cache, CacheMode::None);
        assert!(parse_drive("format=raw").is_err());
        assert!(parse_drive("file=x,bogus=1").is_err());
        assert!(parse_drive("file=x,snapshot=maybe").is_err());
        assert!(parse_drive("file=x,snapshot=on").unwrap().snapshot);
    }

    #[test]
    fn nets() {
        let n =
            parse_net("tap,ifname=vif0,script=/a,,b,downscript=no,mac=52:54:00:AB:cd:01").unwrap();
        assert_eq!(n.tap, TapSource::Name("vif0".into()));
        assert_eq!(n.script, Some(PathBuf::from("/a,b")));
        assert_eq!(n.downscript, None);
        assert_eq!(n.mac, Some([0x52, 0x54, 0, 0xab, 0xcd, 1]));
        let n = parse_net("tap,fd=7").unwrap();
        assert_eq!(n.tap, TapSource::Fd(7));
        assert_eq!(n.script, None);
        assert_eq!(
            parse_net("tap").unwrap().tap,
            TapSource::Name(String::new())
        );
        for (bad, mention) in [
            ("user", "'user'"),
            ("tap,fd=3,ifname=x", "fd="),
            ("tap,fd=3,script=/x", "fd="),
            ("tap,fd=-1", "fd"),
            ("tap,mac=01:00:5e:00:00:01", "multicast"),
            ("tap,mac=52:54:00:00:00", "invalid MAC"),
            ("tap,mac=52:54:00:00:00:0g", "invalid MAC"),
            ("tap,vhost=on", "vhost"),
            ("tap,ifname", "key=value"),
        ] {
            let e = parse_net(bad).unwrap_err();
            assert!(e.contains(mention), "{bad}: {e}");
        }
    }

    #[test]
    fn default_macs_differ_per_nic() {
        let net = |mac: Option<[u8; 6]>| NetConfig {
            tap: TapSource::Name(String::new()),
            script: None,
            downscript: None,
            mac,
        };
        let taken = [0x52, 0x54, 0, 0x12, 0x34, 0x57];
        let macs = nic_macs(&[net(None), net(Some(taken)), net(None), net(None)]);
        assert_eq!(
            macs,
            [
                [0x52, 0x54, 0, 0x12, 0x34, 0x56],
                taken,
                [0x52, 0x54, 0, 0x12, 0x34, 0x58],
                [0x52, 0x54, 0, 0x12, 0x34, 0x59],
            ]
        );
        let many = nic_macs(&vec![net(None); 300]);
        let mut uniq = many.clone();
        uniq.sort();
        uniq.dedup();
        assert_eq!(uniq.len(), 300);
    }
}
