//! Changing a qcow2 image's options in place (`qemu-img amend`), in QEMU's order:
//! checks of the options, then upgrade to version 3, refcount width, the backing file
//! (which amend only accepts unchanged), lazy refcounts, size, and last the downgrade to
//! version 2 (zero clusters expanded first).
//!
//! Each step is crash-safe on its own: new structures are written and synced before the
//! header that names them, and the header write is the step's commit point.

use std::collections::HashSet;

use super::allocator::When;
use super::entry::{L2Entry, COPIED, OFFSET_MASK, ZERO};
use super::header::{CompressionType, COMPAT_LAZY_REFCOUNTS, INCOMPAT_COMPRESSION, INCOMPAT_DIRTY};
use super::meta::Meta;
use super::units::{ClusterCount, HostOffset};
use super::walker::{Flow, Visit};
use super::Qcow2Image;
use crate::error::{io, Error, Result};
use crate::prealloc::Preallocation;

/// The options `amend` takes, as given (`None`: not given).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct AmendOptions {
    /// `0.10`/`v2` or `1.1`/`v3`.
    pub compat: Option<String>,
    pub size: Option<u64>,
    pub backing_file: Option<String>,
    pub backing_fmt: Option<String>,
    pub data_file: Option<String>,
    pub data_file_raw: Option<bool>,
    pub lazy_refcounts: Option<bool>,
    pub refcount_bits: Option<u64>,
    /// Any `encrypt.*` option was given.
    pub encrypt: bool,
}

/// What the options resolve to against the image.
struct Plan {
    version: u32,
    refcount_order: u32,
    lazy_refcounts: bool,
}

impl Qcow2Image {
    /// Apply `opts` (`qemu-img amend`); `progress` hears the share of the long steps
    /// (version and refcount width changes) done, up to 100.
    pub fn amend(&self, opts: &AmendOptions, progress: &mut dyn FnMut(f64)) -> Result<()> {
        let plan = self.plan(opts)?;
        let old_version = self.header().version;
        let long_steps =
            plan.version != old_version || plan.refcount_order != self.header().refcount_order;
        if plan.version > old_version {
            self.with_meta_exclusive(|m| m.upgrade())?;
        }
        if plan.refcount_order != self.header().refcount_order {
            if plan.version < 3 {
                return Err(Error::invalid(
                    "Refcount widths other than 16 bits require compatibility level 1.1 or \
                     above (use compat=1.1 or greater)",
                ));
            }
            self.with_meta_exclusive(|m| m.rebuild_refcounts_as(plan.refcount_order))?;
        }
        if opts.backing_file.is_some() || opts.backing_fmt.is_some() {
            let h = self.header();
            if opts.backing_file != h.backing_file || opts.backing_fmt != h.backing_format {
                return Err(Error::invalid(
                    "Cannot amend the backing file\nYou can use 'img rebase' instead.",
                ));
            }
        }
        if plan.lazy_refcounts != self.header().lazy_refcounts() {
            if plan.lazy_refcounts && plan.version < 3 {
                return Err(Error::invalid(
                    "Lazy refcounts only supported with compatibility level 1.1 and above \
                     (use compat=1.1 or greater)",
                ));
            }
            self.with_meta_exclusive(|m| m.set_lazy_refcounts(plan.lazy_refcounts))?;
        }
        if let Some(size) = opts.size.filter(|&s| s > 0) {
            self.resize(size, Preallocation::Off)?;
        }
        if plan.version < old_version {
            let backed = self.backing.is_some();
            self.with_meta_exclusive(|m| m.downgrade(backed))?;
        }
        if long_steps {
            progress(100.0);
        }
        Ok(())
    }

    /// Check the options as QEMU's option loop does, before anything changes.
    fn plan(&self, opts: &AmendOptions) -> Result<Plan> {
        let h = self.header();
        let version = match opts.compat.as_deref() {
            None => h.version,
            Some("0.10" | "v2") => 2,
            Some("1.1" | "v3") => 3,
            Some(other) => {
                return Err(Error::invalid(format!(
                    "Unknown compatibility level {other}"
                )))
            }
        };
        if opts.data_file.is_some() && !h.has_data_file() {
            return Err(Error::invalid(
                "data-file can only be set for images that use an external data file",
            ));
        }
        if opts.data_file_raw == Some(true) && !h.data_file_raw() {
            return Err(Error::invalid(
                "data-file-raw cannot be set on existing images",
            ));
        }
        let refcount_order = match opts.refcount_bits {
            None => h.refcount_order,
            Some(b) if b > 0 && b <= 64 && b.is_power_of_two() => b.trailing_zeros(),
            Some(_) => {
                return Err(Error::invalid(
                    "Refcount width must be a power of two and may not exceed 64 bits",
                ))
            }
        };
        if opts.encrypt {
            return Err(Error::invalid(
                "Can't amend encryption options - encryption not present",
            ));
        }
        Ok(Plan {
            version,
            refcount_order,
            lazy_refcounts: opts.lazy_refcounts.unwrap_or(h.lazy_refcounts()),
        })
    }
}

impl Meta {
    /// Version 2 to 3: every snapshot gets the version 3 extra data (its disk size),
    /// then the header is written as version 3.
    fn upgrade(&mut self) -> Result<()> {
        self.flush()?;
        if self.h.nb_snapshots > 0 {
            let table = self.snapshot_table()?;
            self.write_snapshot_table(&table, &table)?;
            self.flush()?;
        }
        self.h.version = 3;
        self.write_header()?;
        self.sync()
    }

