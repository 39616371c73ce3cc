//! The Prometheus registry and leasegate's typed metrics. Labels are small fixed sets, typed in
//! [`labels`] (outcome, result, op, status, phase, reason, direction, kind) or names from the
//! configuration (database, role); never a client identity or anything else unbounded. The
//! table below is the one list of metrics: field, type, name, help.

pub(crate) mod labels;

use prometheus_client::encoding::text::encode;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::{Histogram, exponential_buckets};
use prometheus_client::registry::Registry;

use labels::{
    AdminCommand, AdminResult, AuthFailureReason, CancelResult, DatabaseLabel, FixedLabel,
    LeaseResult, PeerForwardResult, RelayDirection, ReloadResult, RoleLabel, SessionEndReason,
    SessionOutcome, SetupPhase, TlsFailureReason, UpstreamClose, UpstreamErrorKind,
    VaultAuthResult, VaultOp, VaultStatus, VersionLabel, WarmResult,
};

type HistogramFamily<L> = Family<L, Histogram, fn() -> Histogram>;

fn latency_histogram() -> Histogram {
    // 1 ms .. ~16 s
    Histogram::new(exponential_buckets(0.001, 2.0, 15))
}

fn session_histogram() -> Histogram {
    // 10 ms .. ~45 h
    Histogram::new(exponential_buckets(0.01, 4.0, 12))
}

