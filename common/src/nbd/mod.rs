//! The NBD protocol (fixed newstyle handshake, simple and structured replies): numbers and
//! the codecs of its messages, shared by `img serve` and the NBD client. Nothing here does
//! I/O beyond reading one message from a stream; every length a peer sends is checked
//! against the limits in [`consts`] before anything is allocated for it.

pub mod client;
pub mod consts;
pub mod fields;
pub mod handshake;
pub mod pipeline;
pub mod reply;
pub mod request;
pub mod storage;
pub mod uri;
