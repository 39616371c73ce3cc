//! The shutdown tree and the drain's steps. One root token with a named child per part of
//! the process (accepting, sessions, prefetch, Vault auth upkeep, revoker, audit writer, admin
//! server, cluster resolvers), one tracker for the sessions and one for every background task,
//! and named time budgets for each wait. [`super::run`] calls the steps in order: readiness
//! off while still accepting for `drain_delay`, stop accepting, let sessions finish within `shutdown_grace`, end the rest,
//! drain the leases, revoke leasegate's own tokens, stop the background tasks.

use std::time::Duration;

use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use super::AppState;
use crate::tasks::Tasks;

/// How long sessions ended by the drain get to go, beyond any creds call in flight: a
/// relaying session ends within [`crate::session::END_WITHIN`], one waiting for Vault lets its
/// creds call finish (`vault.timeout`) and then revokes what it got; 3 s to spare.
pub(crate) fn session_end_budget(vault_timeout: Duration) -> Duration {
    crate::session::END_WITHIN.max(vault_timeout) + Duration::from_secs(3)
}

/// How long the revoker gets to revoke every lease at exit: each revocation is one Vault call
/// (`vault.timeout`) and the first retries of its backoff; halfway through, leases still
/// guarded are taken over.
pub(crate) fn revoke_drain_budget(vault_timeout: Duration) -> Duration {
    vault_timeout.saturating_mul(4)
}

/// How long stopping the token upkeep and revoking leasegate's own tokens may take: a Vault
/// call in flight when it is told to stop, then one revoke-self each for the current token
/// and (rarely) a retired one.
pub(crate) fn token_revoke_budget(vault_timeout: Duration) -> Duration {
    vault_timeout.saturating_mul(3)
}

/// How long the background tasks get to end once told to: the audit writer writing what is
/// queued, a peer lookup, an admin response.
pub(crate) const BACKGROUND_STOP_BUDGET: Duration = Duration::from_secs(5);

/// The root token, its named children and the two trackers.
pub(crate) struct Shutdown {
    /// Cancelled last: stops whatever is still running.
    root: CancellationToken,
    /// The accept loop: the first thing to stop.
    pub(crate) accepting: CancellationToken,
    /// Open sessions (each runs under a child): ended once `shutdown_grace` is over.
    pub(crate) sessions: CancellationToken,
    /// Credential prefetch: stopped with the listener; its waiting leases are revoked.
    prefetch: CancellationToken,
    /// The Vault token upkeep: stopped once the leases are done with; it then revokes its
    /// tokens.
    vault_auth: CancellationToken,
    /// The revoker: stopped after the drain (what it still retries dies at its TTL).
    revoker: CancellationToken,
    /// The audit writer: stopped after the drain, once every line is queued.
    audit: CancellationToken,
    /// The admin server: stopped at the very end, so `/readyz` answers 503 while draining.
    admin: CancellationToken,
    /// The cluster's peer resolvers (each `Cluster` stops its own when a reload drops it).
    cluster: CancellationToken,
    /// Every session task: the grace waits for them.
    pub(crate) session_tasks: TaskTracker,
    /// Every background task: the last step waits for them.
    tasks: TaskTracker,
}

impl Shutdown {
    /// A fresh tree.
    pub(crate) fn new() -> Shutdown {
        let root = CancellationToken::new();
        Shutdown {
            accepting: root.child_token(),
            sessions: root.child_token(),
            prefetch: root.child_token(),
            vault_auth: root.child_token(),
            revoker: root.child_token(),
            audit: root.child_token(),
            admin: root.child_token(),
            cluster: root.child_token(),
            root,
            session_tasks: TaskTracker::new(),
            tasks: TaskTracker::new(),
        }
    }

    fn part(&self, stop: &CancellationToken) -> Tasks {
        Tasks::new(self.tasks.clone(), stop.clone())
    }

    /// Where the accept loop runs.
    pub(crate) fn accepting(&self) -> Tasks {
        self.part(&self.accepting)
    }

    /// Where prefetch runs.
    pub(crate) fn prefetch(&self) -> Tasks {
        self.part(&self.prefetch)
    }

    /// Where the token upkeep runs.
    pub(crate) fn vault_auth(&self) -> Tasks {
        self.part(&self.vault_auth)
    }

    /// Where the revoker runs.
    pub(crate) fn revoker(&self) -> Tasks {
        self.part(&self.revoker)
    }

    /// Where the audit writer runs.
    pub(crate) fn audit(&self) -> Tasks {
        self.part(&self.audit)
    }

    /// Where the admin server runs.
    pub(crate) fn admin(&self) -> Tasks {
        self.part(&self.admin)
    }

    /// Where the cluster's peer resolvers run.
    pub(crate) fn cluster(&self) -> Tasks {
        self.part(&self.cluster)
    }

