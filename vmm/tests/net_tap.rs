//! `vmm run --net tap,...` on real tap devices, each run inside a private network namespace
//! (`unshare -n`: the taps exist only there and no packet can reach this machine's network),
//! with a fake kernel: the tap vmm creates (vnet header on), the up script with the
//! interface name, the downscript on every exit path with the tap still there, the tap gone
//! afterwards, and the one-line errors (failing script, busy tap, not a tap, no permission,
//! an fd that is no tap). Needs root (CI runs as root: there its absence fails the test).

use std::path::PathBuf;
use std::process::{Command, Output, Stdio};

use integration_tests::fake_kernel::{bzimage, POWEROFF, SPIN};
use integration_tests::kvm::have_kvm;

fn tmp(name: &str) -> PathBuf {
    std::env::temp_dir().join(format!("vmm-net-{}-{name}", std::process::id()))
}

fn root() -> bool {
    // SAFETY: geteuid has no preconditions.
    let root = unsafe { libc::geteuid() } == 0;
    assert!(
        root || std::env::var_os("CI").is_none(),
        "CI must run as root"
    );
    if !root {
        eprintln!("SKIPPED: not root");
    }
    root
}

/// Run `script` under `sh` in a new network and mount namespace with its own /sys (so
/// /sys/class/net shows that namespace); $VMM, $K (powers off), $SPIN (spins) and $D (a
/// scratch directory with the scripts `up`, `down` and `fail`, logging to $D/log) are set.
fn in_netns(name: &str, script: &str) -> (Output, String) {
    let d = tmp(name);
    std::fs::create_dir_all(&d).unwrap();
    let k = d.join("k");
    std::fs::write(&k, bzimage(POWEROFF)).unwrap();
    let spin = d.join("spin");
    std::fs::write(&spin, bzimage(SPIN)).unwrap();
    let log = d.join("log");
    for (f, body) in [
        (
            "up",
            format!(
                "echo \"up $1 $(cat /sys/class/net/$1/tun_flags)\" >>{}",
                log.display()
            ),
        ),
        (
            "down",
            format!(
                "echo \"down $1 $([ -e /sys/class/net/$1 ] && echo present)\" >>{}",
                log.display()
            ),
        ),
        ("fail", "exit 3".to_string()),
    ] {
        let p = d.join(f);
        std::fs::write(&p, format!("#!/bin/sh\n{body}\n")).unwrap();
        Command::new("chmod").arg("+x").arg(&p).status().unwrap();
    }
    let o = Command::new("unshare")
        .args(["-n", "-m", "sh", "-c"])
        .arg(format!("mount -t sysfs none /sys || exit 99\n{script}"))
        .env("VMM", env!("CARGO_BIN_EXE_vmm"))
        .env("K", &k)
        .env("SPIN", &spin)
        .env("D", &d)
        .stdin(Stdio::null())
        .output()
        .unwrap();
    let log = std::fs::read_to_string(&log).unwrap_or_default();
    std::fs::remove_dir_all(&d).unwrap();
    (o, log)
}

fn text(o: &Output) -> String {
    format!(
        "status {:?}\nstdout:\n{}\nstderr:\n{}",
        o.status.code(),
        String::from_utf8_lossy(&o.stdout),
        String::from_utf8_lossy(&o.stderr)
    )
}

/// Two NICs, one tap named, one named by the kernel: both created with a vnet header, the
/// scripts run with their names, the taps still there for the downscript and gone after.
#[test]
fn created_taps_run_scripts_and_go_away() {
    if !root() || !have_kvm() {
        return;
    }
    let (o, log) = in_netns(
        "create",
        r#"$VMM run --kernel $K --net tap,ifname=vmmt0,script=$D/up,downscript=$D/down \
             -net nic,model=virtio -net tap,script=$D/up,downscript=$D/down
           echo "rc=$?"
           ls /sys/class/net | grep -v '^lo$' | sed 's/^/left /'"#,
    );
    let out = String::from_utf8_lossy(&o.stdout);
    assert_eq!(out.trim(), "rc=0", "{}", text(&o));
    // 0x5002: IFF_TAP | IFF_NO_PI | IFF_VNET_HDR.
    assert_eq!(
        log,
        "up vmmt0 0x5002\nup tap0 0x5002\ndown vmmt0 present\ndown tap0 present\n",
        "{}",
        text(&o)
    );
}

/// A failing up script: one line, exit 1, no downscript, and the tap vmm made is gone.
#[test]
fn failing_script_is_one_line_and_leaves_nothing() {
    if !root() || !have_kvm() {
        return;
    }
    let (o, log) = in_netns(
        "fail",
        r#"$VMM run --kernel $K --net tap,ifname=vmmt0,script=$D/up,downscript=$D/down \
             --net tap,ifname=vmmt1,script=$D/fail,downscript=$D/down
           echo "rc=$?"
           ls /sys/class/net | grep -v '^lo$' | sed 's/^/left /'"#,
    );
    let out = String::from_utf8_lossy(&o.stdout);
    assert_eq!(out.trim(), "rc=1", "{}", text(&o));
    let err = String::from_utf8_lossy(&o.stderr);
    assert_eq!(err.lines().count(), 1, "{}", text(&o));
    assert!(
        err.starts_with("vmm: network script ") && err.contains("fail failed with exit status 3"),
        "{err}"
    );
    // The first NIC was up: its downscript runs, with its tap still there.
    assert_eq!(log, "up vmmt0 0x5002\ndown vmmt0 present\n", "{}", text(&o));
}

