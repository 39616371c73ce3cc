//! leasegate's own login to the real OpenBao with a least-privilege policy: AppRole with a
//! short token TTL (the token is renewed, its leases live on), a rotated token file (the new
//! token is picked up, the old one may be revoked), and TLS certificate auth against a dev
//! server with a TLS listener.

use std::path::Path;
use std::time::{Duration, Instant};

use reqwest::Method;
use serde_json::json;

use crate::harness::bao::{Mount, OwnBao, Target, fresh_mount, leases};
use crate::harness::client::{current_user, pg_connect};
use crate::harness::fixture::{Fixture, wait_all_revoked_on};
use crate::harness::metrics::value_or_zero;
use crate::harness::pki::{Identity, Pki};
use crate::harness::proxy::{BIN, Proxy, ProxyConfig, set, table};
use crate::harness::{dynamic_roles, env, next_id, poll_until, root};

/// What leasegate needs on `mount`, and nothing else.
fn policy_hcl(mount: &Mount) -> String {
    format!(
        r#"path "{}/creds/*" {{ capabilities = ["read"] }}
path "sys/leases/renew" {{ capabilities = ["update"] }}
path "sys/leases/revoke" {{ capabilities = ["update"] }}
path "auth/token/renew-self" {{ capabilities = ["update"] }}
path "auth/token/lookup-self" {{ capabilities = ["read"] }}
path "auth/token/revoke-self" {{ capabilities = ["update"] }}
"#,
        mount.name
    )
}

fn write_secret(path: &Path, text: &str) {
    crate::harness::proxy::write_secret(path, &format!("{text}\n"));
}

/// `auth` counter of leasegate_vault_auth_renewals_total.
async fn auth_renewals(proxy: &Proxy, result: &str) -> f64 {
    let m = proxy.metrics().await;
    value_or_zero(
        &m,
        "leasegate_vault_auth_renewals_total",
        &[("result", result)],
    )
}

/// An AppRole auth mount with one role `leasegate` whose tokens get `policy`, and a
/// secret_id file for it.
struct AppRole {
    mount: String,
    policy: String,
    role_id: String,
    secret_file: std::path::PathBuf,
    _secrets: tempfile::TempDir,
}

impl AppRole {
    /// Creates the mount, the policy (`policy_hcl` of `mount`) and the role with `role`
    /// settings (token TTLs, ...).
    async fn create(bao: &Target, mount: &Mount, role: serde_json::Value) -> AppRole {
        let n = next_id();
        let (auth_mount, policy) = (format!("approle-t{n}"), format!("leasegate-t{n}"));
        bao.put_policy(&policy, &policy_hcl(mount)).await;
        bao.write(
            Method::POST,
            &format!("sys/auth/{auth_mount}"),
            &json!({"type": "approle"}),
        )
        .await;
        let mut role = role;
        role["token_policies"] = json!([policy]);
        bao.write(
            Method::POST,
            &format!("auth/{auth_mount}/role/leasegate"),
            &role,
        )
        .await;
        let role_id = bao
            .read(&format!("auth/{auth_mount}/role/leasegate/role-id"))
            .await["data"]["role_id"]
            .as_str()
            .expect("role_id")
            .to_string();
        let secret_id = bao
            .write(
                Method::POST,
                &format!("auth/{auth_mount}/role/leasegate/secret-id"),
                &json!({}),
            )
            .await["data"]["secret_id"]
            .as_str()
            .expect("secret_id")
            .to_string();
        let secrets = root().tempdir("approle-");
        let secret_file = secrets.path().join("secret-id");
        write_secret(&secret_file, &secret_id);
        AppRole {
            mount: auth_mount,
            policy,
            role_id,
            secret_file,
            _secrets: secrets,
        }
    }

    /// The `[vault.auth]` section that logs in with this role.
    fn auth_table(&self) -> toml::Table {
        table(&[
            ("method", "approle"),
            ("mount", &self.mount),
            ("role_id", &self.role_id),
            ("secret_id_file", &self.secret_file.display().to_string()),
        ])
    }