    /// Readiness off at once, the listener still accepting for `delay`: a load balancer
    /// health-checking `/readyz` takes this replica out before it stops taking connections.
    pub(crate) async fn not_ready_then_wait(&self, state: &AppState, delay: Duration) {
        state.set_ready(false);
        if !delay.is_zero() {
            tracing::info!(?delay, "not ready; still accepting during the drain delay");
            tokio::time::sleep(delay).await;
        }
    }

    /// Readiness off, the listener closed, prefetch stopped (revoking its waiting leases):
    /// no new session and no new credential from here on.
    pub(crate) async fn stop_accepting(
        &self,
        state: &AppState,
        accept: JoinHandle<()>,
        prefetch: JoinHandle<()>,
    ) {
        state.set_ready(false);
        self.accepting.cancel();
        let _ = accept.await;
        self.session_tasks.close();
        self.prefetch.cancel();
        let _ = prefetch.await;
    }

    /// Lets the open sessions finish within `grace`; whether they all did.
    pub(crate) async fn grace(&self, grace: Duration) -> bool {
        let finished = self.session_tasks.wait();
        tokio::time::timeout(grace, finished).await.is_ok()
    }

    /// Ends the sessions still open (FATAL 57P01) and waits for them within `budget`.
    pub(crate) async fn end_sessions(&self, budget: Duration) {
        let open = self.session_tasks.len();
        tracing::info!(open, "grace period over: ending open sessions");
        self.sessions.cancel();
        if tokio::time::timeout(budget, self.session_tasks.wait())
            .await
            .is_err()
        {
            let open = self.session_tasks.len();
            tracing::warn!(
                open,
                ?budget,
                "sessions still ending; leaving them to the exit"
            );
        }
    }

    /// The leases are done with: stops the token upkeep, which then revokes the tokens
    /// leasegate logged in for (within `budget`; an operator's token is left alone).
    pub(crate) async fn revoke_own_tokens(&self, upkeep: JoinHandle<()>, budget: Duration) {
        self.vault_auth.cancel();
        if tokio::time::timeout(budget, upkeep).await.is_err() {
            tracing::warn!(
                ?budget,
                "Vault tokens not revoked in time; they expire at their TTL"
            );
        }
    }

    /// Stops every background task still running and waits for them all (within
    /// [`BACKGROUND_STOP_BUDGET`]).
    pub(crate) async fn stop_background(&self) {
        self.root.cancel();
        self.tasks.close();
        let stopped = self.tasks.wait();
        if tokio::time::timeout(BACKGROUND_STOP_BUDGET, stopped)
            .await
            .is_err()
        {
            let running = self.tasks.len();
            tracing::warn!(running, "background tasks still running at exit");
        }
    }
}

/// Waits for the revoker to revoke every lease within `budget`; what is left is logged.
pub(crate) async fn drain_leases(state: &AppState, budget: Duration) {
    let left = state.revoker.drain(budget).await;
    if !left.is_empty() {
        tracing::error!(
            leases = left.len(),
            "leases left unrevoked at exit; they expire at their TTL"
        );
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn budgets_cover_what_they_wait_for() {
        let s = Duration::from_secs;
        // The watcher's 4 s to deliver its FATAL, 1 s for the client's close, and a busy
        // upstream's close: 2 s for the cancel, 3 s for the backend to go.
        assert_eq!(crate::session::END_WITHIN, s(10));
        assert_eq!(session_end_budget(s(5)), s(13));
        assert_eq!(session_end_budget(s(30)), s(33));
        assert_eq!(revoke_drain_budget(s(5)), s(20));
        assert_eq!(token_revoke_budget(s(5)), s(15));
    }

    #[tokio::test(start_paused = true)]
    async fn every_named_part_stops_with_the_root_and_the_tracker_waits_for_them() {
        let tree = Shutdown::new();
        let parts = [
            tree.accepting(),
            tree.prefetch(),
            tree.vault_auth(),
            tree.revoker(),
            tree.audit(),
            tree.admin(),
            tree.cluster(),
        ];
        for part in &parts {
            part.run(|stop| async move { stop.cancelled().await });
        }
        tree.sessions.cancel();
        assert!(
            parts.iter().all(|p| !p.stop().is_cancelled()),
            "children are separate"
        );
        tree.stop_background().await;
        assert!(parts.iter().all(|p| p.stop().is_cancelled()));
        assert!(tree.tasks.is_empty());
    }

    #[tokio::test(start_paused = true)]
    async fn a_task_that_ignores_its_token_is_given_up_on_after_the_budget() {
        let tree = Shutdown::new();
        tree.admin()
            .spawn(tokio::time::sleep(BACKGROUND_STOP_BUDGET * 10));
        let started = tokio::time::Instant::now();
        tree.stop_background().await;
        assert_eq!(started.elapsed(), BACKGROUND_STOP_BUDGET);
        assert_eq!(tree.tasks.len(), 1);
    }
}
