//! QEMU's command line for `vmm run`: the options qemu-kvm users type (`-m`, `-smp`,
//! `-name`, `-hda`..`-hdd`, `-drive`, `-snapshot`, `-kernel`/`-initrd`/`-append`, `-boot`,
//! `-nographic`, `-enable-kvm`, `-cpu host`, `-serial stdio`, the network options of
//! [`crate::qemu_net`], ...) rewritten into vmm's own
//! long options before those are parsed. An option vmm does not implement is refused by name.

use common::option_list::split;

use crate::qemu_net::NetArgs;

/// vmm's long options that take a value (their value is never read as a QEMU option).
const VALUE_OPTIONS: &[&str] = &[
    "--kernel",
    "--initrd",
    "--append",
    "--memory",
    "--cpus",
    "--drive",
    "--net",
    "--name",
    "--boot-entry",
    "--firmware",
];

/// QEMU options without an argument that vmm accepts and ignores, because it always
/// behaves that way (a serial console on stdio, KVM, exit instead of reboot, no default
/// devices).
const IGNORED: &[&str] = &[
    "-nographic",
    "-enable-kvm",
    "-no-reboot",
    "-nodefaults",
    "-no-user-config",
];

/// The arguments rewritten, and notes for stderr.
#[derive(Debug, Default, PartialEq, Eq)]
pub struct Rewritten {
    pub args: Vec<String>,
    pub notes: Vec<String>,
}

/// One disk from `-hdX`, `-drive` or a bare file name, before indexes are settled.
struct Disk {
    index: Option<usize>,
    /// vmm `--drive` options without `file=` (which is `file`).
    file: String,
    opts: Vec<String>,
    ide: bool,
}

/// Rewrite the arguments after `run`. vmm's `--long` options pass through untouched.
pub fn rewrite(args: &[String]) -> Result<Rewritten, String> {
    let mut out = Vec::new();
    let mut disks: Vec<Disk> = Vec::new();
    let mut snapshot_all = false;
    let mut net = NetArgs::default();
    let mut it = args.iter();
    while let Some(a) = it.next() {
        if a.starts_with("--") || a == "-h" || a == "-V" {
            out.push(a.clone());
            if VALUE_OPTIONS.contains(&a.as_str()) {
                out.extend(it.next().cloned());
            }
            continue;
        }
        if !a.starts_with('-') || a == "-" {
            // As in QEMU, a bare file name is the first IDE disk.
            disks.push(Disk::ide(0, a));
            continue;
        }
        if IGNORED.contains(&a.as_str()) {
            continue;
        }
        let mut value = || {
            it.next()
                .cloned()
                .ok_or_else(|| format!("{a}: requires an argument"))
        };
        let fail = |v: &str, msg: String| format!("{a} {v}: {msg}");
        match a.as_str() {
            "-m" => {
                let v = value()?;
                out.extend(["--memory".into(), memory(&v).map_err(|e| fail(&v, e))?]);
            }
            "-smp" => {
                let v = value()?;
                out.extend(["--cpus".into(), smp(&v).map_err(|e| fail(&v, e))?]);
            }
            "-name" => {
                let v = value()?;
                out.extend(["--name".into(), name(&v).map_err(|e| fail(&v, e))?]);
            }
            "-bios" => {
                let v = value()?;
                out.extend(["--firmware".into(), v]);
            }
            "-kernel" | "-initrd" | "-append" => {
                let v = value()?;
                out.extend([format!("-{a}"), v]);
            }
            "-hda" | "-hdb" | "-hdc" | "-hdd" => {
                let v = value()?;
                let index = usize::from(a.as_bytes()[3] - b'a');
                disks.push(Disk::ide(index, &v));
            }
            "-drive" => {
                let v = value()?;
                disks.push(drive(&v).map_err(|e| fail(&v, e))?);
            }
            "-net" | "-netdev" | "-nic" | "-device" => {
                let v = value()?;
                net.option(a, &v).map_err(|e| fail(&v, e))?;
            }
            "-snapshot" => snapshot_all = true,
            "-boot" => {
                let v = value()?;
                boot(&v).map_err(|e| fail(&v, e))?;
            }
            "-cpu" => {
                let v = value()?;
                let model = split(&v).into_iter().next().unwrap_or_default();
                if model != "host" && model != "max" {
                    return Err(fail(
                        &v,
                        "vmm gives the guest the host CPU (use -cpu host)".into(),
                    ));
                }
            }
            "-serial" => {
                let v = value()?;
                if v != "stdio" && v != "mon:stdio" {
                    return Err(fail(&v, "vmm's serial console is stdio only".into()));
                }
            }
            "-display" => {
                let v = value()?;
                if v != "none" {
                    return Err(fail(&v, "vmm has no display (use -display none)".into()));
                }
            }
            "-accel" => {
                let v = value()?;
                if split(&v).first().map(String::as_str) != Some("kvm") {
                    return Err(fail(&v, "vmm runs on KVM only (use -accel kvm)".into()));
                }
            }
            _ => return Err(format!("{a}: QEMU option not supported by vmm")),
        }
    }
    let mut notes = Vec::new();
    if disks.iter().any(|d| d.ide) {
        notes.push(
            "IDE disks (-hda..-hdd, if=ide) are served as virtio-blk (vda, vdb, ... in the guest)"
                .to_string(),
        );
    }
    for d in place(disks)? {
        let mut v = format!("file={}", d.file.replace(',', ",,"));
        for o in d.opts {
            v.push(',');
            v.push_str(&o);
        }
        if snapshot_all && !v.split(',').any(|o| o.starts_with("snapshot=")) {
            v.push_str(",snapshot=on");
        }
        out.extend(["--drive".into(), v]);
    }
    let (nets, net_notes) = net.finish()?;
    notes.extend(net_notes);
    for n in nets {
        out.extend(["--net".into(), n]);
    }
    Ok(Rewritten { args: out, notes })
}

