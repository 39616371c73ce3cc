//! The session's credential: a prefetched one when one waits, else a fresh one from Vault,
//! recorded in the registry (`sessions list`) as soon as it exists.

use std::time::Duration;

use super::Session;
use crate::error::SessionError;
use crate::registry::Tracked;
use crate::upstream::Database;
use crate::vault::{Lease, LeaseGuard};

impl Session<'_> {
    /// A credential for the session: a prefetched one when waiting, else a fresh one from
    /// Vault. The guard exists from the moment Vault issued it, so every later path revokes.
    /// `sessions list` shows it from here on.
    pub(super) async fn credential(
        &self,
        database: &Database,
        role: &str,
        tracked: &Tracked,
    ) -> Result<(Lease, LeaseGuard, Duration), SessionError> {
        let issued = self.issue(database, role, tracked).await;
        if let Ok((lease, _, remaining)) = &issued {
            let left = (!remaining.is_zero()).then_some(*remaining);
            tracked.credential(&lease.username, &lease.id, left);
        }
        issued
    }

    async fn issue(
        &self,
        database: &Database,
        role: &str,
        tracked: &Tracked,
    ) -> Result<(Lease, LeaseGuard, Duration), SessionError> {
        if let Some(p) = self.state.prefetch.take(&database.config, role) {
            return Ok((p.lease, p.guard, p.remaining));
        }
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
        Ok((lease, guard, remaining))
    }
}
