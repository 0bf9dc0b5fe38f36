//! QEMU's network options for `vmm run`: `-net nic` + `-net tap`, `-netdev tap` +
//! `-device virtio-net-pci`, and `-nic tap`, rewritten into vmm's `--net tap,...` values.
//! As in QEMU, a tap given by name runs /etc/qemu-ifup and /etc/qemu-ifdown unless
//! `script=` / `downscript=` say otherwise.

use common::option_list::split;

use crate::net_script::{DEFAULT_DOWNSCRIPT, DEFAULT_SCRIPT};

/// A NIC: its model was checked; its tap is named by netdev id or comes from the hub.
struct Nic {
    mac: Option<String>,
    netdev: Option<String>,
    /// No model given: QEMU's would be an e1000.
    default_model: bool,
}

/// The network options seen so far.
#[derive(Default)]
pub struct NetArgs {
    nics: Vec<Nic>,
    /// `-net tap` backends (on QEMU's hub 0), as vmm `--net` values.
    hub_taps: Vec<String>,
    /// `-netdev tap` backends: id and vmm `--net` value.
    netdevs: Vec<(String, String)>,
    /// `-net none`.
    none: bool,
}

/// `--net` value escaping: a comma inside a value is doubled.
fn esc(v: &str) -> String {
    v.replace(',', ",,")
}

/// A tap backend's options (after the `tap` type) as a vmm `--net` value, and its id.
fn tap(opts: &[String]) -> Result<(String, Option<String>), String> {
    let mut out = vec!["tap".to_string()];
    let mut id = None;
    let (mut script, mut downscript, mut fd) = (false, false, false);
    for p in opts {
        let (k, v) = p
            .split_once('=')
            .ok_or_else(|| format!("invalid option '{p}' (expected key=value)"))?;
        match k {
            "id" | "name" => id = Some(v.to_string()),
            "ifname" | "script" | "downscript" | "fd" => {
                script |= k == "script";
                downscript |= k == "downscript";
                fd |= k == "fd";
                out.push(format!("{k}={}", esc(v)));
            }
            "vhost" | "vnet_hdr" if matches!(v, "off" | "no") => {}
            "vnet_hdr" => {}
            "queues" if v == "1" => {}
            "vhost" | "vhostforce" | "vhostfd" | "vhostfds" => {
                return Err("vhost-net is not supported by vmm (its virtio-net is in vmm)".into())
            }
            _ => return Err(format!("tap option '{k}' is not supported by vmm")),
        }
    }
    if !fd {
        if !script {
            out.push(format!("script={DEFAULT_SCRIPT}"));
        }
        if !downscript {
            out.push(format!("downscript={DEFAULT_DOWNSCRIPT}"));
        }
    }
    Ok((out.join(","), id))
}

/// The backend type of a `-net`/`-netdev`/`-nic` value, refused unless it is `tap`.
fn tap_type(parts: &[String]) -> Result<(), String> {
    match parts.first().map(String::as_str) {
        Some("tap") => Ok(()),
        Some(t) => Err(format!(
            "network backend '{t}' is not supported by vmm (tap only)"
        )),
        None => Err("no network backend type".into()),
    }
}

/// A NIC model: virtio-net only.
fn model(m: &str) -> Result<(), String> {
    match m {
        "virtio" | "virtio-net-pci" | "virtio-net" => Ok(()),
        _ => Err(format!(
            "NIC model '{m}' is not supported by vmm (virtio only)"
        )),
    }
}

