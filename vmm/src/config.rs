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
    pub name: Option<String>,
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
}
