//! Logging in upstream with the issued credential: StartupMessage with the client's allowed
//! settings (checked by `params`), then SCRAM-SHA-256 (with `tls-server-end-point` channel binding over TLS, and
//! the server's final signature verified before AuthenticationOk is believed), MD5 only where
//! the database entry allows it, cleartext only over TLS that verified the host name
//! (`verify-full`). Collects what the client must see afterwards: ParameterStatus and
//! NoticeResponse messages, the upstream cancel key, and the transaction status of the first
//! ReadyForQuery.

use bytes::{Bytes, BytesMut};
use fallible_iterator::FallibleIterator;
use postgres_protocol::authentication::md5_hash;
use postgres_protocol::authentication::sasl::SCRAM_SHA_256;
use postgres_protocol::message::backend::Message;
use postgres_protocol::message::frontend;
use secrecy::{ExposeSecret, SecretString};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};

use super::error::UpstreamError;
use super::scram::{Binding, Scram};
use super::stream::UpstreamStream;
use crate::config::{DatabaseConfig, UpstreamTls};
use crate::tls::upstream::server_end_point;

const SCRAM_SHA_256_PLUS: &str = "SCRAM-SHA-256-PLUS";
/// Largest message accepted from the upstream during login.
const MAX_LOGIN_MESSAGE: usize = 1 << 20;

/// Startup parameters that are leasegate's to set (or refused), never the client's.
const RESERVED: &[&str] = &["user", "database", "replication", "options"];

/// A logged-in upstream connection and what the client must be told about it.
pub(crate) struct LoggedIn {
    /// The connection, positioned after the first ReadyForQuery.
    pub stream: UpstreamStream,
    /// ParameterStatus and NoticeResponse messages as received, in order.
    pub to_client: BytesMut,
    /// The upstream's cancel key (pid, secret).
    pub cancel_key: Option<(i32, i32)>,
    /// Transaction status byte of the first ReadyForQuery.
    pub ready_status: u8,
    /// Bytes received after ReadyForQuery (normally none); the relay sends them first,
    /// through its message-boundary tracking.
    pub leftover: BytesMut,
}

/// The startup parameters sent upstream: leasegate's user and database, then the client's
/// allowed settings (see [`super::params::check`]), never a reserved or `_pq_.` one.
pub(crate) fn upstream_params<'a>(
    settings: &'a [(String, String)],
    user: &'a str,
    database: &'a str,
) -> Vec<(&'a str, &'a str)> {
    let mut params = vec![("user", user), ("database", database)];
    params.extend(
        settings
            .iter()
            .filter(|(k, _)| !RESERVED.contains(&k.as_str()) && !k.starts_with("_pq_."))
            .map(|(k, v)| (k.as_str(), v.as_str())),
    );
    params
}

/// Runs the login on a connected stream. The caller bounds the time.
pub(crate) async fn login(
    mut stream: UpstreamStream,
    db: &DatabaseConfig,
    username: &str,
    password: &SecretString,
    settings: &[(String, String)],
) -> Result<LoggedIn, UpstreamError> {
    let mut out = BytesMut::new();
    frontend::startup_message(
        upstream_params(settings, username, db.upstream_database()),
        &mut out,
    )?;
    stream.write_all(&out).await?;
    let mut buf = BytesMut::with_capacity(8192);
    authenticate(&mut stream, &mut buf, db, username, password).await?;
    let mut logged_in = LoggedIn {
        stream,
        to_client: BytesMut::new(),
        cancel_key: None,
        ready_status: b'I',
        leftover: BytesMut::new(),
    };
    loop {
        let (raw, msg) = read_message(&mut logged_in.stream, &mut buf).await?;
        match msg {
            Message::ParameterStatus(_) | Message::NoticeResponse(_) => {
                logged_in.to_client.extend_from_slice(&raw)
            }
            Message::BackendKeyData(k) => {
                logged_in.cancel_key = Some((k.process_id(), k.secret_key()))
            }
            Message::ReadyForQuery(r) => {
                logged_in.ready_status = r.status();
                logged_in.leftover = buf;
                return Ok(logged_in);
            }
            Message::ErrorResponse(body) => return Err(rejected(raw, &body)),
            _ => return Err(unexpected("after authentication")),
        }
    }
}

