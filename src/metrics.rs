//! The Prometheus registry and leasegate's typed metrics. Labels are small fixed sets
//! (outcome, result, op, status, phase, reason, direction, how, database); never a client
//! identity or anything else unbounded. Database names come from the configuration only.

use prometheus_client::encoding::text::encode;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::{Histogram, exponential_buckets};
use prometheus_client::registry::{Metric, Registry};

/// One label: (name, value), both from fixed sets.
pub type Label = [(&'static str, &'static str); 1];
/// Several labels, values from fixed sets or the configuration.
pub type Labels = Vec<(&'static str, String)>;

type HistogramFamily = Family<Label, Histogram, fn() -> Histogram>;

fn latency_histogram() -> Histogram {
    // 1 ms .. ~16 s
    Histogram::new(exponential_buckets(0.001, 2.0, 15))
}

fn session_histogram() -> Histogram {
    // 10 ms .. ~45 h
    Histogram::new(exponential_buckets(0.01, 4.0, 12))
}

/// Every `leasegate_auth_failures_total{reason}` value.
pub const AUTH_FAILURE_REASONS: [&str; 11] = [
    "plaintext",
    "no_client_cert",
    "tls_handshake",
    "login_timeout",
    "bad_startup",
    "no_grant",
    "database_not_granted",
    "role_not_granted",
    "global_session_limit",
    "identity_session_limit",
    "identity_rate_limit",
];

/// Every `leasegate_cancel_requests_total{result}` value.
pub const CANCEL_RESULTS: [&str; 7] = [
    "forwarded",
    "to_peers",
    "unknown_key",
    "not_peer",
    "rate_limited",
    "over_capacity",
    "timed_out",
];
/// Every `leasegate_upstream_closes_total{how}` value.
pub const UPSTREAM_CLOSES: [&str; 4] = ["idle", "busy", "gone", "timeout"];

/// Every metric leasegate exports.
pub struct Metrics {
    registry: Registry,
    /// Sessions currently relaying.
    pub sessions_active: Gauge,
    /// Finished connections by outcome: ok, rejected, error.
    pub sessions_total: Family<Label, Counter>,
    /// Relaying sessions' lifetimes.
    pub session_duration: Histogram,
    /// Session setup time by phase: tls, vault, upstream_login, total.
    pub session_setup_duration: HistogramFamily,
    /// Leases issued and not yet revoked.
    pub leases_active: Gauge,
    /// Leases issued.
    pub leases_issued_total: Counter,
    /// Revocations by result: ok, error.
    pub lease_revocations_total: Family<Label, Counter>,
    /// Lease renewals by result: ok, error.
    pub lease_renewals_total: Family<Label, Counter>,
    /// Revocations queued or in flight.
    pub revocations_pending: Gauge,
    /// Vault request latency by op.
    pub vault_request_duration: HistogramFamily,
    /// Vault requests by op and status (2xx, 4xx, 5xx, timeout, unreachable).
    pub vault_requests_total: Family<Labels, Counter>,
    /// Vault token renewals and logins by result: ok, error, login.
    pub vault_auth_renewals_total: Family<Label, Counter>,
    /// Refused clients by reason.
    pub auth_failures_total: Family<Label, Counter>,
    /// TLS handshake failures by reason.
    pub tls_handshake_failures_total: Family<Label, Counter>,
    /// Upstream connect and login failures by database and kind.
    pub upstream_errors_total: Family<Labels, Counter>,
    /// Relayed bytes by direction: to_upstream, to_client.
    pub relayed_bytes_total: Family<Label, Counter>,
    /// Upstream connections closed at session end, by how: idle, busy, gone, timeout.
    pub upstream_closes_total: Family<Label, Counter>,
    /// Prefetched credentials waiting, by database and role.
    pub prefetch_ready: Family<Labels, Gauge>,
    /// Cancel requests by what became of them.
    pub cancel_requests_total: Family<Label, Counter>,
    /// Cancels forwarded to peer addresses, by result: sent, failed.
    pub cancel_peer_forwards_total: Family<Label, Counter>,
    /// `limits.max_sessions`, for alerts on sessions near the limit.
    pub sessions_limit: Gauge,
    /// Audit events dropped because the writer fell behind (the queue was full).
    pub audit_events_dropped_total: Counter,
    /// Constant 1 with the version label.
    pub build_info: Family<Label, Gauge>,
}

impl Default for Metrics {
    fn default() -> Self {
        Metrics::new()
    }
}

fn register(registry: &mut Registry, name: &str, help: &str, metric: impl Metric) {
    registry.register(name, help, metric);
}

impl Metrics {
    /// Creates and registers every metric.
    pub fn new() -> Metrics {
        let m = Metrics {
            registry: Registry::default(),
            sessions_active: Gauge::default(),
            sessions_total: Family::default(),
            session_duration: session_histogram(),
            session_setup_duration: Family::new_with_constructor(latency_histogram),
            leases_active: Gauge::default(),
            leases_issued_total: Counter::default(),
            lease_revocations_total: Family::default(),
            lease_renewals_total: Family::default(),
            revocations_pending: Gauge::default(),
            vault_request_duration: Family::new_with_constructor(latency_histogram),
            vault_requests_total: Family::default(),
            vault_auth_renewals_total: Family::default(),
            auth_failures_total: Family::default(),
            tls_handshake_failures_total: Family::default(),
            upstream_errors_total: Family::default(),
            relayed_bytes_total: Family::default(),
            upstream_closes_total: Family::default(),
            build_info: Family::default(),
            prefetch_ready: Family::default(),
            sessions_limit: Gauge::default(),
            cancel_requests_total: Family::default(),
            cancel_peer_forwards_total: Family::default(),
            audit_events_dropped_total: Counter::default(),
        };
        let mut r = Registry::default();
        let r = &mut r;
        register(
            r,
            "leasegate_sessions_active",
            "Client sessions currently relaying",
            m.sessions_active.clone(),
        );
        register(
            r,
            "leasegate_sessions",
            "Client connections handled, by outcome (ok, rejected, error)",
            m.sessions_total.clone(),
        );
        register(
            r,
            "leasegate_session_duration_seconds",
            "Lifetime of relaying sessions",
            m.session_duration.clone(),
        );
        register(
            r,
            "leasegate_session_setup_duration_seconds",
            "Session setup time, by phase (tls, vault, upstream_login, total)",
            m.session_setup_duration.clone(),
        );
        register(
            r,
            "leasegate_leases_active",
            "Vault leases issued to sessions and not yet revoked",
            m.leases_active.clone(),
        );
        register(
            r,
            "leasegate_leases_issued",
            "Vault leases issued to sessions",
            m.leases_issued_total.clone(),
        );
        register(
            r,
            "leasegate_lease_revocations",
            "Lease revocations, by result (ok, error)",
            m.lease_revocations_total.clone(),
        );
        register(
            r,
            "leasegate_lease_renewals",
            "Lease renewals, by result (ok, error)",
            m.lease_renewals_total.clone(),
        );
        register(
            r,
            "leasegate_revocations_pending",
            "Lease revocations queued or being retried",
            m.revocations_pending.clone(),
        );
        register(
            r,
            "leasegate_vault_request_duration_seconds",
            "Vault HTTP request latency, by operation",
            m.vault_request_duration.clone(),
        );
        register(
            r,
            "leasegate_vault_requests",
            "Vault HTTP requests, by operation and status (2xx, 3xx, 4xx, 5xx, timeout, unreachable)",
            m.vault_requests_total.clone(),
        );
        register(
            r,
            "leasegate_vault_auth_renewals",
            "Vault token renewals, logins and revocations, by result (ok, error, login, revoked)",
            m.vault_auth_renewals_total.clone(),
        );
        register(
            r,
            "leasegate_auth_failures",
            "Clients refused before any credential was issued, by reason",
            m.auth_failures_total.clone(),
        );
        register(
            r,
            "leasegate_tls_handshake_failures",
            "Client TLS handshakes that failed, by reason",
            m.tls_handshake_failures_total.clone(),
        );
        register(
            r,
            "leasegate_upstream_errors",
            "Upstream connect and login failures, by database and kind",
            m.upstream_errors_total.clone(),
        );
        register(
            r,
            "leasegate_relayed_bytes",
            "Bytes relayed, by direction (to_upstream, to_client)",
            m.relayed_bytes_total.clone(),
        );
        register(
            r,
            "leasegate_cancel_requests",
            "Cancel requests, by result (forwarded, to_peers, unknown_key, not_peer, \
             rate_limited, over_capacity, timed_out)",
            m.cancel_requests_total.clone(),
        );
        register(
            r,
            "leasegate_cancel_peer_forwards",
            "Cancels forwarded to cluster peer addresses, by result (sent, failed)",
            m.cancel_peer_forwards_total.clone(),
        );
        register(
            r,
            "leasegate_upstream_closes",
            "Upstream connections closed at session end, by how (idle, busy: cancelled first, \
             gone: closed by the server, timeout: still open when the lease was revoked)",
            m.upstream_closes_total.clone(),
        );
        register(
            r,
            "leasegate_sessions_limit",
            "Configured limits.max_sessions",
            m.sessions_limit.clone(),
        );
        register(
            r,
            "leasegate_prefetch_ready",
            "Prefetched credentials waiting for a session, by database and role",
            m.prefetch_ready.clone(),
        );
        register(
            r,
            "leasegate_audit_events_dropped",
            "Audit events dropped because the audit log writer fell behind",
            m.audit_events_dropped_total.clone(),
        );
        register(
            r,
            "leasegate_build_info",
            "Build information (constant 1)",
            m.build_info.clone(),
        );
        m.build_info
            .get_or_create(&[("version", env!("CARGO_PKG_VERSION"))])
            .set(1);
        m.zero_known_series();
        Metrics {
            registry: std::mem::take(r),
            ..m
        }
    }

    /// Creates the series with fixed label values at 0, so dashboards and alerts see 0
    /// rather than no data on a fresh instance.
    fn zero_known_series(&self) {
        for outcome in ["ok", "rejected", "error"] {
            let _ = self.sessions_total.get_or_create(&[("outcome", outcome)]);
        }
        for result in ["ok", "error"] {
            let _ = self
                .lease_revocations_total
                .get_or_create(&[("result", result)]);
            let _ = self
                .lease_renewals_total
                .get_or_create(&[("result", result)]);
        }
        for result in ["ok", "error", "login", "revoked"] {
            let _ = self
                .vault_auth_renewals_total
                .get_or_create(&[("result", result)]);
        }
        for reason in AUTH_FAILURE_REASONS {
            let _ = self
                .auth_failures_total
                .get_or_create(&[("reason", reason)]);
        }
        for result in CANCEL_RESULTS {
            let _ = self
                .cancel_requests_total
                .get_or_create(&[("result", result)]);
        }
        for result in ["sent", "failed"] {
            let _ = self
                .cancel_peer_forwards_total
                .get_or_create(&[("result", result)]);
        }
        for direction in ["to_upstream", "to_client"] {
            let _ = self
                .relayed_bytes_total
                .get_or_create(&[("direction", direction)]);
        }
        for how in UPSTREAM_CLOSES {
            let _ = self.upstream_closes_total.get_or_create(&[("how", how)]);
        }
    }

    /// Counts a finished connection.
    pub fn session_finished(&self, outcome: &'static str) {
        self.sessions_total
            .get_or_create(&[("outcome", outcome)])
            .inc();
    }

    /// Counts a refused client.
    pub fn auth_failure(&self, reason: &'static str) {
        self.auth_failures_total
            .get_or_create(&[("reason", reason)])
            .inc();
    }

    /// Records one Vault request's latency and status.
    pub fn vault_request(&self, op: &'static str, status: &'static str, seconds: f64) {
        self.vault_request_duration
            .get_or_create(&[("op", op)])
            .observe(seconds);
        self.vault_requests_total
            .get_or_create(&vec![("op", op.to_owned()), ("status", status.to_owned())])
            .inc();
    }

    /// Records one setup phase's duration.
    pub fn setup_phase(&self, phase: &'static str, seconds: f64) {
        self.session_setup_duration
            .get_or_create(&[("phase", phase)])
            .observe(seconds);
    }

    /// Counts an upstream failure.
    pub fn upstream_error(&self, database: &str, kind: &'static str) {
        self.upstream_errors_total
            .get_or_create(&vec![
                ("database", database.to_owned()),
                ("kind", kind.to_owned()),
            ])
            .inc();
    }

    /// Counts a failed client TLS handshake.
    pub fn tls_failure(&self, reason: &'static str) {
        self.tls_handshake_failures_total
            .get_or_create(&[("reason", reason)])
            .inc();
    }

    /// Counter handle for one relay direction.
    pub fn relayed(&self, direction: &'static str) -> Counter {
        self.relayed_bytes_total
            .get_or_create(&[("direction", direction)])
            .clone()
    }

    /// Counts a lease renewal.
    pub fn lease_renewal(&self, result: &'static str) {
        self.lease_renewals_total
            .get_or_create(&[("result", result)])
            .inc();
    }

    /// Counts a Vault token renewal or login.
    pub fn vault_auth_renewal(&self, result: &'static str) {
        self.vault_auth_renewals_total
            .get_or_create(&[("result", result)])
            .inc();
    }

    /// Counts a handled cancel request by its result (one of [`CANCEL_RESULTS`]).
    pub fn cancel_request(&self, result: &'static str) {
        self.cancel_requests_total
            .get_or_create(&[("result", result)])
            .inc();
    }

    /// Counts one cancel's forwards to peer addresses.
    pub fn cancel_peer_forwards(&self, sent: usize, failed: usize) {
        for (result, n) in [("sent", sent), ("failed", failed)] {
            self.cancel_peer_forwards_total
                .get_or_create(&[("result", result)])
                .inc_by(n as u64);
        }
    }

    /// Counts how a session's upstream connection was closed.
    pub fn upstream_closed(&self, how: &'static str) {
        self.upstream_closes_total
            .get_or_create(&[("how", how)])
            .inc();
    }

    /// Counts a finished revocation.
    pub fn revocation(&self, result: &'static str) {
        self.lease_revocations_total
            .get_or_create(&[("result", result)])
            .inc();
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
        m.session_finished("ok");
        m.auth_failure("no_grant");
        m.vault_request("creds", "2xx", 0.01);
        m.revocation("ok");
        m.sessions_active.inc();
        m.leases_active.inc();
        m.relayed("to_client").inc_by(10);
        m.upstream_error("myapp", "connect");
        m.upstream_closed("busy");
        let text = m.render();
        for needle in [
            "leasegate_sessions_active 1",
            "leasegate_sessions_total{outcome=\"ok\"} 1",
            "leasegate_leases_active 1",
            "leasegate_lease_revocations_total{result=\"ok\"} 1",
            "leasegate_vault_request_duration_seconds_count{op=\"creds\"} 1",
            "leasegate_vault_requests_total{op=\"creds\",status=\"2xx\"} 1",
            "leasegate_auth_failures_total{reason=\"no_grant\"} 1",
            "leasegate_relayed_bytes_total{direction=\"to_client\"} 10",
            "leasegate_upstream_errors_total{database=\"myapp\",kind=\"connect\"} 1",
            "leasegate_build_info{version=",
            "leasegate_audit_events_dropped_total 0",
            "leasegate_upstream_closes_total{how=\"busy\"} 1",
            "leasegate_upstream_closes_total{how=\"timeout\"} 0",
        ] {
            assert!(text.contains(needle), "missing {needle} in\n{text}");
        }
    }
}
