//! The shared disk-image engine of `img` and `vmm`.
//!
//! Front ends open an image with [`open::open_image`] and move bytes through the
//! [`driver::BlockDriver`] trait. Formats sit on the [`storage::Storage`] trait so that tests
//! can inject failures below them.

pub mod check;
pub mod direct_io;
pub mod driver;
pub mod error;
pub mod fault_storage;
pub mod iovec;
pub mod lock;
pub mod raw;
pub mod storage;

pub use driver::{Allocation, BlockDriver, BlockStatus};
pub use error::{Error, Result};
pub use iovec::{IoBuf, IoBufMut};
pub mod open;
pub mod option_list;
pub mod prealloc;
pub mod qcow2;
