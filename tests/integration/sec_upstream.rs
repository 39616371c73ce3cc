//! Upstream authentication downgrades: a fake upstream (a scripted TCP server standing in
//! for PostgreSQL) answers leasegate's StartupMessage with a weaker method than SCRAM. The
//! issued password must never be sent in the clear, MD5 only where `allow_md5 = true`, a
//! SCRAM server that skips its own proof is not believed, the client is told why (08004 or
//! 08006), and the lease that was issued for the attempt is revoked.

use std::sync::{Arc, Mutex};
use std::time::Duration;

use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::net::TcpListener;

use crate::harness::client::Raw;
use crate::harness::fixture::Fixture;
use crate::harness::pki::Pki;
use crate::harness::poll_until;
use crate::harness::proxy::{ProcessOptions, set};
use crate::harness::security::{
    assert_fatal, counter, creds_requests, fixture_edited, tls_startup,
};

/// What the fake upstream does after the StartupMessage.
#[derive(Clone, Copy, Debug)]
enum Script {
    /// AuthenticationCleartextPassword.
    Cleartext,
    /// AuthenticationMD5Password with a salt.
    Md5,
    /// SCRAM-SHA-256 up to the client's proof, then AuthenticationOk without the server's
    /// signature (AuthenticationSASLFinal).
    ScramWithoutServerProof,
}

/// What one connection to the fake upstream carried.
#[derive(Clone, Debug, Default)]
struct Seen {
    /// Startup parameters.
    startup: Vec<(String, String)>,
    /// Frontend messages after the StartupMessage: (type, body).
    messages: Vec<(u8, Vec<u8>)>,
}

async fn read_message<S: AsyncRead + Unpin>(s: &mut S) -> Option<(u8, Vec<u8>)> {
    let tag = s.read_u8().await.ok()?;
    let len = s.read_u32().await.ok()? as usize;
    let mut body = vec![0u8; len.checked_sub(4)?];
    s.read_exact(&mut body).await.ok()?;
    Some((tag, body))
}

fn auth(code: u32, data: &[u8]) -> Vec<u8> {
    let mut m = vec![b'R'];
    m.extend_from_slice(&((8 + data.len()) as u32).to_be_bytes());
    m.extend_from_slice(&code.to_be_bytes());
    m.extend_from_slice(data);
    m
}

/// Starts the fake upstream; every connection's traffic is recorded. With `tls`, the fake
/// answers an SSLRequest with `S` and speaks TLS with the test PKI's server certificate
/// (`localhost`, 127.0.0.1), as a PostgreSQL server with `ssl = on` does.
async fn fake_upstream(
    script: Script,
    tls: Option<tokio_rustls::TlsAcceptor>,
) -> (u16, Arc<Mutex<Vec<Seen>>>) {
    let listener = TcpListener::bind("127.0.0.1:0")
        .await
        .expect("bind fake upstream");
    let port = listener.local_addr().expect("addr").port();
    let seen = Arc::new(Mutex::new(Vec::new()));
    let record = seen.clone();
    tokio::spawn(async move {
        while let Ok((mut sock, _)) = listener.accept().await {
            let record = record.clone();
            let tls = tls.clone();
            tokio::spawn(async move {
                let Some(acceptor) = tls else {
                    return serve_fake(sock, script, record).await;
                };
                let mut request = [0u8; 8];
                if sock.read_exact(&mut request).await.is_err()
                    || request != [0, 0, 0, 8, 0x04, 0xd2, 0x16, 0x2f]
                    || sock.write_all(b"S").await.is_err()
                {
                    return;
                }
                if let Ok(stream) = acceptor.accept(sock).await {
                    serve_fake(stream, script, record).await;
                }
            });
        }
    });
    (port, seen)
}

