//! The NBD protocol (fixed newstyle handshake, simple and structured replies): numbers and
//! the codecs of its messages, and on them the client (`client`, `pipeline`, `storage`)
//! and the server behind `img serve` (`server`). Every length a peer sends is checked
//! against the limits in [`consts`] before anything is allocated for it.

pub mod client;
pub mod consts;
pub mod fields;
pub mod handshake;
pub mod pipeline;
pub mod reply;
pub mod request;
pub mod server;
pub mod storage;
pub mod uri;