impl Disk {
    fn ide(index: usize, file: &str) -> Disk {
        Disk {
            index: Some(index),
            file: file.to_string(),
            opts: vec![],
            ide: true,
        }
    }
}

/// Order the disks as the guest sees them: those with an index at that index, the others
/// in the free places, in command-line order (QEMU's rule for one bus).
fn place(disks: Vec<Disk>) -> Result<Vec<Disk>, String> {
    let mut slots: Vec<Option<Disk>> = Vec::new();
    let mut rest = Vec::new();
    for d in disks {
        match d.index {
            Some(i) => {
                if i >= 26 {
                    return Err(format!("drive index {i} is out of range (0 to 25)"));
                }
                if slots.len() <= i {
                    slots.resize_with(i + 1, || None);
                }
                if slots[i].is_some() {
                    return Err(format!("two drives have index {i}"));
                }
                slots[i] = Some(d);
            }
            None => rest.push(d),
        }
    }
    let mut rest = rest.into_iter();
    for s in slots.iter_mut().filter(|s| s.is_none()) {
        *s = rest.next();
    }
    let placed: Vec<Disk> = slots.into_iter().flatten().chain(rest).collect();
    Ok(placed)
}

/// `-m SIZE` or `-m size=SIZE` (a bare number is MiB, as vmm's --memory).
fn memory(v: &str) -> Result<String, String> {
    let mut size = None;
    for (i, p) in split(v).into_iter().enumerate() {
        match p.split_once('=') {
            Some(("size", s)) => size = Some(s.to_string()),
            None if i == 0 => size = Some(p),
            Some((k, _)) => return Err(format!("option '{k}' is not supported by vmm")),
            None => return Err(format!("invalid option '{p}'")),
        }
    }
    size.filter(|s| !s.is_empty())
        .ok_or_else(|| "no memory size".to_string())
}

