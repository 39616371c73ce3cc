//! Vault refusing leasegate or answering nonsense, the way an operator meets it: leasegate's
//! token revoked while a session is open (then a new token put in `token_file`), a policy
//! edit that refuses revocations for a while, and a 200 creds answer that is no credential:
//! far larger than any, or without a username (a local fake stands in). New sessions fail fast with 08006 and never hang,
//! leasegate recovers by itself, and nothing it was issued is left behind. The OpenBao server
//! itself failing is in `faults_openbao_server`, a slow one in `faults_slow_vault`.
use std::time::{Duration, Instant};

use reqwest::Method;
use serde_json::json;

use crate::harness::bao::{Mount, Target};
use crate::harness::client::{Raw, Transport, raw_startup, tls_config};
use crate::harness::fake_vault::{FakeVault, Reply, Request, lookup_self_ok};
use crate::harness::fixture::{Fixture, messages_until_closed};
use crate::harness::metrics::value_or_zero;
use crate::harness::pg::dynamic_roles;
use crate::harness::pki::Pki;
use crate::harness::proxy::{Proxy, write_secret};
use crate::harness::security::{assert_fatal, counter};
use crate::harness::{env, poll_until};

/// The good client's startup as `readonly` on `myapp`.
pub(crate) async fn attempt(f: &Fixture) -> Raw {
    raw_startup(
        f.proxy.port,
        Transport::Tls(tls_config(&f.pki, Some(&f.good))),
        "readonly",
        "myapp",
    )
    .await
}

/// What leasegate needs of Vault for `mount` (deploy/leasegate-policy.hcl's paths).
fn policy_hcl(mount: &Mount, revoke: bool) -> String {
    let mut hcl = format!(
        r#"path "{}/creds/*" {{ capabilities = ["read"] }}
path "sys/leases/renew" {{ capabilities = ["update"] }}
path "auth/token/renew-self" {{ capabilities = ["update"] }}
path "auth/token/lookup-self" {{ capabilities = ["read"] }}
"#,
        mount.name
    );
    if revoke {
        hcl.push_str("path \"sys/leases/revoke\" { capabilities = [\"update\"] }\n");
    }
    hcl
}

/// A new token on the shared server with `policy`.
async fn token_with(policy: &str) -> String {
    Target::shared()
        .write(
            Method::POST,
            "auth/token/create",
            &json!({"policies": [policy], "ttl": "1h"}),
        )
        .await["auth"]["client_token"]
        .as_str()
        .expect("client_token")
        .to_string()
}

/// Polls `/readyz` until it answers `status`.
pub(crate) async fn wait_readyz(proxy: &Proxy, status: u16, within: Duration) {
    poll_until(within, &format!("/readyz {status}"), || async move {
        match proxy.get("/readyz").await {
            Ok((s, _)) if s == status => Ok(()),
            other => Err(format!("{other:?}")),
        }
    })
    .await;
}

