//! Property tests (proptest) of the code that handles untrusted input before authentication
//! and while relaying: the pre-authentication packet parser, the message framer, the grant
//! glob matcher, and the startup settings check (`options`, `parse_bool`, UTF-8). A separate test binary; the whole file runs in a few seconds.
//!
//! Regressions found by fuzzing (`fuzz/`) belong at the end of this file.

use std::collections::BTreeMap;
use std::future::Future;
use std::pin::pin;
use std::task::{Context, Poll, Waker};

use bytes::BytesMut;
use leasegate::identity::glob_match;
use leasegate::protocol::framing::{Framer, TypeSet};
use leasegate::protocol::options::{self, Setting};
use leasegate::protocol::startup::{
    InitialPacket, MAX_STARTUP_PACKET, PacketError, parse_initial_packet, read_initial_packet,
};
use leasegate::upstream::params;
use proptest::prelude::*;

const SSL_REQUEST_CODE: u32 = 80_877_103;
const GSSENC_REQUEST_CODE: u32 = 80_877_104;
const CANCEL_REQUEST_CODE: u32 = 80_877_102;
const PROTOCOL_3_0: u32 = 196_608;

/// `cases` per property; failures are reported (with the shrunk input), not persisted.
fn config(cases: u32) -> ProptestConfig {
    ProptestConfig {
        cases,
        failure_persistence: None,
        ..ProptestConfig::default()
    }
}

/// Runs a future that never waits (reads from a byte slice) to completion.
fn ready<F: Future>(fut: F) -> F::Output {
    let mut fut = pin!(fut);
    match fut.as_mut().poll(&mut Context::from_waker(Waker::noop())) {
        Poll::Ready(out) => out,
        Poll::Pending => panic!("reading from a slice never waits"),
    }
}

/// `read_initial_packet` over a byte slice; returns the result and the unread rest.
fn read_from(bytes: &[u8]) -> (Result<InitialPacket, PacketError>, Vec<u8>) {
    let mut reader = bytes;
    let result = ready(read_initial_packet(&mut reader));
    (result, reader.to_vec())
}

fn startup_packet(version: u32, params: &BTreeMap<String, String>) -> Vec<u8> {
    let mut body = version.to_be_bytes().to_vec();
    for (k, v) in params {
        body.extend_from_slice(k.as_bytes());
        body.push(0);
        body.extend_from_slice(v.as_bytes());
        body.push(0);
    }
    body.push(0);
    let mut packet = ((body.len() + 4) as u32).to_be_bytes().to_vec();
    packet.extend_from_slice(&body);
    packet
}

/// A request code: one of the special ones, a protocol version, or anything.
fn request_code() -> impl Strategy<Value = u32> {
    prop_oneof![
        Just(SSL_REQUEST_CODE),
        Just(GSSENC_REQUEST_CODE),
        Just(CANCEL_REQUEST_CODE),
        Just(PROTOCOL_3_0),
        (0u32..4, any::<u16>()).prop_map(|(major, minor)| (major << 16) | u32::from(minor)),
        any::<u32>(),
    ]
}

/// Text without NUL (what a C string can carry); names are non-empty.
fn c_text(min: usize) -> impl Strategy<Value = String> {
    proptest::collection::vec(any::<char>().prop_filter("no NUL", |c| *c != '\0'), min..24)
        .prop_map(|chars| chars.into_iter().collect())
}

