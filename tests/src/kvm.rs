//! The host's /dev/kvm: whether tests can use it, and whether it runs guest kernel code at
//! hardware speed (real VT-x/AMD-V) or emulates it (the software backend of this project's
//! machines, about a million guest instructions per second: too slow to boot Linux).

use std::path::Path;
use std::process::Command;
use std::time::Duration;

use crate::{fake_kernel, in_ci, run, Output};

/// Whether /dev/kvm can be opened. Outside CI a test without it is skipped loudly; in CI
/// (which has /dev/kvm) its absence fails the test.
pub fn have_kvm() -> bool {
    let ok = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open("/dev/kvm")
        .is_ok();
    assert!(ok || !in_ci(), "/dev/kvm is missing or unusable in CI");
    if !ok {
        eprintln!("SKIPPED: no usable /dev/kvm");
    }
    ok
}

/// How the host's /dev/kvm runs guest kernel code.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum KvmSpeed {
    /// At hardware speed: Linux boots under `vmm` directly.
    Hardware,
    /// Emulated (or otherwise far too slow to boot Linux).
    Emulated,
    /// `vmm` cannot run even an empty guest here.
    Unusable,
}

/// The verdict of [`probe_kvm`] and the measurements behind it.
#[derive(Debug, Clone)]
pub struct KvmProbe {
    pub speed: KvmSpeed,
    pub detail: String,
}

/// Loop iterations of the probe guest: about 10 ms at hardware speed, about 20 s on the
/// emulating backend (measured there: 1 M iterations/s).
pub const PROBE_ITERATIONS: u32 = 20_000_000;

/// Time the probe loop may take, beyond the empty guest's run time, to count as hardware
/// speed: 10 M iterations/s, 10x the emulating backend and 100x below real hardware.
pub const PROBE_LIMIT: Duration = Duration::from_secs(2);

/// Time `vmm` (at `vmm_bin`) running an empty guest and a guest that counts
/// [`PROBE_ITERATIONS`] down before it powers off; the fake kernels are written to `dir`.
pub fn probe_kvm(vmm_bin: &Path, dir: &Path) -> KvmProbe {
    let run_guest = |name: &str, code: &[u8], timeout: Duration| {
        let kernel = dir.join(name);
        let image = fake_kernel::bzimage(&[code, fake_kernel::POWEROFF].concat());
        std::fs::write(&kernel, image).expect("write the probe kernel");
        let mut cmd = Command::new(vmm_bin);
        cmd.arg("run").arg("--kernel").arg(&kernel);
        cmd.args(["--memory", "64M"]);
        run(&mut cmd, timeout)
    };
    let empty = run_guest("probe-empty", &[], Duration::from_secs(60));
    if !empty.success() {
        return classify(&empty, None);
    }
    let looped = run_guest(
        "probe-loop",
        &fake_kernel::count_down(PROBE_ITERATIONS),
        PROBE_LIMIT + empty.elapsed,
    );
    classify(&empty, Some(&looped))
}

/// The verdict for the empty guest's run and, when that succeeded, the loop guest's.
pub fn classify(empty: &Output, looped: Option<&Output>) -> KvmProbe {
    let verdict = |speed, detail: String| KvmProbe { speed, detail };
    let looped = match looped {
        Some(l) if empty.success() => l,
        _ => {
            return verdict(
                KvmSpeed::Unusable,
                format!("vmm cannot run an empty guest:\n{}", empty.report()),
            )
        }
    };
    let secs = looped.elapsed.saturating_sub(empty.elapsed).as_secs_f64();
    if looped.success() {
        verdict(
            KvmSpeed::Hardware,
            format!(
                "a guest loop of {PROBE_ITERATIONS} iterations took {secs:.3} s \
                 ({:.0} M iterations/s)",
                f64::from(PROBE_ITERATIONS) / secs.max(1e-6) / 1e6
            ),
        )
    } else if looped.timed_out {
        verdict(
            KvmSpeed::Emulated,
            format!(
                "a guest loop of {PROBE_ITERATIONS} iterations did not finish within {:.1} s \
                 (an empty guest took {:.3} s)",
                PROBE_LIMIT.as_secs_f64(),
                empty.elapsed.as_secs_f64()
            ),
        )
    } else {
        verdict(
            KvmSpeed::Unusable,
            format!("the loop guest failed:\n{}", looped.report()),
        )
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn out(code: Option<i32>, timed_out: bool, ms: u64) -> Output {
        Output {
            cmdline: "vmm run".into(),
            code,
            signal: None,
            stdout: String::new(),
            stderr: String::new(),
            timed_out,
            elapsed: Duration::from_millis(ms),
        }
    }

    #[test]
    fn verdicts() {
        let empty = out(Some(0), false, 30);
        let speed = |e: &Output, l: Option<&Output>| classify(e, l).speed;
        assert_eq!(
            speed(&empty, Some(&out(Some(0), false, 45))),
            KvmSpeed::Hardware
        );
        assert_eq!(
            speed(&empty, Some(&out(None, true, 2030))),
            KvmSpeed::Emulated
        );
        assert_eq!(
            speed(&empty, Some(&out(Some(1), false, 40))),
            KvmSpeed::Unusable
        );
        assert_eq!(speed(&out(Some(1), false, 5), None), KvmSpeed::Unusable);
        assert_eq!(speed(&out(None, true, 60_000), None), KvmSpeed::Unusable);
        let d = classify(&empty, Some(&out(Some(0), false, 50))).detail;
        assert!(
            d.contains("took 0.020 s") && d.contains("1000 M iterations/s"),
            "{d}"
        );
    }
}
