//! Upstream errors during login reach the client with the upstream's own SQLSTATE and
//! message, and the lease issued for the attempt is revoked: a database that does not exist
//! (3D000) and a role over its connection limit (53300).

use crate::harness::bao;
use crate::harness::client::{Transport, raw_startup, tls_config};
use crate::harness::fixture::Fixture;
use crate::harness::metrics::value_or_zero;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn database_missing_upstream_is_reported_with_3d000() {
    let f = Fixture::start_with("upstream-nodb", |mut cfg| {
        cfg.databases[0].upstream_database = Some("no_such_database".into());
        cfg
    })
    .await;
    let answer = raw_startup(
        f.proxy.port,
        Transport::Tls(tls_config(&f.pki, Some(&f.good))),
        "readonly",
        "myapp",
    )
    .await;
    let message = answer.expect_error("3D000");
    assert!(
        message.contains("no_such_database") && message.contains("does not exist"),
        "upstream's own message expected, got {message:?}"
    );
    f.wait_failed_login_revoked("readonly").await;
    let m = f.proxy.metrics().await;
    let rejected = value_or_zero(
        &m,
        "leasegate_upstream_errors_total",
        &[("database", "myapp"), ("kind", "rejected")],
    );
    assert_eq!(rejected, 1.0, "upstream error counted:\n{m}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn role_over_its_connection_limit_is_reported_with_53300() {
    let f = Fixture::start_with("upstream-connlimit", |mut cfg| {
        cfg.databases[0].roles.push("limited".into());
        cfg.grants[0].roles.push("limited".into());
        cfg
    })
    .await;
    let body = serde_json::json!({
        "db_name": "pg",
        "default_ttl": "5m",
        "max_ttl": "1h",
        "creation_statements": [
            "CREATE ROLE \"{{name}}\" WITH LOGIN CONNECTION LIMIT 0 PASSWORD '{{password}}' VALID UNTIL '{{expiration}}' IN ROLE leasegate_readonly;"
        ],
        "revocation_statements": ["DROP ROLE IF EXISTS \"{{name}}\";"],
    });
    bao::write(
        reqwest::Method::POST,
        &format!("{}/roles/limited", f.mount.name),
        &body,
    )
    .await;
    let answer = raw_startup(
        f.proxy.port,
        Transport::Tls(tls_config(&f.pki, Some(&f.good))),
        "limited",
        "myapp",
    )
    .await;
    let message = answer.expect_error("53300");
    assert!(
        message.contains("too many connections for role"),
        "upstream's own message expected, got {message:?}"
    );
    f.wait_failed_login_revoked("limited").await;
    f.assert_good_client_works().await;
}
