//! A hand-driven PostgreSQL wire-protocol connection for protocol edge cases: any startup
//! packet (protocol version, parameters, bogus lengths), every backend message as received
//! (NegotiateProtocolVersion, ParameterStatus, BackendKeyData, ...), simple queries, and
//! CancelRequests with a chosen key. Unlike [`super::client::raw_startup`] the session stays
//! open for the test to use.

use std::collections::BTreeMap;
use std::io;
use std::sync::Arc;
use std::time::Duration;

use rustls::ClientConfig;
use rustls::pki_types::ServerName;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::net::TcpStream;

/// Protocol version 3.0 as sent in a StartupMessage.
pub const PROTOCOL_3_0: (u16, u16) = (3, 0);

const SSL_REQUEST: [u8; 8] = [0, 0, 0, 8, 0x04, 0xd2, 0x16, 0x2f];
const CANCEL_REQUEST_CODE: u32 = 80_877_102;

/// A TLS stream to leasegate.
pub type Tls = tokio_rustls::client::TlsStream<TcpStream>;

/// One backend message.
#[derive(Clone)]
pub struct Msg {
    pub tag: u8,
    pub body: Vec<u8>,
}

impl std::fmt::Debug for Msg {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let tag = self.tag as char;
        match self.tag {
            b'E' | b'N' => write!(f, "{tag}{:?}", self.fields()),
            b'S' => write!(f, "S{:?}", self.parameter_status()),
            b'v' => write!(f, "v{:?}", self.negotiate_protocol()),
            _ if self.body.len() > 64 => write!(f, "{tag}<{} bytes>", self.body.len()),
            _ => write!(f, "{tag}{:?}", String::from_utf8_lossy(&self.body)),
        }
    }
}

impl Msg {
    /// ErrorResponse/NoticeResponse fields by code (`S`, `C`, `M`, ...).
    pub fn fields(&self) -> BTreeMap<char, String> {
        self.body
            .split(|b| *b == 0)
            .filter_map(|f| f.split_first())
            .map(|(k, v)| (*k as char, String::from_utf8_lossy(v).into_owned()))
            .collect()
    }

    /// SQLSTATE of an ErrorResponse/NoticeResponse.
    pub fn sqlstate(&self) -> Option<String> {
        matches!(self.tag, b'E' | b'N')
            .then(|| self.fields().get(&'C').cloned())
            .flatten()
    }

    /// ParameterStatus (name, value).
    pub fn parameter_status(&self) -> Option<(String, String)> {
        if self.tag != b'S' {
            return None;
        }
        let mut parts = self.body.split(|b| *b == 0);
        let name = String::from_utf8_lossy(parts.next()?).into_owned();
        let value = String::from_utf8_lossy(parts.next()?).into_owned();
        Some((name, value))
    }

    /// NegotiateProtocolVersion: (protocol version the server offers, unrecognised options).
    /// PostgreSQL sends the full version code here (`major << 16 | minor`, 196608 for 3.0:
    /// `FrontendProtocol` / `PG_PROTOCOL_LATEST`), and libpq reads it that way, although the
    /// protocol documentation calls the field "newest minor protocol version".
    pub fn negotiate_protocol(&self) -> Option<(u32, Vec<String>)> {
        if self.tag != b'v' || self.body.len() < 8 {
            return None;
        }
        let minor = u32::from_be_bytes(self.body[0..4].try_into().ok()?);
        let count = u32::from_be_bytes(self.body[4..8].try_into().ok()?) as usize;
        let options: Vec<String> = self.body[8..]
            .split(|b| *b == 0)
            .filter(|o| !o.is_empty())
            .map(|o| String::from_utf8_lossy(o).into_owned())
            .collect();
        (options.len() == count).then_some((minor, options))
    }

    /// BackendKeyData (pid, secret).
    pub fn backend_key(&self) -> Option<(i32, Vec<u8>)> {
        if self.tag != b'K' || self.body.len() < 8 {
            return None;
        }
        let pid = i32::from_be_bytes(self.body[0..4].try_into().ok()?);
        Some((pid, self.body[4..].to_vec()))
    }

