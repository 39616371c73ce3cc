//! leasegate ↔ Vault, where the answers are hostile or broken (a local fake Vault stands in
//! where OpenBao cannot misbehave on demand): redirects to another origin never carry the
//! token or a login secret there, a same-origin redirect is still followed; a 2xx creds
//! answer whose body is broken or stalls still has its lease revoked; a creds call in flight
//! at SIGTERM is finished and its lease revoked; VAULT_TOKEN does not stay in the process
//! environment.

use std::time::Duration;

use reqwest::Method;
use serde_json::json;

use crate::harness::bao::Target;
use crate::harness::client::{Raw, Transport, raw_startup, tls_config};
use crate::harness::fake_vault::{FakeVault, Reply, Request, lookup_self_ok};
use crate::harness::fixture::Fixture;
use crate::harness::poll_until;
use crate::harness::proxy::{ProcessOptions, set, table};
use crate::harness::security::{assert_fatal, counter, fixture_edited, tls_startup};
use crate::harness::{next_id, root};

/// The token leasegate holds in these tests: it must never reach the recorder or a log.
const CANARY_TOKEN: &str = "hvs.CANARY-vault-token-4f1d";
/// The AppRole secret_id of the redirect test.
const CANARY_SECRET: &str = "CANARY-secret-id-8e2a";