proptest! {
    #![proptest_config(config(512))]

    /// Arbitrary bytes, with or without a consistent length field and a known request
    /// code, never make the parser panic.
    #[test]
    fn parse_initial_packet_never_panics(
        code in request_code(),
        body in proptest::collection::vec(any::<u8>(), 0..600),
        length in prop_oneof![Just(None), any::<u32>().prop_map(Some)],
        raw in proptest::collection::vec(any::<u8>(), 0..64),
    ) {
        let _ = parse_initial_packet(BytesMut::from(&raw[..]));
        let len = length.unwrap_or(8 + body.len() as u32);
        let mut packet = len.to_be_bytes().to_vec();
        packet.extend_from_slice(&code.to_be_bytes());
        packet.extend_from_slice(&body);
        let _ = parse_initial_packet(BytesMut::from(&packet[..]));
        let _ = read_from(&packet);
    }

    /// A generated StartupMessage decodes to exactly its parameters, read from a stream
    /// or parsed from a buffer; bytes after it stay unread.
    #[test]
    fn startup_packets_round_trip(
        user in c_text(1),
        database in c_text(1),
        extra in proptest::collection::btree_map(c_text(1), c_text(0), 0..6),
        minor in 0u16..3,
        trailing in proptest::collection::vec(any::<u8>(), 0..32),
    ) {
        let mut params = extra;
        params.insert("user".into(), user);
        params.insert("database".into(), database);
        let version = (3 << 16) | u32::from(minor);
        let packet = startup_packet(version, &params);
        prop_assume!(packet.len() <= MAX_STARTUP_PACKET);
        let mut stream = packet.clone();
        stream.extend_from_slice(&trailing);
        let (read, rest) = read_from(&stream);
        prop_assert_eq!(&rest, &trailing, "exactly one packet is read");
        for result in [read, parse_initial_packet(BytesMut::from(&packet[..]))] {
            match result {
                Ok(InitialPacket::Startup(s)) => {
                    prop_assert_eq!((s.major, s.minor), (3, minor));
                    prop_assert_eq!(&s.params, &params);
                }
                other => prop_assert!(false, "{:?}", other),
            }
        }
    }

    /// Cancel requests with 4- to 256-byte secrets round-trip.
    #[test]
    fn cancel_requests_round_trip(pid in any::<i32>(), secret in proptest::collection::vec(any::<u8>(), 4..=256)) {
        let mut packet = ((12 + secret.len()) as u32).to_be_bytes().to_vec();
        packet.extend_from_slice(&CANCEL_REQUEST_CODE.to_be_bytes());
        packet.extend_from_slice(&pid.to_be_bytes());
        packet.extend_from_slice(&secret);
        match read_from(&packet).0 {
            Ok(InitialPacket::Cancel(key)) => {
                prop_assert_eq!(key.pid, pid);
                prop_assert_eq!(key.secret, secret);
            }
            other => prop_assert!(false, "{:?}", other),
        }
    }

    /// leasegate's PeerCancelRequests round-trip as their own packet, never as a client's
    /// CancelRequest, and never as one when the code is a client's.
    #[test]
    fn peer_cancel_requests_round_trip(pid in any::<i32>(), secret in proptest::collection::vec(any::<u8>(), 4..=256)) {
        let key = leasegate::protocol::startup::CancelKey { pid, secret: secret.clone() };
        let packet = leasegate::protocol::startup::peer_cancel_packet(&key);
        match read_from(&packet).0 {
            Ok(InitialPacket::PeerCancel(k)) => prop_assert_eq!(k, key),
            other => prop_assert!(false, "{:?}", other),
        }
        let mut client = packet.clone();
        client[4..8].copy_from_slice(&CANCEL_REQUEST_CODE.to_be_bytes());
        prop_assert!(matches!(read_from(&client).0, Ok(InitialPacket::Cancel(_))));
    }

    /// Length fields outside 8..=10000 are refused before anything else is read.
    #[test]
    fn lengths_outside_the_limits_are_refused(
        len in prop_oneof![0u32..8, (MAX_STARTUP_PACKET as u32 + 1)..=u32::MAX],
        rest in proptest::collection::vec(any::<u8>(), 0..64),
    ) {
        let mut stream = len.to_be_bytes().to_vec();
        stream.extend_from_slice(&rest);
        let (result, unread) = read_from(&stream);
        prop_assert!(matches!(result, Err(PacketError::BadLength(l)) if l == len), "{:?}", result);
        prop_assert_eq!(unread, rest, "nothing past the length field is read");
    }

    /// Lengths inside the limits are never refused for their length.
    #[test]
    fn lengths_inside_the_limits_are_read(
        len in 8u32..=MAX_STARTUP_PACKET as u32,
        fill in any::<u8>(),
    ) {
        let mut stream = len.to_be_bytes().to_vec();
        stream.resize(len as usize, fill);
        let (result, unread) = read_from(&stream);
        prop_assert!(!matches!(result, Err(PacketError::BadLength(_))), "{:?}", result);
        prop_assert!(unread.is_empty());
    }
}

