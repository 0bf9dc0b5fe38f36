//! The handshake with one client: greeting, client flags, then options until the client
//! picks the export (NBD_OPT_GO or NBD_OPT_EXPORT_NAME), aborts, or breaks the protocol.

use std::io::{Read, Write};

use crate::nbd::consts::*;
use crate::nbd::handshake::{self, InfoRequest, MetaRequest};
use crate::{Error, Result};

use super::export::{Context, Export};

/// What the client negotiated for the transmission phase.
#[derive(Debug, Default)]
pub struct Session {
    pub structured: bool,
    pub contexts: Vec<Context>,
}

/// The handshake ended without an export: the client aborted or asked for one that
/// does not exist with NBD_OPT_EXPORT_NAME (which can only be refused by hanging up).
pub enum Outcome {
    Transmission(Session),
    Closed,
}

/// Run the handshake on `r`/`w`.
pub fn negotiate(export: &Export, r: &mut impl Read, w: &mut impl Write) -> Result<Outcome> {
    send(w, &handshake::greeting())?;
    let mut flags = [0u8; 4];
    handshake::read_all(r, &mut flags, "client flags")?;
    let client = handshake::client_flags(u32::from_be_bytes(flags))?;
    let mut session = Session::default();
    loop {
        let opt = handshake::read_option(r)?;
        let o = opt.option;
        let reply = |w: &mut dyn Write, kind: u32, data: &[u8]| {
            send(w, &handshake::option_reply(o, kind, data))
        };
        match o {
            OPT_EXPORT_NAME => {
                if opt.data != export.name.as_bytes() {
                    return Ok(Outcome::Closed);
                }
                send(
                    w,
                    &handshake::export_name_reply(
                        export.size(),
                        export.flags(session.structured),
                        client.no_zeroes,
                    ),
                )?;
                return Ok(Outcome::Transmission(session));
            }
            OPT_ABORT => {
                // The client may already be gone; the reply is a courtesy.
                let _ = reply(w, REP_ACK, &[]);
                return Ok(Outcome::Closed);
            }
            OPT_LIST => {
                if !opt.data.is_empty() {
                    invalid(w, o, "no payload expected")?;
                    continue;
                }
                let desc = export.description.as_deref().unwrap_or("");
                reply(w, REP_SERVER, &handshake::server_entry(&export.name, desc))?;
                reply(w, REP_ACK, &[])?;
            }
            OPT_STARTTLS => error(w, o, REP_ERR_POLICY, "TLS not configured")?,
            OPT_STRUCTURED_REPLY => {
                if !opt.data.is_empty() {
                    invalid(w, o, "no payload expected")?;
                } else if session.structured {
                    invalid(w, o, "structured reply already negotiated")?;
                } else {
                    session.structured = true;
                    reply(w, REP_ACK, &[])?;
                }
            }
            OPT_INFO | OPT_GO => {
                let req = match InfoRequest::decode(&opt.data) {
                    Ok(r) => r,
                    Err(e) => {
                        invalid(w, o, &e.to_string())?;
                        continue;
                    }
                };
                if req.name != export.name {
                    let msg = format!("export '{}' not present", req.name);
                    error(w, o, REP_ERR_UNKNOWN, &msg)?;
                    continue;
                }
                if req.requests.contains(&INFO_NAME) {
                    reply(w, REP_INFO, &handshake::info_text(INFO_NAME, &export.name))?;
                }
                if let Some(d) = &export.description {
                    reply(w, REP_INFO, &handshake::info_text(INFO_DESCRIPTION, d))?;
                }
                reply(
                    w,
                    REP_INFO,
                    &handshake::info_block_size(export.block_sizes()),
                )?;
                reply(
                    w,
                    REP_INFO,
                    &handshake::info_export(export.size(), export.flags(session.structured)),
                )?;
                reply(w, REP_ACK, &[])?;
                if o == OPT_GO {
                    return Ok(Outcome::Transmission(session));
                }
            }
            OPT_LIST_META_CONTEXT | OPT_SET_META_CONTEXT => {
                let list = o == OPT_LIST_META_CONTEXT;
                if !list && !session.structured {
                    invalid(w, o, "structured replies not negotiated")?;
                    continue;
                }
                let req = match MetaRequest::decode(&opt.data) {
                    Ok(r) => r,
                    Err(e) => {
                        invalid(w, o, &e.to_string())?;
                        continue;
                    }
                };
                if req.name != export.name {
                    let msg = format!("export '{}' not present", req.name);
                    error(w, o, REP_ERR_UNKNOWN, &msg)?;
                    continue;
                }
                let mut chosen: Vec<Context> = Vec::new();
                if list && req.queries.is_empty() {
                    chosen = export.contexts();
                }
                for q in &req.queries {
                    for c in export.contexts_matching(q, list) {
                        if !chosen.contains(&c) {
                            chosen.push(c);
                        }
                    }
                }
                for c in &chosen {
                    let id = if list { 0 } else { c.id() };
                    reply(
                        w,
                        REP_META_CONTEXT,
                        &handshake::meta_context_entry(id, c.name()),
                    )?;
                }
                reply(w, REP_ACK, &[])?;
                if !list {
                    session.contexts = chosen;
                }
            }
            _ => error(w, o, REP_ERR_UNSUP, &format!("Unsupported option {o}"))?,
        }
    }
}

/// Send an option error with its message.
fn error(w: &mut dyn Write, option: u32, kind: u32, msg: &str) -> Result<()> {
    send(w, &handshake::option_reply(option, kind, msg.as_bytes()))
}

/// NBD_REP_ERR_INVALID for a malformed option the connection survives.
fn invalid(w: &mut dyn Write, option: u32, msg: &str) -> Result<()> {
    error(w, option, REP_ERR_INVALID, msg)
}

/// Send one message now: the client answers it before it sends more.
fn send(w: &mut (impl Write + ?Sized), bytes: &[u8]) -> Result<()> {
    w.write_all(bytes)
        .and_then(|()| w.flush())
        .map_err(|e| Error::io("sending to the client", e))
}