/// `-smp [cpus=]N[,sockets=S][,dies=D][,clusters=C][,cores=C][,threads=T][,maxcpus=M]`: the
/// vCPU count, which a topology without `cpus` gives as the product of its levels.
fn smp(v: &str) -> Result<String, String> {
    let mut cpus = None;
    let mut maxcpus = None;
    let mut product: Option<u64> = None;
    // sockets, cores and threads all given: QEMU has no level left to fill in.
    let mut main_levels = 0;
    for (i, p) in split(v).into_iter().enumerate() {
        let (k, val) = match p.split_once('=') {
            Some(kv) => kv,
            None if i == 0 => ("cpus", p.as_str()),
            None => return Err(format!("invalid option '{p}'")),
        };
        let n: u64 = val
            .parse()
            .ok()
            .filter(|&n| n > 0)
            .ok_or_else(|| format!("invalid value '{val}' for '{k}'"))?;
        match k {
            "cpus" => cpus = Some(n),
            "maxcpus" => maxcpus = Some(n),
            "sockets" | "dies" | "clusters" | "modules" | "books" | "drawers" | "cores"
            | "threads" => {
                main_levels += usize::from(matches!(k, "sockets" | "cores" | "threads"));
                product = Some(product.unwrap_or(1).saturating_mul(n));
            }
            _ => return Err(format!("option '{k}' is not supported by vmm")),
        }
    }
    let max = maxcpus.or(cpus).or(product).unwrap_or(1);
    let cpus = cpus.unwrap_or(max);
    if let Some(p) = product {
        if (main_levels == 3 && p != max) || max % p != 0 {
            return Err(format!(
                "Invalid CPU topology: product of the hierarchy ({p}) must match maxcpus ({max})"
            ));
        }
    }
    if max != cpus {
        return Err(format!(
            "maxcpus={max} above cpus={cpus} (CPU hotplug) is not supported by vmm"
        ));
    }
    Ok(cpus.to_string())
}

/// `-name NAME` or `-name guest=NAME[,process=..][,debug-threads=..]`.
fn name(v: &str) -> Result<String, String> {
    let mut name = None;
    for (i, p) in split(v).into_iter().enumerate() {
        match p.split_once('=') {
            Some(("guest", n)) => name = Some(n.to_string()),
            Some(("process" | "debug-threads", _)) => {}
            None if i == 0 => name = Some(p),
            Some((k, _)) => return Err(format!("option '{k}' is not supported by vmm")),
            None => return Err(format!("invalid option '{p}'")),
        }
    }
    name.ok_or_else(|| "no name".to_string())
}

/// `-boot [order=]c[,once=c][,menu=on|off][,strict=..][,splash-time=..]`: vmm boots the
/// first disk, so only `c` (hard disk) is an order it can follow.
fn boot(v: &str) -> Result<(), String> {
    for (i, p) in split(v).into_iter().enumerate() {
        let (k, val) = match p.split_once('=') {
            Some(kv) => kv,
            None if i == 0 => ("order", p.as_str()),
            None => return Err(format!("invalid option '{p}'")),
        };
        match k {
            "order" | "once" => {
                if val.is_empty() || val.chars().any(|c| c != 'c') {
                    return Err(format!(
                        "vmm boots from the first disk only ({k}=c), not '{val}'"
                    ));
                }
            }
            "menu" | "strict" | "splash-time" | "reboot-timeout" | "splash" => {}
            _ => return Err(format!("option '{k}' is not supported by vmm")),
        }
    }
    Ok(())
}