    /// Authentication request code ('R').
    pub fn auth_code(&self) -> Option<u32> {
        (self.tag == b'R' && self.body.len() >= 4)
            .then(|| u32::from_be_bytes([self.body[0], self.body[1], self.body[2], self.body[3]]))
    }

    /// DataRow columns as text (`None` = NULL).
    pub fn data_row(&self) -> Option<Vec<Option<String>>> {
        if self.tag != b'D' || self.body.len() < 2 {
            return None;
        }
        let n = u16::from_be_bytes([self.body[0], self.body[1]]) as usize;
        let mut at = 2;
        let mut cols = Vec::with_capacity(n);
        for _ in 0..n {
            let len = i32::from_be_bytes(self.body.get(at..at + 4)?.try_into().ok()?);
            at += 4;
            if len < 0 {
                cols.push(None);
            } else {
                let end = at + len as usize;
                cols.push(Some(
                    String::from_utf8_lossy(self.body.get(at..end)?).into_owned(),
                ));
                at = end;
            }
        }
        Some(cols)
    }
}

/// A StartupMessage for protocol `major.minor` with `params` (in this order).
pub fn startup_packet(version: (u16, u16), params: &[(&str, &str)]) -> Vec<u8> {
    let mut body = Vec::new();
    body.extend_from_slice(&version.0.to_be_bytes());
    body.extend_from_slice(&version.1.to_be_bytes());
    for (k, v) in params {
        body.extend_from_slice(k.as_bytes());
        body.push(0);
        body.extend_from_slice(v.as_bytes());
        body.push(0);
    }
    body.push(0);
    let mut msg = ((body.len() + 4) as u32).to_be_bytes().to_vec();
    msg.extend_from_slice(&body);
    msg
}

/// A CancelRequest packet.
pub fn cancel_packet(pid: i32, secret: &[u8]) -> Vec<u8> {
    let mut msg = ((12 + secret.len()) as u32).to_be_bytes().to_vec();
    msg.extend_from_slice(&CANCEL_REQUEST_CODE.to_be_bytes());
    msg.extend_from_slice(&pid.to_be_bytes());
    msg.extend_from_slice(secret);
    msg
}

/// Request code of leasegate's PeerCancelRequest (the cancel one instance forwards to another).
pub const PEER_CANCEL_REQUEST_CODE: u32 = 0x4c47_0001;

/// A PeerCancelRequest packet: laid out as a CancelRequest, with leasegate's own code.
pub fn peer_cancel_packet(pid: i32, secret: &[u8]) -> Vec<u8> {
    let mut msg = cancel_packet(pid, secret);
    msg[4..8].copy_from_slice(&PEER_CANCEL_REQUEST_CODE.to_be_bytes());
    msg
}

/// A simple-protocol Query message.
pub fn query_message(sql: &str) -> Vec<u8> {
    let mut msg = vec![b'Q'];
    msg.extend_from_slice(&((sql.len() + 5) as u32).to_be_bytes());
    msg.extend_from_slice(sql.as_bytes());
    msg.push(0);
    msg
}

/// Sends a plaintext CancelRequest to leasegate on `port` and waits until leasegate closes
/// the connection (it never answers a cancel), at most 5 s.
pub async fn send_plain_cancel(port: u16, pid: i32, secret: &[u8]) -> io::Result<()> {
    let mut tcp = TcpStream::connect(("127.0.0.1", port)).await?;
    tcp.write_all(&cancel_packet(pid, secret)).await?;
    let mut rest = Vec::new();
    let _ = tokio::time::timeout(Duration::from_secs(5), tcp.read_to_end(&mut rest)).await;
    Ok(())
}

/// How a TLS peer ended the connection.
#[derive(Debug, PartialEq, Eq)]
pub enum TlsClose {
    /// close_notify, then EOF (what PostgreSQL's `SSL_shutdown` sends).
    CloseNotify,
    /// TCP EOF without close_notify: OpenSSL 3 (libpq) reports "unexpected eof while reading".
    UnexpectedEof,
    /// Another error.
    Error(String),
    /// Still open after the deadline.
    Open,
}

/// Sends a CancelRequest inside TLS (as libpq ≥ 17's `PQcancelCreate` does) to leasegate on
/// `port`, then reports how leasegate closed the connection (≤ 5 s).
pub async fn send_tls_cancel(
    port: u16,
    config: Arc<ClientConfig>,
    pid: i32,
    secret: &[u8],
) -> io::Result<TlsClose> {
    send_tls_packet(port, config, &cancel_packet(pid, secret)).await
}

