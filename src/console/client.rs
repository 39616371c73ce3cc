//! HTTP/1 over the admin socket: where it is (`[admin] socket` of the configuration file,
//! nothing else of it is read), one request per connection, and errors that say what to do.

use std::io::ErrorKind;
use std::path::{Path, PathBuf};
use std::time::Duration;

use anyhow::{Context, bail};
use http_body_util::{BodyExt, Full};
use hyper::body::Bytes;
use hyper::{Method, Request, StatusCode};
use hyper_util::rt::TokioIo;
use tokio::net::UnixStream;

/// Longest a command waits for its answer (the server gives a connection 120 s).
const ANSWER_WITHIN: Duration = Duration::from_secs(125);

/// `[admin] socket` of `config`, relative to the file's directory.
pub(super) fn socket_path(config: &Path) -> anyhow::Result<PathBuf> {
    let text = std::fs::read_to_string(config)
        .with_context(|| format!("cannot read {}", config.display()))?;
    let table: toml::Table =
        toml::from_str(&text).with_context(|| format!("{}: not valid TOML", config.display()))?;
    let socket = table
        .get("admin")
        .and_then(|a| a.get("socket"))
        .and_then(|s| s.as_str());
    let Some(socket) = socket else {
        bail!(
            "{} has no [admin] socket: the console talks to leasegate over it (see README, \
             Incident response)",
            config.display()
        );
    };
    let socket = PathBuf::from(socket);
    let base = config.parent().unwrap_or(Path::new("."));
    Ok(if socket.is_relative() {
        base.join(socket)
    } else {
        socket
    })
}

/// One request; the answer's body when its status is 200.
pub(super) fn call(
    socket: &Path,
    method: Method,
    path: &str,
    body: Option<String>,
) -> anyhow::Result<String> {
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .context("starting the async runtime")?;
    let request = send(socket, method, path, body);
    let (status, text) = runtime
        .block_on(async { tokio::time::timeout(ANSWER_WITHIN, request).await })
        .map_err(|_| {
            anyhow::anyhow!("no answer on {} within {ANSWER_WITHIN:?}", socket.display())
        })??;
    match status {
        StatusCode::OK => Ok(text),
        StatusCode::FORBIDDEN => bail!("refused by leasegate: {}", text.trim()),
        other => bail!("leasegate answered {other}: {}", text.trim()),
    }
}

async fn send(
    socket: &Path,
    method: Method,
    path: &str,
    body: Option<String>,
) -> anyhow::Result<(StatusCode, String)> {
    let stream = UnixStream::connect(socket)
        .await
        .map_err(|e| connect_error(socket, e))?;
    let (mut sender, conn) = hyper::client::conn::http1::handshake(TokioIo::new(stream))
        .await
        .context("admin socket handshake")?;
    let conn = tokio::spawn(conn);
    let request = Request::builder()
        .method(method)
        .uri(path)
        .header(hyper::header::HOST, "leasegate")
        .header(hyper::header::CONTENT_TYPE, "application/json")
        .body(Full::new(Bytes::from(body.unwrap_or_default())))?;
    let response = sender
        .send_request(request)
        .await
        .context("admin socket request")?;
    let status = response.status();
    let bytes = response
        .into_body()
        .collect()
        .await
        .context("admin socket answer")?
        .to_bytes();
    drop(sender);
    let _ = conn.await;
    Ok((status, String::from_utf8_lossy(&bytes).into_owned()))
}

fn connect_error(socket: &Path, e: std::io::Error) -> anyhow::Error {
    let path = socket.display();
    match e.kind() {
        ErrorKind::NotFound => anyhow::anyhow!(
            "no admin socket at {path}: is leasegate running with this configuration?"
        ),
        ErrorKind::ConnectionRefused => {
            anyhow::anyhow!("nothing listens on {path}: leasegate is not running (a stale socket)")
        }
        ErrorKind::PermissionDenied => anyhow::anyhow!(
            "cannot connect to {path}: permission denied (the admin socket is for leasegate's \
             own user and root)"
        ),
        _ => anyhow::anyhow!("cannot connect to {path}: {e}"),
    }
}
