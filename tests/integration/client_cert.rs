//! `scripts/client-cert.sh` against OpenBao's PKI secrets engine: a person gets a short-lived
//! client certificate for their identity (a URI SAN allowed by the PKI role), written where
//! libpq looks (`~/.postgresql/postgresql.crt`, `postgresql.key` mode 0600, `root.crt`), and
//! psql then connects through leasegate with `sslmode=verify-full` and no certificate
//! arguments. An identity the PKI role does not allow gets Vault's refusal and no files.

use std::os::unix::fs::PermissionsExt;
use std::process::Stdio;
use std::time::Duration;

use serde_json::json;

use crate::harness::bao::{ROOT_TOKEN, write};
use crate::harness::compat::repo;
use crate::harness::fixture::Fixture;
use crate::harness::pg::pg_bin;
use crate::harness::proxy::set;
use crate::harness::{env, next_id, root};

const USER_URI: &str = "spiffe://leasegate.test/user/alice";

/// A fresh PKI mount with a root CA and a role `person` that issues client certificates for
/// URIs under `spiffe://leasegate.test/user/`; returns (mount, CA PEM).
async fn pki_mount() -> (String, String) {
    let mount = format!("pki-client-{}", next_id());
    let post = reqwest::Method::POST;
    write(
        post.clone(),
        &format!("sys/mounts/{mount}"),
        &json!({"type": "pki", "config": {"max_lease_ttl": "24h"}}),
    )
    .await;
    let root = write(
        post.clone(),
        &format!("{mount}/root/generate/internal"),
        &json!({"common_name": "leasegate test people CA", "ttl": "24h", "key_type": "ec"}),
    )
    .await;
    let ca = root["data"]["certificate"]
        .as_str()
        .expect("CA certificate")
        .to_string();
    write(
        post,
        &format!("{mount}/roles/person"),
        &json!({
            "allow_any_name": true,
            "enforce_hostnames": false,
            "allowed_uri_sans": ["spiffe://leasegate.test/user/*"],
            "server_flag": false,
            "client_flag": true,
            "key_type": "ec",
            "key_bits": 256,
            "max_ttl": "1h",
        }),
    )
    .await;
    (mount, ca)
}

fn client_cert(
    home: &std::path::Path,
    mount: &str,
    uri: &str,
    ca: &std::path::Path,
) -> tokio::process::Command {
    let mut cmd = tokio::process::Command::new(repo().join("scripts/client-cert.sh"));
    cmd.args([
        "--mount", mount, "--role", "person", "--cn", "alice", "--uri", uri, "--ttl", "10m",
    ])
    .arg("--ca")
    .arg(ca)
    .env("HOME", home)
    .env("VAULT_ADDR", &env().bao.addr)
    .env("VAULT_TOKEN", ROOT_TOKEN)
    .stdin(Stdio::null())
    .stdout(Stdio::piped())
    .stderr(Stdio::piped())
    .kill_on_drop(true);
    cmd
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_certificate_from_the_pki_engine_lets_psql_connect_with_verify_full_alone() {
    let (mount, people_ca) = pki_mount().await;
    let files = root().tempdir("client-cert-");
    // leasegate trusts its own test CA and the people CA.
    let client_ca = files.path().join("client-ca.pem");
    let f = Fixture::start_edited(
        "client-cert",
        |cfg| {
            let mut bundle = std::fs::read_to_string(cfg.pki.ca_pem()).expect("test CA");
            bundle.push_str(&people_ca);
            std::fs::write(&client_ca, bundle).expect("write client CA bundle");
            cfg.grant(&format!("uri:{USER_URI}"), &["myapp"], &["readonly"])
        },
        |t| set(t, "listen.client_ca", client_ca.display().to_string()),
    )
    .await;
    let home = files.path().join("home");
    std::fs::create_dir(&home).expect("home");

    let refused = client_cert(
        &home,
        &mount,
        "spiffe://elsewhere.test/user/mallory",
        f.pki.ca_pem(),
    )
    .output()
    .await
    .expect("run client-cert.sh");
    let stderr = String::from_utf8_lossy(&refused.stderr);
    assert!(
        !refused.status.success(),
        "an identity the role does not allow is refused"
    );
    assert!(
        stderr.contains("Vault refused") && stderr.contains("HTTP 400"),
        "{stderr}"
    );
    assert!(
        !home.join(".postgresql/postgresql.key").exists(),
        "nothing written"
    );

    let out = client_cert(&home, &mount, USER_URI, f.pki.ca_pem())
        .output()
        .await
        .expect("run client-cert.sh");
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "{stdout}\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let dir = home.join(".postgresql");
    let mode =
        |p: &std::path::Path| std::fs::metadata(p).expect("stat").permissions().mode() & 0o777;
    assert_eq!(mode(&dir), 0o700);
    assert_eq!(
        mode(&dir.join("postgresql.key")),
        0o600,
        "libpq refuses a key others can read"
    );
    assert!(dir.join("postgresql.crt").exists() && dir.join("root.crt").exists());

    let conninfo = format!(
        "host=localhost hostaddr=127.0.0.1 port={} dbname=myapp user=readonly sslmode=verify-full",
        f.proxy.port
    );
    let mut psql = tokio::process::Command::new(pg_bin("psql"));
    psql.args(["-X", "-A", "-t", "-c", "select current_user"])
        .arg(conninfo)
        .env("HOME", &home)
        .env("PGCONNECT_TIMEOUT", "15")
        .env_remove("PGSSLCERT")
        .env_remove("PGSSLKEY")
        .env_remove("PGSSLROOTCERT")
        .stdin(Stdio::null());
    let out = tokio::time::timeout(Duration::from_secs(60), psql.output())
        .await
        .expect("psql finished")
        .expect("run psql");
    let user = String::from_utf8_lossy(&out.stdout).trim().to_string();
    assert!(
        out.status.success(),
        "psql: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(user.starts_with(&f.mount.prefix), "a dynamic role: {user}");
    let log = f.proxy.log_text();
    assert!(
        log.contains(&format!("\"uri:{USER_URI}\"")),
        "the audit line names the PKI identity"
    );
    f.wait_all_revoked(Duration::from_secs(15)).await;
}
