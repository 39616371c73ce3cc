//! Is this leasegate fit to serve: `check-config` reports every problem of a config at once
//! (a missing client CA, an expired server certificate, grants naming an unknown database or
//! role), `check-config --online` logs in to the real OpenBao or says Vault is unreachable,
//! and /readyz answers 503 (with /healthz 200 and clients refused with 08006) until Vault is
//! reachable, then 200.

use std::path::Path;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use tokio::net::{TcpListener, TcpStream};

use crate::harness::bao::fresh_mount;
use crate::harness::client::{Transport, current_user, pg_connect, raw_startup, tls_config};
use crate::harness::fixture::{GOOD_URI, wait_all_revoked};
use crate::harness::ops::{output_text, server_cert};
use crate::harness::pki::{Identity, Pki};
use crate::harness::proxy::{BIN, Proxy, ProxyConfig, check_config, write_secret};
use crate::harness::{closed_port, dynamic_roles, env, free_port, poll_until, root};

/// A config with four problems: a missing client CA file, an expired server certificate, a
/// grant naming an unknown database and one naming an unknown role.
fn config_with_four_problems(pki: &Pki) -> String {
    let expired = server_cert(pki, "expired-server", 0xe1, true);
    let mut cfg = ProxyConfig {
        pki: pki.clone(),
        vault_address: "http://127.0.0.1:8200".into(),
        vault_timeout: None,
        vault_token: "test-token".into(),
        login_timeout: None,
        databases: vec![crate::harness::proxy::Database {
            name: "myapp".into(),
            port: 5432,
            upstream_database: None,
            mount: "database".into(),
            roles: vec!["readonly".into()],
            connect_timeout: None,
        }],
        grants: Vec::new(),
    };
    cfg = cfg
        .grant("uri:spiffe://example.org/a", &["nosuchdb"], &["readonly"])
        .grant("uri:spiffe://example.org/b", &["myapp"], &["nosuchrole"]);
    let token_file = pki.dir().join("vault-token");
    write_secret(&token_file, "test-token\n");
    let missing_ca = pki.dir().join("missing-ca.pem");
    let toml = cfg
        .to_toml(6432, 9187, &token_file)
        .replace(
            &format!("{:?}", pki.server_cert().display().to_string()),
            &format!("{:?}", expired.cert.display().to_string()),
        )
        .replace(
            &format!("{:?}", pki.server_key().display().to_string()),
            &format!("{:?}", expired.key.display().to_string()),
        )
        .replace(
            &format!("{:?}", pki.ca_pem().display().to_string()),
            &format!("{:?}", missing_ca.display().to_string()),
        );
    assert!(
        toml.contains("expired-server.pem") && toml.contains("missing-ca.pem"),
        "{toml}"
    );
    toml
}

