//! Clients that talk to leasegate the way users do: psql (libpq/OpenSSL), tokio-postgres over
//! rustls with a client certificate, and a raw startup-protocol client that reports the exact
//! ErrorResponse fields or TLS alert.

use std::future::Future;
use std::io;
use std::pin::Pin;
use std::process::{Output, Stdio};
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;

use rustls::pki_types::ServerName;
use rustls::{AlertDescription, ClientConfig, RootCertStore};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt, ReadBuf};
use tokio::net::TcpStream;
use tokio_postgres::tls::{ChannelBinding, MakeTlsConnect, TlsConnect, TlsStream};

use super::pki::{ClientCert, Pki};

/// rustls client config trusting the test CA, optionally presenting a client certificate
/// (followed by its intermediate CA certificates, if any).
pub fn tls_config(pki: &Pki, cert: Option<&ClientCert>) -> Arc<ClientConfig> {
    let mut roots = RootCertStore::empty();
    roots.add(pki.ca_der()).expect("add test CA");
    let provider = Arc::new(rustls::crypto::aws_lc_rs::default_provider());
    let builder = ClientConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .expect("TLS versions")
        .with_root_certificates(roots);
    let config = match cert {
        Some(c) => builder
            .with_client_auth_cert(
                std::iter::once(c.cert_der.clone())
                    .chain(c.chain.iter().cloned())
                    .collect(),
                c.key_der(),
            )
            .expect("client cert and key match"),
        None => builder.with_no_client_auth(),
    };
    Arc::new(config)
}

// ---------------------------------------------------------------- psql

/// libpq connection string for leasegate on `port` with `sslmode=verify-full`.
pub fn conninfo(port: u16, pki: &Pki, cert: Option<&ClientCert>, user: &str, db: &str) -> String {
    let mut s = format!(
        "host=localhost hostaddr=127.0.0.1 port={port} dbname={db} user={user} \
         sslmode=verify-full sslrootcert={}",
        pki.ca_pem().display()
    );
    match cert {
        Some(c) => s.push_str(&format!(
            " sslcert={} sslkey={}",
            c.cert.display(),
            c.key.display()
        )),
        // Keep libpq from picking up ~/.postgresql/postgresql.crt.
        None => s.push_str(" sslcert=/nonexistent/cert.pem sslkey=/nonexistent/key.pem"),
    }
    s
}

/// A psql command running `sql` against `conninfo` (unaligned, tuples only, verbose errors
/// so that stderr carries the SQLSTATE).
pub fn psql_command(conninfo: &str, sql: &str) -> tokio::process::Command {
    psql_command_as(None, conninfo, sql)
}

/// [`psql_command`], run as the OS user `os_user` (through `runuser`) when given.
pub fn psql_command_as(
    os_user: Option<&str>,
    conninfo: &str,
    sql: &str,
) -> tokio::process::Command {
    let psql = super::pg::pg_bin("psql");
    let mut cmd = match os_user {
        Some(user) => {
            let mut c = tokio::process::Command::new("runuser");
            c.args(["-u", user, "--"]).arg(psql);
            c
        }
        None => tokio::process::Command::new(psql),
    };
    cmd.args([
        "-X",
        "-A",
        "-t",
        "-v",
        "ON_ERROR_STOP=1",
        "-v",
        "VERBOSITY=verbose",
    ])
    .arg("-c")
    .arg(sql)
    .arg(conninfo)
    .env("PGCONNECT_TIMEOUT", "15")
    .env_remove("PGPASSWORD")
    .env_remove("PGSSLMODE")
    .stdin(Stdio::null())
    .stdout(Stdio::piped())
    .stderr(Stdio::piped())
    .kill_on_drop(true);
    cmd
}

/// Runs psql to completion (at most 60 s).
pub async fn psql(conninfo: &str, sql: &str) -> Output {
    let out = psql_command(conninfo, sql).output();
    tokio::time::timeout(Duration::from_secs(60), out)
        .await
        .expect("psql finished within 60 s")
        .expect("run psql")
}

// ---------------------------------------------------------------- tokio-postgres

/// tokio-postgres TLS glue over tokio-rustls (no channel binding: leasegate terminates TLS).
#[derive(Clone)]
pub struct MakeRustls(pub Arc<ClientConfig>);

pub struct RustlsConnect {
    config: Arc<ClientConfig>,
    name: ServerName<'static>,
}