/// One backend/frontend message: type byte and body.
fn message() -> impl Strategy<Value = (u8, Vec<u8>)> {
    (any::<u8>(), proptest::collection::vec(any::<u8>(), 0..300))
}

fn encode(messages: &[(u8, Vec<u8>)]) -> (Vec<u8>, Vec<usize>) {
    let mut stream = Vec::new();
    let mut boundaries = Vec::new();
    for (tag, body) in messages {
        stream.push(*tag);
        stream.extend_from_slice(&((body.len() + 4) as u32).to_be_bytes());
        stream.extend_from_slice(body);
        boundaries.push(stream.len());
    }
    (stream, boundaries)
}

proptest! {
    #![proptest_config(config(512))]

    /// Fed in arbitrary chunks, the framer is at a boundary exactly after each complete
    /// message, and knows the type of the last one.
    #[test]
    fn framer_tracks_boundaries_across_any_chunking(
        messages in proptest::collection::vec(message(), 1..20),
        cuts in proptest::collection::vec(1usize..64, 0..200),
    ) {
        let (stream, boundaries) = encode(&messages);
        let mut framer = Framer::default();
        let mut fed = 0;
        let mut cuts = cuts.into_iter();
        while fed < stream.len() {
            let n = cuts.next().unwrap_or(stream.len()).min(stream.len() - fed);
            framer.feed(&stream[fed..fed + n]);
            fed += n;
            prop_assert_eq!(framer.at_boundary(), boundaries.contains(&fed), "after {} bytes", fed);
        }
        prop_assert!(framer.at_boundary());
        prop_assert_eq!(framer.last_type(), messages.last().map(|m| m.0).unwrap_or(0));
    }

    /// Under any chunking the framer counts exactly the messages of the counted types, and
    /// knows whether one of the opening types came after the last of them.
    #[test]
    fn framer_counts_chosen_types_across_any_chunking(
        messages in proptest::collection::vec(
            (prop::sample::select(b"QSFPBEdcXZ".to_vec()), proptest::collection::vec(any::<u8>(), 0..40)),
            1..30,
        ),
        cuts in proptest::collection::vec(1usize..16, 0..200),
    ) {
        let (stream, _) = encode(&messages);
        let mut framer = Framer::counting(TypeSet::of(b"QSF"), TypeSet::of(b"PBE"));
        let mut fed = 0;
        let mut cuts = cuts.into_iter();
        while fed < stream.len() {
            let n = cuts.next().unwrap_or(stream.len()).min(stream.len() - fed);
            framer.feed(&stream[fed..fed + n]);
            fed += n;
        }
        let counted = messages.iter().filter(|m| b"QSF".contains(&m.0)).count() as u64;
        let last_counted = messages.iter().rposition(|m| b"QSF".contains(&m.0));
        let pending = messages
            .iter()
            .skip(last_counted.map_or(0, |i| i + 1))
            .any(|m| b"PBE".contains(&m.0));
        prop_assert_eq!(framer.count(), counted);
        prop_assert_eq!(framer.pending(), pending);
    }

    /// `advance` walks message by message: it stops exactly at every boundary.
    #[test]
    fn advance_stops_at_every_boundary(messages in proptest::collection::vec(message(), 1..20)) {
        let (stream, boundaries) = encode(&messages);
        let mut framer = Framer::default();
        let mut at = 0;
        let mut seen = Vec::new();
        while at < stream.len() {
            at += framer.advance(&stream[at..]);
            prop_assert!(framer.at_boundary());
            seen.push(at);
        }
        prop_assert_eq!(seen, boundaries);
    }

    /// Arbitrary bytes (bogus lengths included) never panic the framer, and `advance`
    /// always makes progress.
    #[test]
    fn framer_never_panics(bytes in proptest::collection::vec(any::<u8>(), 0..2000)) {
        let mut framer = Framer::default();
        let mut rest = &bytes[..];
        while !rest.is_empty() {
            let n = framer.advance(rest);
            prop_assert!(n > 0 && n <= rest.len());
            rest = &rest[n..];
        }
    }
}

