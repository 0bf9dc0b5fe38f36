//! The server side of NBD, behind `img serve`: one export over the shared open image, the
//! handshake with a client ([`negotiate::negotiate`]) and its transmission phase
//! ([`transmit::transmit`], requests served concurrently). Both work on any byte streams,
//! so the listening and the sockets stay with the caller.

mod command;
pub mod export;
pub mod negotiate;
pub mod transmit;

pub use export::{Context, Export, Limits, WriteCache};
pub use negotiate::{negotiate, Outcome, Session};
pub use transmit::transmit;