async fn authenticate(
    stream: &mut UpstreamStream,
    buf: &mut BytesMut,
    db: &DatabaseConfig,
    username: &str,
    password: &SecretString,
) -> Result<(), UpstreamError> {
    let mut out = BytesMut::new();
    let mut scram: Option<Scram> = None;
    loop {
        let (raw, msg) = read_message(stream, buf).await?;
        out.clear();
        match msg {
            Message::AuthenticationOk => {
                return if scram.is_some() {
                    Err(UpstreamError::Scram(
                        "server accepted the login without proving it knows the password".into(),
                    ))
                } else {
                    Ok(())
                };
            }
            Message::AuthenticationSasl(body) => {
                let mechanisms: Vec<String> = body
                    .mechanisms()
                    .map(|m| Ok(m.to_owned()))
                    .collect()
                    .map_err(|e| UpstreamError::Protocol(e.to_string()))?;
                scram = Some(sasl_start(stream, &mechanisms, password, &mut out)?);
            }
            Message::AuthenticationSaslContinue(body) => {
                let s = scram.take().ok_or_else(|| unexpected("SASL continue"))?;
                scram = Some(sasl_continue(s, body.data().to_vec(), &mut out).await?);
            }
            Message::AuthenticationSaslFinal(body) => {
                let mut s = scram.take().ok_or_else(|| unexpected("SASL final"))?;
                s.verify(body.data())
                    .map_err(|e| UpstreamError::Scram(e.to_string()))?;
                // Verified: the next AuthenticationOk is genuine.
                return expect_ok(stream, buf).await;
            }
            Message::AuthenticationMd5Password(body) if db.allow_md5 => {
                let hash = md5_hash(
                    username.as_bytes(),
                    password.expose_secret().as_bytes(),
                    body.salt(),
                );
                frontend::password_message(hash.as_bytes(), &mut out)?;
            }
            Message::AuthenticationMd5Password(_) => {
                return Err(UpstreamError::AuthMethod("MD5".into()));
            }
            Message::AuthenticationCleartextPassword => cleartext(db, password, &mut out)?,
            Message::ErrorResponse(body) => return Err(rejected(raw, &body)),
            Message::AuthenticationGss
            | Message::AuthenticationSspi
            | Message::AuthenticationKerberosV5
            | Message::AuthenticationScmCredential
            | Message::AuthenticationGssContinue(_) => {
                return Err(UpstreamError::AuthMethod("GSSAPI/SSPI/Kerberos".into()));
            }
            _ => return Err(unexpected("during authentication")),
        }
        stream.write_all(&out).await?;
    }
}

/// The password in the clear, only to a server whose certificate names the configured host:
/// `verify-ca` accepts any certificate of the CA, so any of its servers could ask.
fn cleartext(
    db: &DatabaseConfig,
    password: &SecretString,
    out: &mut BytesMut,
) -> Result<(), UpstreamError> {
    if !matches!(db.tls, UpstreamTls::VerifyFull(_)) {
        return Err(UpstreamError::AuthMethod(
            "cleartext password (allowed only with tls = \"verify-full\")".into(),
        ));
    }
    frontend::password_message(password.expose_secret().as_bytes(), out)?;
    Ok(())
}

/// The client-first message of SCRAM, with channel binding over TLS.
fn sasl_start(
    stream: &UpstreamStream,
    mechanisms: &[String],
    password: &SecretString,
    out: &mut BytesMut,
) -> Result<Scram, UpstreamError> {
    let (mechanism, binding) = choose_mechanism(stream, mechanisms)?;
    let (scram, first) = Scram::start(password.expose_secret().as_bytes(), binding);
    frontend::sasl_initial_response(mechanism, first.as_bytes(), out)?;
    Ok(scram)
}