impl NetArgs {
    /// Take one `-net`, `-netdev`, `-nic` or `-device` value.
    pub fn option(&mut self, opt: &str, v: &str) -> Result<(), String> {
        let parts = split(v);
        match opt {
            "-net" if parts.first().map(String::as_str) == Some("none") && parts.len() == 1 => {
                self.none = true
            }
            "-net" if parts.first().map(String::as_str) == Some("nic") => {
                let mut nic = Nic {
                    mac: None,
                    netdev: None,
                    default_model: true,
                };
                for p in &parts[1..] {
                    match p.split_once('=') {
                        Some(("model", m)) => {
                            model(m)?;
                            nic.default_model = false;
                        }
                        Some(("macaddr", m)) => nic.mac = Some(m.to_string()),
                        Some(("netdev", n)) => nic.netdev = Some(n.to_string()),
                        Some(("id" | "name" | "addr", _)) => {}
                        Some((k, _)) => {
                            return Err(format!("option '{k}' is not supported by vmm"))
                        }
                        None => return Err(format!("invalid option '{p}' (expected key=value)")),
                    }
                }
                self.nics.push(nic);
            }
            "-net" => {
                tap_type(&parts)?;
                self.hub_taps.push(tap(&parts[1..])?.0);
            }
            "-netdev" => {
                tap_type(&parts)?;
                let (value, id) = tap(&parts[1..])?;
                let id = id
                    .filter(|i| !i.is_empty())
                    .ok_or("Parameter 'id' is missing")?;
                if self.netdevs.iter().any(|(i, _)| *i == id) {
                    return Err(format!("Duplicate ID '{id}' for netdev"));
                }
                self.netdevs.push((id, value));
            }
            "-nic" => {
                tap_type(&parts)?;
                let mut rest = Vec::new();
                let mut nic = Nic {
                    mac: None,
                    netdev: None,
                    default_model: true,
                };
                for p in &parts[1..] {
                    match p.split_once('=') {
                        Some(("model", m)) => {
                            model(m)?;
                            nic.default_model = false;
                        }
                        Some(("mac", m)) => nic.mac = Some(m.to_string()),
                        _ => rest.push(p.clone()),
                    }
                }
                // A NIC with its own backend, as QEMU's -nic.
                let id = format!("\u{0}nic{}", self.nics.len());
                self.netdevs.push((id.clone(), tap(&rest)?.0));
                nic.netdev = Some(id);
                self.nics.push(nic);
            }
            "-device" => {
                let driver = parts.first().map(String::as_str).unwrap_or_default();
                if !matches!(driver, "virtio-net-pci" | "virtio-net") {
                    return Err(format!(
                        "device '{driver}' is not supported by vmm (virtio-net-pci only; disks \
                         are -drive)"
                    ));
                }
                let mut nic = Nic {
                    mac: None,
                    netdev: None,
                    default_model: false,
                };
                for p in &parts[1..] {
                    match p.split_once('=') {
                        Some(("mac", m)) => nic.mac = Some(m.to_string()),
                        Some(("netdev", n)) => nic.netdev = Some(n.to_string()),
                        Some(("id" | "bus" | "addr", _)) => {}
                        Some((k, _)) => {
                            return Err(format!("property '{k}' is not supported by vmm"))
                        }
                        None => return Err(format!("invalid option '{p}' (expected key=value)")),
                    }
                }
                if nic.netdev.is_none() {
                    return Err("virtio-net-pci without netdev= has no network in vmm".into());
                }
                self.nics.push(nic);
            }
            _ => unreachable!("not a network option: {opt}"),
        }
        Ok(())
    }

    /// The `--net` values, one per NIC in command-line order, and notes for stderr.
    pub fn finish(mut self) -> Result<(Vec<String>, Vec<String>), String> {
        let mut notes = Vec::new();
        let hub_nics = self.nics.iter().filter(|n| n.netdev.is_none()).count();
        match (hub_nics, self.hub_taps.len()) {
            (0, 0) | (1, 1) => {}
            (n, t) if n > 1 || t > 1 => {
                return Err(
                    "vmm pairs one -net nic with one -net tap (no hub): give several \
                     NICs as -netdev tap,id=ID -device virtio-net-pci,netdev=ID"
                        .into(),
                )
            }
            (0, _) => return Err("-net tap without a -net nic: no NIC would use it".into()),
            _ => {
                return Err("-net nic without a -net tap: vmm's only network backend is tap".into())
            }
        }
        if self.none && !self.nics.is_empty() {
            return Err("-net none together with a NIC".into());
        }
        if self.nics.iter().any(|n| n.default_model) {
            notes.push("NICs without a model (an e1000 in QEMU) are served as virtio-net".into());
        }
        let mut used = vec![false; self.netdevs.len()];
        let mut out = Vec::new();
        for nic in &self.nics {
            let mut value = match &nic.netdev {
                None => self.hub_taps.pop().expect("paired above"),
                Some(id) => {
                    let Some(i) = self.netdevs.iter().position(|(d, _)| d == id) else {
                        return Err(format!(
                            "Property 'virtio-net-pci.netdev' can't find value '{id}'"
                        ));
                    };
                    if std::mem::replace(&mut used[i], true) {
                        return Err(format!(
                            "Property 'virtio-net-pci.netdev' can't take value '{id}', it's in use"
                        ));
                    }
                    self.netdevs[i].1.clone()
                }
            };
            if let Some(m) = &nic.mac {
                value.push_str(&format!(",mac={}", esc(m)));
            }
            out.push(value);
        }
        if let Some(i) = used.iter().position(|u| !u) {
            return Err(format!(
                "netdev '{}' is not used by any NIC (-device virtio-net-pci,netdev={0})",
                self.netdevs[i].0
            ));
        }
        Ok((out, notes))
    }
}
