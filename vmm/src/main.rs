//! `vmm`: a minimal KVM hypervisor.

use clap::{Parser, Subcommand};

use vmm::config::{parse_cpus, parse_drive, parse_memory, parse_net, VmConfig};

#[derive(Parser)]
#[command(
    name = "vmm",
    version,
    about = "Minimal KVM hypervisor with virtio-blk disks and virtio-net NICs",
    after_help = "`vmm run` also takes QEMU's options: -m, -smp, -name, -hda..-hdd, -drive, \
                  -snapshot, -kernel, -initrd, -append, -boot order=c, -nographic, \
                  -enable-kvm, -cpu host, -serial stdio, -display none, -net nic + -net tap, \
                  -netdev tap + -device virtio-net-pci, -nic tap"
)]
struct Cli {
    #[command(subcommand)]
    cmd: Cmd,
}

#[derive(Subcommand)]
enum Cmd {
    /// Boot a Linux kernel, or a disk's own boot entry.
    Run(RunArgs),
}

#[derive(clap::Args)]
struct RunArgs {
    /// Kernel image: a bzImage, or an ELF vmlinux with a PVH entry note. Without it, vmm
    /// boots the kernel that the first disk's own boot entry names (BLS entries, grub.cfg,
    /// extlinux.conf, menu.lst, or /vmlinuz on an ext2/3/4 filesystem).
    #[arg(long)]
    kernel: Option<std::path::PathBuf>,
    /// Boot the first disk through a BIOS image, as QEMU does without -kernel (a disk
    /// with no Linux boot entry boots this way anyway, through the default, SeaBIOS's
    /// /usr/share/seabios/bios.bin).
    #[arg(long, conflicts_with_all = ["kernel", "boot_entry", "list_boot_entries"])]
    firmware: Option<std::path::PathBuf>,
    /// Initial ramdisk (with --kernel).
    #[arg(long, requires = "kernel")]
    initrd: Option<std::path::PathBuf>,
    /// Kernel command line; when booting a disk's entry, added to the entry's.
    #[arg(long, default_value = "")]
    append: String,
    /// The disk's boot entry to boot: its number or title (default: the configured default).
    #[arg(long, conflicts_with = "kernel")]
    boot_entry: Option<String>,
    /// Print the first disk's boot entries and exit.
    #[arg(long, conflicts_with = "kernel")]
    list_boot_entries: bool,
    /// Guest memory size: a bare number is MiB (as QEMU's -m); or with a B, K, M, G or T
    /// suffix (binary units).
    #[arg(long, default_value = "512M")]
    memory: String,
    /// Number of vCPUs (1 to 64).
    #[arg(long, default_value = "1")]
    cpus: String,
    /// A disk: file=PATH[,format=raw|qcow2|vpc|vdi][,readonly=on][,snapshot=on]
    /// [,cache=writeback|none|writethrough|directsync|unsafe][,serial=S]
    #[arg(long)]
    drive: Vec<String>,
    /// A virtio-net NIC on a tap: tap[,ifname=NAME][,script=PATH|no][,downscript=PATH|no]
    /// [,mac=52:54:00:xx:xx:xx][,fd=N]. Scripts get the interface name as argument; none
    /// runs unless given.
    #[arg(long)]
    net: Vec<String>,
    /// Name of the VM (used for messages).
    #[arg(long)]
    name: Option<String>,
}

fn build_config(a: RunArgs) -> Result<VmConfig, String> {
    let memory = parse_memory(&a.memory)?;
    let drives = a
        .drive
        .iter()
        .map(|d| parse_drive(d))
        .collect::<Result<Vec<_>, _>>()?;
    let nets = a
        .net
        .iter()
        .map(|n| parse_net(n))
        .collect::<Result<Vec<_>, _>>()?;
    let cpus = parse_cpus(&a.cpus)?;
    Ok(VmConfig {
        kernel: a.kernel,
        firmware: a.firmware,
        boot_entry: a.boot_entry,
        list_boot_entries: a.list_boot_entries,
        initrd: a.initrd,
        cmdline: a.append,
        memory,
        cpus,
        drives,
        nets,
        name: a.name,
    })
}

/// Parse the command line, QEMU's options for `run` rewritten first (`qemu_args`). Help and
/// version print as clap prints them; a usage error is one line on stderr and exit 1, like
/// every other vmm error (and like QEMU's option errors).
fn parse_cli() -> Cli {
    use clap::error::ErrorKind;
    let mut args: Vec<String> = std::env::args().collect();
    // `vmm -m 256 -hda disk.qcow2`, as qemu-kvm is typed: a QEMU option first means `run`
    // (and `-hda` is never read as `-h`).
    if args
        .get(1)
        .is_some_and(|a| a.starts_with('-') && !a.starts_with("--") && a != "-h" && a != "-V")
    {
        args.insert(1, "run".into());
    }
    if args.get(1).map(String::as_str) == Some("run") {
        match vmm::qemu_args::rewrite(&args[2..]) {
            Ok(r) => {
                for n in r.notes {
                    eprintln!("vmm: {n}");
                }
                args.truncate(2);
                args.extend(r.args);
            }
            Err(e) => {
                eprintln!("vmm: {e}");
                std::process::exit(1);
            }
        }
    }
    match Cli::try_parse_from(args) {
        Ok(cli) => cli,
        Err(e)
            if !e.use_stderr()
                || e.kind() == ErrorKind::DisplayHelpOnMissingArgumentOrSubcommand =>
        {
            e.exit()
        }
        Err(e) => {
            // clap's first paragraph ("error: ..." and any indented detail lines), joined.
            let text = e.to_string();
            let msg: Vec<&str> = text
                .lines()
                .take_while(|l| !l.trim().is_empty())
                .map(str::trim)
                .collect();
            let msg = msg.join(" ");
            let msg = msg.strip_prefix("error: ").unwrap_or(&msg);
            eprintln!("vmm: {msg} (try --help)");
            std::process::exit(1);
        }
    }
}

fn main() {
    let cli = parse_cli();
    let Cmd::Run(args) = cli.cmd;
    let code = match build_config(args) {
        Err(e) => {
            eprintln!("vmm: {e}");
            1
        }
        Ok(cfg) => match vmm::run::run(cfg) {
            Ok(code) => code,
            Err(e) => {
                // One line, even when the engine's message has several.
                let line: Vec<&str> = e.lines().map(str::trim).filter(|l| !l.is_empty()).collect();
                eprintln!("vmm: {}", line.join(": "));
                1
            }
        },
    };
    std::process::exit(code);
}
