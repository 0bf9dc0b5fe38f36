//! `vmm run`: put the machine together, run it, and turn the way it stopped into an exit
//! status. Also the console (raw terminal, stdin thread, Ctrl-A x).

use std::io::Read;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use crate::boot::file::{kernel_image, open_boot_file, FileImage};
use crate::boot::{load_linux, BootEntry, Initrd};
use crate::config::{nic_macs, NetConfig, TapSource, VmConfig};
use crate::devices::serial::{feed_input, SerialDevice, Stdout};
use crate::diskboot::partitions::boot_sector;
use crate::diskboot::{DiskBoot, Loaded, Search};
use crate::firmware::{Firmware, DEFAULT_FIRMWARE};
use crate::net_script::{run_script, Downscript};
use crate::tap::Tap;
use crate::vcpu::{create_vcpu, install_kick_handler, kick_signal, spawn, VcpuHandle};
use crate::vm::{Machine, VmDisk, VmNic};
use crate::VmExit;

/// vCPU threads of a started machine.
pub struct Running {
    stop: Arc<AtomicBool>,
    vcpus: Vec<VcpuHandle>,
}

impl Machine {
    /// Create the vCPUs (BSP at `entry`) and start their threads.
    pub fn start(&self, entry: BootEntry) -> Result<Running, String> {
        install_kick_handler();
        let stop = Arc::new(AtomicBool::new(false));
        let mut fds = Vec::new();
        for id in 0..self.cpus {
            fds.push(create_vcpu(&self.kvm, &self.vm, id, self.cpus, &entry)?);
        }
        let mut vcpus = Vec::new();
        for (id, fd) in fds.into_iter().enumerate() {
            vcpus.push(spawn(
                id as u8,
                fd,
                self.io_bus.clone(),
                self.mmio_bus.clone(),
                self.exit_tx.clone(),
                stop.clone(),
            )?);
        }
        Ok(Running { stop, vcpus })
    }

    /// Wait for the first reason to stop, up to `timeout` (None: forever).
    pub fn wait(&self, timeout: Option<Duration>) -> Option<VmExit> {
        match timeout {
            Some(t) => self.exit_rx.recv_timeout(t).ok(),
            None => self.exit_rx.recv().ok(),
        }
    }
}

impl Running {
    /// Stop every vCPU thread (kicking them out of KVM_RUN) and join them, giving up
    /// after a second.
    pub fn stop(self) {
        self.stop.store(true, Ordering::SeqCst);
        let deadline = std::time::Instant::now() + Duration::from_secs(1);
        for v in self.vcpus {
            while !v.thread.is_finished() && std::time::Instant::now() < deadline {
                use std::os::unix::thread::JoinHandleExt;
                // SAFETY: the thread is alive (not finished) and its handle is valid.
                unsafe { libc::pthread_kill(v.thread.as_pthread_t(), kick_signal()) };
                std::thread::sleep(Duration::from_millis(5));
            }
            if v.thread.is_finished() {
                let _ = v.thread.join();
            }
        }
    }
}

static SAVED_TERMIOS: Mutex<Option<libc::termios>> = Mutex::new(None);

fn restore_terminal() {
    if let Ok(g) = SAVED_TERMIOS.try_lock() {
        if let Some(t) = g.as_ref() {
            // SAFETY: restoring a termios previously read from fd 0.
            unsafe { libc::tcsetattr(0, libc::TCSANOW, t) };
        }
    }
}

extern "C" fn on_fatal_signal(sig: libc::c_int) {
    restore_terminal();
    // SAFETY: _exit is async-signal-safe.
    unsafe { libc::_exit(128 + sig) };
}

/// Puts stdin into raw mode while alive (when it is a terminal).
struct RawTerminal;

impl RawTerminal {
    fn enter() -> Option<RawTerminal> {
        // SAFETY: isatty/tcgetattr/tcsetattr on fd 0 with a valid termios buffer.
        unsafe {
            if libc::isatty(0) != 1 {
                return None;
            }
            let mut t: libc::termios = std::mem::zeroed();
            if libc::tcgetattr(0, &mut t) != 0 {
                return None;
            }
            *SAVED_TERMIOS.lock().unwrap() = Some(t);
            libc::signal(
                libc::SIGQUIT,
                on_fatal_signal as *const () as libc::sighandler_t,
            );
            let prev = std::panic::take_hook();
            std::panic::set_hook(Box::new(move |info| {
                restore_terminal();
                prev(info);
            }));
            let mut raw = t;
            libc::cfmakeraw(&mut raw);
            // Keep output post-processing so our own messages stay readable.
            raw.c_oflag |= libc::OPOST;
            libc::tcsetattr(0, libc::TCSANOW, &raw);
        }
        Some(RawTerminal)
    }
}

impl Drop for RawTerminal {
    fn drop(&mut self) {
        restore_terminal();
    }
}

/// Console input: bytes from stdin go to the UART; Ctrl-A x quits, Ctrl-A Ctrl-A sends
/// one Ctrl-A.
pub struct ConsoleInput {
    escape: bool,
}

