//! The rows of `sessions list`: one [`Listed`] per live session, prefetched credential or
//! warm session, serialized as one JSON object per line over the admin socket. The
//! pools that hold credentials outside a session feed the listing through
//! [`ListingSource`]: the prefetch pools and their warm sessions.

use std::sync::Arc;
use std::time::{Instant, SystemTime};

use serde::{Deserialize, Serialize};

use crate::prefetch::Prefetcher;

/// What a row stands for.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub(crate) enum Kind {
    /// A client session.
    Session,
    /// A credential issued ahead of demand, waiting for a session.
    Prefetched,
    /// An upstream connection logged in ahead of demand, waiting for a session.
    Warm,
}

impl Kind {
    /// The name shown in the table.
    pub(crate) fn as_str(self) -> &'static str {
        match self {
            Kind::Session => "session",
            Kind::Prefetched => "prefetched",
            Kind::Warm => "warm",
        }
    }
}

/// One row of `sessions list` (times RFC 3339, UTC).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub(crate) struct Listed {
    /// Session, prefetched or warm.
    pub kind: Kind,
    /// The session id (`sessions end --id`); none for pooled credentials.
    pub id: Option<u64>,
    /// tcp, tls or unix (sessions).
    pub transport: Option<String>,
    /// The client's address (sessions).
    pub client_addr: Option<String>,
    /// Every identity of the client (`uri:…`, `dns:…`, `cn:…`).
    pub identities: Vec<String>,
    /// Database name as the client asked for it.
    pub database: String,
    /// Vault role.
    pub role: String,
    /// The database user Vault created.
    pub upstream_user: Option<String>,
    /// The Vault lease id.
    pub lease_id: Option<String>,
    /// When the session registered, or the credential was issued.
    pub started: Option<String>,
    /// The last lease renewal.
    pub last_renewed: Option<String>,
    /// When the lease expires unless renewed.
    pub lease_expires: Option<String>,
    /// Bytes client → upstream.
    pub bytes_to_upstream: u64,
    /// Bytes upstream → client.
    pub bytes_to_client: u64,
    /// setup, idle, in transaction, active; `waiting` for pooled credentials.
    pub state: String,
}

/// Something holding credentials outside a session that `sessions list` shows.
pub(crate) trait ListingSource: Send + Sync {
    /// A snapshot of what it holds now.
    fn listing(&self) -> Vec<Listed>;
}

/// RFC 3339, seconds, UTC.
pub(crate) fn time(t: SystemTime) -> String {
    humantime::format_rfc3339_seconds(t).to_string()
}

/// `at` (a monotonic instant) as wall-clock time.
fn wall(at: Instant) -> SystemTime {
    let now = Instant::now();
    if at <= now {
        SystemTime::now() - (now - at)
    } else {
        SystemTime::now() + (at - now)
    }
}

impl ListingSource for Prefetcher {
    fn listing(&self) -> Vec<Listed> {
        self.waiting()
            .into_iter()
            .map(|w| Listed {
                kind: Kind::Prefetched,
                id: None,
                transport: None,
                client_addr: None,
                identities: Vec::new(),
                database: w.database,
                role: w.role,
                upstream_user: Some(w.username),
                lease_id: Some(w.lease_id),
                started: Some(time(wall(w.issued.into_std()))),
                last_renewed: None,
                lease_expires: w.expires.map(|e| time(wall(e.into_std()))),
                bytes_to_upstream: 0,
                bytes_to_client: 0,
                state: "waiting".into(),
            })
            .chain(self.warm().snapshot().into_iter().map(|w| Listed {
                kind: Kind::Warm,
                id: None,
                transport: None,
                client_addr: None,
                identities: Vec::new(),
                database: w.database,
                role: w.role,
                upstream_user: Some(w.upstream_user),
                lease_id: Some(w.lease_id),
                started: Some(time(w.created)),
                last_renewed: None,
                lease_expires: w.lease_expires.map(time),
                bytes_to_upstream: 0,
                bytes_to_client: 0,
                state: "waiting".into(),
            }))
            .collect()
    }
}

/// The prefetch pools (and their warm sessions) as a source.
pub(crate) fn prefetched(prefetch: &Arc<Prefetcher>) -> Arc<dyn ListingSource> {
    prefetch.clone()
}
