//! Scenario B: readonly=on (vda) and snapshot=on (vdb).

use std::fs;
use std::path::Path;

use integration_tests::{qemu_check, qemu_convert_raw, Rng};

use crate::images::{make_patterned_qcow2, KIB, MIB};
use crate::report::{expect_kv, finish, guest_ran, GUEST_SH_PRELUDE};
use crate::spec::{Drive, VmOutput, VmSpec};
use crate::tools::{sha256, sha256_file};

const RS_SIZE: u64 = 16 * MIB;

pub struct ScenarioB {
    pub spec: VmSpec,
    pub ro_sha: String,
    pub snap_sha: String,
    /// Guest-visible content of the readonly and snapshot images.
    pub ro_raw: Vec<u8>,
    pub snap_raw: Vec<u8>,
    /// What the guest writes to the snapshot disk: (offset, data).
    pub snap_write: (u64, Vec<u8>),
}

pub fn scenario_b(dir: &Path, work: &Path, rng: &mut Rng) -> Result<ScenarioB, String> {
    fs::create_dir_all(dir).unwrap();
    make_patterned_qcow2(
        &dir.join("ro.qcow2"),
        RS_SIZE,
        &[(0x77, 0, MIB), (0x78, 8 * MIB, MIB)],
    )?;
    make_patterned_qcow2(
        &dir.join("snap.qcow2"),
        RS_SIZE,
        &[(0x99, 0, MIB), (0x9a, 8 * MIB, MIB)],
    )?;
    let ro_raw = qemu_convert_raw(&dir.join("ro.qcow2"), None, &work.join("ro.raw"))?;
    let snap_raw = qemu_convert_raw(&dir.join("snap.qcow2"), None, &work.join("snap.raw"))?;
    let w = rng.bytes(64 * KIB as usize);
    let snap_off = 8 * MIB - 32 * KIB; // crosses into the 0x9a region
    let mut sh = String::from(GUEST_SH_PRELUDE);
    sh.push_str(&format!(
        "r ro_flag \"$(cat /sys/block/vda/ro)\"\n\
         r ro_read \"$(hash_dev vda 0 {mib})\"\n\
         write_dev vda 0 /data/w; r ro_write \"rc=$?\"\n\
         write_dev vda {off8} /data/w; r ro_write2 \"rc=$?\"\n\
         r ro_read_after \"$(hash_dev vda 0 {mib})\"\n\
         r snap_read \"$(hash_dev vdb 0 {mib})\"\n\
         write_dev vdb {snap_off} /data/w; r snap_write \"rc=$?\"\n\
         r snap_readback \"$(hash_dev vdb {snap_off} {wlen})\"\n\
         r snap_read2 \"$(hash_dev vdb 0 {mib})\"\n",
        mib = MIB,
        off8 = 8 * MIB,
        wlen = w.len(),
    ));
    Ok(ScenarioB {
        spec: VmSpec {
            name: "b".into(),
            cpus: 1,
            memory_mib: 256,
            drives: vec![
                Drive {
                    file: "ro.qcow2".into(),
                    readonly: true,
                    snapshot: false,
                },
                Drive {
                    file: "snap.qcow2".into(),
                    readonly: false,
                    snapshot: true,
                },
            ],
            test_sh: sh,
            data: vec![("w".into(), w.clone())],
            env: vec![],
            disk_boot: false,
            net: None,
            firmware: false,
            kill_after: None,
        },
        ro_sha: sha256_file(&dir.join("ro.qcow2")),
        snap_sha: sha256_file(&dir.join("snap.qcow2")),
        ro_raw,
        snap_raw,
        snap_write: (snap_off, w),
    })
}

pub fn check_readonly(b: &ScenarioB, out: &VmOutput, images: &Path) -> Result<(), String> {
    let rep = guest_ran(out)?;
    let mut errs = vec![];
    expect_kv(&rep, "ro_flag", "1", &mut errs);
    let want = sha256(&b.ro_raw[..MIB as usize]);
    expect_kv(&rep, "ro_read", &want, &mut errs);
    expect_kv(&rep, "ro_read_after", &want, &mut errs);
    for k in ["ro_write", "ro_write2"] {
        match rep.get(k) {
            Ok("rc=0") => errs.push(format!("{k}: a write to the readonly=on disk succeeded")),
            Ok(_) => {}
            Err(e) => errs.push(e),
        }
    }
    let img = images.join("ro.qcow2");
    if let Err(e) = qemu_check(&img) {
        errs.push(e);
    }
    if sha256_file(&img) != b.ro_sha {
        errs.push("ro.qcow2 changed although it was attached readonly=on".into());
    }
    finish("readonly=on disk", errs, out)
}

pub fn check_snapshot(b: &ScenarioB, out: &VmOutput, images: &Path) -> Result<(), String> {
    let rep = guest_ran(out)?;
    let mut errs = vec![];
    let want = sha256(&b.snap_raw[..MIB as usize]);
    expect_kv(&rep, "snap_read", &want, &mut errs);
    expect_kv(&rep, "snap_read2", &want, &mut errs);
    expect_kv(&rep, "snap_write", "rc=0", &mut errs);
    expect_kv(&rep, "snap_readback", &sha256(&b.snap_write.1), &mut errs);
    let img = images.join("snap.qcow2");
    if let Err(e) = qemu_check(&img) {
        errs.push(e);
    }
    if sha256_file(&img) != b.snap_sha {
        errs.push("snap.qcow2 changed although it was attached snapshot=on".into());
    }
    finish("snapshot=on disk", errs, out)
}
