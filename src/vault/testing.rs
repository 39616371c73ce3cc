//! Unit-test helpers: a Vault client with a token installed, pointed at a tiny local HTTP
//! server that answers every request with a fixed status and records the request heads and
//! bodies it got; and a scripted Vault for the lease calls ([`ScriptedVault`]), for tests
//! with paused time.

use std::sync::{Arc, Mutex};
use std::time::Duration;

use secrecy::SecretString;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpListener;

use super::client::Renewed;
use super::lease::{Call, LeaseApi};
use super::token::Token;
use super::{Lease, LeaseGuard, Revoker, VaultClient, VaultError};
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

/// One call the scripted Vault got.
#[derive(Debug, Clone)]
pub(crate) struct Called {
    /// When (paused time in the tests that use it).
    pub(crate) at: tokio::time::Instant,
    /// `creds`, `renew` or `revoke`.
    pub(crate) op: &'static str,
    /// The lease the call was about (the one issued, for `creds`).
    pub(crate) lease_id: String,
    /// The increment asked for (`renew` only).
    pub(crate) increment: Duration,
}

/// How the scripted Vault answers a renewal: given the lease id and how many renewals of it
/// came before.
type RenewScript = Box<dyn Fn(&str, usize) -> Result<Renewed, VaultError> + Send + Sync>;
/// How it answers a revocation: given how many revocations of that lease came before.
type RevokeScript = Box<dyn Fn(usize) -> Result<(), VaultError> + Send + Sync>;

/// A Vault for the lease calls that answers from a script and records every call with its
/// time: issues leases of `ttl` named `<mount>/creds/<role>/<n>`, renews and revokes as told.
pub(crate) struct ScriptedVault {
    ttl: Duration,
    renew: RenewScript,
    revoke: RevokeScript,
    calls: Mutex<Vec<Called>>,
}

/// The error the script answers with.
pub(crate) fn unreachable() -> VaultError {
    VaultError::Unreachable("scripted".into())
}

impl ScriptedVault {
    /// Issues renewable leases of `ttl`; grants every renewal in full, revokes at once.
    pub(crate) fn new(ttl: Duration) -> ScriptedVault {
        ScriptedVault {
            ttl,
            renew: Box::new(move |_, _| {
                Ok(Renewed {
                    duration: ttl,
                    renewable: true,
                })
            }),
            revoke: Box::new(|_| Ok(())),
            calls: Mutex::default(),
        }
    }

    /// Answers renewals with `script(lease_id, renewals of it so far)`.
    pub(crate) fn renewing(
        mut self,
        script: impl Fn(&str, usize) -> Result<Renewed, VaultError> + Send + Sync + 'static,
    ) -> ScriptedVault {
        self.renew = Box::new(script);
        self
    }

    /// Answers revocations with `script(revocations of that lease so far)`.
    pub(crate) fn revoking(
        mut self,
        script: impl Fn(usize) -> Result<(), VaultError> + Send + Sync + 'static,
    ) -> ScriptedVault {
        self.revoke = Box::new(script);
        self
    }

    /// Every call so far.
    pub(crate) fn calls(&self) -> Vec<Called> {
        self.calls.lock().expect("calls").clone()
    }

    /// The calls of one kind so far.
    pub(crate) fn calls_of(&self, op: &str) -> Vec<Called> {
        self.calls().into_iter().filter(|c| c.op == op).collect()
    }

    /// Records a call; returns how many of its kind for that lease came before.
    fn record(&self, op: &'static str, lease_id: &str, increment: Duration) -> usize {
        let mut calls = self.calls.lock().expect("calls");
        let before = calls
            .iter()
            .filter(|c| c.op == op && c.lease_id == lease_id)
            .count();
        calls.push(Called {
            at: tokio::time::Instant::now(),
            op,
            lease_id: lease_id.to_owned(),
            increment,
        });
        before
    }
}

/// A parent token for scripted leases (an operator's, never expiring).
pub(crate) fn parent_token() -> Arc<Token> {
    let secret = SecretString::from("parent".to_owned());
    Arc::new(Token::new(secret, Duration::ZERO, false, false))
}

impl LeaseApi for ScriptedVault {
    fn creds<'a>(
        &'a self,
        mount: &'a str,
        role: &'a str,
        revoker: &'a Revoker,
    ) -> Call<'a, (Lease, LeaseGuard)> {
        let issued = self.calls_of("creds").len();
        let id = format!("{mount}/creds/{role}/{issued}");
        self.record("creds", &id, Duration::ZERO);
        let lease = Lease {
            id,
            duration: self.ttl,
            renewable: true,
            username: format!("v-{role}-{issued}"),
            password: SecretString::from("pw".to_owned()),
            parent: parent_token(),
        };
        let guard = revoker.guard(&lease);
        Box::pin(async move { Ok((lease, guard)) })
    }

    fn renew<'a>(&'a self, lease_id: &'a str, increment: Duration) -> Call<'a, Renewed> {
        let before = self.record("renew", lease_id, increment);
        let answer = (self.renew)(lease_id, before);
        Box::pin(async move { answer })
    }

    fn revoke<'a>(&'a self, lease_id: &'a str) -> Call<'a, ()> {
        let before = self.record("revoke", lease_id, Duration::ZERO);
        let answer = (self.revoke)(before);
        Box::pin(async move { answer })
    }

    fn timeout(&self) -> Duration {
        Duration::from_secs(5)
    }
}
