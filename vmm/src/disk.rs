//! Opening `--drive` images as [`BlockDriver`]s, plus the small wrappers vmm adds on top:
//! an in-memory copy-on-write layer for `snapshot=on` and a flush-ignoring layer for
//! `cache=unsafe`.

use std::collections::HashMap;
use std::sync::{Arc, RwLock};

use common::{Allocation, BlockDriver, BlockStatus, Error, Result};

use crate::config::{CacheMode, DriveConfig, DriveFormat};

/// Open one drive as the guest will see it.
pub fn open_drive(cfg: &DriveConfig) -> std::result::Result<Arc<dyn BlockDriver>, String> {
    let path = cfg.path.display();
    // With snapshot=on the image itself is never written: open it read-only and shared.
    let base_ro = cfg.read_only || cfg.snapshot;
    let base = open_base(cfg, base_ro).map_err(|e| {
        let msg = e.to_string();
        if msg.contains(&path.to_string()) {
            msg
        } else {
            format!("drive '{path}': {msg}")
        }
    })?;
    let mut drv: Arc<dyn BlockDriver> = Arc::from(base);
    if cfg.snapshot && !cfg.read_only {
        drv = Arc::new(CowOverlay::new(drv));
    }
    if cfg.cache == CacheMode::Unsafe {
        drv = Arc::new(NoFlush(drv));
    }
    Ok(drv)
}

fn open_base(cfg: &DriveConfig, read_only: bool) -> Result<Box<dyn BlockDriver>> {
    let opts = common::open::OpenOptions {
        read_only,
        force_share: false,
        format: cfg.format.map(|f| match f {
            DriveFormat::Raw => common::open::Format::Raw,
            DriveFormat::Qcow2 => common::open::Format::Qcow2,
        }),
        no_backing: false,
    };
    Ok(common::open::open_image(&cfg.path, &opts)?.into_driver())
}

const COW_BLOCK: u64 = 4096;

enum CowBlock {
    Zero,
    Data(Box<[u8]>),
}

/// `snapshot=on`: every write lands in memory; the image below is only read.
pub struct CowOverlay {
    base: Arc<dyn BlockDriver>,
    blocks: RwLock<HashMap<u64, CowBlock>>,
}

impl CowOverlay {
    pub fn new(base: Arc<dyn BlockDriver>) -> Self {
        CowOverlay {
            base,
            blocks: RwLock::new(HashMap::new()),
        }
    }

    /// Call `f(block_index, offset_in_block, offset_in_request, len)` for each block piece.
    fn pieces(
        offset: u64,
        len: u64,
        mut f: impl FnMut(u64, usize, usize, usize) -> Result<()>,
    ) -> Result<()> {
        let mut pos = offset;
        let end = offset + len;
        while pos < end {
            let blk = pos / COW_BLOCK;
            let in_blk = (pos % COW_BLOCK) as usize;
            let n = ((COW_BLOCK as usize) - in_blk).min((end - pos) as usize);
            f(blk, in_blk, (pos - offset) as usize, n)?;
            pos += n as u64;
        }
        Ok(())
    }

    fn block_len(&self, blk: u64) -> usize {
        (self.base.size() - blk * COW_BLOCK).min(COW_BLOCK) as usize
    }

    fn zero_range(&self, offset: u64, len: u64) -> Result<()> {
        common::driver::check_range(offset, len, self.size())?;
        let mut map = self.blocks.write().unwrap();
        Self::pieces(offset, len, |blk, in_blk, _, n| {
            if in_blk == 0 && n == self.block_len(blk) {
                map.insert(blk, CowBlock::Zero);
            } else {
                let mut data = self.load_block(&map, blk)?;
                data[in_blk..in_blk + n].fill(0);
                map.insert(blk, CowBlock::Data(data));
            }
            Ok(())
        })
    }

    fn load_block(&self, map: &HashMap<u64, CowBlock>, blk: u64) -> Result<Box<[u8]>> {
        let mut data = vec![0u8; self.block_len(blk)].into_boxed_slice();
        match map.get(&blk) {
            Some(CowBlock::Zero) => {}
            Some(CowBlock::Data(d)) => data.copy_from_slice(d),
            None => self.base.read_at(&mut data, blk * COW_BLOCK)?,
        }
        Ok(data)
    }
}

