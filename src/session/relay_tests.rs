//! Relay tests over in-memory pipes: both directions, injected messages at boundaries (also
//! after the login's leftover bytes), and whether the upstream is idle when the client
//! vanishes: simple queries, COPY both ways, pipelines with and without errors, unsynced
//! Execute, half messages, Terminate behind a running query.

use super::*;
use tokio::io::{AsyncReadExt, DuplexStream, duplex, split};
use tokio::task::JoinHandle;

/// The relay task's result.
type Outcome = JoinHandle<Relayed>;

/// A relay between two in-memory pipes, `leftover` standing for what the upstream sent
/// after login: returns the client's and the database's ends, the control sender, and
/// the relay task.
fn relay_with(leftover: &[u8]) -> (DuplexStream, DuplexStream, super::ControlSender, Outcome) {
    let (client_app, client_proxy) = duplex(1024);
    let (upstream_proxy, upstream_db) = duplex(1024);
    let (tx, task) = spawn_relay(client_proxy, upstream_proxy, leftover);
    (client_app, upstream_db, tx, task)
}

/// The relay between leasegate's ends of a client and an upstream connection, on its own
/// task: the control sender and the task.
fn spawn_relay<C, U>(client: C, upstream: U, leftover: &[u8]) -> (super::ControlSender, Outcome)
where
    C: AsyncRead + AsyncWrite + Send + 'static,
    U: AsyncRead + AsyncWrite + Send + 'static,
{
    let (tx, mut control) = super::super::relay::control_channel();
    let leftover = BytesMut::from(leftover);
    let task = tokio::spawn(async move {
        let (mut cr, mut cw) = split(client);
        let (mut ur, mut uw) = split(upstream);
        let mut up = Direction::to_upstream(None);
        let mut down = Direction::to_client(None, leftover);
        let end = relay(
            &mut cr,
            &mut cw,
            &mut ur,
            &mut uw,
            &mut control,
            &mut up,
            &mut down,
        )
        .await;
        Relayed {
            end,
            to_upstream: up,
            to_client: down,
        }
    });
    (tx, task)
}

fn relay_between() -> (DuplexStream, DuplexStream, super::ControlSender, Outcome) {
    relay_with(b"")
}

#[tokio::test]
async fn relays_both_ways_and_sees_terminate() {
    let (client_app, upstream_db, _tx, task) = relay_between();
    let (mut app_r, mut app_w) = split(client_app);
    let (mut db_r, mut db_w) = split(upstream_db);
    app_w.write_all(b"Q\0\0\0\x09abcd\0").await.expect("write");
    let mut got = [0u8; 10];
    db_r.read_exact(&mut got).await.expect("read");
    assert_eq!(&got, b"Q\0\0\0\x09abcd\0");
    db_w.write_all(b"Z\0\0\0\x05I").await.expect("write");
    let mut z = [0u8; 6];
    app_r.read_exact(&mut z).await.expect("read");
    app_w.write_all(b"X\0\0\0\x04").await.expect("write");
    drop(app_w);
    drop(app_r);
    let r = task.await.expect("join");
    let (up, down) = (r.to_upstream.bytes, r.to_client.bytes);
    assert_eq!((r.end.label(), up, down), ("client_terminate", 15, 6));
    assert!(r.upstream_idle(), "every query answered");
    assert!(
        !r.can_terminate(),
        "the client's own Terminate went upstream"
    );
}