/// Sends a CancelRequest from the local address `source` (any 127.x address is this host's
/// too) and returns what leasegate sent back before closing (a cancel is never answered),
/// waiting at most 5 s.
pub async fn send_plain_cancel_from(
    source: std::net::IpAddr,
    port: u16,
    pid: i32,
    secret: &[u8],
) -> io::Result<Vec<u8>> {
    let socket = tokio::net::TcpSocket::new_v4()?;
    socket.bind((source, 0).into())?;
    let mut tcp = socket.connect(([127, 0, 0, 1], port).into()).await?;
    tcp.write_all(&cancel_packet(pid, secret)).await?;
    let mut rest = Vec::new();
    let _ = tokio::time::timeout(Duration::from_secs(5), tcp.read_to_end(&mut rest)).await;
    Ok(rest)
}

/// Sends one pre-authentication `packet` inside TLS to leasegate on `port`, then reports how
/// leasegate closed the connection (≤ 5 s).
pub async fn send_tls_packet(
    port: u16,
    config: Arc<ClientConfig>,
    packet: &[u8],
) -> io::Result<TlsClose> {
    let mut tls = tls_connect(port, config).await?;
    tls.write_all(packet).await?;
    tls.flush().await?;
    let mut rest = Vec::new();
    Ok(
        match tokio::time::timeout(Duration::from_secs(5), tls.read_to_end(&mut rest)).await {
            Err(_) => TlsClose::Open,
            Ok(Ok(_)) => TlsClose::CloseNotify,
            Ok(Err(e)) if e.kind() == io::ErrorKind::UnexpectedEof => TlsClose::UnexpectedEof,
            Ok(Err(e)) => TlsClose::Error(e.to_string()),
        },
    )
}

/// SSLRequest, `S`, then a TLS handshake with `config`, verifying the name `localhost`.
pub async fn tls_connect(port: u16, config: Arc<ClientConfig>) -> io::Result<Tls> {
    let mut tcp = TcpStream::connect(("127.0.0.1", port)).await?;
    tcp.write_all(&SSL_REQUEST).await?;
    let mut answer = [0u8; 1];
    tcp.read_exact(&mut answer).await?;
    if answer[0] != b'S' {
        return Err(io::Error::other(format!(
            "SSLRequest answered {:?}",
            answer[0] as char
        )));
    }
    let name = ServerName::try_from("localhost").expect("server name");
    tokio_rustls::TlsConnector::from(config)
        .connect(name, tcp)
        .await
}

/// A wire-protocol connection over any stream.
pub struct Wire<S> {
    pub stream: S,
}

/// What a completed login produced.
#[derive(Debug, Default)]
pub struct Login {
    /// Every message up to and including ReadyForQuery.
    pub messages: Vec<Msg>,
    /// ParameterStatus values.
    pub parameters: BTreeMap<String, String>,
    /// BackendKeyData.
    pub key: Option<(i32, Vec<u8>)>,
}

impl<S: AsyncRead + AsyncWrite + Unpin> Wire<S> {
    pub fn new(stream: S) -> Wire<S> {
        Wire { stream }
    }

    pub async fn send(&mut self, bytes: &[u8]) -> io::Result<()> {
        self.stream.write_all(bytes).await?;
        self.stream.flush().await
    }

    /// The next backend message (messages up to 64 MiB).
    pub async fn recv(&mut self) -> io::Result<Msg> {
        let mut header = [0u8; 5];
        self.stream.read_exact(&mut header).await?;
        let len = u32::from_be_bytes([header[1], header[2], header[3], header[4]]) as usize;
        if !(4..=64 << 20).contains(&len) {
            return Err(io::Error::new(
                io::ErrorKind::InvalidData,
                format!("bad message length {len} (tag {:?})", header[0] as char),
            ));
        }
        let mut body = vec![0u8; len - 4];
        self.stream.read_exact(&mut body).await?;
        Ok(Msg {
            tag: header[0],
            body,
        })
    }