impl BlockDriver for CowOverlay {
    fn format_name(&self) -> &'static str {
        self.base.format_name()
    }
    fn size(&self) -> u64 {
        self.base.size()
    }
    fn is_read_only(&self) -> bool {
        false
    }
    fn read_at(&self, buf: &mut [u8], offset: u64) -> Result<()> {
        common::driver::check_range(offset, buf.len() as u64, self.size())?;
        let map = self.blocks.read().unwrap();
        Self::pieces(offset, buf.len() as u64, |blk, in_blk, at, n| {
            let out = &mut buf[at..at + n];
            match map.get(&blk) {
                Some(CowBlock::Zero) => out.fill(0),
                Some(CowBlock::Data(d)) => out.copy_from_slice(&d[in_blk..in_blk + n]),
                None => self.base.read_at(out, blk * COW_BLOCK + in_blk as u64)?,
            }
            Ok(())
        })
    }
    fn write_at(&self, buf: &[u8], offset: u64) -> Result<()> {
        common::driver::check_range(offset, buf.len() as u64, self.size())?;
        let mut map = self.blocks.write().unwrap();
        Self::pieces(offset, buf.len() as u64, |blk, in_blk, at, n| {
            let mut data = if in_blk == 0 && n == self.block_len(blk) {
                vec![0u8; n].into_boxed_slice()
            } else {
                self.load_block(&map, blk)?
            };
            data[in_blk..in_blk + n].copy_from_slice(&buf[at..at + n]);
            map.insert(blk, CowBlock::Data(data));
            Ok(())
        })
    }
    fn write_zeroes(&self, offset: u64, len: u64, _may_unmap: bool) -> Result<()> {
        self.zero_range(offset, len)
    }
    fn discard(&self, offset: u64, len: u64) -> Result<()> {
        self.zero_range(offset, len)
    }
    fn flush(&self) -> Result<()> {
        Ok(())
    }
    fn block_status(&self, offset: u64, len: u64) -> Result<BlockStatus> {
        Ok(BlockStatus {
            len: len.min(self.size().saturating_sub(offset)).max(1),
            allocation: Allocation::Data,
            depth: 0,
            host_offset: None,
        })
    }
    fn allocated_file_size(&self) -> Result<u64> {
        self.base.allocated_file_size()
    }
}

/// `cache=unsafe`: flushes from the guest are acknowledged without reaching the disk.
pub struct NoFlush(pub Arc<dyn BlockDriver>);

impl BlockDriver for NoFlush {
    fn format_name(&self) -> &'static str {
        self.0.format_name()
    }
    fn size(&self) -> u64 {
        self.0.size()
    }
    fn is_read_only(&self) -> bool {
        self.0.is_read_only()
    }
    fn read_at(&self, buf: &mut [u8], offset: u64) -> Result<()> {
        self.0.read_at(buf, offset)
    }
    fn write_at(&self, buf: &[u8], offset: u64) -> Result<()> {
        self.0.write_at(buf, offset)
    }
    fn write_zeroes(&self, offset: u64, len: u64, may_unmap: bool) -> Result<()> {
        self.0.write_zeroes(offset, len, may_unmap)
    }
    fn discard(&self, offset: u64, len: u64) -> Result<()> {
        self.0.discard(offset, len)
    }
    fn flush(&self) -> Result<()> {
        Ok(())
    }
    fn block_status(&self, offset: u64, len: u64) -> Result<BlockStatus> {
        self.0.block_status(offset, len)
    }
    fn allocated_file_size(&self) -> Result<u64> {
        self.0.allocated_file_size()
    }
}

/// An in-memory image, for tests.
pub struct MemDisk {
    data: RwLock<Vec<u8>>,
    read_only: bool,
}

impl MemDisk {
    pub fn new(size: usize, read_only: bool) -> Self {
        MemDisk {
            data: RwLock::new(vec![0; size]),
            read_only,
        }
    }
    pub fn contents(&self) -> Vec<u8> {
        self.data.read().unwrap().clone()
    }
}

