//! The session's credential and the upstream login with it: a prefetched credential when one
//! waits, else a fresh one from Vault, recorded in the registry (`sessions list`) as soon as
//! it exists. A prefetched credential whose password the upstream refuses (28P01) had its
//! role dropped while it waited: its lease revoked outside leasegate (`sys/leases/revoke-prefix`
//! in an incident, a revoked token), and the rest of its pool most likely too. Then the pool
//! is emptied (revoked) and the session asks Vault for a fresh credential, once, instead of
//! failing.

use std::time::Duration;

use super::Session;
use super::handshake::ClientHello;
use crate::error::SessionError;
use crate::escape::logged;
use crate::registry::Tracked;
use crate::upstream::{Database, LoggedIn};
use crate::vault::{Lease, LeaseGuard};

/// A session's credential and where it came from.
pub(super) struct Issued {
    /// The credential.
    pub lease: Lease,
    /// Revokes it on every path, from the moment Vault issued it.
    pub guard: LeaseGuard,
    /// Time left on it (its TTL for a fresh one).
    pub remaining: Duration,
    /// Taken from the prefetch pool: a refused password then means its lease died there.
    pub prefetched: bool,
}

impl Session<'_> {
    /// A credential for the session: a prefetched one when waiting, else a fresh one from
    /// Vault. `sessions list` shows it from here on.
    pub(super) async fn credential(
        &self,
        database: &Database,
        role: &str,
        tracked: &Tracked,
    ) -> Result<Issued, SessionError> {
        let issued = match self.state.prefetch.take(&database.config, role) {
            Some(p) => Issued {
                lease: p.lease,
                guard: p.guard,
                remaining: p.remaining,
                prefetched: true,
            },
            None => self.fresh(database, role, tracked).await?,
        };
        track(&issued, tracked);
        Ok(issued)
    }

    /// A fresh credential from Vault.
    async fn fresh(
        &self,
        database: &Database,
        role: &str,
        tracked: &Tracked,
    ) -> Result<Issued, SessionError> {
        // Not raced against `stop`: once the request is out, Vault may have issued the
        // credential, so the call runs to its end (bounded by `vault.timeout`) and a lease
        // issued during shutdown is revoked rather than forgotten.
        let creds = Box::pin(self.state.vault.creds(
            &database.config.mount,
            role,
            &self.state.revoker,
        ))
        .await;
        let (lease, guard) = creds.map_err(|error| SessionError::Vault {
            role: role.to_owned(),
            error,
        })?;
        if self.stop.is_cancelled() {
            guard.revoke();
            return Err(tracked.stopped());
        }
        let remaining = lease.duration;
        Ok(Issued {
            lease,
            guard,
            remaining,
            prefetched: false,
        })
    }

    /// Logs in upstream with `issued`; a prefetched credential refused as a wrong password is
    /// replaced by a fresh one (see the module doc). The failure is returned, not yet told.
    pub(super) async fn log_in_with(
        &mut self,
        issued: Issued,
        hello: &ClientHello,
        database: &Database,
        settings: &[(String, String)],
        tracked: &Tracked,
    ) -> Result<(Issued, LoggedIn), SessionError> {
        self.note(&issued, hello);
        let login = self.attempt_login(database, &issued.lease, settings, tracked);
        match Box::pin(login).await {
            Ok(l) => Ok((issued, l)),
            Err(SessionError::Upstream(e)) if issued.prefetched && e.password_refused() => {
                let discarded = self.state.prefetch.discard(&database.config, &hello.role);
                tracing::warn!(database = %database.config.name, role = %logged(&hello.role),
                    username = %issued.lease.username, lease_id = %issued.guard.id(), discarded,
                    "the upstream refused a prefetched credential (its lease was revoked outside \
                     leasegate?): pool emptied, asking Vault for a fresh one");
                drop(issued);
                let fresh = Box::pin(self.fresh(database, &hello.role, tracked)).await?;
                track(&fresh, tracked);
                self.note(&fresh, hello);
                let login = self.attempt_login(database, &fresh.lease, settings, tracked);
                let logged_in = Box::pin(login).await?;
                Ok((fresh, logged_in))
            }
            Err(e) => Err(e),
        }
    }

    /// Records the credential in the audit facts and the debug log.
    fn note(&mut self, issued: &Issued, hello: &ClientHello) {
        self.audit.upstream_user = Some(issued.lease.username.clone());
        self.audit.lease_id = Some(issued.lease.id.clone());
        tracing::debug!(peer = %self.peer, identity = %logged(&hello.principal.display_name()),
            database = %logged(&hello.database), role = %logged(&hello.role),
            username = %issued.lease.username, lease_id = %issued.guard.id(),
            prefetched = issued.prefetched, "credential issued");
    }
}

/// Shows the session's credential in `sessions list`.
fn track(issued: &Issued, tracked: &Tracked) {
    let left = (!issued.remaining.is_zero()).then_some(issued.remaining);
    tracked.credential(&issued.lease.username, &issued.lease.id, left);
}
