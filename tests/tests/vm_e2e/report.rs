//! The guest's side: the shell helpers its scripts start with, and the report they print
//! on the console.

use std::collections::BTreeMap;

use crate::spec::VmOutput;

/// Helpers for the guest scripts. Every step reports `R key value` on the console.
pub const GUEST_SH_PRELUDE: &str = r#"
say() { echo "<2>E2E: $*" > /dev/kmsg; }
r() { k=$1; shift; say "R $k $*"; }
sha() { sha256sum < "$1" | cut -d' ' -f1; }
# hash_dev DEV OFFSET LEN (4K aligned), read with O_DIRECT
hash_dev() {
    timeout 60 dd if=/dev/$1 bs=4096 skip=$(($2 / 4096)) count=$(($3 / 4096)) iflag=direct 2>/dev/null \
        | sha256sum | cut -d' ' -f1
}
# write_dev DEV OFFSET FILE (4K aligned), O_DIRECT + fsync
write_dev() {
    timeout 60 dd if=$3 of=/dev/$1 bs=4096 seek=$(($2 / 4096)) oflag=direct conv=fsync,notrunc 2>/tmp/dd.err
    rc=$?
    [ $rc -ne 0 ] && say "WARN dd of=/dev/$1 seek=$2: $(tr '\n' ' ' </tmp/dd.err)"
    return $rc
}
"#;

/// Guest-side report. The guest writes `E2E: R <key> <value...>`, `E2E: WARN ...` and
/// `E2E: END rc=N` through /dev/kmsg (the kernel prints them on the console with polled UART
/// writes, behind a timestamp), and `E2E-TTY-OK` through the tty (needs the UART interrupt).
pub struct Report {
    pub values: BTreeMap<String, String>,
    pub warnings: Vec<String>,
    pub end_rc: Option<i32>,
    pub tty_ok: bool,
}

impl Report {
    pub fn parse(console: &str) -> Report {
        let mut r = Report {
            values: BTreeMap::new(),
            warnings: vec![],
            end_rc: None,
            tty_ok: false,
        };
        for line in console.lines() {
            let line = line.trim_end_matches('\r');
            if line.contains("E2E-TTY-OK") {
                r.tty_ok = true;
            }
            let Some(at) = line.find("E2E: ") else {
                continue;
            };
            let msg = line[at + 5..].trim();
            if let Some(rest) = msg.strip_prefix("R ") {
                let mut it = rest.splitn(2, ' ');
                let k = it.next().unwrap_or("").to_string();
                let v = it.next().unwrap_or("").trim().to_string();
                r.values.insert(k, v);
            } else if let Some(rc) = msg.strip_prefix("END rc=") {
                r.end_rc = rc.trim().parse().ok();
            } else if msg.starts_with("WARN") {
                r.warnings.push(msg.to_string());
            }
        }
        r
    }
    pub fn get(&self, k: &str) -> Result<&str, String> {
        self.values.get(k).map(|s| s.as_str()).ok_or_else(|| {
            let mut m = format!("guest did not report '{k}'");
            if !self.warnings.is_empty() {
                m.push_str(&format!(" (guest warnings: {})", self.warnings.join("; ")));
            }
            m
        })
    }
}

pub fn expect_kv(rep: &Report, key: &str, want: &str, errs: &mut Vec<String>) {
    match rep.get(key) {
        Ok(v) if v == want => {}
        Ok(v) => errs.push(format!("{key}: guest reported '{v}', expected '{want}'")),
        Err(e) => errs.push(e),
    }
}

pub fn guest_ran(out: &VmOutput) -> Result<Report, String> {
    let rep = Report::parse(&out.console);
    if rep.end_rc.is_none() {
        return Err(format!(
            "the guest did not finish its script (no 'E2E: END' on the console)\n{}",
            out.describe()
        ));
    }
    Ok(rep)
}

pub fn finish(what: &str, errs: Vec<String>, out: &VmOutput) -> Result<(), String> {
    if errs.is_empty() {
        Ok(())
    } else {
        Err(format!(
            "{what}:\n  - {}\n{}",
            errs.join("\n  - "),
            out.describe()
        ))
    }
}
