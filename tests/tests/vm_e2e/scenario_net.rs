//! Networking: a guest with two virtio-net NICs on taps vmm creates (one through `--net`,
//! one through QEMU's `-netdev tap` + `-device virtio-net-pci`), each put on its own bridge
//! by the up script. Addresses are in the documentation range 192.0.2.0/24 only, and the
//! network exists only where vmm runs (the test host has no NIC; the direct runner uses a
//! private network namespace), so no packet reaches any real network.
//!
//! The guest pings the host side on both NICs and is pinged from it, takes its second link
//! down (pings fail) and up again (they work), receives 64 MiB over TCP from the host and
//! sends 64 MiB back (busybox `nc`), and both sides report SHA-256 digests.

use crate::report::{expect_kv, finish, guest_ran, Report, GUEST_SH_PRELUDE};
use crate::spec::{NetRun, VmOutput, VmSpec};

/// Time the whole networking run may take (64 MiB each way at test-host speed: 135 s alone,
/// 260 s with the machine busy).
const NET_TIMEOUT_S: u64 = 600;
const MAC1: &str = "52:54:00:00:01:02";
/// vmm's first default MAC (QEMU's).
const MAC0: &str = "52:54:00:12:34:56";

/// The guest side.
const GUEST_SH: &str = r#"
for m in failover net_failover virtio_net; do insmod /lib/modules/$m.ko 2>/dev/null; done
i=0; while [ ! -e /sys/class/net/eth1 ] && [ $i -lt 100 ]; do sleep 0.1; i=$((i + 1)); done
r macs "$(cat /sys/class/net/eth0/address) $(cat /sys/class/net/eth1/address)"
ip link set lo up
ip addr add 192.0.2.2/25 dev eth0 && ip link set eth0 up
ip addr add 192.0.2.130/25 dev eth1 && ip link set eth1 up
# ping_until ADDR: up to 30 s for the first answer (links and ARP settle).
ping_until() {
    i=0
    while [ $i -lt 30 ]; do
        ping -c 1 -W 1 $1 >/dev/null 2>&1 && { echo ok; return; }
        i=$((i + 1))
    done
    echo fail
}
r ping0 "$(ping_until 192.0.2.1)"
r ping1 "$(ping_until 192.0.2.129)"
ip link set eth1 down
if ping -c 2 -W 1 192.0.2.129 >/dev/null 2>&1; then r link_down_ping ok; else r link_down_ping fail; fi
r link_down_carrier "$(cat /sys/class/net/eth1/operstate)"
ip link set eth1 up
r link_up_ping "$(ping_until 192.0.2.129)"
# Host to guest: the host connects once this listens.
timeout 300 nc -l -p 5001 -e sh -c 'cat > /tmp/h2g'
r h2g_bytes "$(wc -c < /tmp/h2g)"
r h2g_sha "$(sha /tmp/h2g)"
# Guest to host.
head -c 67108864 /dev/urandom > /tmp/g2h
r g2h_sha "$(sha /tmp/g2h)"
i=0
until timeout 300 nc 192.0.2.1 5002 < /tmp/g2h; do
    i=$((i + 1)); [ $i -ge 30 ] && break; sleep 1
done
r g2h_sent "$i"
"#;

/// Run before vmm starts, in $NETDIR: the bridges with the host's addresses, the up and
/// down scripts (they log to $NETDIR/scripts.log), the data to send, and the listener for
/// the guest's data.
const HOST_SETUP: &str = r#"
set -e
ip link set lo up
for b in br0 br1; do brctl addbr $b; done
ip addr add 192.0.2.1/25 dev br0
ip addr add 192.0.2.129/25 dev br1
ip link set br0 up
ip link set br1 up
for n in 0 1; do
    cat > $NETDIR/ifup$n <<EOF
#!/bin/sh
brctl addif br$n \$1 && ip link set \$1 up && echo "up \$1 br$n" >> $NETDIR/scripts.log
EOF
done
cat > $NETDIR/ifdown <<EOF
#!/bin/sh
echo "down \$1 \$(cat /sys/class/net/\$1/brport/bridge/uevent 2>/dev/null | sed -n 's/^INTERFACE=//p')" >> $NETDIR/scripts.log
brctl delif br0 \$1
EOF
chmod +x $NETDIR/ifup0 $NETDIR/ifup1 $NETDIR/ifdown
head -c 67108864 /dev/urandom > $NETDIR/h2g
"#;