#[tokio::test]
async fn end_waits_for_a_message_boundary() {
    let (client_app, upstream_db, tx, task) = relay_between();
    let (mut app_r, _app_w) = split(client_app);
    let (_db_r, mut db_w) = split(upstream_db);
    // Half a DataRow, then leasegate decides to end the session.
    db_w.write_all(b"D\0\0\0\x0aab").await.expect("write");
    let mut first = [0u8; 7];
    app_r.read_exact(&mut first).await.expect("read");
    tx.send(Control::Notice(BytesMut::from(&b"N\0\0\0\x04"[..])))
        .await
        .expect("send");
    tx.send(Control::End(BytesMut::from(&b"E\0\0\0\x04"[..])))
        .await
        .expect("send");
    // The rest of the row and a second message arrive in one chunk.
    db_w.write_all(b"cdefZ\0\0\0\x05I").await.expect("write");
    let mut rest = [0u8; 14];
    app_r.read_exact(&mut rest).await.expect("read");
    assert_eq!(&rest, b"cdefN\0\0\0\x04E\0\0\0\x04");
    let r = task.await.expect("join");
    assert!(matches!(r.end, RelayEnd::Ended { delivered: true }));
    // The ReadyForQuery the client never saw waits unsent; at the close it still counts.
    let mut r = r;
    assert_eq!(&r.to_client.unsent[..], b"Z\0\0\0\x05I");
    r.to_client.count_unsent();
    assert_eq!(r.to_client.framer.count(), 1);
}

#[tokio::test]
async fn login_leftover_goes_through_the_boundary_tracking() {
    // The upstream sent half a NoticeResponse right after the login's ReadyForQuery.
    let (client_app, upstream_db, tx, task) = relay_with(b"N\0\0\0\x08ab");
    let (mut app_r, _app_w) = split(client_app);
    let (_db_r, mut db_w) = split(upstream_db);
    let mut first = [0u8; 7];
    app_r
        .read_exact(&mut first)
        .await
        .expect("read the leftover");
    assert_eq!(&first, b"N\0\0\0\x08ab");
    tx.send(Control::End(BytesMut::from(&b"E\0\0\0\x04"[..])))
        .await
        .expect("send");
    db_w.write_all(b"cdZ\0\0\0\x05I").await.expect("write");
    let mut rest = [0u8; 7];
    app_r.read_exact(&mut rest).await.expect("read");
    assert_eq!(
        &rest, b"cdE\0\0\0\x04",
        "the FATAL after the rest of the message"
    );
    let r = task.await.expect("join");
    assert!(matches!(r.end, RelayEnd::Ended { delivered: true }));
    assert_eq!(r.to_client.bytes, 9);
}

/// Plays a conversation through the relay: `client` goes up, the database reads it all
/// and answers `server`, the client reads that all and vanishes. Returns the relay's view.
async fn vanish_after(client: &[u8], server: &[u8]) -> Relayed {
    let (client_app, upstream_db, _tx, task) = relay_between();
    let (mut app_r, mut app_w) = split(client_app);
    let (mut db_r, mut db_w) = split(upstream_db);
    app_w.write_all(client).await.expect("client writes");
    let mut got = vec![0u8; client.len()];
    db_r.read_exact(&mut got).await.expect("database reads");
    db_w.write_all(server).await.expect("database writes");
    let mut seen = vec![0u8; server.len()];
    app_r.read_exact(&mut seen).await.expect("client reads");
    drop((app_r, app_w));
    let r = task.await.expect("join");
    assert_eq!(r.end.label(), "client_gone");
    r
}

const Q: &[u8] = b"Q\0\0\0\x0asleep\0";
const Z: &[u8] = b"Z\0\0\0\x05I";
const PARSE: &[u8] = b"P\0\0\0\x09\0x\0\0\0";
const BIND: &[u8] = b"B\0\0\0\x0e\0\0\0\0\0\0\0\0\0\0";
const EXECUTE: &[u8] = b"E\0\0\0\x09\0\0\0\0\0";
const SYNC: &[u8] = b"S\0\0\0\x04";

fn cat(parts: &[&[u8]]) -> Vec<u8> {
    parts.concat()
}

#[tokio::test]
async fn a_simple_query_is_busy_until_its_ready_for_query() {
    assert!(
        !vanish_after(Q, b"").await.upstream_idle(),
        "statement running"
    );
    let row = b"T\0\0\0\x06\0\0D\0\0\0\x06\0\0";
    assert!(
        !vanish_after(Q, row).await.upstream_idle(),
        "results streaming"
    );
    assert!(
        vanish_after(Q, &cat(&[row, b"C\0\0\0\x05x", Z]))
            .await
            .upstream_idle()
    );
    // Two queries in one write, one answered.
    assert!(!vanish_after(&cat(&[Q, Q]), Z).await.upstream_idle());
    assert!(
        vanish_after(&cat(&[Q, Q]), &cat(&[Z, Z]))
            .await
            .upstream_idle()
    );
}

