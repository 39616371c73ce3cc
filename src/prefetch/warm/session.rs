//! One warm session: an upstream backend logged in with a lease of its own, waiting for the
//! one client it will be handed to. Opening it is a creds call, the connect and the login (the
//! session path's own [`crate::upstream`] functions, so the backend is exactly what a cold
//! login would have made); whether the server has closed it is a non-blocking peek at its
//! socket; retiring it closes the backend before the lease is let go.

use std::mem::MaybeUninit;
use std::time::{Duration, SystemTime};

use tokio::io::AsyncWriteExt;
use tokio::time::Instant;

use crate::lease_clock::{Jitter, Term};
use crate::upstream::{self, Database, LoggedIn, UpstreamError, UpstreamStream};
use crate::vault::lease::LeaseApi;
use crate::vault::{Lease, LeaseGuard, Revoker, VaultError};

/// Longest a retired warm backend gets to close before its lease is revoked anyway.
const CLOSE_WITHIN: Duration = Duration::from_secs(3);

/// A warm session waiting in its pool.
pub(super) struct WarmSession {
    /// The credential it logged in with (its password zeroized when this drops).
    pub lease: Lease,
    /// Revokes the lease when the session leaves the pool other than to a client.
    pub guard: LeaseGuard,
    /// The logged-in upstream, with what the client must be told at startup.
    pub logged_in: LoggedIn,
    /// When it was logged in: closed once idle for `warm_max_idle`.
    pub created: Instant,
    /// The same instant on the wall clock, for listings.
    #[cfg_attr(not(test), allow(dead_code))]
    pub created_at: SystemTime,
    /// Its lease's lifetime as last granted, and when to renew it.
    pub term: Term,
}

/// Why a warm session could not be opened.
#[derive(Debug, thiserror::Error)]
pub(super) enum OpenError {
    /// The creds call failed.
    #[error("creds: {0}")]
    Vault(#[from] VaultError),
    /// Connecting or logging in upstream failed (the lease is revoked).
    #[error("upstream login: {0}")]
    Upstream(#[from] UpstreamError),
}

impl WarmSession {
    /// A fresh lease for `role`, then connect and log in to `database` with `settings`, all
    /// within the entry's `connect_timeout` for the upstream part.
    pub(super) async fn open(
        vault: &dyn LeaseApi,
        revoker: &Revoker,
        database: &Database,
        role: &str,
        settings: &[(String, String)],
    ) -> Result<WarmSession, OpenError> {
        let config = &database.config;
        let (lease, guard) = vault.creds(&config.mount, role, revoker).await?;
        let login = async {
            let stream = database.connect().await?;
            upstream::login(stream, config, &lease.username, &lease.password, settings).await
        };
        let logged_in = match tokio::time::timeout(config.connect_timeout, login).await {
            Ok(r) => r?,
            Err(_) => return Err(UpstreamError::Timeout(config.name.clone()).into()),
        };
        // Logged in: the password is not needed any more (zeroized as it drops here).
        let mut lease = lease;
        lease.password = secrecy::SecretString::from(String::new());
        let now = Instant::now();
        Ok(WarmSession {
            term: Term::issued(now, lease.duration, lease.renewable, Jitter::random()),
            created: now,
            created_at: SystemTime::now(),
            lease,
            guard,
            logged_in,
        })
    }

    /// Whether the server closed the backend or sent something unasked (a FATAL before
    /// closing, at a restart or `idle_session_timeout`): anything readable on an idle
    /// backend's socket, EOF included. A non-blocking `MSG_PEEK` on the socket itself, so it
    /// sees what the kernel has now, whatever the runtime has polled.
    pub(super) fn gone(&self) -> bool {
        if !self.logged_in.leftover.is_empty() {
            return true;
        }
        let socket = match &self.logged_in.stream {
            UpstreamStream::Plain(tcp) => socket2::SockRef::from(tcp),
            UpstreamStream::Tls(tls) => socket2::SockRef::from(tls.get_ref().0),
            UpstreamStream::Local(unix) => socket2::SockRef::from(unix),
        };
        let mut byte = [MaybeUninit::<u8>::uninit()];
        match socket.peek(&mut byte) {
            Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => false,
            // EOF, a byte, or a reset: not a session to hand out.
            _ => true,
        }
    }

    /// Whether it still has more than `min` of its lease left.
    pub(super) fn alive(&self, now: Instant, min: Duration) -> bool {
        self.term.left(now).is_none_or(|left| left > min)
    }

    /// The lease's expiry on the wall clock, if it has one.
    #[cfg_attr(not(test), allow(dead_code))]
    pub(super) fn expires_at(&self, now: Instant) -> Option<SystemTime> {
        self.term.left(now).map(|left| SystemTime::now() + left)
    }

    /// Closes the backend (Terminate, then waits for the server to close, at most
    /// [`CLOSE_WITHIN`]), then lets the lease go to the revoker: `DROP ROLE` never races the
    /// live backend.
    pub(super) async fn retire(self) {
        let WarmSession {
            guard, logged_in, ..
        } = self;
        let mut stream = logged_in.stream;
        let close = async {
            const TERMINATE: [u8; 5] = [b'X', 0, 0, 0, 4];
            stream.write_all(&TERMINATE).await?;
            stream.flush().await?;
            let mut sink = [0u8; 512];
            while tokio::io::AsyncReadExt::read(&mut stream, &mut sink).await? > 0 {}
            Ok::<(), std::io::Error>(())
        };
        let _ = tokio::time::timeout(CLOSE_WITHIN, close).await;
        drop(stream);
        drop(guard);
    }
}