/// A tap in use by another vmm is busy; the first one, stopped by SIGTERM, still runs its
/// downscript.
#[test]
fn busy_tap_and_downscript_on_signal() {
    if !root() || !have_kvm() {
        return;
    }
    let (o, log) = in_netns(
        "busy",
        r#"$VMM run --kernel $SPIN --net tap,ifname=vmmt0,script=$D/up,downscript=$D/down &
           pid=$!
           i=0; while [ ! -e /sys/class/net/vmmt0 ] && [ $i -lt 100 ]; do sleep 0.1; i=$((i+1)); done
           sleep 0.3
           $VMM run --kernel $K --net tap,ifname=vmmt0 2>$D/err
           echo "second rc=$?"
           kill -TERM $pid; wait $pid
           echo "first rc=$?"
           cat $D/err
           ls /sys/class/net | grep -v '^lo$' | sed 's/^/left /'"#,
    );
    let out = String::from_utf8_lossy(&o.stdout);
    let lines: Vec<&str> = out.lines().collect();
    assert_eq!(lines.len(), 3, "{}", text(&o));
    assert_eq!(lines[0], "second rc=1", "{}", text(&o));
    // 128 + SIGTERM, as vmm reports a stop by signal.
    assert!(lines[1].starts_with("first rc="), "{}", text(&o));
    assert_eq!(
        lines[2],
        "vmm: tap 'vmmt0' is busy (in use by another process)",
        "{}",
        text(&o)
    );
    assert_eq!(log, "up vmmt0 0x5002\ndown vmmt0 present\n", "{}", text(&o));
}

/// Not a tap, no permission, an fd that is no tap, a script that cannot run: one line each.
#[test]
fn tap_errors_are_one_line() {
    if !root() || !have_kvm() {
        return;
    }
    let (o, _) = in_netns(
        "errors",
        r#"for net in tap,ifname=lo tap,fd=0 tap,ifname=vmmt0,script=/nonexistent/up \
                   tap,ifname=has/slash; do
               $VMM run --kernel $K --net $net 2>$D/err </dev/null
               echo "rc=$? $(wc -l <$D/err) $(cat $D/err)"
           done
           setpriv --reuid=65534 --regid=65534 --clear-groups $VMM run --kernel $K \
               --net tap,ifname=vmmt0 2>$D/err
           echo "rc=$? $(wc -l <$D/err) $(cat $D/err)"
           ls /sys/class/net | grep -v '^lo$' | sed 's/^/left /'"#,
    );
    let out = String::from_utf8_lossy(&o.stdout);
    let lines: Vec<&str> = out.lines().collect();
    let want = [
        "interface 'lo' exists and is not a tap device",
        "fd 0 is not a tap device",
        "could not launch network script /nonexistent/up",
        "invalid interface name 'has/slash'",
        // /dev/net/tun is root-only on some hosts; elsewhere creating a tap needs privilege.
        "permission",
    ];
    assert_eq!(lines.len(), want.len(), "{}", text(&o));
    for (l, w) in lines.iter().zip(want) {
        assert!(l.starts_with("rc=1 1 vmm: "), "{l}\n{}", text(&o));
        let w2 = if w == "permission" {
            "may not create"
        } else {
            w
        };
        assert!(
            l.contains(w) || l.contains(w2),
            "{l} lacks {w}\n{}",
            text(&o)
        );
    }
}

/// `fd=N`: a tap opened by a management layer (here perl, which creates `vmmfd0` with and
/// without a vnet header and execs vmm with the fd inherited) is taken and vmm runs.
#[test]
fn fd_takes_an_open_tap() {
    if !root() || !have_kvm() {
        return;
    }
    let (o, _) = in_netns(
        "fd",
        r#"for flags in 0x5002 0x1002; do
               perl -e '$^F = 255; open(my $t, "+<", "/dev/net/tun") or die "tun: $!";
                   ioctl($t, 0x400454ca, pack("Z16 s x22", "vmmfd0", hex($ARGV[0]))) or die "TUNSETIFF: $!";
                   exec($ENV{VMM}, "run", "--kernel", $ENV{K}, "--net", "tap,fd=" . fileno($t)) or die;' $flags
               echo "rc=$?"
           done
           ls /sys/class/net | grep -v '^lo$' | sed 's/^/left /'"#,
    );
    let out = String::from_utf8_lossy(&o.stdout);
    assert_eq!(out.trim(), "rc=0\nrc=0", "{}", text(&o));
    assert!(o.stderr.is_empty(), "{}", text(&o));
}