/// The documented grant semantics, written the obvious (exponential) way: `**` matches any
/// run, `*` any run without `/` or `.`, everything else itself. Tokenised left to right like
/// `glob_match` (`***` is `**` then `*`).
fn reference(p: &[u8], t: &[u8]) -> bool {
    match p {
        [] => t.is_empty(),
        [b'*', b'*', rest @ ..] => (0..=t.len()).any(|i| reference(rest, &t[i..])),
        [b'*', rest @ ..] => {
            for i in 0..=t.len() {
                if reference(rest, &t[i..]) {
                    return true;
                }
                if i < t.len() && matches!(t[i], b'/' | b'.') {
                    return false;
                }
            }
            false
        }
        [c, rest @ ..] => t.first() == Some(c) && reference(rest, &t[1..]),
    }
}

/// Bytes over a small alphabet that makes separators and stars frequent.
fn small(alphabet: &'static [u8], max: usize) -> impl Strategy<Value = Vec<u8>> {
    proptest::collection::vec(proptest::sample::select(alphabet), 0..max)
}

/// Literal text (no `*`), over an alphabet with separators.
fn literal(max: usize) -> impl Strategy<Value = Vec<u8>> {
    small(b"ab/.:-x", max)
}

proptest! {
    #![proptest_config(config(1024))]

    #[test]
    fn pattern_without_wildcards_matches_only_itself(p in literal(12), t in literal(12)) {
        prop_assert!(glob_match(&p, &p));
        prop_assert_eq!(glob_match(&p, &t), p == t);
    }

    /// `prefix*suffix` matches `prefix<mid>suffix` exactly when `mid` has no `/` and no `.`.
    #[test]
    fn single_star_never_crosses_a_separator(
        prefix in literal(8),
        mid in literal(8),
        suffix in literal(8),
    ) {
        let pattern = [&prefix[..], b"*", &suffix[..]].concat();
        let text = [&prefix[..], &mid[..], &suffix[..]].concat();
        let crosses = mid.iter().any(|b| matches!(b, b'/' | b'.'));
        prop_assert_eq!(glob_match(&pattern, &text), !crosses);
        prop_assert_eq!(glob_match(b"*", &mid), !crosses);
    }

    /// `prefix**` matches exactly the texts that start with `prefix`.
    #[test]
    fn double_star_matches_everything_after_a_literal_prefix(
        prefix in literal(10),
        t in small(b"ab/.:-x*", 16),
    ) {
        let pattern = [&prefix[..], b"**"].concat();
        prop_assert_eq!(glob_match(&pattern, &t), t.starts_with(&prefix));
        let text = [&prefix[..], &t[..]].concat();
        prop_assert!(glob_match(&pattern, &text));
    }

    /// Whatever `glob_match` accepts, the documented semantics accept too: it never grants
    /// more than the grant says.
    #[test]
    fn glob_match_never_matches_more_than_documented(
        p in small(b"ab/.*", 9),
        t in small(b"ab/.", 10),
    ) {
        if glob_match(&p, &t) {
            prop_assert!(reference(&p, &t), "pattern {:?} text {:?}", String::from_utf8_lossy(&p), String::from_utf8_lossy(&t));
        }
    }

    /// Arbitrary patterns and texts (star runs, long inputs) never panic.
    #[test]
    fn glob_match_never_panics(
        p in proptest::collection::vec(any::<u8>(), 0..64),
        stars in small(b"**a/", 64),
        t in proptest::collection::vec(any::<u8>(), 0..512),
    ) {
        let _ = glob_match(&p, &t);
        let _ = glob_match(&stars, &t);
        let _ = glob_match(&stars, &stars);
        let _ = glob_match(&t, &p);
    }
}

