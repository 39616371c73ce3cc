//! Hostile first packets on the local Unix socket, where the StartupMessage comes in
//! plaintext: bad lengths, an HTTP request, SSLRequest twice, an oversized packet get FATAL
//! ErrorResponses (08P01); GSSENCRequest then SSLRequest are both answered `N` and the session
//! runs; a silent client is cut at `login_timeout`; nothing but the one proper session asks
//! Vault.

use std::time::{Duration, Instant};

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::UnixStream;

use crate::harness::fixture::logged_in;
use crate::harness::security::{creds_requests, wait_auth_failures};
use crate::harness::unix::{socket_dir, socket_path, start};
use crate::harness::wire::first_error;

const SSL_REQUEST: [u8; 8] = [0, 0, 0, 8, 0x04, 0xd2, 0x16, 0x2f];
const GSSENC_REQUEST: [u8; 8] = [0, 0, 0, 8, 0x04, 0xd2, 0x16, 0x30];

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn hostile_first_packets_on_the_unix_socket_get_postgres_answers() {
    let dir = socket_dir();
    let (f, _) = start("sec-hostile-unix", dir.path(), None, &["unix:uid=0"]).await;
    let path = socket_path(dir.path(), f.proxy.port);
    let cases: Vec<(&str, Vec<u8>, usize, &str)> = vec![
        ("length 0", vec![0; 8], 0, "invalid startup packet length 0"),
        (
            "HTTP",
            b"GET / HTTP/1.1\r\n\r\n".to_vec(),
            0,
            "invalid startup packet length",
        ),
        (
            "oversized",
            [&20_000u32.to_be_bytes()[..], &[0; 64]].concat(),
            0,
            "length 20000",
        ),
        (
            "SSLRequest twice",
            [SSL_REQUEST, SSL_REQUEST].concat(),
            1,
            "sent twice",
        ),
        (
            "GSSENCRequest twice",
            [GSSENC_REQUEST, GSSENC_REQUEST].concat(),
            1,
            "sent twice",
        ),
    ];
    for (what, bytes, refusals, needle) in &cases {
        let mut s = UnixStream::connect(&path).await.expect("connect");
        s.write_all(bytes).await.expect("send");
        let mut seen = Vec::new();
        // The connection is closed with the client's bytes unread: the read after the answer
        // may be a reset instead of EOF (as from PostgreSQL).
        let read = tokio::time::timeout(Duration::from_secs(5), s.read_to_end(&mut seen)).await;
        assert!(read.is_ok(), "{what}: closed within 5 s");
        assert!(
            seen[..*refusals].iter().all(|b| *b == b'N'),
            "{what}: {seen:02x?}"
        );
        let fields = first_error(&seen[*refusals..])
            .unwrap_or_else(|| panic!("{what}: ErrorResponse, got {seen:02x?}"));
        eprintln!("{what}: {fields:?}");
        assert_eq!(
            fields.get(&'C').map(String::as_str),
            Some("08P01"),
            "{what}"
        );
        assert!(fields[&'M'].contains(needle), "{what}: {fields:?}");
    }
    wait_auth_failures(&f.proxy, "bad_startup", cases.len() as f64).await;
    assert_eq!(creds_requests(&f.proxy).await, 0.0, "nothing reached Vault");

    // A silent client is cut at login_timeout (the fixture's default, 10 s, or as set).
    let opened = Instant::now();
    let mut silent = UnixStream::connect(&path).await.expect("connect");

    // GSSENCRequest and SSLRequest, as libpq with gssencmode=prefer, sslmode=prefer: `N`, `N`.
    let mut s = UnixStream::connect(&path).await.expect("connect");
    s.write_all(&[GSSENC_REQUEST, SSL_REQUEST].concat())
        .await
        .expect("send");
    let mut answers = [0u8; 2];
    s.read_exact(&mut answers).await.expect("answers");
    assert_eq!(&answers, b"NN");
    let wire = logged_in(s, "readonly").await;
    wire.terminate().await;

    let mut buf = [0u8; 8];
    let r = tokio::time::timeout(Duration::from_secs(20), silent.read(&mut buf)).await;
    eprintln!("silent Unix client cut after {:?}: {r:?}", opened.elapsed());
    assert!(
        matches!(r, Ok(Ok(0)) | Ok(Err(_))),
        "silent client closed: {r:?}"
    );
    wait_auth_failures(&f.proxy, "login_timeout", 1.0).await;
    assert_eq!(
        creds_requests(&f.proxy).await,
        1.0,
        "only the proper session asked Vault"
    );
    f.wait_all_revoked(Duration::from_secs(15)).await;
}