    /// Accessors of the tokens OpenBao holds (valid) that were issued by a login here.
    async fn live_tokens(&self, bao: &Target) -> Vec<String> {
        let list = Method::from_bytes(b"LIST").expect("LIST");
        let (status, text) = bao
            .request(list, "auth/token/accessors", None)
            .await
            .expect("list accessors");
        assert!(
            status.is_success(),
            "LIST auth/token/accessors: {status}: {text}"
        );
        let body: serde_json::Value = serde_json::from_str(&text).expect("JSON");
        let login = format!("auth/{}/login", self.mount);
        let mut live = Vec::new();
        for accessor in body["data"]["keys"].as_array().into_iter().flatten() {
            let body = json!({ "accessor": accessor });
            let Ok((status, text)) = bao
                .request(Method::POST, "auth/token/lookup-accessor", Some(&body))
                .await
            else {
                continue;
            };
            let data: serde_json::Value = serde_json::from_str(&text).unwrap_or_default();
            if status.is_success() && data["data"]["path"].as_str() == Some(login.as_str()) {
                live.push(accessor.as_str().unwrap_or_default().to_string());
            }
        }
        live
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn approle_token_with_short_ttl_is_renewed_and_its_leases_live_on() {
    let bao = Target::shared();
    let mount = fresh_mount("approle").await;
    let role = json!({"token_ttl": "3s", "token_max_ttl": "1h"});
    let approle = AppRole::create(&bao, &mount, role).await;
    let auth = approle.auth_table();
    let f = Fixture::with_mount(mount, Pki::new(), |cfg| cfg, |t| set(t, "vault.auth", auth)).await;

    let s = pg_connect(f.proxy.port, &f.pki, Some(&f.good), "readonly", "myapp")
        .await
        .expect("session with an AppRole token");
    let user = current_user(&s).await;
    let held = leases(&f.mount, "readonly").await;
    assert_eq!(held.len(), 1);
    // More than three token TTLs: the lease is a child of leasegate's token and would be
    // revoked by Vault with the token if it were not renewed.
    let started = Instant::now();
    while started.elapsed() < Duration::from_secs(10) {
        s.client
            .query_one("select 1", &[])
            .await
            .unwrap_or_else(|e| panic!("query at {:?}: {e:?}", started.elapsed()));
        tokio::time::sleep(Duration::from_millis(250)).await;
    }
    assert_eq!(
        leases(&f.mount, "readonly").await,
        held,
        "lease still listed"
    );
    assert_eq!(dynamic_roles(&f.mount.prefix).await, vec![user]);
    let renewed = auth_renewals(&f.proxy, "ok").await;
    let logins = auth_renewals(&f.proxy, "login").await;
    eprintln!("approle: token renewals ok {renewed}, logins {logins}");
    assert!(renewed > 0.0, "the AppRole token was renewed");

    drop(s.client);
    let _ = s.driver.await;
    f.wait_all_revoked(Duration::from_secs(10)).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn retired_login_token_is_revoked_once_no_lease_needs_it_and_the_last_at_exit() {
    let bao = Target::shared();
    let mount = fresh_mount("approle-retired").await;
    // No default policy: the role's policy alone decides whether renew-self works.
    let role = json!({"token_ttl": "6s", "token_max_ttl": "1h", "token_no_default_policy": true});
    let approle = AppRole::create(&bao, &mount, role).await;
    let auth = approle.auth_table();
    let mut f =
        Fixture::with_mount(mount, Pki::new(), |cfg| cfg, |t| set(t, "vault.auth", auth)).await;
    assert_eq!(approle.live_tokens(&bao).await.len(), 1, "logged in once");
    let s = pg_connect(f.proxy.port, &f.pki, Some(&f.good), "readonly", "myapp")
        .await
        .expect("session with an AppRole token");
    let user = current_user(&s).await;

    // Renewal stops working for a moment: leasegate logs in again; the first token, which
    // created the session's lease, is retired but kept (and renewed once that works again).
    let full = policy_hcl(&f.mount);
    let without_renew: String = full
        .lines()
        .filter(|l| !l.contains("renew-self"))
        .map(|l| format!("{l}\n"))
        .collect();
    bao.put_policy(&approle.policy, &without_renew).await;
    let proxy = &f.proxy;
    poll_until(
        Duration::from_secs(15),
        "a failed renewal and a second login",
        || async move {
            let (errors, logins) = (
                auth_renewals(proxy, "error").await,
                auth_renewals(proxy, "login").await,
            );
            if errors >= 1.0 && logins >= 2.0 {
                Ok(())
            } else {
                Err(format!("errors {errors}, logins {logins}"))
            }
        },
    )
    .await;
    bao.put_policy(&approle.policy, &full).await;
    assert_eq!(
        approle.live_tokens(&bao).await.len(),
        2,
        "the retired token lives on for the session's lease"
    );
    s.client.query_one("select 1", &[]).await.expect("query");
    assert_eq!(dynamic_roles(&f.mount.prefix).await, vec![user]);
    assert_eq!(auth_renewals(&f.proxy, "revoked").await, 0.0);

    // The session ends: its lease is revoked, and with it the last need for the old token.
    drop(s.client);
    let _ = s.driver.await;
    f.wait_all_revoked(Duration::from_secs(10)).await;
    let (approle, bao) = (&approle, &bao);
    poll_until(
        Duration::from_secs(15),
        "the retired token revoked",
        || async move {
            let live = approle.live_tokens(bao).await.len();
            let revoked = auth_renewals(proxy, "revoked").await;
            if live == 1 && revoked == 1.0 {
                Ok(())
            } else {
                Err(format!("live tokens {live}, revoked {revoked}"))
            }
        },
    )
    .await;

    // At exit the current token goes too.
    let status = f.proxy.terminate(Duration::from_secs(15)).expect("exits");
    assert!(status.success(), "exit status {status:?}");
    assert_eq!(approle.live_tokens(bao).await, Vec::<String>::new());
}

/// A child token of root with `policy`.
async fn child_token(bao: &Target, policy: &str) -> String {
    bao.write(
        Method::POST,
        "auth/token/create",
        &json!({"policies": [policy], "ttl": "1h"}),
    )
    .await["auth"]["client_token"]
        .as_str()
        .expect("client_token")
        .to_string()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rotated_token_file_is_picked_up_and_the_old_token_may_be_revoked() {
    let bao = Target::shared();
    let mount = fresh_mount("token-rotation").await;
    let policy = format!("leasegate-t{}", next_id());
    bao.put_policy(&policy, &policy_hcl(&mount)).await;
    let token_a = child_token(&bao, &policy).await;
    let token_b = child_token(&bao, &policy).await;

    let token = token_a.clone();
    let f = Fixture::with_mount(
        mount,
        Pki::new(),
        move |mut cfg| {
            cfg.vault_token = token;
            cfg
        },
        |_| {},
    )
    .await;
    f.assert_good_client_works().await;
    f.wait_all_revoked(Duration::from_secs(10)).await;
    assert_eq!(auth_renewals(&f.proxy, "login").await, 1.0);

    // Rotate the way secret stores do: write a new file, rename it over the old one.
    let file = f.proxy.token_file();
    let fresh = file.with_extension("new");
    write_secret(&fresh, &token_b);
    std::fs::rename(&fresh, &file).expect("replace the token file");
    let proxy = &f.proxy;
    poll_until(
        Duration::from_secs(15),
        "leasegate logged in with the new token file",
        || async move {
            match auth_renewals(proxy, "login").await {
                n if n >= 2.0 => Ok(()),
                n => Err(format!("logins {n}")),
            }
        },
    )
    .await;

    bao.write(
        Method::POST,
        "auth/token/revoke",
        &json!({ "token": token_a }),
    )
    .await;
    let revoked = Target {
        token: token_a.clone(),
        ..bao.clone()
    };
    let (status, _) = revoked
        .request(Method::GET, "auth/token/lookup-self", None)
        .await
        .expect("lookup-self");
    assert_eq!(status.as_u16(), 403, "token A is revoked");

    let s = pg_connect(f.proxy.port, &f.pki, Some(&f.good), "readonly", "myapp")
        .await
        .expect("new session after token A was revoked");
    let user = current_user(&s).await;
    assert!(user.starts_with(&f.mount.prefix), "user {user}");
    assert_eq!(leases(&f.mount, "readonly").await.len(), 1);
    drop(s.client);
    let _ = s.driver.await;
    // Revoked with token B.
    f.wait_all_revoked(Duration::from_secs(10)).await;
    let (ready, _) = f.proxy.get("/readyz").await.expect("/readyz");
    assert_eq!(ready, 200);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cert_auth_over_tls_logs_in_with_leasegates_client_certificate() {
    let tls = OwnBao::dev_tls().await;
    let bao = &tls.target;
    let pg = &env().pg;
    let mount = bao.fresh_mount(pg, "cert-auth").await;
    let policy = "leasegate";
    bao.put_policy(policy, &policy_hcl(&mount)).await;
    bao.write(Method::POST, "sys/auth/cert", &json!({"type": "cert"}))
        .await;
    let pki = Pki::new();
    let ca_pem = std::fs::read_to_string(pki.ca_pem()).expect("read test CA");
    bao.write(
        Method::POST,
        "auth/cert/certs/leasegate",
        &json!({"certificate": ca_pem, "token_policies": [policy], "token_ttl": "1h"}),
    )
    .await;
    // leasegate's own client certificate for Vault, issued by that CA.
    let own = pki.client("leasegate-vault", Identity::Cn("leasegate".into()));
    let vault_ca = bao.ca_pem.clone().expect("dev-tls CA");

    let addr = bao.addr.clone();
    let f = Fixture::with_mount(
        mount,
        pki,
        move |mut cfg| {
            cfg.vault_address = addr;
            cfg
        },
        |t| {
            set(t, "vault.ca_cert", vault_ca.display().to_string());
            let auth = table(&[
                ("method", "cert"),
                ("cert", &own.cert.display().to_string()),
                ("key", &own.key.display().to_string()),
                ("role", "leasegate"),
            ]);
            set(t, "vault.auth", auth);
        },
    )
    .await;

    let s = pg_connect(f.proxy.port, &f.pki, Some(&f.good), "readonly", "myapp")
        .await
        .expect("session with a cert-auth token");
    let user = current_user(&s).await;
    assert!(user.starts_with(&f.mount.prefix), "user {user}");
    assert_eq!(bao.leases(&f.mount, "readonly").await.len(), 1);
    assert_eq!(
        auth_renewals(&f.proxy, "login").await,
        1.0,
        "one cert login"
    );
    drop(s.client);
    let _ = s.driver.await;
    wait_all_revoked_on(bao, pg, &f.mount, Duration::from_secs(10)).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn check_config_online_with_approle_leaves_no_token_behind() {
    let bao = Target::shared();
    let mount = fresh_mount("approle-check").await;
    let approle = AppRole::create(&bao, &mount, json!({"token_ttl": "1h"})).await;
    let pki = Pki::new();
    let dir = root().tempdir("approle-check-");
    let path = ProxyConfig::new(&pki, &mount).write(dir.path(), 6432, 9187);
    let mut config: toml::Table = std::fs::read_to_string(&path)
        .expect("read config")
        .parse()
        .expect("TOML");
    set(&mut config, "vault.auth", approle.auth_table());
    std::fs::write(&path, toml::to_string(&config).expect("TOML")).expect("write config");
    let out = std::process::Command::new(BIN)
        .args(["check-config", "--online", "--config"])
        .arg(&path)
        .stdin(std::process::Stdio::null())
        .output()
        .expect("run leasegate check-config --online");
    assert!(
        out.status.success(),
        "check-config --online: {}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    assert_eq!(
        approle.live_tokens(&bao).await,
        Vec::<String>::new(),
        "the login's token was revoked again"
    );
}
