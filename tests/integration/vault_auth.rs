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
use crate::harness::proxy::{Proxy, set, table};
use crate::harness::{dynamic_roles, env, next_id, poll_until, root};

/// What leasegate needs on `mount`, and nothing else.
fn policy_hcl(mount: &Mount) -> String {
    format!(
        r#"path "{}/creds/*" {{ capabilities = ["read"] }}
path "sys/leases/renew" {{ capabilities = ["update"] }}
path "sys/leases/revoke" {{ capabilities = ["update"] }}
path "auth/token/renew-self" {{ capabilities = ["update"] }}
path "auth/token/lookup-self" {{ capabilities = ["read"] }}
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

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn approle_token_with_short_ttl_is_renewed_and_its_leases_live_on() {
    let bao = Target::shared();
    let mount = fresh_mount("approle").await;
    let n = next_id();
    let (auth_mount, policy) = (format!("approle-t{n}"), format!("leasegate-t{n}"));
    bao.put_policy(&policy, &policy_hcl(&mount)).await;
    bao.write(
        Method::POST,
        &format!("sys/auth/{auth_mount}"),
        &json!({"type": "approle"}),
    )
    .await;
    bao.write(
        Method::POST,
        &format!("auth/{auth_mount}/role/leasegate"),
        &json!({"token_policies": [policy], "token_ttl": "3s", "token_max_ttl": "1h"}),
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

    let f = Fixture::with_mount(
        mount,
        Pki::new(),
        |cfg| cfg,
        |t| {
            let auth = table(&[
                ("method", "approle"),
                ("mount", &auth_mount),
                ("role_id", &role_id),
                ("secret_id_file", &secret_file.display().to_string()),
            ]);
            set(t, "vault.auth", auth);
        },
    )
    .await;

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
