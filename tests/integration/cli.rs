//! The command line: `leasegate check-config --config PATH` exits 0 for a good config and
//! non-zero with a message naming the problem for a bad one (needs neither PostgreSQL nor
//! Vault); the server refuses a bad config and stops on SIGTERM.

use std::process::Output;
use std::time::Duration;

use crate::harness::bao::fresh_mount;
use crate::harness::pki::Pki;
use crate::harness::proxy::{
    Database, Grant, Proxy, ProxyConfig, check_config, refused_start, run_to_exit, write_secret,
};
use crate::harness::root;

/// A complete, valid config text (certificates and token file exist).
pub(crate) fn good_toml(pki: &Pki) -> String {
    let cfg = ProxyConfig {
        pki: pki.clone(),
        vault_address: "http://127.0.0.1:8200".into(),
        vault_timeout: Some("5s".into()),
        vault_token: "test-token".into(),
        login_timeout: Some("10s".into()),
        databases: vec![Database {
            name: "myapp".into(),
            port: 5432,
            upstream_database: None,
            mount: "database".into(),
            roles: vec!["readonly".into(), "readwrite".into()],
            connect_timeout: Some("5s".into()),
        }],
        grants: vec![Grant {
            identity: "uri:spiffe://example.org/app/*".into(),
            databases: vec!["myapp".into()],
            roles: vec!["readonly".into()],
        }],
    };
    let token_file = pki.dir().join("vault-token");
    write_secret(&token_file, "test-token\n");
    cfg.to_toml(6432, 9187, &token_file)
}

fn text(out: &Output) -> String {
    format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    )
}

#[track_caller]
fn assert_rejected(toml: &str, must_mention: &str) {
    let out = check_config(toml);
    let said = text(&out);
    assert!(
        !out.status.success(),
        "check-config should fail for a config with {must_mention:?}; it said: {said}"
    );
    assert!(
        said.contains(must_mention),
        "check-config's message should name {must_mention:?}; it said: {said}"
    );
}

#[test]
fn good_config_passes() {
    let pki = Pki::new();
    let out = check_config(&good_toml(&pki));
    assert!(out.status.success(), "check-config failed: {}", text(&out));
}

#[test]
fn unknown_keys_are_rejected() {
    let pki = Pki::new();
    let good = good_toml(&pki);
    assert_rejected(
        &good.replacen("[listen]\n", "[listen]\nbogus_option = true\n", 1),
        "bogus_option",
    );
    assert_rejected(
        &good.replacen("[[databases]]\n", "[[databases]]\ncolour = \"blue\"\n", 1),
        "colour",
    );
}

#[test]
fn grant_for_unconfigured_database_is_rejected() {
    let pki = Pki::new();
    let toml = good_toml(&pki).replace(
        "databases = [\"myapp\"]\nroles = [\"readonly\"]",
        "databases = [\"nosuchdb\"]\nroles = [\"readonly\"]",
    );
    assert!(toml.contains("nosuchdb"), "the grant was rewritten");
    assert_rejected(&toml, "nosuchdb");
}

#[test]
fn bad_duration_is_rejected() {
    let pki = Pki::new();
    let toml = good_toml(&pki).replace("login_timeout = \"10s\"", "login_timeout = \"soon\"");
    assert_rejected(&toml, "login_timeout");
}

#[test]
fn nan_infinite_zero_and_negative_limits_are_rejected() {
    let pki = Pki::new();
    let good = good_toml(&pki);
    let with = |limits: &str| format!("{good}\n[limits]\n{limits}\n");
    let rate = "limits.new_sessions_per_second_per_identity must be a finite number above 0";
    for (limits, problem) in [
        ("new_sessions_per_second_per_identity = nan", rate),
        ("new_sessions_per_second_per_identity = inf", rate),
        ("new_sessions_per_second_per_identity = 0.0", rate),
        ("new_sessions_per_second_per_identity = -1.5", rate),
        ("max_sessions = 0", "limits.max_sessions must be at least 1"),
        (
            "max_sessions_per_identity = 0",
            "limits.max_sessions_per_identity must be at least 1",
        ),
        (
            "burst_per_identity = 0",
            "limits.burst_per_identity must be at least 1",
        ),
        // Negative counts do not even parse; the message names the key.
        (
            "max_sessions_per_identity = -1",
            "max_sessions_per_identity",
        ),
    ] {
        assert_rejected(&with(limits), problem);
    }
    // Every bad limit at once.
    let all = with(
        "max_sessions = 0\nmax_sessions_per_identity = 0\nburst_per_identity = 0\n\
         new_sessions_per_second_per_identity = nan",
    );
    let said = text(&check_config(&all));
    for key in [
        "limits.max_sessions ",
        "limits.max_sessions_per_identity",
        "limits.burst_per_identity",
        "limits.new_sessions_per_second_per_identity",
    ] {
        assert!(said.contains(key), "check-config should name {key}: {said}");
    }
    let out = check_config(&with(
        "max_sessions = 1\nnew_sessions_per_second_per_identity = 0.01\nburst_per_identity = 1",
    ));
    assert!(
        out.status.success(),
        "small positive limits are fine: {}",
        text(&out)
    );
}

#[test]
fn server_refuses_to_start_with_a_bad_config() {
    let pki = Pki::new();
    let dir = root().tempdir("badstart-");
    let path = dir.path().join("leasegate.toml");
    let toml = good_toml(&pki).replacen("[listen]\n", "[listen]\nbogus_option = true\n", 1);
    std::fs::write(&path, toml).expect("write config");
    let status = refused_start(&path, "an invalid config").status;
    assert!(
        !status.success(),
        "leasegate exits non-zero for an invalid config"
    );
}

#[tokio::test]
async fn sigterm_stops_an_idle_server() {
    let mount = fresh_mount("sigterm").await;
    let pki = Pki::new();
    let cfg = ProxyConfig::new(&pki, &mount).grant("cn:nobody", &["myapp"], &["readonly"]);
    let mut proxy = Proxy::start(cfg).await;
    let status = proxy
        .terminate(Duration::from_secs(5))
        .expect("leasegate exits within 5 s of SIGTERM");
    assert!(status.success(), "exit status after SIGTERM: {status}");
}

#[test]
fn a_missing_config_file_is_reported_with_its_os_error_once() {
    let dir = root().tempdir("nope-");
    let path = dir.path().join("nope.toml");
    let os_error = std::fs::read(&path)
        .expect_err("the file is missing")
        .to_string();
    let config = std::ffi::OsStr::new("--config");
    for args in [
        vec![config, path.as_os_str()],
        vec![
            std::ffi::OsStr::new("check-config"),
            config,
            path.as_os_str(),
        ],
    ] {
        let out = run_to_exit(&args, "a missing config file");
        let (status, stderr) = (
            out.status,
            String::from_utf8_lossy(&out.stderr).into_owned(),
        );
        assert!(!status.success(), "{args:?} exits non-zero: {stderr}");
        assert!(
            stderr.contains(&format!("cannot read {}", path.display())),
            "{args:?} names the file: {stderr}"
        );
        assert_eq!(
            stderr.matches(&os_error).count(),
            1,
            "{args:?} prints {os_error:?} exactly once: {stderr}"
        );
    }
}
