//! What a client sees at the end of its startup, after the upstream login (cold or warm):
//! NegotiateProtocolVersion when it asked for more than 3.0, AuthenticationOk, the
//! upstream's ParameterStatus and notices, leasegate's own cancel key, ReadyForQuery.

use bytes::{BufMut, BytesMut};

use super::handshake::ClientHello;
use crate::protocol::messages;
use crate::upstream::LoggedIn;

/// What the client gets to complete its startup, up to leasegate's cancel key:
/// NegotiateProtocolVersion if needed, AuthenticationOk, the upstream's ParameterStatus and
/// notices. [`startup_tail`] adds the rest.
pub(super) fn startup_head(hello: &ClientHello, logged_in: &LoggedIn) -> BytesMut {
    let mut out = BytesMut::with_capacity(1024);
    negotiate_protocol(&mut out, hello);
    messages::authentication_ok(&mut out);
    out.extend_from_slice(&logged_in.to_client);
    out
}

/// The end of the startup reply: leasegate's cancel key (when the upstream gave one), then
/// ReadyForQuery with the upstream's transaction `status`.
pub(super) fn startup_tail(out: &mut BytesMut, key: Option<(i32, i32)>, status: u8) {
    if let Some((pid, secret)) = key {
        messages::backend_key_data(out, pid, secret);
    }
    messages::ready_for_query(out, status);
}

/// NegotiateProtocolVersion when the client asked for a newer minor version or `_pq_.`
/// options: leasegate speaks 3.0 and no protocol extensions.
fn negotiate_protocol(out: &mut BytesMut, hello: &ClientHello) {
    let options: Vec<&String> = hello
        .params
        .keys()
        .filter(|k| k.starts_with("_pq_."))
        .collect();
    if hello.minor == 0 && options.is_empty() {
        return;
    }
    let len = 4 + 4 + 4 + options.iter().map(|o| o.len() + 1).sum::<usize>();
    out.put_u8(b'v');
    out.put_u32(len as u32);
    // The newest version this server speaks for the requested major, as PostgreSQL sends it:
    // the full version code 3.0 (libpq reads it so).
    out.put_u32(0x0003_0000);
    out.put_u32(options.len() as u32);
    for o in options {
        out.put_slice(o.as_bytes());
        out.put_u8(0);
    }
}