/// Declares `Metrics` from the table: each entry is a field, its type and initial value, the
/// registered name (a counter is exported with `_total` appended) and its help text.
macro_rules! metrics {
    ($($(#[$doc:meta])* $field:ident: $ty:ty = $init:expr => $name:literal, $help:literal;)+) => {
        /// Every metric leasegate exports.
        pub struct Metrics {
            registry: Registry,
            $($(#[$doc])* pub(crate) $field: $ty,)+
        }

        impl Metrics {
            /// Every metric, created and registered.
            fn registered() -> Metrics {
                let mut registry = Registry::default();
                $(
                    let $field: $ty = $init;
                    registry.register($name, $help, $field.clone());
                )+
                Metrics { registry, $($field,)+ }
            }

            /// (registered name, type, labels) of every metric, for the README check.
            #[cfg(test)]
            pub(crate) fn schema() -> Vec<(
                &'static str,
                prometheus_client::metrics::MetricType,
                Vec<(&'static str, &'static [&'static str])>,
            )> {
                use labels::LabelSchema;
                use prometheus_client::metrics::TypedMetric;
                vec![$(($name, <$ty as TypedMetric>::TYPE, <$ty as LabelSchema>::labels()),)+]
            }
        }
    };
}

metrics! {
    /// Sessions currently relaying.
    sessions_active: Gauge = Gauge::default()
        => "leasegate_sessions_active", "Client sessions currently relaying";
    /// Finished connections by outcome.
    sessions_total: Family<SessionOutcome, Counter> = Family::default()
        => "leasegate_sessions", "Client connections handled, by outcome (ok, rejected, error)";
    /// Relaying sessions' lifetimes.
    session_duration: Histogram = session_histogram()
        => "leasegate_session_duration_seconds", "Lifetime of relaying sessions";
    /// Session setup time by phase.
    session_setup_duration: HistogramFamily<SetupPhase> = Family::new_with_constructor(latency_histogram)
        => "leasegate_session_setup_duration_seconds",
           "Session setup time, by phase (tls, vault, upstream_login, total)";
    /// Leases issued and not yet revoked.
    leases_active: Gauge = Gauge::default()
        => "leasegate_leases_active", "Vault leases issued to sessions and not yet revoked";
    /// Leases issued.
    leases_issued_total: Counter = Counter::default()
        => "leasegate_leases_issued", "Vault leases issued to sessions";
    /// Revocations by result.
    lease_revocations_total: Family<LeaseResult, Counter> = Family::default()
        => "leasegate_lease_revocations", "Lease revocations, by result (ok, error)";
    /// Lease renewals by result.
    lease_renewals_total: Family<LeaseResult, Counter> = Family::default()
        => "leasegate_lease_renewals", "Lease renewals, by result (ok, error)";
    /// Revocations queued or in flight.
    revocations_pending: Gauge = Gauge::default()
        => "leasegate_revocations_pending", "Lease revocations queued or being retried";
    /// Revocation calls at Vault right now (what the pacing window lets through).
    revocations_in_flight: Gauge = Gauge::default()
        => "leasegate_revocations_in_flight", "Lease revocation calls in flight at Vault";
    /// The pacing window: how many revocations may run at once now (creds calls first).
    revocation_window: Gauge = Gauge::default()
        => "leasegate_revocation_window",
           "Lease revocations allowed in flight at once now (shrinks while creds calls are slow)";
    /// Times the pacing window was halved because issuance suffered or a revocation failed.
    revocation_window_cuts_total: Counter = Counter::default()
        => "leasegate_revocation_window_cuts",
           "Times the revocation window was halved (a creds call slow or waiting, a revocation failed)";
    /// Vault request latency by op.
    vault_request_duration: HistogramFamily<VaultOp> = Family::new_with_constructor(latency_histogram)
        => "leasegate_vault_request_duration_seconds", "Vault HTTP request latency, by operation";
    /// Vault requests by op and status.
    vault_requests_total: Family<(VaultOp, VaultStatus), Counter> = Family::default()
        => "leasegate_vault_requests",
           "Vault HTTP requests, by operation and status (2xx, 3xx, 4xx, 5xx, timeout, unreachable)";
    /// Vault token renewals, logins and revocations by result.
    vault_auth_renewals_total: Family<VaultAuthResult, Counter> = Family::default()
        => "leasegate_vault_auth_renewals",
           "Vault token renewals, logins and revocations, by result (ok, error, login, revoked)";
    /// Refused clients by reason.
    auth_failures_total: Family<AuthFailureReason, Counter> = Family::default()
        => "leasegate_auth_failures", "Clients refused before any credential was issued, by reason";
    /// TLS handshake failures by reason.
    tls_handshake_failures_total: Family<TlsFailureReason, Counter> = Family::default()
        => "leasegate_tls_handshake_failures", "Client TLS handshakes that failed, by reason";
    /// Upstream connect and login failures by database and kind.
    upstream_errors_total: Family<(DatabaseLabel, UpstreamErrorKind), Counter> = Family::default()
        => "leasegate_upstream_errors", "Upstream connect and login failures, by database and kind";
    /// Relayed bytes by direction.
    relayed_bytes_total: Family<RelayDirection, Counter> = Family::default()
        => "leasegate_relayed_bytes", "Bytes relayed, by direction (to_upstream, to_client)";
    /// Upstream connections closed at session end, by how.
    upstream_closes_total: Family<UpstreamClose, Counter> = Family::default()
        => "leasegate_upstream_closes",
           "Upstream connections closed at session end, by how (idle, busy: cancelled first, \
            gone: closed by the server, timeout: still open when the lease was revoked)";
    /// Cancel requests by what became of them.
    cancel_requests_total: Family<CancelResult, Counter> = Family::default()
        => "leasegate_cancel_requests",
           "Cancel requests, by result (forwarded, to_peers, unknown_key, not_peer, \
            rate_limited, over_capacity, timed_out)";
    /// Cancels forwarded to peer addresses, by result.
    cancel_peer_forwards_total: Family<PeerForwardResult, Counter> = Family::default()
        => "leasegate_cancel_peer_forwards",
           "Cancels forwarded to cluster peer addresses, by result (sent, failed)";
    /// Peer cancels that reached the wrong replica (replica ids misconfigured).
    cluster_id_mismatches_total: Counter = Counter::default()
        => "leasegate_cluster_id_mismatches",
           "PeerCancelRequests whose key carries another replica's id: a peer maps that id \
            to this instance, or two replicas share an id";
    /// `limits.max_sessions`, for alerts on sessions near the limit.
    sessions_limit: Gauge = Gauge::default()
        => "leasegate_sessions_limit", "Configured limits.max_sessions";
    /// Prefetched credentials waiting, by database and role.
    prefetch_ready: Family<(DatabaseLabel, RoleLabel), Gauge> = Family::default()
        => "leasegate_prefetch_ready",
           "Prefetched credentials waiting for a session, by database and role";
    /// Warm sessions waiting, by database and role.
    warm_ready: Family<(DatabaseLabel, RoleLabel), Gauge> = Family::default()
        => "leasegate_warm_ready",
           "Warm upstream sessions logged in and waiting for a client, by database and role";
    /// Warm session hits, misses and sessions found closed by the server.
    warm_sessions_total: Family<WarmResult, Counter> = Family::default()
        => "leasegate_warm_sessions",
           "Clients of roles with warm sessions, by result (hit, miss: cold path), and warm \
            sessions found closed by the server (gone)";
    /// Audit events dropped because the writer fell behind (the queue was full) or the sink
    /// refused the line (a full disk).
    audit_events_dropped_total: Counter = Counter::default()
        => "leasegate_audit_events_dropped",
           "Audit events dropped because the audit log writer fell behind or could not write them";
    /// Sessions that passed the grant check, by why they ended (each once).
    sessions_ended_total: Family<SessionEndReason, Counter> = Family::default()
        => "leasegate_sessions_ended",
           "Sessions that passed the grant check, by why they ended (operator, grant_removed, \
            max_lifetime, shutdown, client, upstream, error)";
    /// Admin socket requests by command and result.
    admin_requests_total: Family<(AdminCommand, AdminResult), Counter> = Family::default()
        => "leasegate_admin_requests",
           "Requests on the admin socket, by command and result";
    /// Reloads (SIGHUP, the file watch) by result.
    config_reloads_total: Family<ReloadResult, Counter> = Family::default()
        => "leasegate_config_reloads",
           "Configuration reloads (SIGHUP or the file watch), by result (ok, error)";
    /// 1 while the last reload succeeded (or none was tried), 0 after a refused one.
    config_last_reload_successful: Gauge = Gauge::default()
        => "leasegate_config_last_reload_successful",
           "1 when the last configuration reload succeeded or none was tried, 0 when it was refused";
    /// Constant 1 with the version label.
    build_info: Family<VersionLabel, Gauge> = Family::default()
        => "leasegate_build_info", "Build information (constant 1)";
}

impl Default for Metrics {
    fn default() -> Self {
        Metrics::new()
    }
}

/// Creates the series of every value of `L` at 0.
fn zero<L: FixedLabel>(family: &Family<L, Counter>) {
    for value in L::all() {
        let _ = family.get_or_create(value);
    }
}

impl Metrics {
    /// Creates and registers every metric.
    pub fn new() -> Metrics {
        let m = Metrics::registered();
        let version = VersionLabel(env!("CARGO_PKG_VERSION").to_owned());
        m.build_info.get_or_create(&version).set(1);
        m.config_last_reload_successful.set(1);
        m.zero_known_series();
        m
    }

    /// Creates the series with fixed label values at 0, so dashboards and alerts see 0
    /// rather than no data on a fresh instance.
    fn zero_known_series(&self) {
        zero(&self.sessions_total);
        zero(&self.lease_revocations_total);
        zero(&self.lease_renewals_total);
        zero(&self.vault_auth_renewals_total);
        zero(&self.auth_failures_total);
        zero(&self.cancel_requests_total);
        zero(&self.cancel_peer_forwards_total);
        zero(&self.relayed_bytes_total);
        zero(&self.upstream_closes_total);
        zero(&self.warm_sessions_total);
        zero(&self.sessions_ended_total);
        zero(&self.config_reloads_total);
    }

    /// Sets the warm sessions waiting for `database` and `role`.
    pub(crate) fn set_warm_ready(&self, database: &str, role: &str, n: usize) {
        let labels = (
            DatabaseLabel(database.to_owned()),
            RoleLabel(role.to_owned()),
        );
        self.warm_ready.get_or_create(&labels).set(n as i64);
    }

    /// Counts a warm session hit, miss or one found gone.
    pub(crate) fn warm_session(&self, result: WarmResult) {
        self.warm_sessions_total.get_or_create(&result).inc();
    }

    /// Counts a session's end.
    pub(crate) fn session_ended(&self, reason: SessionEndReason) {
        self.sessions_ended_total.get_or_create(&reason).inc();
    }

    /// Counts an admin socket request.
    pub(crate) fn admin_request(&self, command: AdminCommand, result: AdminResult) {
        self.admin_requests_total
            .get_or_create(&(command, result))
            .inc();
    }

    /// Counts a finished connection.
    pub(crate) fn session_finished(&self, outcome: SessionOutcome) {
        self.sessions_total.get_or_create(&outcome).inc();
    }

    /// Counts a refused client.
    pub(crate) fn auth_failure(&self, reason: AuthFailureReason) {
        self.auth_failures_total.get_or_create(&reason).inc();
    }

    /// Records one Vault request's latency and status.
    pub(crate) fn vault_request(&self, op: VaultOp, status: VaultStatus, seconds: f64) {
        self.vault_request_duration
            .get_or_create(&op)
            .observe(seconds);
        self.vault_requests_total.get_or_create(&(op, status)).inc();
    }

    /// Records one setup phase's duration.
    pub(crate) fn setup_phase(&self, phase: SetupPhase, seconds: f64) {
        self.session_setup_duration
            .get_or_create(&phase)
            .observe(seconds);
    }

    /// Counts an upstream failure.
    pub(crate) fn upstream_error(&self, database: &str, kind: UpstreamErrorKind) {
        self.upstream_errors_total
            .get_or_create(&(DatabaseLabel(database.to_owned()), kind))
            .inc();
    }

    /// Sets the prefetched credentials waiting for `database` and `role`.
    pub(crate) fn set_prefetch_ready(&self, database: &str, role: &str, n: usize) {
        let labels = (
            DatabaseLabel(database.to_owned()),
            RoleLabel(role.to_owned()),
        );
        self.prefetch_ready.get_or_create(&labels).set(n as i64);
    }

    /// Counts a failed client TLS handshake.
    pub(crate) fn tls_failure(&self, reason: TlsFailureReason) {
        self.tls_handshake_failures_total
            .get_or_create(&reason)
            .inc();
    }

    /// Counter handle for one relay direction.
    pub(crate) fn relayed(&self, direction: RelayDirection) -> Counter {
        self.relayed_bytes_total.get_or_create(&direction).clone()
    }

    /// Counts a lease renewal.
    pub(crate) fn lease_renewal(&self, result: LeaseResult) {
        self.lease_renewals_total.get_or_create(&result).inc();
    }

    /// Counts a Vault token renewal, login or revocation.
    pub(crate) fn vault_auth_renewal(&self, result: VaultAuthResult) {
        self.vault_auth_renewals_total.get_or_create(&result).inc();
    }

    /// Counts a handled cancel request by its result.
    pub(crate) fn cancel_request(&self, result: CancelResult) {
        self.cancel_requests_total.get_or_create(&result).inc();
    }

    /// Counts one cancel's forwards to peer addresses.
    pub(crate) fn cancel_peer_forwards(&self, sent: usize, failed: usize) {
        for (result, n) in [
            (PeerForwardResult::Sent, sent),
            (PeerForwardResult::Failed, failed),
        ] {
            self.cancel_peer_forwards_total
                .get_or_create(&result)
                .inc_by(n as u64);
        }
    }

    /// Counts a peer cancel that carried another replica's id.
    pub(crate) fn cluster_id_mismatch(&self) {
        self.cluster_id_mismatches_total.inc();
    }

    /// Counts how a session's upstream connection was closed.
    pub(crate) fn upstream_closed(&self, how: UpstreamClose) {
        self.upstream_closes_total.get_or_create(&how).inc();
    }

    /// Counts a reload and remembers whether it succeeded.
    pub(crate) fn config_reload(&self, result: ReloadResult) {
        self.config_reloads_total.get_or_create(&result).inc();
        let ok = matches!(result, ReloadResult::Ok);
        self.config_last_reload_successful.set(i64::from(ok));
    }

    /// Counts a finished revocation.
    pub(crate) fn revocation(&self, result: LeaseResult) {
        self.lease_revocations_total.get_or_create(&result).inc();
    }

    /// The Prometheus text exposition of every metric.
    pub fn render(&self) -> String {
        let mut out = String::new();
        // Writing into a String cannot fail.
        let _ = encode(&mut out, &self.registry);
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn exposes_the_contract_names() {
        let m = Metrics::new();
        m.session_finished(SessionOutcome::Ok);
        m.auth_failure(AuthFailureReason::NoGrant);
        m.vault_request(VaultOp::Creds, VaultStatus::Success, 0.01);
        m.revocation(LeaseResult::Ok);
        m.sessions_active.inc();
        m.leases_active.inc();
        m.relayed(RelayDirection::ToClient).inc_by(10);
        m.upstream_error("myapp", UpstreamErrorKind::Connect);
        m.set_prefetch_ready("myapp", "readonly", 2);
        let text = m.render();
        for needle in [
            "leasegate_sessions_active 1",
            "leasegate_sessions_total{outcome=\"ok\"} 1",
            "leasegate_sessions_total{outcome=\"rejected\"} 0",
            "leasegate_leases_active 1",
            "leasegate_lease_revocations_total{result=\"ok\"} 1",
            "leasegate_vault_request_duration_seconds_count{op=\"creds\"} 1",
            "leasegate_vault_requests_total{op=\"creds\",status=\"2xx\"} 1",
            "leasegate_auth_failures_total{reason=\"no_grant\"} 1",
            "leasegate_auth_failures_total{reason=\"identity_rate_limit\"} 0",
            "leasegate_relayed_bytes_total{direction=\"to_client\"} 10",
            "leasegate_upstream_errors_total{database=\"myapp\",kind=\"connect\"} 1",
            "leasegate_prefetch_ready{database=\"myapp\",role=\"readonly\"} 2",
            "leasegate_cancel_peer_forwards_total{result=\"failed\"} 0",
            "leasegate_build_info{version=",
            "leasegate_audit_events_dropped_total 0",
            "leasegate_upstream_closes_total{how=\"timeout\"} 0",
        ] {
            assert!(text.contains(needle), "missing {needle} in\n{text}");
        }
    }
}