/// The client-final message of SCRAM for the server-first message `data`.
async fn sasl_continue(
    mut scram: Scram,
    data: Vec<u8>,
    out: &mut BytesMut,
) -> Result<Scram, UpstreamError> {
    // PBKDF2 with thousands of rounds: keep it off the async worker threads.
    let (scram, last) =
        tokio::task::spawn_blocking(move || scram.client_final(&data).map(|last| (scram, last)))
            .await
            .map_err(|e| UpstreamError::Scram(e.to_string()))?
            .map_err(|e| UpstreamError::Scram(e.to_string()))?;
    frontend::sasl_response(last.as_bytes(), out)?;
    Ok(scram)
}

fn choose_mechanism(
    stream: &UpstreamStream,
    mechanisms: &[String],
) -> Result<(&'static str, Binding), UpstreamError> {
    let cert = match stream {
        UpstreamStream::Tls(tls) => tls
            .get_ref()
            .1
            .peer_certificates()
            .and_then(|c| c.first())
            .map(server_end_point),
        UpstreamStream::Plain(_) | UpstreamStream::Local(_) => None,
    };
    let offers = |m: &str| mechanisms.iter().any(|x| x == m);
    match cert {
        Some(hash) if offers(SCRAM_SHA_256_PLUS) => {
            Ok((SCRAM_SHA_256_PLUS, Binding::EndPoint(hash)))
        }
        Some(_) if offers(SCRAM_SHA_256) => Ok((SCRAM_SHA_256, Binding::Unrequested)),
        None if offers(SCRAM_SHA_256) => Ok((SCRAM_SHA_256, Binding::Unsupported)),
        _ => Err(UpstreamError::AuthMethod(format!(
            "SASL ({})",
            mechanisms.join(", ")
        ))),
    }
}

async fn expect_ok(stream: &mut UpstreamStream, buf: &mut BytesMut) -> Result<(), UpstreamError> {
    match read_message(stream, buf).await? {
        (_, Message::AuthenticationOk) => Ok(()),
        (raw, Message::ErrorResponse(body)) => Err(rejected(raw, &body)),
        _ => Err(unexpected("after SASL final")),
    }
}

fn unexpected(when: &str) -> UpstreamError {
    UpstreamError::Protocol(format!("unexpected message {when}"))
}

fn rejected(
    raw: Bytes,
    body: &postgres_protocol::message::backend::ErrorResponseBody,
) -> UpstreamError {
    let mut code = String::new();
    let mut message = String::new();
    let mut fields = body.fields();
    while let Ok(Some(f)) = fields.next() {
        match f.type_() {
            b'C' => code = String::from_utf8_lossy(f.value_bytes()).into_owned(),
            b'M' => message = String::from_utf8_lossy(f.value_bytes()).into_owned(),
            _ => {}
        }
    }
    UpstreamError::Rejected { code, message, raw }
}

/// Reads one whole message; returns its raw bytes and the parsed form.
async fn read_message<S>(
    stream: &mut S,
    buf: &mut BytesMut,
) -> Result<(Bytes, Message), UpstreamError>
where
    S: AsyncRead + AsyncWrite + Unpin,
{
    loop {
        if buf.len() >= 5 {
            let len = u32::from_be_bytes([buf[1], buf[2], buf[3], buf[4]]) as usize;
            if !(4..=MAX_LOGIN_MESSAGE).contains(&len) {
                return Err(UpstreamError::Protocol(format!("message length {len}")));
            }
            if buf.len() > len {
                let raw = Bytes::copy_from_slice(&buf[..=len]);
                return match Message::parse(buf)? {
                    Some(msg) => Ok((raw, msg)),
                    None => Err(unexpected("(incomplete parse)")),
                };
            }
        }
        if stream.read_buf(buf).await? == 0 {
            return Err(UpstreamError::Io(std::io::ErrorKind::UnexpectedEof.into()));
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn client_cannot_override_reserved_params() {
        let client: Vec<(String, String)> = [
            ("user", "postgres"),
            ("database", "template1"),
            ("replication", "true"),
            ("options", "-W 2"),
            ("_pq_.x", "1"),
            ("application_name", "app"),
        ]
        .iter()
        .map(|(k, v)| (k.to_string(), v.to_string()))
        .collect();
        let params = upstream_params(&client, "v_dyn", "myapp");
        assert_eq!(
            params,
            vec![
                ("user", "v_dyn"),
                ("database", "myapp"),
                ("application_name", "app")
            ]
        );
    }
}