proptest! {
    #![proptest_config(config(1024))]

    /// `glob_match` finds every match the documented semantics allow.
    #[test]
    fn glob_match_finds_every_documented_match(
        p in small(b"ab/.*", 9),
        t in small(b"ab/.", 10),
    ) {
        prop_assert_eq!(glob_match(&p, &t), reference(&p, &t), "pattern {:?} text {:?}", String::from_utf8_lossy(&p), String::from_utf8_lossy(&t));
    }
}

/// The cases behind the ignored property above: each is a match by the documented
/// semantics (e.g. `**` = `a/x`, `/x`, `*` = ``) that `glob_match` misses.
#[test]
fn double_star_then_star_backtracks_into_the_double_star() {
    let cases: [(&[u8], &[u8]); 3] = [
        (b"**/x*", b"a/x/x"),
        (
            b"spiffe://example.org/**/billing-*",
            b"spiffe://example.org/ns/billing-a/billing-b",
        ),
        (b"***", b"/"),
    ];
    let missed: Vec<String> = cases
        .iter()
        .filter(|(p, t)| reference(p, t) && !glob_match(p, t))
        .map(|(p, t)| {
            format!(
                "{:?} vs {:?}",
                String::from_utf8_lossy(p),
                String::from_utf8_lossy(t)
            )
        })
        .collect();
    assert!(missed.is_empty(), "glob_match misses: {missed:?}");
}

#[test]
fn reference_matcher_agrees_with_the_documented_examples() {
    for (p, t, want) in [
        (
            &b"spiffe://x/app/*"[..],
            &b"spiffe://x/app/billing"[..],
            true,
        ),
        (b"spiffe://x/app/*", b"spiffe://x/app/billing/extra", false),
        (b"spiffe://x/**", b"spiffe://x/app/billing/extra", true),
        (b"*.example.org", b"db.example.org", true),
        (b"*.example.org", b"a.b.example.org", false),
        (b"*.example.org", b"example.org", false),
    ] {
        assert_eq!(reference(p, t), want, "{p:?} {t:?}");
        assert_eq!(glob_match(p, t), want, "{p:?} {t:?}");
    }
}

// ---------------------------------------------------------------- startup settings

/// `options` text built from words PostgreSQL's switch parser treats specially.
fn options_text() -> impl Strategy<Value = String> {
    let word = prop_oneof![
        Just("-c".to_string()),
        Just("-W".to_string()),
        Just("--".to_string()),
        Just("-".to_string()),
        Just("-cpost-auth-delay=1".to_string()),
        Just("--post_auth_delay=2".to_string()),
        Just("POST_AUTH_DELAY=3".to_string()),
        Just("statement_timeout=1".to_string()),
        Just("--statement-timeout=2".to_string()),
        Just("-csearch_path=a".to_string()),
        Just("=".to_string()),
        Just("\\".to_string()),
        Just("\\ ".to_string()),
        Just(" ".to_string()),
        Just("\t".to_string()),
        Just("\u{b}".to_string()),
        Just("é".to_string()),
        "[a-zA-Z_=.-]{0,6}",
    ];
    proptest::collection::vec(word, 0..12).prop_map(|words| words.concat())
}

/// PostgreSQL's `parse_bool`, written out: every spelling it accepts.
fn reference_bool(v: &str) -> Option<bool> {
    let v = v.to_ascii_lowercase();
    let trues = ["t", "tr", "tru", "true", "y", "ye", "yes", "on", "1"];
    let falses = [
        "f", "fa", "fal", "fals", "false", "n", "no", "of", "off", "0",
    ];
    if trues.contains(&v.as_str()) {
        Some(true)
    } else if falses.contains(&v.as_str()) {
        Some(false)
    } else {
        None
    }
}