/// Run alongside vmm; prints `R key value` lines.
const HOST_SH: &str = r#"
r() { k=$1; shift; echo "R $k $*"; }
sha() { sha256sum < "$1" | cut -d' ' -f1; }
(timeout 400 nc -l -p 5002 -e sh -c "cat > $NETDIR/g2h") &
listener=$!
r h2g_sha "$(sha $NETDIR/h2g)"
i=0
until ping -c 1 -W 1 192.0.2.2 >/dev/null 2>&1; do
    i=$((i + 1)); [ $i -ge 240 ] && break
done
r host_ping0 "$(ping -c 3 -W 2 192.0.2.2 >/dev/null 2>&1 && echo ok || echo fail)"
r host_ping1 "$(ping -c 3 -W 2 192.0.2.130 >/dev/null 2>&1 && echo ok || echo fail)"
i=0
until timeout 300 nc 192.0.2.2 5001 < $NETDIR/h2g 2>/dev/null; do
    i=$((i + 1)); [ $i -ge 120 ] && break; sleep 1
done
r h2g_tries "$i"
wait $listener
r g2h_bytes "$(wc -c < $NETDIR/g2h)"
r g2h_sha "$(sha $NETDIR/g2h)"
"#;

pub fn scenario_net() -> VmSpec {
    let args = [
        "--net",
        "tap,ifname=vmmtap0,script=@NETDIR@/ifup0,downscript=@NETDIR@/ifdown",
        "-netdev",
        "tap,id=n1,ifname=vmmtap1,script=@NETDIR@/ifup1,downscript=no",
        "-device",
    ]
    .iter()
    .map(|s| s.to_string())
    .chain([format!("virtio-net-pci,netdev=n1,mac={MAC1}")])
    .collect();
    VmSpec {
        name: "net".into(),
        cpus: 2,
        memory_mib: 512,
        drives: vec![],
        test_sh: format!("{GUEST_SH_PRELUDE}{GUEST_SH}"),
        data: vec![],
        env: vec![],
        disk_boot: false,
        firmware: false,
        kill_after: None,
        net: Some(NetRun {
            args,
            host_setup: HOST_SETUP.into(),
            host_sh: HOST_SH.into(),
            timeout_s: NET_TIMEOUT_S,
        }),
    }
}

pub fn check_net(out: &VmOutput) -> Result<(), String> {
    let rep = guest_ran(out)?;
    let host = Report::parse(
        &out.host
            .lines()
            .map(|l| format!("E2E: {l}\n"))
            .collect::<String>(),
    );
    let mut errs = vec![];
    expect_kv(&rep, "macs", &format!("{MAC0} {MAC1}"), &mut errs);
    for k in ["ping0", "ping1", "link_up_ping"] {
        expect_kv(&rep, k, "ok", &mut errs);
    }
    expect_kv(&rep, "link_down_ping", "fail", &mut errs);
    expect_kv(&rep, "link_down_carrier", "down", &mut errs);
    for k in ["host_ping0", "host_ping1"] {
        expect_kv(&host, k, "ok", &mut errs);
    }
    expect_kv(&rep, "h2g_bytes", "67108864", &mut errs);
    expect_kv(&host, "g2h_bytes", "67108864", &mut errs);
    for k in ["h2g_sha", "g2h_sha"] {
        match (rep.get(k), host.get(k)) {
            (Ok(g), Ok(h)) if g == h && g.len() == 64 => {}
            (g, h) => errs.push(format!("{k}: guest {g:?}, host {h:?}")),
        }
    }
    // Both up scripts ran with the interface names; the one downscript ran while the tap
    // was still on its bridge; the taps went with vmm.
    expect_kv(
        &host,
        "scripts",
        "up vmmtap0 br0; up vmmtap1 br1; down vmmtap0 br0",
        &mut errs,
    );
    expect_kv(&host, "netdevs_after", "br0 br1 lo", &mut errs);
    if out.rc != Some(0) {
        errs.push(format!("exit code {:?}, expected 0", out.rc));
    }
    let res = finish("networking (two virtio-net NICs on taps)", errs, out);
    res.map_err(|e| format!("{e}\nhost side:\n{}", out.host))
}