pub struct RustlsStream<S>(tokio_rustls::client::TlsStream<S>);

type BoxError = Box<dyn std::error::Error + Send + Sync>;

impl<S> MakeTlsConnect<S> for MakeRustls
where
    S: AsyncRead + AsyncWrite + Unpin + Send + 'static,
{
    type Stream = RustlsStream<S>;
    type TlsConnect = RustlsConnect;
    type Error = BoxError;

    fn make_tls_connect(&mut self, domain: &str) -> Result<RustlsConnect, BoxError> {
        Ok(RustlsConnect {
            config: self.0.clone(),
            name: ServerName::try_from(domain.to_string())?,
        })
    }
}

impl<S> TlsConnect<S> for RustlsConnect
where
    S: AsyncRead + AsyncWrite + Unpin + Send + 'static,
{
    type Stream = RustlsStream<S>;
    type Error = io::Error;
    type Future = Pin<Box<dyn Future<Output = io::Result<RustlsStream<S>>> + Send>>;

    fn connect(self, stream: S) -> Self::Future {
        let connector = tokio_rustls::TlsConnector::from(self.config);
        Box::pin(async move { Ok(RustlsStream(connector.connect(self.name, stream).await?)) })
    }
}

impl<S: AsyncRead + AsyncWrite + Unpin> TlsStream for RustlsStream<S> {
    fn channel_binding(&self) -> ChannelBinding {
        ChannelBinding::none()
    }
}

impl<S: AsyncRead + AsyncWrite + Unpin> AsyncRead for RustlsStream<S> {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        Pin::new(&mut self.0).poll_read(cx, buf)
    }
}

impl<S: AsyncRead + AsyncWrite + Unpin> AsyncWrite for RustlsStream<S> {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.0).poll_write(cx, buf)
    }
    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.0).poll_flush(cx)
    }
    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.0).poll_shutdown(cx)
    }
}

/// A tokio-postgres session through leasegate; the driver task is returned so a test can
/// abort it (drops the socket without a Terminate message).
pub struct PgSession {
    pub client: tokio_postgres::Client,
    pub driver: tokio::task::JoinHandle<()>,
    pub tls: MakeRustls,
}

/// Connects with `sslmode=require` semantics plus full verification by rustls.
pub async fn pg_connect(
    port: u16,
    pki: &Pki,
    cert: Option<&ClientCert>,
    user: &str,
    db: &str,
) -> Result<PgSession, tokio_postgres::Error> {
    let tls = MakeRustls(tls_config(pki, cert));
    let (client, conn) = tokio_postgres::Config::new()
        .host("localhost")
        .hostaddr(std::net::Ipv4Addr::LOCALHOST.into())
        .port(port)
        .user(user)
        .dbname(db)
        .ssl_mode(tokio_postgres::config::SslMode::Require)
        .connect_timeout(Duration::from_secs(15))
        .connect(tls.clone())
        .await?;
    let driver = tokio::spawn(async move {
        let _ = conn.await;
    });
    Ok(PgSession {
        client,
        driver,
        tls,
    })
}

/// `select current_user` through a session.
pub async fn current_user(s: &PgSession) -> String {
    let row = s
        .client
        .query_one("select current_user::text", &[])
        .await
        .expect("select current_user through leasegate");
    row.get(0)
}

// ---------------------------------------------------------------- raw protocol

/// What the server answered to a hand-written startup. The texts are read through `Debug`
/// in assertion messages.
#[derive(Debug)]
#[allow(dead_code)]
pub enum Raw {
    /// ErrorResponse: severity (S), SQLSTATE (C), message (M).
    Error {
        severity: String,
        code: String,
        message: String,
    },
    /// AuthenticationOk ... ReadyForQuery.
    Ready,
    /// The peer sent a TLS alert (during or right after the handshake).
    Alert(AlertDescription),
    /// Another TLS error.
    Tls(String),
    /// Connection closed or failed without a PostgreSQL answer.
    Io(String),
    /// Anything else (unexpected message).
    Other(String),
}

impl Raw {
    /// Panics unless this is an ErrorResponse with `code`; returns the message.
    #[track_caller]
    pub fn expect_error(&self, code: &str) -> &str {
        match self {
            Raw::Error {
                code: c, message, ..
            } if c == code => message,
            other => panic!("expected ErrorResponse {code}, got {other:?}"),
        }
    }
}

