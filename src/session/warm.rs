//! A session served by a warm upstream session ([`crate::prefetch::warm`]): the credential
//! and the upstream login were done ahead of demand, for exactly this database entry, role
//! and startup-parameter set, and the session relays from there as after a cold login: the
//! client sees AuthenticationOk, the ParameterStatus the backend reported at its login,
//! leasegate's BackendKeyData (the cancel map holds the warm backend's own key) and
//! ReadyForQuery; the audit lines say `"warm":true`.

use std::sync::Arc;

use super::handshake::ClientHello;
use super::relaying::Ready;
use super::{Session, lifetime};
use crate::error::SessionError;
use crate::limits::Permit;
use crate::metrics::labels::SetupPhase;
use crate::prefetch::warm::Warm;
use crate::registry::Registered;
use crate::upstream::Database;

impl<'a> Session<'a> {
    /// A warm session for this client, if one is waiting for its entry, role and settings.
    pub(super) fn warm(
        &self,
        database: &Database,
        role: &str,
        settings: &[(String, String)],
    ) -> Option<Warm> {
        let pool = self.state.prefetch.warm();
        pool.take(&database.config, role, settings)
    }

    /// Relays `hello` over the warm session `warm`; the lease is revoked once the upstream is
    /// closed, then the limit slot `permit` is released.
    pub(super) async fn serve_warm(
        self,
        hello: ClientHello,
        warm: Warm,
        database: &Arc<Database>,
        permit: Permit,
        tracked: Registered,
    ) -> Result<Ready<'a>, SessionError> {
        let Warm {
            lease,
            guard,
            remaining,
            mut logged_in,
        } = warm;
        // Logged in on the control runtime: from now on its readiness is this thread's.
        logged_in.stream = logged_in
            .stream
            .rehome()
            .map_err(crate::upstream::UpstreamError::Io)?;
        let elapsed = self.started.elapsed().as_secs_f64();
        self.state.metrics.setup_phase(SetupPhase::Total, elapsed);
        tracing::debug!(peer = %self.peer, username = %lease.username, lease_id = %guard.id(),
            "warm session handed over");
        let left = (!remaining.is_zero()).then_some(remaining);
        tracked.credential(&lease.username, &lease.id, left);
        let life = lifetime(&lease, remaining, database, &hello.role, &tracked);
        drop(lease);
        Ok(Ready {
            scope: self.scope(true),
            hello,
            logged_in,
            database: database.clone(),
            life,
            guard,
            permit,
            tracked,
        })
    }
}