/// Polls until no revocation is queued or being retried; returns the revocations counted
/// `(ok, error)`.
pub(crate) async fn wait_no_revocation_pending(proxy: &Proxy, within: Duration) -> (f64, f64) {
    poll_until(within, "no revocation pending", || async move {
        let m = proxy.metrics().await;
        match value_or_zero(&m, "leasegate_revocations_pending", &[]) {
            0.0 => Ok(()),
            n => Err(format!("{n} pending")),
        }
    })
    .await;
    let m = proxy.metrics().await;
    let result = |r| value_or_zero(&m, "leasegate_lease_revocations_total", &[("result", r)]);
    (result("ok"), result("error"))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn revoked_token_fails_new_sessions_fast_and_a_new_token_file_recovers() {
    let mount = Target::shared()
        .fresh_mount(&env().pg, "vault-token-revoked")
        .await;
    let policy = format!("lg-{}", mount.name);
    Target::shared()
        .put_policy(&policy, &policy_hcl(&mount, true))
        .await;
    let token = token_with(&policy).await;
    let leasegates = token.clone();
    let f = Fixture::with_mount(
        mount,
        Pki::new(),
        |mut cfg| {
            cfg.vault_token = leasegates;
            cfg
        },
        |_| {},
    )
    .await;
    let mut open = f.raw_session("readonly").await;
    assert_eq!(dynamic_roles(&f.mount.prefix).await.len(), 1);

    // Revoking a token revokes its leases: OpenBao's revocation statements end the backend,
    // and the client gets PostgreSQL's 57P01.
    Target::shared()
        .write(
            Method::POST,
            "auth/token/revoke",
            &json!({ "token": token }),
        )
        .await;
    let seen = messages_until_closed(&mut open, Instant::now(), Duration::from_secs(10))
        .await
        .unwrap_or_else(|seen| panic!("session still open: {seen:?}"));
    let codes: Vec<_> = seen.iter().filter_map(|(_, m)| m.sqlstate()).collect();
    assert_eq!(codes, ["57P01"], "PostgreSQL's error relayed: {seen:?}");

    // New sessions fail at once with 08006; nothing is issued.
    let before = f.issued().await;
    let asked = Instant::now();
    let answer = attempt(&f).await;
    assert_fatal(
        &answer,
        "08006",
        &["could not obtain credentials", "HTTP 403"],
    );
    assert!(
        asked.elapsed() < Duration::from_secs(3),
        "{:?}",
        asked.elapsed()
    );
    assert_eq!(f.issued().await.leases, before.leases, "no lease issued");
    wait_readyz(&f.proxy, 503, Duration::from_secs(25)).await;

    // A valid token in the file: leasegate takes it, turns ready and serves again.
    let fresh = token_with(&policy).await;
    write_secret(&f.proxy.token_file(), &format!("{fresh}\n"));
    wait_readyz(&f.proxy, 200, Duration::from_secs(15)).await;
    f.assert_good_client_works().await;
    f.wait_all_revoked(Duration::from_secs(10)).await;
    let (ok, error) = wait_no_revocation_pending(&f.proxy, Duration::from_secs(30)).await;
    eprintln!("token-revoked: revocations ok {ok}, error {error}");
    assert_eq!(ok + error, 3.0, "the three revocations finished");
    f.assert_nothing_outstanding().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn revocations_refused_for_a_while_are_retried_until_they_succeed() {
    let mount = Target::shared()
        .fresh_mount(&env().pg, "vault-revoke-403")
        .await;
    let policy = format!("lg-{}", mount.name);
    let shared = Target::shared();
    shared.put_policy(&policy, &policy_hcl(&mount, true)).await;
    let token = token_with(&policy).await;
    let f = Fixture::with_mount(
        mount,
        Pki::new(),
        |mut cfg| {
            cfg.vault_token = token;
            cfg
        },
        |_| {},
    )
    .await;
    let open = f.raw_session("readonly").await;
    let roles = dynamic_roles(&f.mount.prefix).await;
    assert_eq!(roles.len(), 1);

    // An operator's policy edit drops sys/leases/revoke; the session ends meanwhile.
    shared
        .put_policy(&policy, &policy_hcl(&f.mount, false))
        .await;
    open.terminate().await;
    let proxy = &f.proxy;
    poll_until(
        Duration::from_secs(10),
        "revocations refused",
        || async move {
            let refused = counter(
                proxy,
                "leasegate_vault_requests_total",
                &[("op", "revoke"), ("status", "4xx")],
            )
            .await;
            if refused >= 2.0 {
                Ok(())
            } else {
                Err(format!("{refused} refused revoke calls"))
            }
        },
    )
    .await;
    assert_eq!(
        dynamic_roles(&f.mount.prefix).await,
        roles,
        "the role lives on"
    );

    // The policy is put right within the retry window: the lease is revoked after all.
    shared
        .put_policy(&policy, &policy_hcl(&f.mount, true))
        .await;
    f.wait_all_revoked(Duration::from_secs(20)).await;
    let (ok, error) = wait_no_revocation_pending(&f.proxy, Duration::from_secs(5)).await;
    assert_eq!((ok, error), (1.0, 0.0), "one revocation, no failure");
}

/// A fake Vault whose creds answer is 200 with `data` (JSON text) under a lease id: the
/// client gets 08006 naming no Vault internals, and the lease in the answer is revoked.
async fn broken_creds_answer_is_revoked(name: &str, data: String) {
    const LEASE: &str = "t-broken/creds/readonly/BROKEN0123456789";
    let data = std::sync::Arc::new(data);
    let fake = FakeVault::start(move |req: Request| {
        let data = data.clone();
        async move {
            match (req.method.as_str(), req.path.as_str()) {
                (_, "/v1/auth/token/lookup-self") => lookup_self_ok(),
                ("PUT", "/v1/sys/leases/revoke") => Reply::Json(204, String::new()),
                ("GET", p) if p.contains("/creds/") => Reply::Json(
                    200,
                    format!(
                        r#"{{"lease_id":"{LEASE}","renewable":true,"lease_duration":300,"data":{data}}}"#
                    ),
                ),
                _ => Reply::Json(404, r#"{"errors":[]}"#.into()),
            }
        }
    })
    .await;
    let address = fake.addr();
    let f = Fixture::start_with(name, |mut cfg| {
        cfg.vault_address = address;
        cfg.vault_timeout = Some("3s".into());
        cfg
    })
    .await;
    wait_readyz(&f.proxy, 200, Duration::from_secs(20)).await;
    let answer = attempt(&f).await;
    let message = assert_fatal(
        &answer,
        "08006",
        &[
            "could not obtain credentials",
            "Vault sent an unexpected answer",
        ],
    );
    assert!(
        !message.contains("BROKEN") && !message.contains("AAAA"),
        "{message:?}"
    );
    let revoke = fake
        .wait_request("PUT", "/v1/sys/leases/revoke", Duration::from_secs(10))
        .await;
    assert_eq!(revoke.body_text(), json!({ "lease_id": LEASE }).to_string());
    let (ok, error) = wait_no_revocation_pending(&f.proxy, Duration::from_secs(10)).await;
    assert_eq!((ok, error), (1.0, 0.0));
    assert_eq!(counter(&f.proxy, "leasegate_leases_active", &[]).await, 0.0);
    f.assert_nothing_outstanding().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn creds_answer_of_four_mebibytes_gives_08006_and_its_lease_is_revoked() {
    let pad = "A".repeat(4 << 20);
    let data = format!(r#"{{"username":"u","password":"p","pad":"{pad}"}}"#);
    broken_creds_answer_is_revoked("vault-huge", data).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn creds_answer_without_a_username_gives_08006_and_its_lease_is_revoked() {
    broken_creds_answer_is_revoked("vault-no-user", r#"{"password":"p"}"#.into()).await;
}
