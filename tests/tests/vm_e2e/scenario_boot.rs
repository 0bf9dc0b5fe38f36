//! The plainest boot: 2 vCPUs, 512M, no disks.

use crate::report::{expect_kv, finish, guest_ran, GUEST_SH_PRELUDE};
use crate::spec::{VmOutput, VmSpec};

/// The plainest boot: 2 vCPUs, 512M, no disks; the guest reports CPUs and memory.
pub fn scenario_boot() -> VmSpec {
    let mut sh = String::from(GUEST_SH_PRELUDE);
    sh.push_str(
        "r cpus_online \"$(cat /sys/devices/system/cpu/online)\"\n\
         r nproc \"$(grep -c '^processor' /proc/cpuinfo)\"\n\
         r memtotal_kb \"$(awk '/^MemTotal:/ {print $2}' /proc/meminfo)\"\n\
         r loader \"$(od -An -tx1 -j 528 -N 1 /sys/kernel/boot_params/data | tr -d ' ')\"\n",
    );
    VmSpec {
        name: "boot".into(),
        cpus: 2,
        memory_mib: 512,
        drives: vec![],
        test_sh: sh,
        data: vec![],
        env: vec![],
        disk_boot: false,
        net: None,
        firmware: false,
        kill_after: None,
    }
}

/// The same boot entered through the 64-bit boot protocol (zero page with the E820 map,
/// command line and initrd) instead of PVH: `VMM_BOOT_NO_PVH=1`.
pub fn scenario_boot_64bit() -> VmSpec {
    VmSpec {
        name: "boot64".into(),
        env: vec![("VMM_BOOT_NO_PVH", "1")],
        ..scenario_boot()
    }
}

/// The boot loader type the kernel recorded (`type_of_loader` in /sys/kernel/boot_params,
/// in hex): vmm's zero page says ff; through PVH the kernel fills in its own value.
pub fn loader_type(out: &VmOutput) -> Result<String, String> {
    Ok(guest_ran(out)?.get("loader")?.to_string())
}

pub fn check_boot(out: &VmOutput) -> Result<(), String> {
    let rep = guest_ran(out)?;
    let mut errs = vec![];
    expect_kv(&rep, "cpus_online", "0-1", &mut errs);
    expect_kv(&rep, "nproc", "2", &mut errs);
    match rep.get("memtotal_kb").map(|v| v.parse::<u64>()) {
        Ok(Ok(kb)) if kb > 400 * 1024 && kb <= 512 * 1024 => {}
        Ok(v) => errs.push(format!("MemTotal {v:?} kB is not plausible for 512M")),
        Err(e) => errs.push(e),
    }
    if out.rc != Some(0) {
        errs.push(format!(
            "exit code {:?}, expected 0 after the guest's reboot",
            out.rc
        ));
    }
    finish("boot (2 CPUs, 512M)", errs, out)
}

/// Userspace writes to the console (the tty layer: interrupt-driven UART transmit, unlike the
/// kernel's polled console writes that carry the reports) reach the host.
pub fn check_tty(out: &VmOutput) -> Result<(), String> {
    let rep = guest_ran(out)?;
    if rep.tty_ok {
        Ok(())
    } else {
        Err(format!(
            "userspace console output is missing: /init's `echo E2E-TTY-OK` (through the tty, \
             i.e. interrupt-driven UART transmit on IRQ 4) never reached the console, while the \
             kernel's polled console writes did\n{}",
            out.describe()
        ))
    }
}