    /// The next message within `timeout`; `Ok(None)` when nothing arrived in time.
    pub async fn recv_within(&mut self, timeout: Duration) -> io::Result<Option<Msg>> {
        match tokio::time::timeout(timeout, self.recv()).await {
            Ok(r) => r.map(Some),
            Err(_) => Ok(None),
        }
    }

    /// Messages up to and including ReadyForQuery, or up to a FATAL ErrorResponse (then the
    /// connection is expected to close); `timeout` bounds the whole exchange.
    pub async fn recv_until_ready(&mut self, timeout: Duration) -> io::Result<Vec<Msg>> {
        let collect = async {
            let mut out = Vec::new();
            loop {
                let m = self.recv().await?;
                let done = m.tag == b'Z'
                    || (m.tag == b'E' && m.fields().get(&'S').map(String::as_str) == Some("FATAL"));
                out.push(m);
                if done {
                    return Ok(out);
                }
            }
        };
        tokio::time::timeout(timeout, collect)
            .await
            .unwrap_or_else(|_| {
                Err(io::Error::new(
                    io::ErrorKind::TimedOut,
                    format!("no ReadyForQuery within {timeout:?}"),
                ))
            })
    }

    /// Sends a StartupMessage and reads the answer up to ReadyForQuery (or FATAL error).
    pub async fn startup(
        &mut self,
        version: (u16, u16),
        params: &[(&str, &str)],
    ) -> io::Result<Login> {
        self.send(&startup_packet(version, params)).await?;
        let messages = self.recv_until_ready(Duration::from_secs(30)).await?;
        let mut login = Login::default();
        for m in &messages {
            if let Some((k, v)) = m.parameter_status() {
                login.parameters.insert(k, v);
            }
            if let Some(key) = m.backend_key() {
                login.key = Some(key);
            }
        }
        login.messages = messages;
        Ok(login)
    }

    /// Runs one simple query and returns every message up to ReadyForQuery.
    pub async fn simple_query(&mut self, sql: &str) -> io::Result<Vec<Msg>> {
        self.send(&query_message(sql)).await?;
        self.recv_until_ready(Duration::from_secs(60)).await
    }

    /// First column of every DataRow of a simple query; panics on an ErrorResponse.
    pub async fn query_column(&mut self, sql: &str) -> Vec<Option<String>> {
        let msgs = self
            .simple_query(sql)
            .await
            .unwrap_or_else(|e| panic!("simple query {sql:?}: {e}"));
        if let Some(err) = msgs.iter().find(|m| m.tag == b'E') {
            panic!("simple query {sql:?} failed: {err:?}");
        }
        msgs.iter()
            .filter_map(Msg::data_row)
            .map(|row| row.into_iter().next().flatten())
            .collect()
    }

    /// Sends Terminate and closes.
    pub async fn terminate(mut self) {
        let _ = self.send(&[b'X', 0, 0, 0, 4]).await;
        let _ = self.stream.shutdown().await;
    }

    /// Waits up to `timeout` for the peer to close the connection (EOF or reset), discarding
    /// whatever it still sends. Returns the bytes seen, or `Err` with them if still open.
    pub async fn closed_within(&mut self, timeout: Duration) -> Result<Vec<u8>, Vec<u8>> {
        let mut seen = Vec::new();
        let drain = async {
            let mut buf = [0u8; 4096];
            loop {
                match self.stream.read(&mut buf).await {
                    Ok(0) | Err(_) => return,
                    Ok(n) => seen.extend_from_slice(&buf[..n]),
                }
            }
        };
        match tokio::time::timeout(timeout, drain).await {
            Ok(()) => Ok(seen),
            Err(_) => Err(seen),
        }
    }
}

/// The error fields of the first ErrorResponse in `bytes` (raw bytes read after a refusal).
pub fn first_error(bytes: &[u8]) -> Option<BTreeMap<char, String>> {
    if bytes.first() != Some(&b'E') || bytes.len() < 5 {
        return None;
    }
    let len = u32::from_be_bytes([bytes[1], bytes[2], bytes[3], bytes[4]]) as usize;
    let body = bytes.get(5..1 + len)?;
    Some(
        Msg {
            tag: b'E',
            body: body.to_vec(),
        }
        .fields(),
    )
}