impl BlockDriver for MemDisk {
    fn format_name(&self) -> &'static str {
        "raw"
    }
    fn size(&self) -> u64 {
        self.data.read().unwrap().len() as u64
    }
    fn is_read_only(&self) -> bool {
        self.read_only
    }
    fn read_at(&self, buf: &mut [u8], offset: u64) -> Result<()> {
        common::driver::check_range(offset, buf.len() as u64, self.size())?;
        let d = self.data.read().unwrap();
        buf.copy_from_slice(&d[offset as usize..offset as usize + buf.len()]);
        Ok(())
    }
    fn write_at(&self, buf: &[u8], offset: u64) -> Result<()> {
        if self.read_only {
            return Err(Error::ReadOnly);
        }
        common::driver::check_range(offset, buf.len() as u64, self.size())?;
        let mut d = self.data.write().unwrap();
        d[offset as usize..offset as usize + buf.len()].copy_from_slice(buf);
        Ok(())
    }
    fn write_zeroes(&self, offset: u64, len: u64, _may_unmap: bool) -> Result<()> {
        if self.read_only {
            return Err(Error::ReadOnly);
        }
        common::driver::check_range(offset, len, self.size())?;
        let mut d = self.data.write().unwrap();
        d[offset as usize..(offset + len) as usize].fill(0);
        Ok(())
    }
    fn discard(&self, offset: u64, len: u64) -> Result<()> {
        self.write_zeroes(offset, len, true)
    }
    fn flush(&self) -> Result<()> {
        Ok(())
    }
    fn block_status(&self, _offset: u64, len: u64) -> Result<BlockStatus> {
        Ok(BlockStatus {
            len,
            allocation: Allocation::Data,
            depth: 0,
            host_offset: None,
        })
    }
    fn allocated_file_size(&self) -> Result<u64> {
        Ok(self.size())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn temp_image(name: &str, size: usize) -> std::path::PathBuf {
        let p = std::env::temp_dir().join(format!("vmm-disk-{}-{name}", std::process::id()));
        std::fs::write(&p, vec![0x11u8; size]).unwrap();
        p
    }

    fn drive(path: &std::path::Path, extra: &str) -> DriveConfig {
        crate::config::parse_drive(&format!("file={},format=raw{extra}", path.display())).unwrap()
    }

    #[test]
    fn snapshot_on_leaves_the_file_alone() {
        let p = temp_image("snap", 1 << 16);
        let d = open_drive(&drive(&p, ",snapshot=on")).unwrap();
        assert!(!d.is_read_only());
        d.write_at(&[0x22; 1000], 100).unwrap();
        let mut b = [0u8; 4];
        d.read_at(&mut b, 98).unwrap();
        assert_eq!(b, [0x11, 0x11, 0x22, 0x22]);
        drop(d);
        assert_eq!(std::fs::read(&p).unwrap(), vec![0x11u8; 1 << 16]);
        std::fs::remove_file(&p).unwrap();
    }

    #[test]
    fn read_only_and_locking() {
        let p = temp_image("lock", 1 << 16);
        let ro = open_drive(&drive(&p, ",readonly=on")).unwrap();
        assert!(ro.is_read_only());
        assert!(ro.write_at(&[1], 0).is_err());
        // As in QEMU, a reader blocks writers (it wants a consistent image).
        assert!(open_drive(&drive(&p, "")).is_err());
        drop(ro);
        let rw = open_drive(&drive(&p, "")).unwrap();
        // A second writer is refused while the first one is open.
        let err = open_drive(&drive(&p, ""))
            .err()
            .expect("second writer refused");
        assert!(err.to_lowercase().contains("lock"), "{err}");
        drop(rw);
        std::fs::remove_file(&p).unwrap();
    }

    #[test]
    fn cow_overlay_keeps_base_untouched() {
        let base = Arc::new(MemDisk::new(3 * 4096 + 100, false));
        base.write_at(&[7u8; 10], 4090).unwrap();
        let cow = CowOverlay::new(base.clone());
        cow.write_at(&[1u8; 5], 4093).unwrap();
        let mut buf = [0u8; 12];
        cow.read_at(&mut buf, 4088).unwrap();
        assert_eq!(buf, [0, 0, 7, 7, 7, 1, 1, 1, 1, 1, 7, 7]);
        cow.write_zeroes(4090, 4, false).unwrap();
        cow.read_at(&mut buf, 4088).unwrap();
        assert_eq!(buf, [0, 0, 0, 0, 0, 0, 1, 1, 1, 1, 7, 7]);
        // Last, short block.
        cow.write_at(&[9u8; 100], 3 * 4096).unwrap();
        cow.discard(0, 4096).unwrap();
        let mut b2 = [0u8; 100];
        cow.read_at(&mut b2, 3 * 4096).unwrap();
        assert_eq!(b2, [9u8; 100]);
        assert!(cow.write_at(&[0u8; 2], 3 * 4096 + 99).is_err());
        let mut base_buf = [0u8; 10];
        base.read_at(&mut base_buf, 4090).unwrap();
        assert_eq!(base_buf, [7u8; 10]);
    }
}
