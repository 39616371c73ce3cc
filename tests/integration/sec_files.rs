//! Secret files: every file that holds a secret (the server key, the cluster peer key,
//! leasegate's Vault client key, the Vault token file, the AppRole secret-ID file, and the
//! configuration file itself when it holds a token inline) is refused when every user can read
//! it, and named in a warning when its group can; `check-config` lists every such file at
//! once, and the server refuses to start. The AppRole role-ID file only gets a warning.

use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};

use crate::harness::pki::{Identity, Pki};
use crate::harness::proxy::{BIN, ProxyConfig, refused_start, set, table, write_secret};
use crate::harness::{root, set_mode};

fn text(out: &Output) -> String {
    format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    )
}

fn check_config_at(path: &Path) -> Output {
    Command::new(BIN)
        .args(["check-config", "--config"])
        .arg(path)
        .env("RUST_LOG", "warn")
        .env("NO_COLOR", "1")
        .stdin(Stdio::null())
        .output()
        .expect("run leasegate check-config")
}

/// Writes a config naming one file of every secret kind (all in `dir`, mode 0600), with an
/// inline token as well; returns the config path and (key, file) of each secret file.
fn config_with_every_secret_file(pki: &Pki, dir: &Path) -> (PathBuf, Vec<(&'static str, PathBuf)>) {
    let cfg = ProxyConfig::offline(pki).grant("cn:app", &["myapp"], &["readonly"]);
    let token_file = dir.join("vault-token");
    let config_path = dir.join("leasegate.toml");
    let mut t: toml::Table = cfg
        .to_toml(6432, 9187, &token_file)
        .parse()
        .expect("generated config is TOML");
    let listen_key = dir.join("server-key.pem");
    std::fs::copy(pki.server_key(), &listen_key).expect("copy server key");
    let peer = pki.client("peer", Identity::Dns("peer.leasegate.test".into()));
    let vault_client = pki.client("vault-client", Identity::Cn("leasegate".into()));
    let (secret_id, role_id) = (dir.join("secret-id"), dir.join("role-id"));
    write_secret(&token_file, "test-token\n");
    write_secret(&secret_id, "test-secret-id\n");
    write_secret(&role_id, "test-role-id\n");
    let s = |p: &Path| p.display().to_string();
    set(&mut t, "listen.key", s(&listen_key));
    set(
        &mut t,
        "cluster",
        table(&[
            ("peer_identity", "dns:peer.leasegate.test"),
            ("cert", &s(&peer.cert)),
            ("key", &s(&peer.key)),
            ("ca_cert", &s(pki.ca_pem())),
        ]),
    );
    set(
        &mut t,
        "cluster.peers",
        toml::Value::Array(vec!["localhost:1".into()]),
    );
    set(
        &mut t,
        "vault.auth",
        table(&[
            ("method", "cert"),
            ("cert", &s(&vault_client.cert)),
            ("key", &s(&vault_client.key)),
            ("token_file", &s(&token_file)),
            ("token", "inline-test-token"),
            ("secret_id_file", &s(&secret_id)),
            ("role_id_file", &s(&role_id)),
        ]),
    );
    write_secret(
        &config_path,
        &toml::to_string(&t).expect("serialise config"),
    );
    let files = vec![
        ("listen.key", listen_key),
        ("cluster.key", peer.key.clone()),
        ("vault.auth.key", vault_client.key.clone()),
        ("vault.auth.token_file", token_file),
        ("vault.auth.secret_id_file", secret_id),
        (
            "the configuration file (it holds vault.auth.token)",
            config_path.clone(),
        ),
        ("vault.auth.role_id_file", role_id),
    ];
    (config_path, files)
}

/// The `  - ` lines of check-config's "invalid configuration" list.
fn problems(said: &str) -> Vec<&str> {
    said.lines()
        .filter_map(|l| l.trim_start().strip_prefix("- "))
        .collect()
}

#[test]
fn check_config_names_every_world_readable_secret_file() {
    let pki = Pki::new();
    let dir = root().tempdir("sec-files-");
    let (config, files) = config_with_every_secret_file(&pki, dir.path());
    let out = check_config_at(&config);
    assert!(out.status.success(), "all 0600: valid: {}", text(&out));
    assert!(
        !text(&out).contains("readable by"),
        "no warning: {}",
        text(&out)
    );

    for (_, path) in &files {
        set_mode(path, 0o644).expect("chmod 644");
    }
    let out = check_config_at(&config);
    let said = text(&out);
    assert!(
        !out.status.success(),
        "world-readable secrets accepted: {said}"
    );
    let listed = problems(&said);
    for (key, path) in &files {
        let named = listed
            .iter()
            .any(|l| l.starts_with(key) && l.contains(&path.display().to_string()));
        let shown = format!("{key}: {}", path.display());
        if *key == "vault.auth.role_id_file" {
            assert!(!named, "the role ID file is only warned about: {said}");
            assert!(
                said.lines()
                    .any(|l| l.contains(" WARN ") && l.contains(&shown)),
                "warning for {key}: {said}"
            );
        } else {
            assert!(
                named,
                "check-config should name {key} ({}): {said}",
                path.display()
            );
            let line = listed.iter().find(|l| l.starts_with(key)).unwrap_or(&"");
            assert!(
                line.contains("readable by every user") && line.contains("chmod 600"),
                "{line}"
            );
        }
    }

    for (_, path) in &files {
        set_mode(path, 0o640).expect("chmod 640");
    }
    let out = check_config_at(&config);
    let said = text(&out);
    assert!(
        out.status.success(),
        "group-readable: warnings only: {said}"
    );
    for (key, path) in &files {
        let shown = format!("{key}: {}", path.display());
        assert!(
            said.lines()
                .any(|l| l.contains(" WARN ") && l.contains(&shown) && l.contains("group")),
            "a warning should name {key}: {said}"
        );
    }
}

#[test]
fn the_server_refuses_to_start_with_a_world_readable_token_file() {
    let pki = Pki::new();
    let dir = root().tempdir("sec-files-start-");
    let cfg = ProxyConfig::offline(&pki).grant("cn:app", &["myapp"], &["readonly"]);
    let config = cfg.write(
        dir.path(),
        crate::harness::free_port(),
        crate::harness::free_port(),
    );
    let token_file = dir.path().join("vault-token");
    set_mode(&token_file, 0o644).expect("chmod 644");
    let out = refused_start(&config, "a world-readable token file");
    let status = out.status;
    let said = String::from_utf8_lossy(&out.stderr);
    assert!(!status.success(), "exit status {status}: {said}");
    assert!(
        said.contains(&format!("vault.auth.token_file: {}", token_file.display()))
            && said.contains("readable by every user"),
        "{said}"
    );
}