impl ConsoleInput {
    pub fn new() -> Self {
        ConsoleInput { escape: false }
    }

    /// Filter `input`; returns the bytes for the guest and whether the user asked to quit.
    pub fn filter(&mut self, input: &[u8]) -> (Vec<u8>, bool) {
        let mut out = Vec::with_capacity(input.len());
        for &b in input {
            if self.escape {
                self.escape = false;
                match b {
                    b'x' | b'X' => return (out, true),
                    0x01 => out.push(0x01),
                    _ => out.extend_from_slice(&[0x01, b]),
                }
            } else if b == 0x01 {
                self.escape = true;
            } else {
                out.push(b);
            }
        }
        (out, false)
    }
}

impl Default for ConsoleInput {
    fn default() -> Self {
        Self::new()
    }
}

fn spawn_stdin(serial: Arc<Mutex<SerialDevice>>, exit: std::sync::mpsc::Sender<VmExit>) {
    let _ = std::thread::Builder::new()
        .name("stdin".into())
        .spawn(move || {
            let mut filter = ConsoleInput::new();
            let mut buf = [0u8; 256];
            let mut stdin = std::io::stdin();
            loop {
                let n = match stdin.read(&mut buf) {
                    Ok(0) => return,
                    Ok(n) => n,
                    Err(e) if e.kind() == std::io::ErrorKind::Interrupted => continue,
                    Err(_) => return,
                };
                let (bytes, quit) = filter.filter(&buf[..n]);
                feed_input(&serial, &bytes);
                if quit {
                    let _ = exit.send(VmExit::Quit);
                    return;
                }
            }
        });
}

const STOP_SIGNALS: [libc::c_int; 3] = [libc::SIGTERM, libc::SIGINT, libc::SIGHUP];

/// Block SIGTERM/SIGINT/SIGHUP in this thread (and so in every thread started after) and
/// turn them into an orderly stop on a dedicated thread, so disks get flushed and the
/// terminal restored.
fn handle_stop_signals(exit: std::sync::mpsc::Sender<VmExit>) {
    // SAFETY: plain sigset manipulation on a local set.
    let set = unsafe {
        let mut set: libc::sigset_t = std::mem::zeroed();
        libc::sigemptyset(&mut set);
        for s in STOP_SIGNALS {
            libc::sigaddset(&mut set, s);
        }
        libc::pthread_sigmask(libc::SIG_BLOCK, &set, std::ptr::null_mut());
        set
    };
    let _ = std::thread::Builder::new()
        .name("signals".into())
        .spawn(move || loop {
            let mut sig: libc::c_int = 0;
            // SAFETY: waiting on a valid, blocked signal set.
            if unsafe { libc::sigwait(&set, &mut sig) } == 0 {
                let _ = exit.send(VmExit::Signal(sig));
                return;
            }
        });
}

fn host_memory() -> Option<u64> {
    // SAFETY: sysinfo fills the struct we pass.
    unsafe {
        let mut si: libc::sysinfo = std::mem::zeroed();
        if libc::sysinfo(&mut si) != 0 {
            return None;
        }
        Some(si.totalram as u64 * si.mem_unit as u64)
    }
}

/// What the VM boots: a kernel file (its name and bytes), a disk's boot entry, or the
/// disk through firmware.
enum Boot {
    Kernel(String, FileImage),
    Disk(Loaded),
    Firmware(Firmware),
}

/// Open every NIC's tap and run its up script; a downscript for each goes to `downscripts`.
fn open_nics(nets: &[NetConfig], downscripts: &mut Vec<Downscript>) -> Result<Vec<VmNic>, String> {
    let mut nics = Vec::new();
    for (n, mac) in nets.iter().zip(nic_macs(nets)) {
        let tap = match &n.tap {
            TapSource::Name(name) => Tap::open(name)?,
            TapSource::Fd(fd) => Tap::from_fd(*fd)?,
        };
        if let Some(s) = &n.script {
            run_script(s, tap.name())?;
        }
        let tap = Arc::new(tap);
        if let Some(s) = &n.downscript {
            downscripts.push(Downscript::new(s.clone(), tap.clone()));
        }
        nics.push(VmNic { backend: tap, mac });
    }
    Ok(nics)
}