proptest! {
    #![proptest_config(config(1024))]

    /// Settings written out with `to_options` parse back to exactly themselves, whatever
    /// whitespace and backslashes their values hold.
    #[test]
    fn options_round_trip(
        settings in proptest::collection::vec(("[a-zA-Z_.]{0,12}", c_text(0)), 0..6),
    ) {
        let settings: Vec<Setting> = settings
            .into_iter()
            .map(|(name, value)| Setting { name, value })
            .collect();
        let text = options::to_options(&settings);
        prop_assert_eq!(options::parse(&text), Ok(settings));
    }

    /// Whatever `options` holds, nothing reaches the upstream that is not on the allow-list,
    /// and a `post_auth_delay` PostgreSQL would read there is always refused.
    #[test]
    fn only_allowed_settings_pass(text in options_text(), bare in "[a-zA-Z_]{1,20}") {
        let mut client = BTreeMap::new();
        client.insert("options".to_string(), text.clone());
        client.entry(bare).or_insert_with(|| "1".to_string());
        let parsed = options::parse(&text);
        if let Ok(out) = params::check(&client, &[]) {
            for (name, _) in &out {
                prop_assert!(params::DEFAULT_ALLOWED.contains(&name.as_str()), "{}", name);
            }
            let parsed = parsed.clone().expect("accepted options parse");
            prop_assert!(parsed.iter().all(|s| !s.name.eq_ignore_ascii_case("post_auth_delay")));
        }
        for s in parsed.iter().flatten() {
            prop_assert!(!s.name.contains('-') && !s.name.contains('='), "{:?}", s);
        }
    }

    /// `parse_bool` accepts exactly PostgreSQL's spellings.
    #[test]
    fn parse_bool_matches_postgres(v in "[tTrRuUeEfFaAlLsSyYnNoO01 x]{0,6}") {
        prop_assert_eq!(options::parse_bool(&v), reference_bool(&v));
    }

    /// A startup packet with a parameter that is not UTF-8 is refused, never decoded.
    #[test]
    fn startup_parameters_must_be_utf8(
        params in proptest::collection::btree_map(c_text(1), c_text(0), 1..5),
        pick in any::<proptest::sample::Index>(),
        at in any::<proptest::sample::Index>(),
        bad in prop_oneof![Just(0xffu8), Just(0xc3), Just(0x80), Just(0xfe)],
        in_name in any::<bool>(),
    ) {
        let mut body = PROTOCOL_3_0.to_be_bytes().to_vec();
        let victim = pick.index(params.len());
        for (i, (k, v)) in params.iter().enumerate() {
            let (mut k, mut v) = (k.as_bytes().to_vec(), v.as_bytes().to_vec());
            if i == victim {
                let target = if in_name { &mut k } else { &mut v };
                // At a char boundary, so the rest stays UTF-8 and the byte alone breaks it.
                let text = String::from_utf8(target.clone()).expect("utf-8");
                let bounds: Vec<usize> = text.char_indices().map(|(i, _)| i).chain([text.len()]).collect();
                target.insert(bounds[at.index(bounds.len())], bad);
                // 0xc3 followed by a continuation byte would be valid: make it stand alone.
                let pos = target.iter().position(|b| *b == bad).expect("inserted");
                if bad == 0xc3 { target.insert(pos + 1, b'x'); }
            }
            body.extend_from_slice(&k);
            body.push(0);
            body.extend_from_slice(&v);
            body.push(0);
        }
        body.push(0);
        let mut packet = ((body.len() + 4) as u32).to_be_bytes().to_vec();
        packet.extend_from_slice(&body);
        prop_assume!(packet.len() <= MAX_STARTUP_PACKET);
        let result = parse_initial_packet(BytesMut::from(&packet[..]));
        prop_assert!(matches!(result, Err(PacketError::NotUtf8(_))), "{:?}", result);
    }
}

// ---------------------------------------------------------------- fuzzing regressions
//
// Inputs that crashed a fuzz target are added here as plain tests (none so far: see
// SECURITY.md, "Fuzzing").
