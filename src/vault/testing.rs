//! Unit-test helpers: a Vault client with a token installed, pointed at a tiny local HTTP
//! server that answers every request with a fixed status and records the request heads and
//! bodies it got.

use std::sync::{Arc, Mutex};
use std::time::Duration;

use secrecy::SecretString;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpListener;

use super::VaultClient;
use super::token::Token;
use crate::config::VaultConfig;
use crate::metrics::Metrics;

/// Every request the fake server got, as text (head and body).
pub(crate) type Seen = Arc<Mutex<Vec<String>>>;

/// A client for `address` holding the operator token `t` (never expiring).
pub(crate) fn client(address: &str) -> Arc<VaultClient> {
    let text = format!("address = {address:?}\ntimeout = \"2s\"\n[auth]\nmethod = \"token\"\n");
    let cfg: VaultConfig = toml::from_str(&text).expect("vault config");
    let client = VaultClient::new(&cfg, Arc::new(Metrics::new())).expect("client");
    let token = Token::new(
        SecretString::from("t".to_owned()),
        Duration::ZERO,
        false,
        false,
    );
    client.tokens.install(token);
    Arc::new(client)
}

/// An address nothing listens on (connections are refused at once).
pub(crate) async fn closed_address() -> String {
    let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
    let port = listener.local_addr().expect("addr").port();
    drop(listener);
    format!("http://127.0.0.1:{port}")
}

/// A server answering every request with `status` and an empty body; returns its address.
pub(crate) async fn answering(status: u16) -> (String, Seen) {
    let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
    let port = listener.local_addr().expect("addr").port();
    let seen = Seen::default();
    let record = seen.clone();
    tokio::spawn(async move {
        while let Ok((mut sock, _)) = listener.accept().await {
            let record = record.clone();
            tokio::spawn(async move {
                let mut got = Vec::new();
                let mut buf = [0u8; 4096];
                while !complete(&got) {
                    match sock.read(&mut buf).await {
                        Ok(0) | Err(_) => return,
                        Ok(n) => got.extend_from_slice(&buf[..n]),
                    }
                }
                record
                    .lock()
                    .expect("record")
                    .push(String::from_utf8_lossy(&got).into_owned());
                let resp = format!(
                    "HTTP/1.1 {status} X\r\ncontent-length: 0\r\nconnection: close\r\n\r\n"
                );
                let _ = sock.write_all(resp.as_bytes()).await;
                let _ = sock.shutdown().await;
            });
        }
    });
    (format!("http://127.0.0.1:{port}"), seen)
}

/// Whether `got` holds a whole request: the head and `content-length` bytes of body.
fn complete(got: &[u8]) -> bool {
    let Some(end) = got.windows(4).position(|w| w == b"\r\n\r\n") else {
        return false;
    };
    let head = String::from_utf8_lossy(&got[..end]).to_ascii_lowercase();
    let length = head
        .lines()
        .find_map(|l| l.strip_prefix("content-length:"))
        .and_then(|v| v.trim().parse::<usize>().ok())
        .unwrap_or(0);
    got.len() >= end + 4 + length
}