/// Run a VM described by `cfg` until it stops. Returns the exit status; `Err` carries a
/// one-line message for `vmm: ...`.
pub fn run(cfg: VmConfig) -> Result<i32, String> {
    // The boot files first: a bad kernel or initrd is refused before a VM exists.
    let kernel = match &cfg.kernel {
        Some(k) => {
            let f = open_boot_file(k, "kernel")?;
            let image = kernel_image(&f)
                .map_err(|e| format!("cannot read kernel '{}': {e}", k.display()))?;
            Some(image)
        }
        None => None,
    };
    if let Some(p) = &cfg.initrd {
        open_boot_file(p, "initrd")?;
    }
    if let Some(host) = host_memory() {
        if cfg.memory > host {
            return Err(format!(
                "--memory {} MiB does not fit in host memory ({} MiB)",
                cfg.memory >> 20,
                host >> 20
            ));
        }
    }
    let mut disks = Vec::new();
    for (i, d) in cfg.drives.iter().enumerate() {
        let driver = crate::disk::open_drive(d).map_err(|e| e.to_string())?;
        disks.push(VmDisk {
            driver,
            read_only: d.read_only,
            serial: d
                .serial
                .clone()
                .unwrap_or_else(|| format!("vmm-vd{}", (b'a' + i as u8) as char)),
        });
    }
    let boot = match (kernel, &cfg.kernel) {
        (Some(image), Some(k)) => Boot::Kernel(k.display().to_string(), image),
        _ => {
            let (Some(first), Some(d)) = (disks.first(), cfg.drives.first()) else {
                return Err("nothing to boot: give --kernel, or a disk (--drive, -hda)".into());
            };
            let disk_err = |e: String| format!("disk '{}': {e}", d.path.display());
            if let Some(f) = &cfg.firmware {
                Boot::Firmware(Firmware::load(f)?)
            } else {
                match DiskBoot::search(first.driver.clone()).map_err(disk_err)? {
                    Search::Found(found) => {
                        if cfg.list_boot_entries {
                            print!("{}", found.describe());
                            return Ok(0);
                        }
                        let i = found.select(cfg.boot_entry.as_deref())?;
                        Boot::Disk(found.load(i, cfg.memory).map_err(disk_err)?)
                    }
                    Search::NoEntry(why) => {
                        let no_entry = format!("no Linux boot entry found ({why})");
                        let signed = boot_sector(&*first.driver)
                            .map_err(|e| disk_err(e.to_string()))?
                            .is_some();
                        if cfg.list_boot_entries || cfg.boot_entry.is_some() || !signed {
                            let bios = if signed {
                                ""
                            } else {
                                ", and no BIOS boot sector"
                            };
                            return Err(disk_err(format!("{no_entry}{bios}")));
                        }
                        eprintln!(
                            "vmm: disk '{}': {no_entry}: booting its boot sector through {}",
                            d.path.display(),
                            DEFAULT_FIRMWARE
                        );
                        Boot::Firmware(Firmware::load(DEFAULT_FIRMWARE.as_ref())?)
                    }
                }
            }
        }
    };
    // Declared before the machine, so dropped after it: each downscript runs once the
    // devices are gone, on every way out from here.
    let mut downscripts = Vec::new();
    let nics = open_nics(&cfg.nets, &mut downscripts)?;
    let drivers: Vec<_> = disks.iter().map(|d| d.driver.clone()).collect();
    let m = match &boot {
        Boot::Firmware(f) => {
            Machine::with_firmware(cfg.memory, cfg.cpus, Box::new(Stdout), disks, nics, f)?
        }
        _ => Machine::new(cfg.memory, cfg.cpus, Box::new(Stdout), disks, nics)?,
    };
    let entry = match &boot {
        Boot::Firmware(_) => BootEntry::ResetVector,
        Boot::Kernel(name, image) => {
            let initrd = cfg.initrd.as_deref().map(Initrd::File);
            load_linux(&m, image, name, initrd, &cfg.cmdline)?
        }
        Boot::Disk(l) => {
            let initrd = l.initrd.as_deref().map(|data| Initrd::Bytes {
                name: &l.initrd_name,
                data,
            });
            let cmdline = format!("{} {}", l.cmdline, cfg.cmdline);
            load_linux(&m, &l.kernel, &l.kernel_name, initrd, cmdline.trim())?
        }
    };
    drop(boot);

    handle_stop_signals(m.exit_tx.clone());
    let term = RawTerminal::enter();
    spawn_stdin(m.serial.clone(), m.exit_tx.clone());
    let running = m.start(entry)?;
    let why = m
        .wait(None)
        .unwrap_or(VmExit::Error("all vCPUs stopped".into()));
    running.stop();
    let mut flush_err = None;
    for d in &drivers {
        if let Err(e) = d.flush() {
            flush_err = Some(format!("flushing disk at exit: {e}"));
        }
    }
    drop(term);
    if let VmExit::Signal(sig) = why {
        eprintln!("vmm: terminating on signal {sig}");
    }
    match why {
        VmExit::Error(e) => Err(e),
        _ => match flush_err {
            Some(e) => Err(e),
            None => Ok(why.exit_code()),
        },
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ctrl_a_x() {
        let mut f = ConsoleInput::new();
        assert_eq!(f.filter(b"ab\x01"), (b"ab".to_vec(), false));
        assert_eq!(f.filter(b"\x01c"), (vec![1, b'c'], false));
        assert_eq!(f.filter(b"\x01zq"), (vec![1, b'z', b'q'], false));
        assert_eq!(f.filter(b"q\x01x more"), (b"q".to_vec(), true));
    }
}