#[tokio::test]
async fn copy_in_and_out_are_busy_until_the_ready_for_query() {
    // COPY FROM STDIN: CopyInResponse, data, CopyDone; done only with ReadyForQuery.
    let copy_in = b"G\0\0\0\x07\0\0\0";
    let data = cat(&[Q, b"d\0\0\0\x061\n", b"c\0\0\0\x04"]);
    assert!(
        !vanish_after(Q, copy_in).await.upstream_idle(),
        "waiting for data"
    );
    assert!(
        !vanish_after(&data, copy_in).await.upstream_idle(),
        "copy ending"
    );
    let done = cat(&[copy_in, b"C\0\0\0\x05x", Z]);
    assert!(vanish_after(&data, &done).await.upstream_idle());
    // COPY TO STDOUT: CopyOutResponse, data, CopyDone, CommandComplete, ReadyForQuery.
    let out = cat(&[b"H\0\0\0\x07\0\0\0", b"d\0\0\0\x061\n"]);
    assert!(
        !vanish_after(Q, &out).await.upstream_idle(),
        "copy out streaming"
    );
    let out_done = cat(&[&out, b"c\0\0\0\x04", b"C\0\0\0\x05x", Z]);
    assert!(vanish_after(Q, &out_done).await.upstream_idle());
}

#[tokio::test]
async fn a_pipeline_is_busy_until_every_sync_is_answered() {
    let batch = cat(&[PARSE, BIND, EXECUTE, SYNC]);
    let two = cat(&[&batch, &batch]);
    let ok = cat(&[b"1\0\0\0\x04", b"2\0\0\0\x04", b"C\0\0\0\x05x", Z]);
    assert!(
        !vanish_after(&two, &ok).await.upstream_idle(),
        "second batch running"
    );
    assert!(vanish_after(&two, &cat(&[&ok, &ok])).await.upstream_idle());
    // An error in the first batch skips to its Sync; the second batch still runs.
    let failed = cat(&[b"E\0\0\0\x04", Z]);
    assert!(!vanish_after(&two, &failed).await.upstream_idle());
    assert!(
        vanish_after(&two, &cat(&[&failed, &ok]))
            .await
            .upstream_idle()
    );
    // Execute without Sync: the statement runs although nothing awaits a ReadyForQuery.
    let unsynced = cat(&[PARSE, BIND, EXECUTE]);
    assert!(!vanish_after(&unsynced, b"").await.upstream_idle());
    let answered = cat(&[b"1\0\0\0\x04", b"2\0\0\0\x04", b"C\0\0\0\x05x"]);
    assert!(!vanish_after(&unsynced, &answered).await.upstream_idle());
}

#[tokio::test]
async fn a_client_gone_mid_message_leaves_the_upstream_busy_and_unterminated() {
    let r = vanish_after(&Q[..7], b"").await;
    assert!(!r.upstream_idle(), "half a query");
    assert!(
        !r.can_terminate(),
        "a Terminate would land inside the query"
    );
    let r = vanish_after(&cat(&[Q, &Q[..3]]), Z).await;
    assert!(
        !r.upstream_idle() && !r.can_terminate(),
        "answered, then half a header"
    );
    let r = vanish_after(Q, Z).await;
    assert!(r.upstream_idle() && r.can_terminate());
}

#[tokio::test]
async fn terminate_behind_a_running_query_is_busy() {
    let (client_app, upstream_db, _tx, task) = relay_between();
    let (app_r, mut app_w) = split(client_app);
    let (mut db_r, _db_w) = split(upstream_db);
    let both = cat(&[Q, b"X\0\0\0\x04"]);
    app_w.write_all(&both).await.expect("write");
    let mut got = vec![0u8; both.len()];
    db_r.read_exact(&mut got).await.expect("read");
    drop((app_r, app_w));
    let r = task.await.expect("join");
    assert_eq!(r.end.label(), "client_terminate");
    assert!(!r.upstream_idle(), "the query still runs");
    assert!(!r.can_terminate());
}