/// One connection of the fake upstream: the StartupMessage, then `script`.
async fn serve_fake<S>(mut sock: S, script: Script, record: Arc<Mutex<Vec<Seen>>>)
where
    S: AsyncRead + AsyncWrite + Unpin,
{
    let Ok(len) = sock.read_u32().await else {
        return;
    };
    let mut body = vec![0u8; (len as usize).saturating_sub(4)];
    if sock.read_exact(&mut body).await.is_err() {
        return;
    }
    let fields: Vec<String> = body[4..]
        .split(|b| *b == 0)
        .map(|f| String::from_utf8_lossy(f).into_owned())
        .collect();
    let mut this = Seen {
        startup: fields
            .chunks(2)
            .filter(|kv| kv.len() == 2 && !kv[0].is_empty())
            .map(|kv| (kv[0].clone(), kv[1].clone()))
            .collect(),
        messages: Vec::new(),
    };
    match script {
        Script::Cleartext => {
            let _ = sock.write_all(&auth(3, &[])).await;
        }
        Script::Md5 => {
            // Take the answer (if any), then hang up.
            let _ = sock.write_all(&auth(5, b"salt")).await;
            if let Some(m) = read_message(&mut sock).await {
                this.messages.push(m);
            }
            drop(sock);
            record.lock().unwrap_or_else(|p| p.into_inner()).push(this);
            return;
        }
        Script::ScramWithoutServerProof => {
            let mut offer = b"SCRAM-SHA-256\0\0".to_vec();
            let _ = sock.write_all(&auth(10, &offer)).await;
            offer.clear();
            let Some(first) = read_message(&mut sock).await else {
                return;
            };
            // SASLInitialResponse: mechanism\0, length, "n,,n=,r=<nonce>".
            let text = String::from_utf8_lossy(&first.1).into_owned();
            let nonce = text.split("r=").nth(1).unwrap_or("").to_string();
            this.messages.push(first);
            let server_first = format!("r={nonce}fakeserver,s=c2FsdHNhbHRzYWx0c2FsdA==,i=4096");
            let _ = sock.write_all(&auth(11, server_first.as_bytes())).await;
            let Some(proof) = read_message(&mut sock).await else {
                return;
            };
            this.messages.push(proof);
            // "Welcome" without AuthenticationSASLFinal, then ReadyForQuery.
            let mut ok = auth(0, &[]);
            ok.extend_from_slice(b"Z\0\0\0\x05I");
            let _ = sock.write_all(&ok).await;
        }
    }
    let read_rest = async {
        while let Some(m) = read_message(&mut sock).await {
            this.messages.push(m);
        }
    };
    let _ = tokio::time::timeout(Duration::from_secs(10), read_rest).await;
    record.lock().unwrap_or_else(|p| p.into_inner()).push(this);
}

/// A TLS acceptor with the test PKI's server certificate and key.
fn fake_tls(pki: &Pki) -> tokio_rustls::TlsAcceptor {
    use rustls::pki_types::pem::PemObject;
    let certs = rustls::pki_types::CertificateDer::pem_file_iter(pki.server_cert())
        .expect("read cert")
        .collect::<Result<Vec<_>, _>>()
        .expect("server cert PEM");
    let key =
        rustls::pki_types::PrivateKeyDer::from_pem_file(pki.server_key()).expect("a server key");
    let config = rustls::ServerConfig::builder()
        .with_no_client_auth()
        .with_single_cert(certs, key)
        .expect("server config");
    tokio_rustls::TlsAcceptor::from(Arc::new(config))
}

/// leasegate with `myapp` pointing at the fake upstream.
async fn against_fake(
    name: &str,
    script: Script,
    allow_md5: bool,
) -> (Fixture, Arc<Mutex<Vec<Seen>>>) {
    let (port, seen) = fake_upstream(script, None).await;
    let f = fixture_edited(
        name,
        |mut cfg| {
            cfg.databases[0].port = port;
            cfg
        },
        ProcessOptions::default(),
        |config, _| {
            if allow_md5 {
                set(config, "databases.0.allow_md5", true);
            }
        },
    )
    .await;
    (f, seen)
}

/// The one connection the fake upstream saw, once leasegate closed it.
async fn the_connection(f: &Fixture, seen: &Arc<Mutex<Vec<Seen>>>) -> Seen {
    poll_until(
        Duration::from_secs(10),
        "leasegate closed the upstream connection",
        || async {
            if seen.lock().unwrap_or_else(|p| p.into_inner()).is_empty() {
                Err("still open".into())
            } else {
                Ok(())
            }
        },
    )
    .await;
    let all = seen.lock().unwrap_or_else(|p| p.into_inner()).clone();
    assert_eq!(all.len(), 1, "one upstream connection: {all:?}");
    let conn = all[0].clone();
    let user = conn
        .startup
        .iter()
        .find(|(k, _)| k == "user")
        .map(|(_, v)| v.clone())
        .unwrap_or_default();
    assert!(
        user.starts_with(&f.mount.prefix),
        "leasegate logs in upstream as the issued user, got {:?}",
        conn.startup
    );
    conn
}

/// The lease issued for the failed login is revoked, and counted.
async fn lease_revoked(f: &Fixture) {
    f.wait_all_revoked(Duration::from_secs(10)).await;
    let proxy = &f.proxy;
    poll_until(
        Duration::from_secs(10),
        "revocation counted",
        || async move {
            let ok = counter(
                proxy,
                "leasegate_lease_revocations_total",
                &[("result", "ok")],
            )
            .await;
            if ok == 1.0 {
                Ok(())
            } else {
                Err(format!("revocations ok {ok}"))
            }
        },
    )
    .await;
    assert_eq!(creds_requests(&f.proxy).await, 1.0);
}

