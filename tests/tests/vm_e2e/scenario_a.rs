//! Scenario A: a qcow2 overlay on a patterned base (vda) and an ext4 disk (vdb).

use std::fs;
use std::path::Path;
use std::process::Command;
use std::time::Duration;

use integration_tests::{qemu_check, qemu_convert_raw, qemu_img_in, run, Rng};

use crate::fixtures::Bins;
use crate::images::{first_difference, make_overlay, make_patterned_qcow2, KIB, MIB};
use crate::report::{expect_kv, finish, guest_ran, GUEST_SH_PRELUDE};
use crate::spec::{Drive, VmOutput, VmSpec};
use crate::tools::{sha256, sha256_file, t};

const BASE_SIZE: u64 = 64 * MIB;

/// (pattern byte, offset, length) written into base.qcow2 with qemu-io.
const BASE_PATTERNS: &[(u8, u64, u64)] = &[
    (0xa5, 0, MIB),
    (0x5a, 4 * MIB, MIB),
    (0x3c, 32 * MIB - 64 * KIB, 192 * KIB),
    (0xc3, BASE_SIZE - 256 * KIB, 256 * KIB),
];

pub struct ScenarioA {
    pub spec: VmSpec,
    /// The guest's writes to vda: (offset, data).
    pub writes: Vec<(u64, Vec<u8>)>,
    /// The base image's guest-visible content.
    pub base_raw: Vec<u8>,
    pub base_sha_before: String,
    /// Text of /host/hello.txt on the ext4 disk.
    pub host_text: String,
    /// Token the guest writes into /guest/from-guest.txt.
    pub token: String,
}

pub fn scenario_a(
    dir: &Path,
    work: &Path,
    rng: &mut Rng,
    bins: Option<&Bins>,
) -> Result<ScenarioA, String> {
    fs::create_dir_all(dir).unwrap();
    // vda: overlay.qcow2 -> base.qcow2 (relative backing name: the pair moves together).
    make_patterned_qcow2(&dir.join("base.qcow2"), BASE_SIZE, BASE_PATTERNS)?;
    make_overlay(
        dir,
        "base.qcow2",
        "overlay.qcow2",
        bins.map(|b| b.img.as_path()),
    )?;
    let base_raw = qemu_convert_raw(&dir.join("base.qcow2"), None, &work.join("base-a.raw"))?;
    let base_sha_before = sha256_file(&dir.join("base.qcow2"));

    // vdb: ext4 built on the host, converted to qcow2.
    let token = format!("{:016x}", rng.next_u64());
    let host_text = format!("hello from the host, token {:016x}\n", rng.next_u64());
    let tree = work.join("ext4-tree");
    fs::create_dir_all(tree.join("host")).unwrap();
    fs::create_dir_all(tree.join("guest")).unwrap();
    fs::write(tree.join("host/hello.txt"), &host_text).unwrap();
    let raw = work.join("data.raw");
    run(
        Command::new(t("mkfs.ext4"))
            .args(["-q", "-F", "-L", "e2e", "-d"])
            .arg(&tree)
            .arg(&raw)
            .arg("32M"),
        Duration::from_secs(60),
    )
    .check()?;
    qemu_img_in(
        dir,
        &[
            "convert",
            "-O",
            "qcow2",
            raw.to_str().unwrap(),
            dir.join("data.qcow2").to_str().unwrap(),
        ],
    )
    .check()?;

    // The guest's writes: fixed interesting places (partial clusters over backing data,
    // crossing a pattern edge, crossing a cluster boundary, unallocated space, the last block)
    // plus random ones; all 4 KiB aligned and non-overlapping.
    let mut places: Vec<(u64, u64)> = vec![
        (0, 4 * KIB),
        (MIB - 4 * KIB, 8 * KIB),
        (4 * MIB + 60 * KIB, 8 * KIB),
        (20 * MIB + 4 * KIB * rng.below(64), 128 * KIB),
        (32 * MIB - 4 * KIB, 12 * KIB),
        (BASE_SIZE - 4 * KIB, 4 * KIB),
    ];
    while places.len() < 10 {
        let len = 4 * KIB * (1 + rng.below(16));
        let off = 4 * KIB * rng.below((BASE_SIZE - len) / (4 * KIB));
        if places.iter().all(|&(o, l)| off + len <= o || o + l <= off) {
            places.push((off, len));
        }
    }
    let writes: Vec<(u64, Vec<u8>)> = places
        .iter()
        .map(|&(o, l)| (o, rng.bytes(l as usize)))
        .collect();

    let mut sh = String::from(GUEST_SH_PRELUDE);
    sh.push_str("r vda_sectors \"$(cat /sys/block/vda/size)\"\n");
    // The base, read through the overlay before any write.
    for (i, (_, off, len)) in BASE_PATTERNS.iter().enumerate() {
        sh.push_str(&format!("r base.{i} \"$(hash_dev vda {off} {len})\"\n"));
    }
    for (i, (off, data)) in writes.iter().enumerate() {
        sh.push_str(&format!(
            "write_dev vda {off} /data/w{i}; r write.{i} \"off={off} len={} rc=$? sha=$(sha /data/w{i})\"\n",
            data.len()
        ));
    }
    for (i, (off, data)) in writes.iter().enumerate() {
        sh.push_str(&format!(
            "r readback.{i} \"$(hash_dev vda {off} {})\"\n",
            data.len()
        ));
    }
    sh.push_str(&format!(
        "timeout 60 mount -t ext4 /dev/vdb /mnt; r mount_vdb \"rc=$?\"\n\
         r host_sha \"$(sha /mnt/host/hello.txt)\"\n\
         echo 'written by the guest, token {token}' > /mnt/guest/from-guest.txt; r guest_write \"rc=$?\"\n\
         cp /data/w0 /mnt/guest/blob.bin; r guest_blob \"rc=$?\"\n\
         sync; r sync_vdb \"rc=$?\"\n\
         timeout 60 umount /mnt; r umount_vdb \"rc=$?\"\n"
    ));
    let data = writes
        .iter()
        .enumerate()
        .map(|(i, (_, d))| (format!("w{i}"), d.clone()))
        .collect();
    Ok(ScenarioA {
        spec: VmSpec {
            name: "a".into(),
            cpus: 2,
            memory_mib: 512,
            drives: vec![
                Drive {
                    file: "overlay.qcow2".into(),
                    readonly: false,
                    snapshot: false,
                },
                Drive {
                    file: "data.qcow2".into(),
                    readonly: false,
                    snapshot: false,
                },
            ],
            test_sh: sh,
            data,
            env: vec![],
            disk_boot: false,
            net: None,
            firmware: false,
            kill_after: None,
        },
        writes,
        base_raw,
        base_sha_before,
        host_text,
        token,
    })
}

