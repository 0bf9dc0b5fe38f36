//! The shared disk-image engine of `img` and `vmm`.
//!
//! Front ends open an image with [`open::open_image`], move bytes through the
//! [`driver::BlockDriver`] trait, and describe or create images with the format operations in
//! [`ops`] and [`create`]. Formats sit on the [`storage::Storage`] trait so that tests can
//! inject failures below them.

pub mod backing;
mod block_map;
pub mod check;
pub mod copy_offload;
pub mod create;
pub mod direct_io;
pub mod driver;
pub mod error;
#[cfg(any(test, feature = "fault-injection"))]
pub mod fault_storage;
pub mod format;
mod inflate;
pub mod iovec;
pub mod lock;
pub mod measure;
pub mod nbd;
pub mod open;
pub mod ops;
pub mod option_list;
pub mod parallels;
pub mod prealloc;
pub mod probe;
pub mod qcow1;
pub mod qcow2;
pub mod qed;
pub mod raw;
pub mod readonly;
pub mod storage;
#[cfg(test)]
mod test_tools;
pub mod uuid;
pub mod vdi;
pub mod vhdx;
pub mod vmdk;
pub mod vpc;

pub use driver::{Allocation, BlockDriver, BlockStatus, Clusters};
pub use error::{Error, Result};
pub use iovec::{IoBuf, IoBufMut};
