//! The relay's message framer on an arbitrary byte stream split at arbitrary points: no
//! panic, `advance` always makes progress and never reports more than it was given, and
//! feeding in chunks ends in the same state as feeding everything at once.

#![no_main]

use leasegate::protocol::framing::Framer;
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    // First byte: chunk size for the split feed; the rest: the stream.
    let Some((&chunk, stream)) = data.split_first() else {
        return;
    };
    let chunk = usize::from(chunk).max(1);

    let mut whole = Framer::default();
    whole.feed(stream);

    let mut split = Framer::default();
    let mut boundaries = 0usize;
    for piece in stream.chunks(chunk) {
        let mut rest = piece;
        while !rest.is_empty() {
            let n = split.advance(rest);
            assert!(
                n > 0 && n <= rest.len(),
                "advance returned {n} of {}",
                rest.len()
            );
            if split.at_boundary() {
                boundaries += 1;
            }
            rest = &rest[n..];
        }
    }
    assert_eq!(whole.at_boundary(), split.at_boundary());
    assert_eq!(whole.last_type(), split.last_type());
    assert!(boundaries <= stream.len() / 5 + 1);
});