/// A fake that records whatever reaches it and answers 404.
async fn recorder() -> FakeVault {
    FakeVault::start(|_| async { Reply::Json(404, r#"{"errors":[]}"#.into()) }).await
}

/// Asserts that nothing at all reached `recorder`.
#[track_caller]
fn assert_untouched(recorder: &FakeVault) {
    let bytes = recorder.received();
    assert!(
        recorder.connections() == 0 && bytes.is_empty(),
        "the other origin got {} connection(s): {:?}",
        recorder.connections(),
        String::from_utf8_lossy(&bytes)
    );
}

async fn good_client(f: &Fixture) -> Raw {
    tls_startup(f.proxy.port, &f.pki, Some(&f.good), "readonly", "myapp").await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn vault_redirect_to_another_origin_keeps_the_token_home() {
    let elsewhere = recorder().await;
    let target = format!("http://127.0.0.1:{}", elsewhere.port);
    let front = FakeVault::start(move |req: Request| {
        let target = target.clone();
        async move {
            if req.path == "/v1/auth/token/lookup-self" {
                lookup_self_ok()
            } else {
                Reply::Redirect(format!("{target}{}", req.path))
            }
        }
    })
    .await;
    let address = front.addr();
    let f = Fixture::start_with("redirect-token", |mut cfg| {
        cfg.vault_address = address;
        cfg.vault_token = CANARY_TOKEN.into();
        cfg.vault_timeout = Some("2s".into());
        cfg
    })
    .await;

    let answer = good_client(&f).await;
    let message = assert_fatal(&answer, "08006", &["could not obtain credentials"]);
    for leak in [&elsewhere.port.to_string(), "127.0.0.1", CANARY_TOKEN] {
        assert!(!message.contains(leak), "{message:?} leaks {leak:?}");
    }
    let creds = front
        .wait_request(
            "GET",
            &format!("/v1/{}/creds/readonly", f.mount.name),
            Duration::ZERO,
        )
        .await;
    assert_eq!(creds.header("x-vault-token"), Some(CANARY_TOKEN), "sanity");
    assert_untouched(&elsewhere);
    let redirected = counter(
        &f.proxy,
        "leasegate_vault_requests_total",
        &[("op", "creds"), ("status", "3xx")],
    )
    .await;
    assert_eq!(redirected, 1.0);
    let log = f.proxy.log_text();
    assert!(!log.contains(CANARY_TOKEN), "the token is in the log");
    assert!(
        log.contains(&format!(
            "redirecting to http://127.0.0.1:{}",
            elsewhere.port
        )),
        "the log names where the redirect pointed"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn approle_login_redirected_elsewhere_sends_the_secret_id_nowhere() {
    let elsewhere = recorder().await;
    let target = format!("http://127.0.0.1:{}", elsewhere.port);
    let front = FakeVault::start(move |req: Request| {
        let target = target.clone();
        async move { Reply::Redirect(format!("{target}{}", req.path)) }
    })
    .await;
    let secrets = root().tempdir("redirect-approle-");
    let secret_file = secrets.path().join("secret-id");
    crate::harness::proxy::write_secret(&secret_file, &format!("{CANARY_SECRET}\n"));
    let address = front.addr();
    let f = Fixture::start_edited(
        "redirect-approle",
        |mut cfg| {
            cfg.vault_address = address;
            cfg.vault_timeout = Some("2s".into());
            cfg
        },
        |t| {
            let auth = table(&[
                ("method", "approle"),
                ("role_id", "leasegate-role"),
                ("secret_id_file", &secret_file.display().to_string()),
            ]);
            set(t, "vault.auth", auth);
        },
    )
    .await;

    let login = front
        .wait_request("POST", "/v1/auth/approle/login", Duration::from_secs(10))
        .await;
    assert!(
        login.body_text().contains(CANARY_SECRET),
        "sanity: {login:?}"
    );
    let answer = good_client(&f).await;
    assert_fatal(&answer, "08006", &["could not obtain credentials"]);
    assert_untouched(&elsewhere);
    let log = f.proxy.log_text();
    assert!(!log.contains(CANARY_SECRET), "the secret_id is in the log");
    assert!(
        log.contains(&format!(
            "redirecting to http://127.0.0.1:{}",
            elsewhere.port
        )),
        "the log names where the redirect pointed"
    );
}

/// Forwards `req` (its path without the `/hop` prefix) to the shared OpenBao.
async fn forward(bao: &Target, req: &Request, path: &str) -> Reply {
    let method = Method::from_bytes(req.method.as_bytes()).expect("method");
    let mut out = reqwest::Client::new().request(method, format!("{}{path}", bao.addr));
    for name in ["x-vault-token", "x-vault-request", "content-type"] {
        if let Some(v) = req.header(name) {
            out = out.header(name, v);
        }
    }
    let resp = out.body(req.body.clone()).send().await.expect("forward");
    let status = resp.status().as_u16();
    Reply::Json(status, resp.text().await.unwrap_or_default())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn same_origin_vault_redirect_is_followed() {
    let bao = Target::shared();
    // Every request is first redirected to the same server under /hop, then forwarded to
    // the real OpenBao.
    let front = FakeVault::start(move |req: Request| {
        let bao = bao.clone();
        async move {
            match req.path.strip_prefix("/hop") {
                Some(path) => forward(&bao, &req, path).await,
                None => Reply::Redirect(format!("/hop{}", req.path)),
            }
        }
    })
    .await;
    let address = front.addr();
    let f = Fixture::start_with("redirect-same-origin", |mut cfg| {
        cfg.vault_address = address;
        cfg
    })
    .await;
    f.assert_good_client_works().await;
    f.wait_all_revoked(Duration::from_secs(10)).await;
    let creds = format!("/v1/{}/creds/readonly", f.mount.name);
    assert!(front.find("GET", &creds).is_some(), "asked the front first");
    let hop = front
        .find("GET", &format!("/hop{creds}"))
        .expect("followed the redirect");
    assert!(
        hop.header("x-vault-token").is_some(),
        "the token went along"
    );
    let revoke = front
        .find("PUT", "/hop/v1/sys/leases/revoke")
        .expect("the revoke followed the redirect too");
    assert!(revoke.body_text().contains(&f.mount.name), "{revoke:?}");
}

/// A fake Vault for token auth whose creds answer is `creds`; it revokes (204) whatever it
/// is asked to.
async fn creds_fake<F>(creds: F) -> FakeVault
where
    F: Fn() -> Reply + Send + Sync + 'static,
{
    FakeVault::start(move |req: Request| {
        let reply = match (req.method.as_str(), req.path.as_str()) {
            (_, "/v1/auth/token/lookup-self") => lookup_self_ok(),
            ("PUT", "/v1/sys/leases/revoke") => Reply::Json(204, String::new()),
            ("GET", p) if p.contains("/creds/") => creds(),
            _ => Reply::Json(404, r#"{"errors":[]}"#.into()),
        };
        async move { reply }
    })
    .await
}

/// Starts leasegate against `fake` with token auth.
async fn against(fake: &FakeVault, name: &str, timeout: &str, grace: &str) -> Fixture {
    let address = fake.addr();
    let (timeout, grace) = (timeout.to_string(), grace.to_string());
    Fixture::start_edited(
        name,
        |mut cfg| {
            cfg.vault_address = address;
            cfg.vault_timeout = Some(timeout);
            cfg
        },
        |t| set(t, "listen.shutdown_grace", grace),
    )
    .await
}

/// Polls until the fake got a revoke for `lease_id`.
async fn wait_revoked_at(fake: &FakeVault, lease_id: &str) {
    poll_until(
        Duration::from_secs(10),
        &format!("revoke of {lease_id} at the fake Vault"),
        || async move {
            let revokes: Vec<String> = fake
                .requests()
                .iter()
                .filter(|r| r.method == "PUT" && r.path == "/v1/sys/leases/revoke")
                .map(Request::body_text)
                .collect();
            let wanted = json!({ "lease_id": lease_id }).to_string();
            if revokes.contains(&wanted) {
                Ok(())
            } else {
                Err(format!("revokes so far: {revokes:?}"))
            }
        },
    )
    .await;
}

/// A 2xx creds answer whose body does not parse as a credential: the client gets 08006,
/// the lease id in the body is revoked.
async fn broken_creds_body_is_revoked(name: &str, lease_id: &'static str, data: &'static str) {
    let fake = creds_fake(move || {
        let body = format!(
            r#"{{"request_id":"r","lease_id":"{lease_id}","renewable":true,"lease_duration":300,"data":{data}}}"#
        );
        Reply::Json(200, body)
    })
    .await;
    let f = against(&fake, name, "2s", "30s").await;
    let answer = good_client(&f).await;
    assert_fatal(
        &answer,
        "08006",
        &[
            "could not obtain credentials",
            "Vault sent an unexpected answer",
        ],
    );
    wait_revoked_at(&fake, lease_id).await;
    f.wait_revocations_ok(1.0, Some(0.0), Duration::from_secs(5))
        .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn creds_answer_without_a_password_has_its_lease_revoked() {
    broken_creds_body_is_revoked(
        "creds-no-password",
        "fake/creds/readonly/no-password",
        r#"{"username":"lg_fake"}"#,
    )
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn creds_answer_with_a_wrongly_typed_password_has_its_lease_revoked() {
    broken_creds_body_is_revoked(
        "creds-wrong-type",
        "fake/creds/readonly/wrong-type",
        r#"{"username":"lg_fake","password":424242}"#,
    )
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn creds_answer_that_stalls_mid_body_has_its_lease_revoked() {
    let lease_id = "fake/creds/readonly/stalled";
    let fake = creds_fake(move || Reply::Stall {
        announced: 2000,
        part: format!(
            r#"{{"request_id":"r","lease_id":"{lease_id}","renewable":true,"lease_duration":300,"data":{{"username":"lg_fake","pass"#
        ),
        stall: Duration::from_secs(10),
    })
    .await;
    let f = against(&fake, "creds-stall", "1s", "30s").await;
    let answer = good_client(&f).await;
    assert_fatal(
        &answer,
        "08006",
        &["could not obtain credentials", "did not answer within 1s"],
    );
    wait_revoked_at(&fake, lease_id).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigterm_during_a_creds_call_revokes_the_lease_it_issued() {
    let lease_id = "fake/creds/readonly/late";
    let fake = creds_fake(move || {
        let body = format!(
            r#"{{"lease_id":"{lease_id}","renewable":true,"lease_duration":300,"data":{{"username":"lg_fake","password":"pw"}}}}"#
        );
        Reply::After(Duration::from_millis(1500), Box::new(Reply::Json(200, body)))
    })
    .await;
    let mut f = against(&fake, "creds-shutdown", "5s", "100ms").await;
    let port = f.proxy.port;
    let config = tls_config(&f.pki, Some(&f.good));
    let client = tokio::spawn(async move {
        raw_startup(port, Transport::Tls(config), "readonly", "myapp").await
    });
    fake.wait_request(
        "GET",
        &format!("/v1/{}/creds/readonly", f.mount.name),
        Duration::from_secs(10),
    )
    .await;
    f.proxy.signal("TERM");
    let answer = client.await.expect("client task");
    assert_fatal(
        &answer,
        "57P01",
        &["terminating connection due to administrator command"],
    );
    let status = f
        .proxy
        .wait_exit(Duration::from_secs(20))
        .await
        .expect("leasegate exits after SIGTERM");
    assert!(status.success(), "exit status {status:?}");
    // Sent before the process exited: nothing sends anything after.
    wait_revoked_at(&fake, lease_id).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn vault_token_from_the_environment_is_not_left_in_the_process_environment() {
    let bao = Target::shared();
    let token = bao
        .write(
            Method::POST,
            "auth/token/create",
            &json!({"policies": ["root"], "ttl": "1h", "meta": {"test": format!("env-{}", next_id())}}),
        )
        .await["auth"]["client_token"]
        .as_str()
        .expect("client_token")
        .to_string();
    let process = ProcessOptions {
        env: vec![("VAULT_TOKEN".into(), token.clone())],
        ..ProcessOptions::default()
    };
    let f = fixture_edited(
        "env-token",
        |cfg| cfg,
        process,
        |t, _| {
            set(t, "vault.auth", table(&[("method", "token")]));
        },
    )
    .await;
    f.assert_good_client_works().await;
    let environ = std::fs::read(format!("/proc/{}/environ", f.proxy.pid())).expect("environ");
    let environ = String::from_utf8_lossy(&environ);
    assert!(
        environ.contains("RUST_LOG="),
        "sanity: the environment is readable"
    );
    assert!(
        !environ.contains("VAULT_TOKEN"),
        "VAULT_TOKEN is still in the environment"
    );
    assert!(
        !environ.contains(&token),
        "the token is still in the environment block"
    );
    f.wait_all_revoked(Duration::from_secs(10)).await;
}
