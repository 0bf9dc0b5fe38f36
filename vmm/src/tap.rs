//! Host tap devices: created or attached by name through /dev/net/tun, or taken as an open
//! file descriptor; with a virtio-net header on every packet when the kernel gives one
//! (`IFF_VNET_HDR`), so offloads pass through (`TUNSETOFFLOAD`).

use std::fs::File;
use std::io;
use std::os::unix::fs::OpenOptionsExt;
use std::os::unix::io::{AsRawFd, FromRawFd, RawFd};

/// The header every packet carries on a tap with `IFF_VNET_HDR` (virtio_net_hdr_mrg_rxbuf,
/// the VERSION_1 layout).
pub const VNET_HDR_LEN: usize = 12;

const IFNAMSIZ: usize = 16;
const TUNSETIFF: libc::c_ulong = 0x4004_54ca;
const TUNGETFEATURES: libc::c_ulong = 0x8004_54cf;
const TUNSETOFFLOAD: libc::c_ulong = 0x4004_54d0;
const TUNGETIFF: libc::c_ulong = 0x8004_54d2;
const TUNSETVNETHDRSZ: libc::c_ulong = 0x4004_54d8;
const IFF_TAP: libc::c_short = 0x0002;
const IFF_NO_PI: libc::c_short = 0x1000;
const IFF_VNET_HDR: libc::c_short = 0x4000;

/// `TUNSETOFFLOAD` flags: what the guest takes from the tap.
pub const TUN_F_CSUM: u32 = 0x01;
pub const TUN_F_TSO4: u32 = 0x02;
pub const TUN_F_TSO6: u32 = 0x04;
pub const TUN_F_TSO_ECN: u32 = 0x08;
pub const TUN_F_UFO: u32 = 0x10;

#[repr(C)]
struct IfReq {
    name: [u8; IFNAMSIZ],
    flags: libc::c_short,
    _pad: [u8; 22],
}

impl IfReq {
    fn new(name: &str, flags: libc::c_short) -> IfReq {
        let mut r = IfReq {
            name: [0; IFNAMSIZ],
            flags,
            _pad: [0; 22],
        };
        r.name[..name.len()].copy_from_slice(name.as_bytes());
        r
    }

    fn name(&self) -> String {
        let end = self.name.iter().position(|&b| b == 0).unwrap_or(IFNAMSIZ);
        String::from_utf8_lossy(&self.name[..end]).into_owned()
    }
}

/// What the device's I/O thread needs of a packet backend: a nonblocking fd carrying one
/// packet per read and write, and the offloads the guest accepts.
pub trait PacketBackend: Send + Sync {
    fn fd(&self) -> RawFd;
    /// Whether each packet starts with a [`VNET_HDR_LEN`]-byte virtio-net header.
    fn vnet_hdr(&self) -> bool;
    /// Whether the kernel takes UDP fragmentation offload (probed once).
    fn ufo(&self) -> bool;
    /// Offloads (`TUN_F_*`) the guest negotiated.
    fn set_offload(&self, flags: u32) -> io::Result<()>;
}

/// An open tap device.
#[derive(Debug)]
pub struct Tap {
    file: File,
    name: String,
    vnet_hdr: bool,
    ufo: bool,
}

fn ioctl_ptr<T>(fd: RawFd, req: libc::c_ulong, arg: *mut T) -> io::Result<()> {
    // SAFETY: every caller passes a request whose argument is a `T` the kernel reads or
    // writes in place, and `arg` points to a live `T`.
    if unsafe { libc::ioctl(fd, req as _, arg) } < 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(())
}

fn interface_exists(name: &str) -> bool {
    let Ok(c) = std::ffi::CString::new(name) else {
        return false;
    };
    // SAFETY: a valid NUL-terminated string.
    unsafe { libc::if_nametoindex(c.as_ptr()) != 0 }
}

