//! The upstream leg over TLS to the real PostgreSQL 15 (the shared cluster has `ssl = on`
//! with the dev PKI's server certificate). Over TLS the server offers SCRAM-SHA-256-PLUS and
//! leasegate takes it: the login binds the `tls-server-end-point` hash of the server's
//! certificate, which PostgreSQL checks against its own, so a login that works is one whose
//! channel binding is right. `require` and `verify-full` (with `ca_cert`) both log in; the
//! backend reports its connection encrypted; the lease is revoked when the session ends.

use std::time::Duration;

use crate::harness::client::{current_user, pg_connect};
use crate::harness::env;
use crate::harness::fixture::Fixture;
use crate::harness::proxy::set;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn scram_with_channel_binding_over_upstream_tls_require_and_verify_full() {
    for mode in ["require", "verify-full"] {
        let f = Fixture::start_edited(
            &format!("up-tls-{mode}"),
            |cfg| cfg,
            |t| {
                set(t, "databases.0.tls", mode);
                if mode == "verify-full" {
                    set(t, "databases.0.ca_cert", env().pg_ca.display().to_string());
                }
            },
        )
        .await;
        let s = pg_connect(f.proxy.port, &f.pki, Some(&f.good), "readonly", "myapp")
            .await
            .unwrap_or_else(|e| panic!("{mode}: a session through leasegate: {e}"));
        let row = s
            .client
            .query_one(
                "select ssl, version from pg_stat_ssl where pid = pg_backend_pid()",
                &[],
            )
            .await
            .unwrap_or_else(|e| panic!("{mode}: pg_stat_ssl: {e}"));
        assert!(
            row.get::<_, bool>(0),
            "{mode}: the upstream backend is not on TLS"
        );
        let version: String = row.get(1);
        assert!(version.starts_with("TLSv1."), "{mode}: {version}");
        let user = current_user(&s).await;
        assert_ne!(user, "readonly", "{mode}: logged in as a dynamic role");
        drop(s);
        f.wait_all_revoked(Duration::from_secs(15)).await;
    }
}