#[tokio::test]
async fn a_client_that_cannot_take_results_is_gone_not_the_upstream() {
    // The client's side: reads wait forever, writes fail (its peer is gone).
    let (client_in, _client_keeps) = duplex(64);
    let (client_out, gone) = duplex(64);
    drop(gone);
    let (upstream_proxy, upstream_db) = duplex(1024);
    let client = tokio::io::join(client_in, client_out);
    let (_tx, task) = spawn_relay(client, upstream_proxy, b"");
    let (_db_r, mut db_w) = split(upstream_db);
    db_w.write_all(b"D\0\0\0\x06\0\0").await.expect("write");
    let end = task.await.expect("join").end;
    assert_eq!(end.label(), "client_gone", "{end:?}");
}

/// A client connection that holds written bytes until it is flushed, as a TLS stream does
/// when its socket would block: the relay must flush what it wrote in both directions.
#[tokio::test]
async fn written_bytes_are_flushed_both_ways() {
    let (client_app, client_proxy) = duplex(64 * 1024);
    let (upstream_proxy, upstream_db) = duplex(64 * 1024);
    let holding = |s: DuplexStream| tokio::io::BufWriter::with_capacity(32 * 1024, s);
    let (_tx, task) = spawn_relay(holding(client_proxy), holding(upstream_proxy), b"");
    let (mut app_r, mut app_w) = split(client_app);
    let (mut db_r, mut db_w) = split(upstream_db);
    app_w.write_all(b"Q\0\0\0\x09abcd\0").await.expect("write");
    let mut got = [0u8; 10];
    tokio::time::timeout(std::time::Duration::from_secs(5), db_r.read_exact(&mut got))
        .await
        .expect("the query reaches the upstream without another write behind it")
        .expect("read");
    db_w.write_all(b"Z\0\0\0\x05I").await.expect("write");
    let mut z = [0u8; 6];
    tokio::time::timeout(std::time::Duration::from_secs(5), app_r.read_exact(&mut z))
        .await
        .expect("the answer reaches the client without another write behind it")
        .expect("read");
    assert_eq!(&z, b"Z\0\0\0\x05I");
    drop((app_w, app_r));
    let _ = task.await;
}

/// A NotificationResponse from backend `pid` on channel `c` with payload `p`.
fn notification(pid: i32) -> Vec<u8> {
    let mut m = vec![b'A'];
    m.extend_from_slice(&12u32.to_be_bytes());
    m.extend_from_slice(&pid.to_be_bytes());
    m.extend_from_slice(b"c\0p\0");
    m
}

/// What the client gets when the upstream's `stream` arrives in reads cut at `cuts`: each
/// read goes through `took`, and what it releases is written (held-back bytes first).
fn relayed_in_reads(dir: &mut Direction, stream: &[u8], cuts: &[usize]) -> Vec<u8> {
    let mut out = Vec::new();
    let mut bounds = vec![0];
    bounds.extend_from_slice(cuts);
    bounds.push(stream.len());
    for w in bounds.windows(2) {
        let mut read = stream[w[0]..w[1]].to_vec();
        let took = dir.took(&mut read);
        out.extend_from_slice(took.head());
        out.extend_from_slice(&read[..took.len]);
        dir.sent(took.total());
    }
    out
}