impl Tap {
    /// Attach to the tap `name` or create it (the kernel picks a `tapN` name when `name` is
    /// empty). A tap created here is not persistent: it goes when vmm closes it.
    pub fn open(name: &str) -> Result<Tap, String> {
        if name.len() >= IFNAMSIZ || name.contains(['/', ' ', '\0']) {
            return Err(format!("invalid interface name '{name}'"));
        }
        let existed = !name.is_empty() && interface_exists(name);
        let file = std::fs::OpenOptions::new()
            .read(true)
            .write(true)
            .custom_flags(libc::O_NONBLOCK | libc::O_CLOEXEC)
            .open("/dev/net/tun")
            .map_err(|e| match e.raw_os_error() {
                Some(libc::ENOENT) | Some(libc::ENODEV) | Some(libc::ENXIO) => {
                    "/dev/net/tun not found: is the tun module loaded?".to_string()
                }
                Some(libc::EACCES) | Some(libc::EPERM) => {
                    "no permission to open /dev/net/tun".to_string()
                }
                _ => format!("cannot open /dev/net/tun: {e}"),
            })?;
        let mut features: libc::c_uint = 0;
        let vnet = ioctl_ptr(file.as_raw_fd(), TUNGETFEATURES, &mut features).is_ok()
            && features & IFF_VNET_HDR as libc::c_uint != 0;
        let mut flags = IFF_TAP | IFF_NO_PI;
        if vnet {
            flags |= IFF_VNET_HDR;
        }
        let mut req = IfReq::new(name, flags);
        let shown = if name.is_empty() { "tap" } else { name };
        ioctl_ptr(file.as_raw_fd(), TUNSETIFF, &mut req).map_err(|e| match e.raw_os_error() {
            Some(libc::EBUSY) => format!("tap '{shown}' is busy (in use by another process)"),
            Some(libc::EPERM) if existed => {
                format!("no permission to attach to tap '{shown}' (it belongs to another user)")
            }
            Some(libc::EPERM) => format!(
                "tap '{shown}' does not exist and vmm may not create it (needs \
                     CAP_NET_ADMIN, or `ip tuntap add {shown} mode tap user USER` first)"
            ),
            Some(libc::EINVAL) if existed => {
                format!("interface '{shown}' exists and is not a tap device")
            }
            _ => format!("cannot attach tap '{shown}': {e}"),
        })?;
        Tap::finish(file, req.name(), vnet)
    }

    /// Take the open tap `fd` (a management layer's, as QEMU's `fd=`).
    pub fn from_fd(fd: RawFd) -> Result<Tap, String> {
        // SAFETY: F_GETFD on any integer is harmless.
        if fd < 0 || unsafe { libc::fcntl(fd, libc::F_GETFD) } < 0 {
            return Err(format!("tap fd {fd} is not an open file descriptor"));
        }
        let mut req = IfReq::new("", 0);
        if ioctl_ptr(fd, TUNGETIFF, &mut req).is_err() || req.flags & IFF_TAP == 0 {
            return Err(format!("fd {fd} is not a tap device"));
        }
        // SAFETY: the fd is open, and from here on ours alone (the caller hands it over).
        let file = unsafe { File::from_raw_fd(fd) };
        // SAFETY: plain flag changes on our own open fd.
        unsafe {
            let fl = libc::fcntl(fd, libc::F_GETFL);
            libc::fcntl(fd, libc::F_SETFL, fl | libc::O_NONBLOCK);
            libc::fcntl(fd, libc::F_SETFD, libc::FD_CLOEXEC);
        }
        Tap::finish(file, req.name(), req.flags & IFF_VNET_HDR != 0)
    }

    fn finish(file: File, name: String, vnet_hdr: bool) -> Result<Tap, String> {
        let fd = file.as_raw_fd();
        let mut ufo = false;
        if vnet_hdr {
            let mut len = VNET_HDR_LEN as libc::c_int;
            ioctl_ptr(fd, TUNSETVNETHDRSZ, &mut len)
                .map_err(|e| format!("tap '{name}': TUNSETVNETHDRSZ: {e}"))?;
            // Probe as QEMU does: UDP fragmentation offload went away from some kernels.
            ufo = set_offload(fd, TUN_F_CSUM | TUN_F_UFO).is_ok();
            set_offload(fd, 0).map_err(|e| format!("tap '{name}': TUNSETOFFLOAD: {e}"))?;
        }
        Ok(Tap {
            file,
            name,
            vnet_hdr,
            ufo,
        })
    }

    /// The interface name (as the kernel has it).
    pub fn name(&self) -> &str {
        &self.name
    }
}

fn set_offload(fd: RawFd, flags: u32) -> io::Result<()> {
    // SAFETY: TUNSETOFFLOAD takes its flags by value.
    if unsafe { libc::ioctl(fd, TUNSETOFFLOAD as _, flags as libc::c_ulong) } < 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(())
}

impl PacketBackend for Tap {
    fn fd(&self) -> RawFd {
        self.file.as_raw_fd()
    }
    fn vnet_hdr(&self) -> bool {
        self.vnet_hdr
    }
    fn ufo(&self) -> bool {
        self.ufo
    }
    fn set_offload(&self, flags: u32) -> io::Result<()> {
        set_offload(self.file.as_raw_fd(), flags)
    }
}