/// `-drive file=..[,if=virtio|ide][,media=disk][,format=..][,cache=..][,readonly=on]
/// [,snapshot=on][,index=N][,id=..][,serial=..][,aio=..][,discard=..]`.
fn drive(v: &str) -> Result<Disk, String> {
    let mut d = Disk {
        index: None,
        file: String::new(),
        opts: vec![],
        ide: false,
    };
    let mut have_file = false;
    for p in split(v) {
        let Some((k, val)) = p.split_once('=') else {
            return Err(format!("invalid option '{p}' (expected key=value)"));
        };
        match k {
            "file" => {
                d.file = val.to_string();
                have_file = true;
            }
            "if" => match val {
                "virtio" => {}
                "ide" => d.ide = true,
                _ => return Err(format!("if={val} is not supported by vmm (virtio or ide)")),
            },
            "media" if val == "disk" => {}
            "media" => return Err(format!("media={val} is not supported by vmm (disk only)")),
            "index" => d.index = Some(val.parse().map_err(|_| format!("invalid index '{val}'"))?),
            "id" | "aio" | "discard" | "detect-zeroes" => {}
            "format" | "cache" | "readonly" | "snapshot" | "serial" => d.opts.push(p.clone()),
            _ => return Err(format!("option '{k}' is not supported by vmm")),
        }
    }
    if !have_file {
        return Err("no file= (a drive without a medium is not supported by vmm)".into());
    }
    Ok(d)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn rw(s: &[&str]) -> Result<Rewritten, String> {
        rewrite(&s.iter().map(|a| a.to_string()).collect::<Vec<_>>())
    }

    fn args(s: &[&str]) -> Vec<String> {
        rw(s).unwrap().args
    }

    #[test]
    fn memory_cpus_name() {
        assert_eq!(args(&["-m", "128"]), ["--memory", "128"]);
        assert_eq!(args(&["-m", "size=2G"]), ["--memory", "2G"]);
        assert!(rw(&["-m", "1G,maxmem=4G"]).unwrap_err().contains("maxmem"));
        assert_eq!(args(&["-smp", "2"]), ["--cpus", "2"]);
        assert_eq!(
            args(&["-smp", "4,sockets=1,cores=2,threads=2"]),
            ["--cpus", "4"]
        );
        assert_eq!(args(&["-smp", "sockets=2,cores=3"]), ["--cpus", "6"]);
        assert_eq!(args(&["-smp", "cpus=4,sockets=2"]), ["--cpus", "4"]);
        assert!(rw(&["-smp", "4,sockets=1,cores=2,threads=1"])
            .unwrap_err()
            .contains("topology"));
        assert!(rw(&["-smp", "2,maxcpus=4"])
            .unwrap_err()
            .contains("hotplug"));
        assert!(rw(&["-smp", "x"]).is_err());
        assert_eq!(args(&["-name", "test"]), ["--name", "test"]);
        assert_eq!(
            args(&["-name", "guest=t,debug-threads=on"]),
            ["--name", "t"]
        );
    }

    #[test]
    fn disks_in_index_order() {
        let r = rw(&[
            "-hdb",
            "b.img",
            "-drive",
            "file=v,,1.qcow2,format=qcow2,cache=none",
            "-hda",
            "a.img",
        ])
        .unwrap();
        assert_eq!(
            r.args,
            [
                "--drive",
                "file=a.img",
                "--drive",
                "file=b.img",
                "--drive",
                "file=v,,1.qcow2,format=qcow2,cache=none"
            ]
        );
        assert_eq!(r.notes.len(), 1, "{:?}", r.notes);
        let r = rw(&[
            "-drive",
            "file=x,if=virtio,media=disk,readonly=on,index=1",
            "-drive",
            "file=y,id=d0,snapshot=off",
            "-snapshot",
        ])
        .unwrap();
        assert_eq!(
            r.args,
            [
                "--drive",
                "file=y,snapshot=off",
                "--drive",
                "file=x,readonly=on,snapshot=on"
            ]
        );
        assert!(r.notes.is_empty());
        assert_eq!(args(&["disk.qcow2"]), ["--drive", "file=disk.qcow2"]);
        assert!(rw(&["-hda", "a", "-drive", "file=b,index=0"])
            .unwrap_err()
            .contains("index 0"));
        assert!(rw(&["-drive", "file=x,if=scsi"])
            .unwrap_err()
            .contains("if=scsi"));
        assert!(rw(&["-drive", "file=x,media=cdrom"]).is_err());
        assert!(rw(&["-drive", "if=virtio"]).is_err());
        assert!(rw(&["-drive", "file=x,bogus=1"])
            .unwrap_err()
            .contains("bogus"));
    }

    #[test]
    fn nics() {
        let r = rw(&[
            "-net",
            "nic,model=virtio,macaddr=52:54:00:00:00:01",
            "-net",
            "tap,ifname=vif0,script=/etc/qemu-ifup,downscript=no",
        ])
        .unwrap();
        assert_eq!(
            r.args,
            [
                "--net",
                "tap,ifname=vif0,script=/etc/qemu-ifup,downscript=no,mac=52:54:00:00:00:01"
            ]
        );
        assert!(r.notes.is_empty(), "{:?}", r.notes);
        // QEMU's default scripts, NICs in command-line order, a comma in a path kept.
        let r = rw(&[
            "-netdev",
            "tap,id=n0",
            "-netdev",
            "tap,id=n1,ifname=t1,script=/a,,b,vhost=off",
            "-device",
            "virtio-net-pci,netdev=n1,mac=52:54:00:00:00:02,id=x",
            "-device",
            "virtio-net-pci,netdev=n0",
        ])
        .unwrap();
        assert_eq!(
            r.args,
            [
                "--net",
                "tap,ifname=t1,script=/a,,b,downscript=/etc/qemu-ifdown,mac=52:54:00:00:00:02",
                "--net",
                "tap,script=/etc/qemu-ifup,downscript=/etc/qemu-ifdown"
            ]
        );
        // fd= runs no script, as in QEMU; -nic; a NIC without a model gets a note.
        let r = rw(&["-nic", "tap,fd=5,mac=52:54:00:00:00:03"]).unwrap();
        assert_eq!(r.args, ["--net", "tap,fd=5,mac=52:54:00:00:00:03"]);
        assert_eq!(r.notes.len(), 1, "{:?}", r.notes);
        assert!(rw(&["-net", "none"]).unwrap().args.is_empty());
        for (a, mention) in [
            (&["-net", "nic,model=e1000", "-net", "tap"][..], "'e1000'"),
            (&["-nic", "tap,model=rtl8139"], "'rtl8139'"),
            (&["-nic", "user"], "'user'"),
            (&["-netdev", "user,id=n0"], "'user'"),
            (&["-netdev", "tap"], "'id'"),
            (&["-netdev", "tap,id=n0,vhost=on"], "vhost"),
            (&["-netdev", "tap,id=n0,helper=/x"], "'helper'"),
            (
                &["-netdev", "tap,id=n0", "-netdev", "tap,id=n0"],
                "Duplicate",
            ),
            (&["-device", "e1000,netdev=n0"], "'e1000'"),
            (&["-device", "virtio-net-pci"], "netdev="),
            (&["-device", "virtio-net-pci,netdev=n9"], "'n9'"),
            (&["-netdev", "tap,id=n0"], "not used"),
            (
                &[
                    "-netdev",
                    "tap,id=n0",
                    "-device",
                    "virtio-net-pci,netdev=n0",
                    "-device",
                    "virtio-net-pci,netdev=n0",
                ],
                "in use",
            ),
            (&["-net", "nic"], "-net tap"),
            (&["-net", "tap"], "-net nic"),
            (
                &["-net", "nic", "-net", "nic", "-net", "tap", "-net", "tap"],
                "-netdev",
            ),
        ] {
            let e = rw(a).unwrap_err();
            assert!(e.contains(mention) && !e.contains('\n'), "{a:?}: {e}");
        }
    }

    #[test]
    fn accepted_and_refused() {
        assert_eq!(
            args(&[
                "-nographic",
                "-enable-kvm",
                "-cpu",
                "host",
                "-serial",
                "stdio",
                "-boot",
                "order=c,menu=off",
                "-kernel",
                "k",
                "-initrd",
                "i",
                "-append",
                "-x console=ttyS0"
            ]),
            [
                "--kernel",
                "k",
                "--initrd",
                "i",
                "--append",
                "-x console=ttyS0"
            ]
        );
        // vmm's own options, and their values, are left alone.
        assert_eq!(
            args(&["--append", "-vnc", "--memory=1G", "-h"]),
            ["--append", "-vnc", "--memory=1G", "-h"]
        );
        for (a, mention) in [
            (&["-vnc", ":1"][..], "-vnc"),
            (&["-net", "user"], "-net user"),
            (&["-cdrom", "x.iso"], "-cdrom"),
            (&["-boot", "d"], "'d'"),
            (&["-cpu", "qemu64"], "-cpu qemu64"),
            (&["-serial", "pty"], "stdio"),
            (&["-m"], "requires an argument"),
        ] {
            let e = rw(a).unwrap_err();
            assert!(e.contains(mention) && !e.contains('\n'), "{a:?}: {e}");
        }
    }
}
