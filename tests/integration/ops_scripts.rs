//! deploy/openbao-setup.sh and deploy/openbao-approle.sh run as an operator runs them, against
//! the real OpenBao and PostgreSQL: the database secrets engine is set up and verified, the
//! AppRole login is created (a second run keeps the secret_id, the files are 0600), and
//! leasegate logs in with those files and serves a session.

use std::path::Path;
use std::process::{Command, Stdio};
use std::time::Duration;

use serde_json::json;

use crate::harness::bao::{Mount, ROOT_TOKEN, Target, leases};
use crate::harness::client::{current_user, pg_connect};
use crate::harness::fixture::Fixture;
use crate::harness::ops::{output_text, repo};
use crate::harness::pg::pg_bin;
use crate::harness::pki::Pki;
use crate::harness::proxy::{set, table};
use crate::harness::{env, next_id, root};

/// Runs a deploy/ script with `envs`; panics with its output unless it succeeds.
fn run_script(script: &str, envs: &[(&str, String)]) -> String {
    let pg_dir = pg_bin("psql")
        .parent()
        .expect("PGBIN directory")
        .to_path_buf();
    let path = std::env::join_paths(std::iter::once(pg_dir).chain(std::env::split_paths(
        &std::env::var_os("PATH").unwrap_or_default(),
    )))
    .expect("PATH");
    let out = Command::new("bash")
        .arg(repo(script))
        .env("PATH", path)
        .env_remove("VAULT_TOKEN")
        .env_remove("VAULT_ADDR")
        .envs(envs.iter().map(|(k, v)| (k, v)))
        .stdin(Stdio::null())
        .output()
        .unwrap_or_else(|e| panic!("run {script}: {e}"));
    let said = output_text(&out);
    assert!(out.status.success(), "{script} failed:\n{said}");
    said
}

/// `VAULT_ADDR`, `VAULT_TOKEN` (root) and `MOUNT`: what both scripts read.
type Vars = Vec<(&'static str, String)>;

/// deploy/openbao-setup.sh: the database secrets engine on `mount`, as an operator sets it
/// up against the shared PostgreSQL; the script verifies the readonly role itself.
fn run_openbao_setup(vault: &Vars, mount: &Mount) {
    let env = env();
    let mut setup = vault.clone();
    setup.extend([
        ("PGHOST", "127.0.0.1".to_string()),
        ("PGPORT", env.pg.port.to_string()),
        ("PGUSER", "postgres".to_string()),
        ("PGPASSWORD", env.pg.password.clone()),
        ("PGDATABASE", "myapp".to_string()),
        ("USERNAME_PREFIX", mount.prefix.clone()),
    ]);
    let said = run_script("deploy/openbao-setup.sh", &setup);
    assert!(said.contains("verified readonly"), "{said}");
}

/// deploy/openbao-approle.sh, twice: the second run keeps the secret_id; both files are
/// 0600.
fn run_openbao_approle_twice(vault: &Vars, approle_mount: &str, role_id: &Path, secret_id: &Path) {
    let mut approle = vault.clone();
    approle.extend([
        ("APPROLE_MOUNT", approle_mount.to_string()),
        ("ROLE_ID_FILE", role_id.display().to_string()),
        ("SECRET_ID_FILE", secret_id.display().to_string()),
        ("TOKEN_PERIOD", "1h".to_string()),
    ]);
    let said = run_script("deploy/openbao-approle.sh", &approle);
    assert!(said.contains("periodic token"), "{said}");
    let first = std::fs::read_to_string(secret_id).expect("secret_id file");
    let said = run_script("deploy/openbao-approle.sh", &approle);
    assert!(said.contains("still valid, keeping it"), "{said}");
    assert_eq!(
        std::fs::read_to_string(secret_id).expect("secret_id file"),
        first,
        "a second run keeps the secret_id"
    );
    for file in [role_id, secret_id] {
        use std::os::unix::fs::PermissionsExt;
        let mode = std::fs::metadata(file).expect("stat").permissions().mode() & 0o777;
        assert_eq!(mode, 0o600, "{} mode {mode:o}", file.display());
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn openbao_scripts_set_up_an_approle_login_that_leasegate_uses() {
    let n = next_id();
    let mount = Mount {
        name: format!("t{n}-ops-approle"),
        prefix: format!("lgt{n}_"),
    };
    let approle_mount = format!("approle-t{n}");
    let secrets = root().tempdir("ops-approle-");
    let role_id_file = secrets.path().join("role-id");
    let secret_id_file = secrets.path().join("secret-id");
    let vault: Vars = vec![
        ("VAULT_ADDR", env().bao.addr.clone()),
        ("VAULT_TOKEN", ROOT_TOKEN.to_string()),
        ("MOUNT", mount.name.clone()),
    ];
    run_openbao_setup(&vault, &mount);
    run_openbao_approle_twice(&vault, &approle_mount, &role_id_file, &secret_id_file);
    let bao = Target::shared();
    let role = bao
        .read(&format!("auth/{approle_mount}/role/leasegate"))
        .await;
    assert_eq!(role["data"]["token_period"], json!(3600), "{role}");
    assert_eq!(
        role["data"]["token_policies"],
        json!([format!("leasegate-{}", mount.name)]),
        "{role}"
    );

    // leasegate logs in with those files and serves a session.
    let (rid, sid) = (
        role_id_file.display().to_string(),
        secret_id_file.display().to_string(),
    );
    let f = Fixture::with_mount(
        mount,
        Pki::new(),
        |cfg| cfg,
        |t| {
            let auth = table(&[
                ("method", "approle"),
                ("mount", &approle_mount),
                ("role_id_file", &rid),
                ("secret_id_file", &sid),
            ]);
            set(t, "vault.auth", auth);
        },
    )
    .await;
    let (ready, _) = f.proxy.get("/readyz").await.expect("/readyz");
    assert_eq!(ready, 200, "ready with the AppRole token");
    let s = pg_connect(f.proxy.port, &f.pki, Some(&f.good), "readonly", "myapp")
        .await
        .expect("session with an AppRole token");
    let user = current_user(&s).await;
    assert!(user.starts_with(&f.mount.prefix), "user {user}");
    assert_eq!(leases(&f.mount, "readonly").await.len(), 1);
    drop(s.client);
    let _ = s.driver.await;
    f.wait_all_revoked(Duration::from_secs(10)).await;
}
