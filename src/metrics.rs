//! The Prometheus registry and leasegate's typed metrics. Labels are small fixed sets
//! (outcome, result, op, reason, database, role); never a client identity or anything else
//! unbounded.

use prometheus_client::encoding::text::encode;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::{Histogram, exponential_buckets};
use prometheus_client::registry::Registry;

/// One label: (name, value), both from fixed sets.
pub type Label = [(&'static str, &'static str); 1];

type HistogramFamily = Family<Label, Histogram, fn() -> Histogram>;

fn latency_histogram() -> Histogram {
    // 1 ms .. ~16 s
    Histogram::new(exponential_buckets(0.001, 2.0, 15))
}

/// Every metric leasegate exports.
pub struct Metrics {
    registry: Registry,
    /// Sessions currently relaying.
    pub sessions_active: Gauge,
    /// Finished connections by outcome: ok, rejected, error.
    pub sessions_total: Family<Label, Counter>,
    /// Leases issued and not yet revoked.
    pub leases_active: Gauge,
    /// Revocations by result: ok, error.
    pub lease_revocations_total: Family<Label, Counter>,
    /// Vault request latency by op: creds, revoke.
    pub vault_request_duration: HistogramFamily,
    /// Refused clients by reason.
    pub auth_failures_total: Family<Label, Counter>,
    /// Lease renewals by result: ok, error.
    pub lease_renewals_total: Family<Label, Counter>,
    /// Revocations queued or in flight.
    pub revocations_pending: Gauge,
    /// Vault token renewals and re-logins by result: ok, error, relogin.
    pub vault_auth_renewals_total: Family<Label, Counter>,
}

impl Default for Metrics {
    fn default() -> Self {
        Metrics::new()
    }
}

impl Metrics {
    /// Creates and registers every metric.
    pub fn new() -> Metrics {
        let mut registry = Registry::default();
        let m = Metrics {
            registry: Registry::default(),
            sessions_active: Gauge::default(),
            sessions_total: Family::default(),
            leases_active: Gauge::default(),
            lease_revocations_total: Family::default(),
            vault_request_duration: Family::new_with_constructor(latency_histogram),
            auth_failures_total: Family::default(),
            lease_renewals_total: Family::default(),
            revocations_pending: Gauge::default(),
            vault_auth_renewals_total: Family::default(),
        };
        registry.register(
            "leasegate_sessions_active",
            "Client sessions currently relaying to an upstream database",
            m.sessions_active.clone(),
        );
        registry.register(
            "leasegate_sessions",
            "Client connections handled, by outcome (ok, rejected, error)",
            m.sessions_total.clone(),
        );
        registry.register(
            "leasegate_leases_active",
            "Vault leases issued to sessions and not yet revoked",
            m.leases_active.clone(),
        );
        registry.register(
            "leasegate_lease_revocations",
            "Lease revocations, by result (ok, error)",
            m.lease_revocations_total.clone(),
        );
        registry.register(
            "leasegate_vault_request_duration_seconds",
            "Vault HTTP request latency, by operation (creds, revoke)",
            m.vault_request_duration.clone(),
        );
        registry.register(
            "leasegate_auth_failures",
            "Clients refused before any credential was issued, by reason",
            m.auth_failures_total.clone(),
        );
        registry.register(
            "leasegate_lease_renewals",
            "Lease renewals, by result (ok, error)",
            m.lease_renewals_total.clone(),
        );
        registry.register(
            "leasegate_revocations_pending",
            "Lease revocations queued or being retried",
            m.revocations_pending.clone(),
        );
        registry.register(
            "leasegate_vault_auth_renewals",
            "Vault token renewals and logins, by result (ok, error, login)",
            m.vault_auth_renewals_total.clone(),
        );
        Metrics { registry, ..m }
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

    /// Records one Vault request's latency.
    pub fn vault_request(&self, op: &'static str, seconds: f64) {
        self.vault_request_duration
            .get_or_create(&[("op", op)])
            .observe(seconds);
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
        m.vault_request("creds", 0.01);
        m.revocation("ok");
        m.sessions_active.inc();
        m.leases_active.inc();
        let text = m.render();
        for needle in [
            "leasegate_sessions_active 1",
            "leasegate_sessions_total{outcome=\"ok\"} 1",
            "leasegate_leases_active 1",
            "leasegate_lease_revocations_total{result=\"ok\"} 1",
            "leasegate_vault_request_duration_seconds_count{op=\"creds\"} 1",
            "leasegate_auth_failures_total{reason=\"no_grant\"} 1",
        ] {
            assert!(text.contains(needle), "missing {needle} in\n{text}");
        }
    }
}
