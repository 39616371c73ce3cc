//! The pre-authentication packet parser on arbitrary bytes: `parse_initial_packet` on the
//! input as one buffer, and `read_initial_packet` on the input as a stream. Besides "no
//! panic", checks the stream reader's contract: it never reads past the packet its length
//! field announces, refuses lengths outside 8..=10000, and what it decodes has C-string
//! parameters (non-empty names, no NUL anywhere).

#![no_main]

use std::future::Future;
use std::pin::pin;
use std::task::{Context, Poll, Waker};

use bytes::BytesMut;
use leasegate::protocol::startup::{
    InitialPacket, MAX_STARTUP_PACKET, PacketError, parse_initial_packet, read_initial_packet,
};
use libfuzzer_sys::fuzz_target;

/// Reading from a byte slice never waits: one poll completes the future.
fn ready<F: Future>(fut: F) -> F::Output {
    match pin!(fut).poll(&mut Context::from_waker(Waker::noop())) {
        Poll::Ready(out) => out,
        Poll::Pending => panic!("reading from a slice returned Pending"),
    }
}

fn check(packet: &InitialPacket) {
    if let InitialPacket::Startup(s) = packet {
        for (k, v) in &s.params {
            assert!(!k.is_empty(), "empty parameter name");
            assert!(
                !k.contains('\0') && !v.contains('\0'),
                "NUL inside a parameter"
            );
        }
    }
}

fuzz_target!(|data: &[u8]| {
    if let Ok(packet) = parse_initial_packet(BytesMut::from(data)) {
        check(&packet);
    }

    let mut reader = data;
    let result = ready(read_initial_packet(&mut reader));
    let consumed = data.len() - reader.len();
    if data.len() >= 4 {
        let len = u32::from_be_bytes([data[0], data[1], data[2], data[3]]) as usize;
        if !(8..=MAX_STARTUP_PACKET).contains(&len) {
            assert!(
                matches!(result, Err(PacketError::BadLength(_))),
                "{result:?}"
            );
            assert_eq!(consumed, 4, "read past a refused length field");
        } else {
            assert!(
                consumed <= len,
                "read {consumed} bytes of a {len}-byte packet"
            );
        }
    }
    if let Ok(packet) = &result {
        check(packet);
    }
});
