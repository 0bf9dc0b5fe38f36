//! Changing the backing file a qcow2 image names: the header's name field and the
//! backing-format extension, every other field and extension kept. `rebase` and (later)
//! `amend` build on it.
//!
//! Crash safety: everything written before (the data a safe rebase copied) is flushed and
//! synced before the header changes, and the header is synced before this returns, so a
//! crash leaves the old name over the old contents or the new name over the new ones.

use super::Qcow2Image;
use crate::backing::BackingRef;
use crate::error::{Error, Result};

impl Qcow2Image {
    /// Name `backing` as the image's backing file (name and format as given, not
    /// resolved), or no backing file with `None`. The layer attached below in memory is
    /// not replaced: reads keep going there until the image is opened again.
    pub(crate) fn change_backing_file(&self, backing: Option<&BackingRef>) -> Result<()> {
        if self.read_only {
            return Err(Error::ReadOnly);
        }
        let _g = self.gate.write().unwrap_or_else(|p| p.into_inner());
        let mut m = self.meta();
        let mut h = m.h.clone();
        if let Some(b) = backing {
            // QEMU: a raw external data file is a valid image alone, so it takes no backing
            // file; names longer than its buffer are refused.
            if h.has_data_file() && h.data_file_raw() {
                return Err(Error::invalid("Invalid argument"));
            }
            if b.name.len() > super::header::MAX_BACKING_NAME as usize {
                return Err(Error::invalid("Invalid argument"));
            }
        }
        h.backing_file = backing.map(|b| b.name.clone());
        h.backing_format = backing.and_then(|b| b.format.clone());
        // Refuses a name that does not fit in the header cluster, before anything changes.
        h.clone().encode()?;
        m.flush()?;
        m.h = h;
        m.write_header()?;
        m.sync()
    }
}

#[cfg(test)]
mod tests {
    use crate::backing::BackingRef;
    use crate::error::Error;
    use crate::open::{open_image, Image, OpenOptions};
    use crate::test_tools::{qemu, qemu_ok};

    fn open(p: &std::path::Path) -> Image {
        let opts = OpenOptions {
            no_backing: true,
            ..Default::default()
        };
        crate::lock::retry_while_locked(|| open_image(p, &opts)).unwrap()
    }

    /// `qemu-img info` split into the backing lines and the rest (file size aside).
    fn info(p: &std::path::Path) -> (Vec<String>, Vec<String>) {
        let text = qemu_ok("qemu-img", &["info", "-U", p.to_str().unwrap()]);
        text.lines()
            .filter(|l| !l.starts_with("disk size"))
            .map(String::from)
            .partition(|l| l.starts_with("backing file"))
    }

    /// A new name and format land in the header as qemu-img reads them, the other fields
    /// survive, guest data stays, and `None` removes both.
    #[test]
    fn rename_and_remove_keep_everything_else() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("t.qcow2");
        let ps = p.to_str().unwrap();
        let create = [
            "create",
            "-q",
            "-f",
            "qcow2",
            "-o",
            "compression_type=zstd,lazy_refcounts=on",
            "-u",
            "-b",
            "old.raw",
            "-F",
            "raw",
            ps,
            "1M",
        ];
        std::fs::write(dir.path().join("old.raw"), vec![0u8; 1 << 20]).unwrap();
        qemu_ok("qemu-img", &create);
        qemu_ok("qemu-io", &["-c", "write -P 7 0 64k", "-f", "qcow2", ps]);
        let (_, rest_before) = info(&p);
        let img = open(&p);
        let new = BackingRef {
            name: "sub/new base.qcow2".into(),
            format: Some("qcow2".into()),
        };
        img.change_backing_file(Some(&new)).unwrap();
        drop(img);
        let (backing, rest) = info(&p);
        assert!(
            backing[0].starts_with("backing file: sub/new base.qcow2 "),
            "{backing:?}"
        );
        assert!(
            backing.contains(&"backing file format: qcow2".to_string()),
            "{backing:?}"
        );
        assert_eq!(rest, rest_before);
        let img = open(&p);
        img.change_backing_file(None).unwrap();
        drop(img);
        let (backing, rest) = info(&p);
        assert!(backing.is_empty(), "{backing:?}");
        assert_eq!(rest, rest_before);
        qemu_ok("qemu-img", &["check", "-q", ps]);
        let (code, out) = qemu("qemu-io", &["-c", "read -P 7 0 64k", "-f", "qcow2", ps]);
        assert!(code == 0 && out.contains("read 65536/65536"), "{out}");
    }

    /// A name that does not fit in a 512-byte header cluster is refused as no space, one
    /// past QEMU's limit as invalid, and the image keeps its old name either way.
    #[test]
    fn names_that_do_not_fit_are_refused() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("t.qcow2");
        let ps = p.to_str().unwrap();
        qemu_ok(
            "qemu-img",
            &[
                "create",
                "-q",
                "-f",
                "qcow2",
                "-o",
                "cluster_size=512",
                ps,
                "1M",
            ],
        );
        let img = open(&p);
        let r = |n: usize| BackingRef {
            name: "a".repeat(n),
            format: Some("raw".into()),
        };
        let e = img.change_backing_file(Some(&r(600))).unwrap_err();
        assert!(matches!(e, Error::NoSpace(_)), "{e:?}");
        let e = img.change_backing_file(Some(&r(1024))).unwrap_err();
        assert!(matches!(e, Error::InvalidArgument(_)), "{e:?}");
        assert!(info(&p).0.is_empty());
        img.change_backing_file(Some(&r(100))).unwrap();
        drop(img);
        let name = format!("backing file: {} ", "a".repeat(100));
        assert!(info(&p).0[0].starts_with(&name));
        let alone = format!(
            r#"json:{{"driver":"qcow2","backing":null,"file":{{"driver":"file","filename":"{ps}"}}}}"#
        );
        qemu_ok("qemu-img", &["check", "-q", &alone]);
    }

    /// What was written before (a safe rebase's copies) is durable before the header
    /// names the new backing file, and the header is durable when the call returns.
    #[test]
    fn data_is_durable_before_the_header_changes() {
        use crate::driver::BlockDriver;
        use crate::fault_storage::{FaultStorage, Op};
        use std::sync::Arc;
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("t.qcow2");
        let ps = p.to_str().unwrap();
        qemu_ok(
            "qemu-img",
            &[
                "create", "-q", "-f", "qcow2", "-u", "-b", "o", "-F", "raw", ps, "4M",
            ],
        );
        let fault = FaultStorage::with_content(std::fs::read(&p).unwrap());
        let img = super::Qcow2Image::open(Arc::new(fault.clone()), false).unwrap();
        fault.reset_log().unwrap();
        img.write_at(&[9u8; 65536], 1 << 20).unwrap();
        let new = BackingRef {
            name: "n".into(),
            format: Some("qcow2".into()),
        };
        img.change_backing_file(Some(&new)).unwrap();
        let log = fault.log();
        let header = log
            .iter()
            .rposition(|op| matches!(op, Op::Write { offset: 0, .. }))
            .expect("the header is written");
        let last_other = log
            .iter()
            .rposition(|op| matches!(op, Op::Write { offset, .. } if *offset != 0))
            .expect("data and metadata are written");
        assert!(last_other < header, "{log:?}");
        assert!(log[last_other..header].contains(&Op::Flush), "{log:?}");
        assert_eq!(log.last(), Some(&Op::Flush), "{log:?}");
    }
}