pub fn check_overlay(
    a: &ScenarioA,
    out: &VmOutput,
    images: &Path,
    work: &Path,
) -> Result<(), String> {
    let rep = guest_ran(out)?;
    let mut errs = vec![];
    expect_kv(
        &rep,
        "vda_sectors",
        &(BASE_SIZE / 512).to_string(),
        &mut errs,
    );
    for (i, (_, off, len)) in BASE_PATTERNS.iter().enumerate() {
        let want = sha256(&a.base_raw[*off as usize..(off + len) as usize]);
        expect_kv(&rep, &format!("base.{i}"), &want, &mut errs);
    }
    for (i, (off, data)) in a.writes.iter().enumerate() {
        let sha = sha256(data);
        expect_kv(
            &rep,
            &format!("write.{i}"),
            &format!("off={off} len={} rc=0 sha={sha}", data.len()),
            &mut errs,
        );
        expect_kv(&rep, &format!("readback.{i}"), &sha, &mut errs);
    }
    for f in ["overlay.qcow2", "base.qcow2"] {
        if let Err(e) = qemu_check(&images.join(f)) {
            errs.push(e);
        }
    }
    let base_after = sha256_file(&images.join("base.qcow2"));
    if base_after != a.base_sha_before {
        errs.push("base.qcow2 (the backing file) was modified".into());
    }
    // Byte-compare the whole overlay (as the guest sees it) with base + the guest's writes.
    let mut expected = a.base_raw.clone();
    for (off, data) in &a.writes {
        expected[*off as usize..*off as usize + data.len()].copy_from_slice(data);
    }
    match qemu_convert_raw(
        &images.join("overlay.qcow2"),
        None,
        &work.join("overlay-after.raw"),
    ) {
        Ok(got) => {
            if let Some(at) = first_difference(&got, &expected) {
                errs.push(format!(
                    "overlay content differs from base + guest writes at byte {at} (0x{at:x}); \
                     sizes {} vs {}",
                    got.len(),
                    expected.len()
                ));
            }
        }
        Err(e) => errs.push(e),
    }
    finish("qcow2 overlay (vda)", errs, out)
}

pub fn check_ext4(a: &ScenarioA, out: &VmOutput, images: &Path, work: &Path) -> Result<(), String> {
    let rep = guest_ran(out)?;
    let mut errs = vec![];
    expect_kv(&rep, "mount_vdb", "rc=0", &mut errs);
    expect_kv(&rep, "host_sha", &sha256(a.host_text.as_bytes()), &mut errs);
    for k in ["guest_write", "guest_blob", "sync_vdb", "umount_vdb"] {
        expect_kv(&rep, k, "rc=0", &mut errs);
    }
    let img = images.join("data.qcow2");
    if let Err(e) = qemu_check(&img) {
        errs.push(e);
    }
    let raw = work.join("data-after.raw");
    if let Err(e) = qemu_convert_raw(&img, None, &raw) {
        errs.push(e);
        return finish("ext4 disk (vdb)", errs, out);
    }
    let fsck = run(
        Command::new(t("e2fsck")).arg("-fn").arg(&raw),
        Duration::from_secs(120),
    );
    if !fsck.success() {
        errs.push(format!("e2fsck -fn is not clean:\n{}", fsck.report()));
    }
    let cat = run(
        Command::new(t("debugfs"))
            .args(["-R", "cat /guest/from-guest.txt"])
            .arg(&raw),
        Duration::from_secs(60),
    );
    let want = format!("written by the guest, token {}\n", a.token);
    if cat.stdout != want {
        errs.push(format!(
            "debugfs cat /guest/from-guest.txt: got {:?}, want {want:?}",
            cat.stdout
        ));
    }
    let blob = work.join("blob.bin");
    let _ = run(
        Command::new(t("debugfs"))
            .arg("-R")
            .arg(format!("dump /guest/blob.bin {}", blob.display()))
            .arg(&raw),
        Duration::from_secs(60),
    );
    if fs::read(&blob).ok().as_deref() != Some(&a.writes[0].1[..]) {
        errs.push(
            "/guest/blob.bin (dumped with debugfs) differs from what the guest copied".into(),
        );
    }
    finish("ext4 disk (vdb)", errs, out)
}