async fn login(f: &Fixture) -> Raw {
    let answer = tls_startup(f.proxy.port, &f.pki, Some(&f.good), "readonly", "myapp").await;
    eprintln!("answer: {answer:?}");
    answer
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cleartext_password_request_is_refused_without_sending_the_password() {
    let (f, seen) = against_fake("sec-up-clear", Script::Cleartext, false).await;
    let answer = login(&f).await;
    assert_fatal(&answer, "08004", &["cleartext"]);
    let conn = the_connection(&f, &seen).await;
    assert!(
        conn.messages.iter().all(|(tag, _)| *tag != b'p'),
        "no PasswordMessage may reach the upstream: {:?}",
        conn.messages
    );
    assert_eq!(
        counter(
            &f.proxy,
            "leasegate_upstream_errors_total",
            &[("kind", "auth")]
        )
        .await,
        1.0
    );
    lease_revoked(&f).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn md5_request_is_refused_unless_allowed() {
    let (f, seen) = against_fake("sec-up-md5", Script::Md5, false).await;
    let answer = login(&f).await;
    assert_fatal(&answer, "08004", &["MD5"]);
    let conn = the_connection(&f, &seen).await;
    assert!(
        conn.messages.iter().all(|(tag, _)| *tag != b'p'),
        "no PasswordMessage may reach the upstream: {:?}",
        conn.messages
    );
    lease_revoked(&f).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn md5_is_answered_with_a_hash_when_allowed() {
    let (f, seen) = against_fake("sec-up-md5ok", Script::Md5, true).await;
    let answer = login(&f).await;
    // The fake closes after the hash: the login cannot complete.
    assert!(matches!(answer, Raw::Error { .. }), "{answer:?}");
    let conn = the_connection(&f, &seen).await;
    let (tag, body) = conn.messages.first().expect("a PasswordMessage");
    assert_eq!(*tag, b'p', "{:?}", conn.messages);
    let text = String::from_utf8_lossy(body);
    assert!(
        text.starts_with("md5")
            && body.len() == 3 + 32 + 1
            && text[3..35].bytes().all(|b| b.is_ascii_hexdigit()),
        "an MD5 hash (md5 + 32 hex digits + NUL), not the password: {text:?}"
    );
    lease_revoked(&f).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn scram_server_that_skips_its_proof_is_not_believed() {
    let (f, seen) = against_fake("sec-up-scram", Script::ScramWithoutServerProof, false).await;
    let answer = login(&f).await;
    assert_fatal(&answer, "08006", &["without proving it knows the password"]);
    let conn = the_connection(&f, &seen).await;
    assert_eq!(
        conn.messages.len(),
        2,
        "SASLInitialResponse and SASLResponse only: {:?}",
        conn.messages
    );
    assert!(
        String::from_utf8_lossy(&conn.messages[0].1).contains("SCRAM-SHA-256"),
        "{:?}",
        conn.messages
    );
    lease_revoked(&f).await;
}

/// leasegate with `myapp` pointing at a TLS fake upstream, verified with `mode`.
async fn against_tls_fake(name: &str, mode: &'static str) -> (Fixture, Arc<Mutex<Vec<Seen>>>) {
    let pki = Pki::new();
    let (port, seen) = fake_upstream(Script::Cleartext, Some(fake_tls(&pki))).await;
    let mount = crate::harness::fresh_mount(name).await;
    let ca = pki.ca_pem().display().to_string();
    let f = Fixture::with_mount(
        mount,
        pki,
        |mut cfg| {
            cfg.databases[0].port = port;
            cfg
        },
        |config| {
            set(config, "databases.0.tls", mode);
            set(config, "databases.0.ca_cert", ca);
        },
    )
    .await;
    (f, seen)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cleartext_password_is_refused_over_verify_ca() {
    // verify-ca accepts any certificate of the CA, whatever name it carries: a server that is
    // not the configured host could be asking, so the password is not sent.
    let (f, seen) = against_tls_fake("sec-up-clear-ca", "verify-ca").await;
    let answer = login(&f).await;
    assert_fatal(&answer, "08004", &["cleartext", "verify-full"]);
    let conn = the_connection(&f, &seen).await;
    assert!(
        conn.messages.iter().all(|(tag, _)| *tag != b'p'),
        "no PasswordMessage may reach the upstream: {:?}",
        conn.messages
    );
    lease_revoked(&f).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cleartext_password_is_sent_only_over_verify_full() {
    let (f, seen) = against_tls_fake("sec-up-clear-full", "verify-full").await;
    let answer = login(&f).await;
    // The fake never completes the login after the password: the client gets an error.
    assert!(matches!(answer, Raw::Error { .. }), "{answer:?}");
    let conn = the_connection(&f, &seen).await;
    assert!(
        conn.messages.iter().any(|(tag, _)| *tag == b'p'),
        "verify-full: the server named by the host gets the PasswordMessage: {:?}",
        conn.messages
    );
    lease_revoked(&f).await;
}