#[test]
fn own_notifications_show_the_pid_of_leasegates_key_however_the_reads_cut_them() {
    let (own, shown, other) = (4242, 77, 5151);
    let mut stream = b"Z\0\0\0\x05I".to_vec();
    let mut want = stream.clone();
    for pid in [own, other, own] {
        stream.extend_from_slice(&notification(pid));
        want.extend_from_slice(&notification(if pid == own { shown } else { pid }));
    }
    // Every way to cut the stream into two reads, and into three (the pid split three ways
    // too): the client gets every byte once, in order, each own pid rewritten.
    for a in 0..=stream.len() {
        for b in a..=stream.len() {
            let mut dir = Direction::to_client(None, BytesMut::new()).showing_pid(own, shown);
            let got = relayed_in_reads(&mut dir, &stream, &[a, b]);
            assert_eq!(got, want, "reads cut at {a} and {b}");
            assert!(dir.framer.at_boundary(), "cuts {a} {b}");
            assert_eq!(dir.bytes, stream.len() as u64, "cuts {a} {b}");
        }
    }
    // One byte per read.
    let mut dir = Direction::to_client(None, BytesMut::new()).showing_pid(own, shown);
    let cuts: Vec<usize> = (1..stream.len()).collect();
    assert_eq!(
        relayed_in_reads(&mut dir, &stream, &cuts),
        want,
        "byte by byte"
    );
}

#[test]
fn a_pid_split_between_reads_is_held_back_until_it_is_whole() {
    let own = 4242;
    let stream = notification(own);
    let mut dir = Direction::to_client(None, BytesMut::new()).showing_pid(own, 77);
    let mut first = stream[..7].to_vec();
    let took = dir.took(&mut first);
    assert_eq!(
        (took.head(), took.len),
        (&[][..], 5),
        "the pid's first 2 bytes wait"
    );
    let mut rest = stream[7..].to_vec();
    let took = dir.took(&mut rest);
    assert_eq!(
        took.head(),
        &77i32.to_be_bytes()[..2],
        "then go out, rewritten"
    );
    assert_eq!(&rest[..2], &77i32.to_be_bytes()[2..]);
    assert_eq!(took.len, rest.len());
    // Another backend's pid split the same way comes out as it was.
    let other = notification(5151);
    let mut dir = Direction::to_client(None, BytesMut::new()).showing_pid(own, 77);
    let got = relayed_in_reads(&mut dir, &other, &[6, 8]);
    assert_eq!(got, other);
}

#[test]
fn without_a_key_or_in_other_messages_the_pid_bytes_are_left_alone() {
    let own = 4242;
    let mut stream = notification(own);
    // A DataRow whose value is the pid's bytes, and a malformed 'A' too short for a pid
    // followed by a message that starts with them.
    stream.extend_from_slice(b"D\0\0\0\x0e\0\x01\0\0\0\x04");
    stream.extend_from_slice(&own.to_be_bytes());
    stream.extend_from_slice(b"A\0\0\0\x05x");
    stream.extend_from_slice(&own.to_be_bytes()[..1]);
    let mut plain = Direction::to_client(None, BytesMut::new());
    let mut bytes = stream.clone();
    plain.took(&mut bytes);
    assert_eq!(bytes, stream, "no key: nothing rewritten");

    let mut dir = Direction::to_client(None, BytesMut::new()).showing_pid(own, 77);
    let mut bytes = stream.clone();
    dir.took(&mut bytes);
    assert_eq!(&bytes[5..9], &77i32.to_be_bytes(), "the notification");
    assert_eq!(&bytes[12..], &stream[12..], "the rest as it was");
}

#[tokio::test]
async fn the_server_closing_after_the_clients_terminate_is_the_clients_end() {
    let (client_app, upstream_db, _tx, task) = relay_between();
    let (_app_r, mut app_w) = split(client_app);
    let (mut db_r, db_w) = split(upstream_db);
    app_w.write_all(b"X\0\0\0\x04").await.expect("write");
    let mut got = [0u8; 5];
    db_r.read_exact(&mut got).await.expect("read");
    assert_eq!(&got, b"X\0\0\0\x04");
    // The server closes at once, before the client closes its side.
    drop((db_r, db_w));
    let r = task.await.expect("join");
    assert_eq!(r.end.label(), "client_terminate");
    assert!(r.upstream_idle(), "nothing was left unanswered");
    assert!(!r.can_terminate(), "the Terminate went through already");
}