#[test]
fn check_config_reports_every_problem_at_once() {
    let pki = Pki::new();
    let toml = config_with_four_problems(&pki);
    let out = check_config(&toml);
    let said = output_text(&out);
    assert!(
        !out.status.success(),
        "check-config accepted:\n{toml}\nit said: {said}"
    );
    let problems = [
        ("the missing client CA file", "missing-ca.pem"),
        ("the expired server certificate", "expired-server.pem"),
        ("the grant naming an unknown database", "nosuchdb"),
        ("the grant naming an unknown role", "nosuchrole"),
    ];
    let missing: Vec<&str> = problems
        .iter()
        .filter(|(_, needle)| !said.contains(needle))
        .map(|(what, _)| *what)
        .collect();
    assert!(
        missing.is_empty(),
        "check-config should list every problem at once; it did not mention {missing:?}. \
         It said:\n{said}"
    );
    let expiry = said
        .lines()
        .find(|l| l.contains("expired-server.pem"))
        .unwrap_or_default();
    assert!(
        expiry.contains("not valid") || expiry.contains("expired"),
        "the server certificate problem should say it is expired: {expiry}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn check_config_online_logs_in_to_vault_or_says_it_is_unreachable() {
    let pki = Pki::new();
    let mount = fresh_mount("ops-online").await;
    let cfg = ProxyConfig::new(&pki, &mount).grant("cn:nobody", &["myapp"], &["readonly"]);
    let dir = root().tempdir("ops-online-");
    let path = cfg.write(dir.path(), 6432, 9187);
    let run = |path: &Path| {
        Command::new(BIN)
            .args(["check-config", "--online", "--config"])
            .arg(path)
            .stdin(Stdio::null())
            .output()
            .expect("run leasegate check-config --online")
    };
    let out = run(&path);
    assert!(
        out.status.success(),
        "--online with the real OpenBao: {}",
        output_text(&out)
    );

    let closed = ProxyConfig {
        vault_address: format!("http://127.0.0.1:{}", closed_port()),
        ..cfg
    };
    let path = closed.write(dir.path(), 6432, 9187);
    let out = run(&path);
    let said = output_text(&out);
    assert!(
        !out.status.success(),
        "--online against a closed port passed: {said}"
    );
    assert!(said.contains("Vault unreachable"), "{said}");
}

/// Forwards every TCP connection on `listener` to `to` (a Vault that "comes back").
fn forward(listener: TcpListener, to: String) -> tokio::task::JoinHandle<()> {
    tokio::spawn(async move {
        loop {
            let Ok((mut client, _)) = listener.accept().await else {
                return;
            };
            let to = to.clone();
            tokio::spawn(async move {
                if let Ok(mut server) = TcpStream::connect(&to).await {
                    let _ = tokio::io::copy_bidirectional(&mut client, &mut server).await;
                }
            });
        }
    })
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn readyz_is_503_until_vault_is_reachable_then_200() {
    let mount = fresh_mount("ops-readyz").await;
    let pki = Pki::new();
    let good = pki.client("good", Identity::Uri(GOOD_URI.into()));
    let vault_port = free_port();
    let mut cfg =
        ProxyConfig::new(&pki, &mount).grant(&format!("uri:{GOOD_URI}"), &["myapp"], &["readonly"]);
    cfg.vault_address = format!("http://127.0.0.1:{vault_port}");
    cfg.vault_timeout = Some("1s".into());
    let proxy = Proxy::start(cfg).await;

    let started = Instant::now();
    let p = &proxy;
    for _ in 0..5 {
        let (status, body) = p.get("/readyz").await.expect("/readyz");
        assert_eq!(status, 503, "Vault unreachable: not ready ({body})");
        let (health, _) = p.get("/healthz").await.expect("/healthz");
        assert_eq!(health, 200, "alive all the same");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let refused = raw_startup(
        proxy.port,
        Transport::Tls(tls_config(&pki, Some(&good))),
        "readonly",
        "myapp",
    )
    .await;
    let message = refused.expect_error("08006");
    assert!(
        message.starts_with("could not obtain credentials"),
        "{message}"
    );

    // Vault "comes back" on that address.
    let bao = env().bao.addr.trim_start_matches("http://").to_string();
    let listener = TcpListener::bind(("127.0.0.1", vault_port))
        .await
        .expect("bind the Vault address");
    let relay = forward(listener, bao);
    poll_until(
        Duration::from_secs(40),
        "/readyz 200 once Vault answers",
        || async move {
            match p.get("/readyz").await {
                Ok((200, _)) => Ok(()),
                other => Err(format!("{other:?}")),
            }
        },
    )
    .await;
    eprintln!("ready {:?} after start", started.elapsed());
    let s = pg_connect(proxy.port, &pki, Some(&good), "readonly", "myapp")
        .await
        .expect("session once Vault is reachable");
    let user = current_user(&s).await;
    assert!(user.starts_with(&mount.prefix), "user {user}");
    drop(s.client);
    let _ = s.driver.await;
    wait_all_revoked(&mount, Duration::from_secs(10)).await;
    assert!(dynamic_roles(&mount.prefix).await.is_empty());
    drop(proxy);
    relay.abort();
}