    /// Turn lazy refcounts on, or off after making the image clean.
    fn set_lazy_refcounts(&mut self, on: bool) -> Result<()> {
        if on {
            self.flush()?;
            self.h.compatible_features |= COMPAT_LAZY_REFCOUNTS;
        } else {
            self.close()?;
            self.h.compatible_features &= !COMPAT_LAZY_REFCOUNTS;
        }
        self.write_header()?;
        self.sync()
    }

    /// Version 3 to 2, refusing what version 2 cannot hold, as QEMU's downgrade does.
    /// `backed`: the image has a backing file (zero clusters must then get storage).
    fn downgrade(&mut self, backed: bool) -> Result<()> {
        if self.h.refcount_order != 4 {
            return Err(Error::Unsupported(
                "compat=0.10 requires refcount_bits=16".into(),
            ));
        }
        let size = self.h.size;
        let snapshots = self.snapshot_table()?;
        if snapshots
            .iter()
            .any(|s| s.vm_state_size > u64::from(u32::MAX) || s.disk_size != Some(size))
        {
            return Err(Error::Unsupported(
                "Internal snapshots prevent downgrade of image".into(),
            ));
        }
        self.close()?;
        if self.h.compression_type == CompressionType::Zstd {
            if self.has_compressed_clusters()? {
                return Err(Error::Unsupported(
                    "Cannot downgrade an image with zstd compression type and existing \
                     compressed clusters"
                        .into(),
                ));
            }
            self.h.compression_type = CompressionType::Zlib;
            self.h.incompatible_features &= !INCOMPAT_COMPRESSION;
        }
        let incompat = self.h.incompatible_features & !INCOMPAT_DIRTY;
        if incompat != 0 {
            return Err(Error::Unsupported(format!(
                "Cannot downgrade an image with incompatible features {incompat:#x} set"
            )));
        }
        self.h.compatible_features = 0;
        self.h.autoclear_features = 0;
        self.expand_zero_clusters(backed)?;
        self.h.version = 2;
        self.write_header()?;
        self.sync()
    }

    /// Whether any L1 table maps a compressed cluster.
    fn has_compressed_clusters(&mut self) -> Result<bool> {
        let mut found = false;
        self.walk(&mut |v| match v {
            Visit::Entry { entry, .. } if entry.is_compressed() => {
                found = true;
                Flow::Stop
            }
            _ => Flow::Continue,
        })?;
        Ok(found)
    }

    /// Every distinct L2 table of every L1 table; a finding is an error.
    fn all_l2_tables(&mut self) -> Result<Vec<HostOffset>> {
        let mut seen = HashSet::new();
        let mut tables = Vec::new();
        let mut problem = None;
        self.walk_shared_once(&mut |v| {
            match v {
                Visit::L2Table { offset, .. } if seen.insert(offset.0) => tables.push(offset),
                Visit::Finding(f) => {
                    problem = Some(f);
                    return Flow::Stop;
                }
                _ => {}
            }
            Flow::Continue
        })?;
        match problem {
            Some(f) => Err(Error::corrupt(format!("{f}; run 'check -r all' first"))),
            None => Ok(tables),
        }
    }

    /// Make every zero cluster, in every L1 table, a data cluster of zeroes (version 2
    /// has no zero flag): preallocated ones keep their cluster, written with zeroes;
    /// others read as zeroes unallocated, or get a cluster of zeroes over a backing file.
    /// A new cluster in a table several L1 tables share gets one reference for each.
    fn expand_zero_clusters(&mut self, backed: bool) -> Result<()> {
        let tables = self.all_l2_tables()?;
        // Tables go in batches, each with one sync between the zeroes and refcounts and
        // the entries that use them.
        for batch in tables.chunks(64) {
            let mut edits = Vec::new();
            for &table in batch {
                self.plan_zero_expansion(table, backed, &mut edits)?;
            }
            if edits.is_empty() {
                continue;
            }
            self.write_refcounts()?;
            self.sync()?;
            for (table, i, e) in edits {
                self.l2_set(table, i, e)?;
            }
            self.flush()?;
        }
        Ok(())
    }

    /// The new entries for the zero clusters of `table`, their clusters written with
    /// zeroes (and allocated where needed) first.
    fn plan_zero_expansion(
        &mut self,
        table: HostOffset,
        backed: bool,
        edits: &mut Vec<(HostOffset, usize, L2Entry)>,
    ) -> Result<()> {
        let g = self.geo();
        let zeros = vec![0u8; g.cluster_size() as usize];
        let uses = self.refcount(g.host_cluster(table))?;
        for i in 0..g.l2_entries() as usize {
            let e = self.l2_get(table, i)?;
            if e.is_compressed() || e.word & ZERO == 0 {
                continue;
            }
            let host = e.word & OFFSET_MASK;
            let word = if host != 0 {
                io(
                    "Could not write zeroes",
                    self.storage().write_at(&zeros, host),
                )?;
                e.word & !ZERO
            } else if !backed {
                0
            } else {
                let c = self.alloc_clusters(ClusterCount(1))?;
                if uses > 1 {
                    self.update_refcount(c, ClusterCount(1), uses as i64 - 1, When::Now)?;
                }
                let off = g.host_offset(c).0;
                io(
                    "Could not write zeroes",
                    self.storage().write_at(&zeros, off),
                )?;
                off | if uses == 1 { COPIED } else { 0 }
            };
            edits.push((table, i, L2Entry { word, bitmap: 0 }));
        }
        Ok(())
    }
}