pub enum Transport {
    /// StartupMessage without SSLRequest.
    Plain,
    /// SSLRequest, then TLS with this config, then StartupMessage.
    Tls(Arc<ClientConfig>),
}

/// Sends a startup for `user`/`db` and reports the server's answer (30 s deadline).
pub async fn raw_startup(port: u16, transport: Transport, user: &str, db: &str) -> Raw {
    let attempt = async {
        let mut tcp = match TcpStream::connect(("127.0.0.1", port)).await {
            Ok(s) => s,
            Err(e) => return classify(e),
        };
        match transport {
            Transport::Plain => exchange(&mut tcp, user, db).await,
            Transport::Tls(config) => {
                let ssl_request = [0u8, 0, 0, 8, 0x04, 0xd2, 0x16, 0x2f];
                if let Err(e) = tcp.write_all(&ssl_request).await {
                    return classify(e);
                }
                let mut answer = [0u8; 1];
                if let Err(e) = tcp.read_exact(&mut answer).await {
                    return classify(e);
                }
                if answer[0] != b'S' {
                    return Raw::Other(format!("SSLRequest answered {:?}", answer[0] as char));
                }
                let name = ServerName::try_from("localhost").expect("server name");
                let mut tls = match tokio_rustls::TlsConnector::from(config)
                    .connect(name, tcp)
                    .await
                {
                    Ok(s) => s,
                    Err(e) => return classify(e),
                };
                exchange(&mut tls, user, db).await
            }
        }
    };
    tokio::time::timeout(Duration::from_secs(30), attempt)
        .await
        .unwrap_or_else(|_| Raw::Io("no answer within 30 s".into()))
}

async fn exchange<S: AsyncRead + AsyncWrite + Unpin>(s: &mut S, user: &str, db: &str) -> Raw {
    let mut body = 196608u32.to_be_bytes().to_vec();
    for (k, v) in [("user", user), ("database", db)] {
        body.extend_from_slice(k.as_bytes());
        body.push(0);
        body.extend_from_slice(v.as_bytes());
        body.push(0);
    }
    body.push(0);
    let mut msg = u32::try_from(body.len() + 4)
        .expect("small startup")
        .to_be_bytes()
        .to_vec();
    msg.extend_from_slice(&body);
    if let Err(e) = s.write_all(&msg).await {
        return classify(e);
    }
    if let Err(e) = s.flush().await {
        return classify(e);
    }
    loop {
        let (tag, payload) = match read_message(s).await {
            Ok(m) => m,
            Err(e) => return classify(e),
        };
        match tag {
            b'E' => return parse_error(&payload),
            b'Z' => {
                // Terminate politely.
                let _ = s.write_all(&[b'X', 0, 0, 0, 4]).await;
                let _ = s.shutdown().await;
                return Raw::Ready;
            }
            b'R' | b'S' | b'K' | b'N' => continue,
            other => return Raw::Other(format!("unexpected message {:?}", other as char)),
        }
    }
}

async fn read_message<S: AsyncRead + Unpin>(s: &mut S) -> io::Result<(u8, Vec<u8>)> {
    let mut header = [0u8; 5];
    s.read_exact(&mut header).await?;
    let len = u32::from_be_bytes([header[1], header[2], header[3], header[4]]) as usize;
    if !(4..=1 << 20).contains(&len) {
        return Err(io::Error::new(
            io::ErrorKind::InvalidData,
            format!("bad message length {len}"),
        ));
    }
    let mut payload = vec![0u8; len - 4];
    s.read_exact(&mut payload).await?;
    Ok((header[0], payload))
}

fn parse_error(payload: &[u8]) -> Raw {
    let (mut severity, mut code, mut message) = (String::new(), String::new(), String::new());
    for field in payload.split(|b| *b == 0) {
        let Some((&kind, value)) = field.split_first() else {
            continue;
        };
        let value = String::from_utf8_lossy(value).into_owned();
        match kind {
            b'S' => severity = value,
            b'C' => code = value,
            b'M' => message = value,
            _ => {}
        }
    }
    Raw::Error {
        severity,
        code,
        message,
    }
}

fn classify(e: io::Error) -> Raw {
    match e
        .get_ref()
        .and_then(|inner| inner.downcast_ref::<rustls::Error>())
    {
        Some(rustls::Error::AlertReceived(alert)) => Raw::Alert(*alert),
        Some(other) => Raw::Tls(other.to_string()),
        None => Raw::Io(format!("{:?}: {e}", e.kind())),
    }
}
