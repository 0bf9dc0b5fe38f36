//! The one export `img serve` offers: the open image, its name and description, the
//! transmission flags it advertises, and its block status as NBD meta contexts.

use crate::driver::{Allocation, BlockDriver, BlockStatus};
use crate::nbd::consts::*;
use crate::nbd::handshake::BlockSizes;
use crate::nbd::reply::Extent;
use crate::Result;

/// How writes reach the disk (qemu-nbd's `--cache`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum WriteCache {
    /// Flushes when the client asks (writeback, none, unsafe).
    Back,
    /// Every write is made durable before it is acknowledged (writethrough, directsync).
    Through,
}

/// The meta contexts a client can select, with the ids qemu-nbd gives them.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Context {
    BaseAllocation,
    AllocationDepth,
}

impl Context {
    pub fn name(self) -> &'static str {
        match self {
            Context::BaseAllocation => CONTEXT_BASE_ALLOCATION,
            Context::AllocationDepth => CONTEXT_ALLOCATION_DEPTH,
        }
    }

    pub fn id(self) -> u32 {
        match self {
            Context::BaseAllocation => 0,
            Context::AllocationDepth => 1,
        }
    }

    /// The descriptor flags of a run: `base:allocation`'s hole and zero bits, or the
    /// layer that holds it (0 when none does).
    fn value(self, s: &BlockStatus) -> u32 {
        match (self, s.allocation) {
            (Context::BaseAllocation, Allocation::Data) => 0,
            (Context::BaseAllocation, Allocation::DataOverHole) => STATE_ZERO,
            (Context::BaseAllocation, Allocation::Zero | Allocation::Unallocated) => {
                STATE_HOLE | STATE_ZERO
            }
            (Context::BaseAllocation, Allocation::Undetermined) => STATE_HOLE,
            (Context::AllocationDepth, Allocation::Unallocated | Allocation::Undetermined) => 0,
            (Context::AllocationDepth, _) => s.depth + 1,
        }
    }
}

/// Block status descriptors gathered per request at most (a client asks again for more).
const MAX_RUNS: usize = 1 << 16;

/// The export.
pub struct Export {
    /// The open image (its chain below it).
    pub image: Box<dyn BlockDriver>,
    pub name: String,
    pub description: Option<String>,
    pub allocation_depth: bool,
    pub cache: WriteCache,
    /// More than one client may connect at once (`-e` other than 1).
    pub multi_conn: bool,
    /// What one connection may have in flight.
    pub limits: Limits,
}

/// What one connection may have in flight: requests (and so worker threads), and bytes of
/// WRITE payloads and READ buffers, over which a request waits unless it is alone.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Limits {
    pub requests: usize,
    pub bytes: usize,
}

impl Default for Limits {
    /// qemu-nbd's 16 requests, and two of the largest payloads.
    fn default() -> Self {
        Limits {
            requests: 16,
            bytes: 2 * MAX_PAYLOAD as usize,
        }
    }
}

impl Export {
    pub fn driver(&self) -> &dyn BlockDriver {
        &*self.image
    }

    pub fn size(&self) -> u64 {
        self.driver().size()
    }

    pub fn read_only(&self) -> bool {
        self.driver().is_read_only()
    }

    /// The transmission flags, as qemu-nbd sets them: DF only with structured replies
    /// (`structured`); multi-conn only when several clients may connect (safe because
    /// they share one open image, so a flush on any connection covers writes completed on
    /// all of them).
    pub fn flags(&self, structured: bool) -> u16 {
        let mut f = FLAG_HAS_FLAGS | FLAG_SEND_FLUSH | FLAG_SEND_FUA | FLAG_SEND_CACHE;
        if structured {
            f |= FLAG_SEND_DF;
        }
        if self.read_only() {
            f |= FLAG_READ_ONLY;
        } else {
            f |= FLAG_SEND_TRIM | FLAG_SEND_WRITE_ZEROES | FLAG_SEND_FAST_ZERO;
        }
        if self.multi_conn {
            f |= FLAG_CAN_MULTI_CONN;
        }
        f
    }

    /// Block size constraints: any alignment, 4 KiB preferred, qemu-nbd's 32 MiB at most.
    pub fn block_sizes(&self) -> BlockSizes {
        BlockSizes {
            min: 1,
            preferred: 4096,
            max: MAX_PAYLOAD,
        }
    }

    /// The contexts whose names match `query`: an exact name, or a namespace (`base:`,
    /// `qemu:`) when `list` (only NBD_OPT_LIST_META_CONTEXT takes namespaces).
    pub fn contexts_matching(&self, query: &str, list: bool) -> Vec<Context> {
        self.contexts()
            .into_iter()
            .filter(|c| {
                let name = c.name();
                name == query || (list && query.ends_with(':') && name.starts_with(query))
            })
            .collect()
    }

    /// Every context this export offers.
    pub fn contexts(&self) -> Vec<Context> {
        let mut v = vec![Context::BaseAllocation];
        if self.allocation_depth {
            v.push(Context::AllocationDepth);
        }
        v
    }

    /// The status runs from `offset` over at most `len` bytes (fewer when the range breaks
    /// into very many runs, or only the first with `one`).
    pub fn runs(&self, offset: u64, len: u64, one: bool) -> Result<Vec<BlockStatus>> {
        let mut runs = Vec::new();
        let (mut at, end) = (offset, offset + len);
        while at < end && runs.len() < MAX_RUNS {
            let s = self.driver().block_status(at, end - at)?;
            at += s.len;
            runs.push(s);
            if one {
                break;
            }
        }
        Ok(runs)
    }
}

/// The descriptors of `context` over `runs`, neighbours with equal flags merged (only
/// the first with `one`).
pub fn extents(context: Context, runs: &[BlockStatus], one: bool) -> Vec<Extent> {
    let mut out: Vec<Extent> = Vec::new();
    for r in runs {
        let flags = context.value(r);
        match out.last_mut() {
            Some(last) if last.flags == flags => last.len += r.len as u32,
            _ => out.push(Extent {
                len: r.len as u32,
                flags,
            }),
        }
    }
    if one {
        out.truncate(1);
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn run(len: u64, allocation: Allocation, depth: u32) -> BlockStatus {
        BlockStatus {
            len,
            allocation,
            depth,
            host_offset: None,
            compressed: false,
        }
    }

    #[test]
    fn runs_become_merged_descriptors_per_context() {
        let runs = [
            run(512, Allocation::Data, 0),
            run(512, Allocation::Data, 1),
            run(1024, Allocation::Zero, 0),
            run(512, Allocation::Unallocated, 0),
            run(512, Allocation::DataOverHole, 0),
        ];
        let e = |len, flags| Extent { len, flags };
        assert_eq!(
            extents(Context::BaseAllocation, &runs, false),
            vec![
                e(1024, 0),
                e(1536, STATE_HOLE | STATE_ZERO),
                e(512, STATE_ZERO)
            ]
        );
        assert_eq!(
            extents(Context::AllocationDepth, &runs, false),
            vec![e(512, 1), e(512, 2), e(1024, 1), e(512, 0), e(512, 1)]
        );
        assert_eq!(
            extents(Context::BaseAllocation, &runs, true),
            vec![e(1024, 0)]
        );
    }
}
