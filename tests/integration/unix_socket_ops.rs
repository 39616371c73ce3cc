//! Operating the Unix-socket listener: SIGHUP keeps the socket (its keys wait for a restart)
//! and SIGTERM removes it; a stale socket file is replaced and a live one refused; a directory
//! that does not exist, is open to writers or belongs to another user is refused by
//! `check-config` and at startup.

use std::os::unix::fs::{MetadataExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::time::Duration;

use crate::harness::bao::fresh_mount;
use crate::harness::ops::{log_count, wait_log};
use crate::harness::pg::pg_bin;
use crate::harness::pki::Pki;
use crate::harness::proxy::{BIN, ProxyConfig, check_config, refused_start};
use crate::harness::unix::{psql_as, run, socket_dir, socket_path, start, text};
use crate::harness::{free_port, poll_until, root};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sighup_keeps_the_socket_and_shutdown_removes_it() {
    let dir = socket_dir();
    let (mut f, _) = start("unix-hup", dir.path(), None, &["unix:user=root"]).await;
    let path = socket_path(dir.path(), f.proxy.port);
    let inode = std::fs::metadata(&path).expect("socket").ino();
    let config = f.proxy.dir().join("leasegate.toml");
    let text_before = std::fs::read_to_string(&config).expect("config");
    std::fs::write(
        &config,
        text_before.replace(
            "unix_socket_dir",
            "unix_socket_mode = \"0600\"\nunix_socket_dir",
        ),
    )
    .expect("edit config");
    let before = log_count(&f.proxy, "configuration reloaded");
    f.proxy.signal("HUP");
    wait_log(&f.proxy, "configuration reloaded", before).await;
    assert!(
        f.proxy
            .log_text()
            .contains("listen.unix_socket_mode changed: takes effect after a restart"),
        "the mode is a restart key"
    );
    let meta = std::fs::metadata(&path).expect("socket kept");
    assert_eq!(
        (meta.ino(), meta.mode() & 0o777),
        (inode, 0o660),
        "the same socket, unchanged"
    );
    let out = run(psql_as(None, dir.path(), f.proxy.port, "select 1")).await;
    assert!(out.status.success(), "{:?}", text(&out));
    // The DATABASE_URL form of the socket, as README gives it.
    let url = format!(
        "postgresql://readonly@/myapp?host={}&port={}",
        dir.path().display(),
        f.proxy.port
    );
    let mut psql = tokio::process::Command::new(pg_bin("psql"));
    psql.args(["-X", "-A", "-t", "-c", "select 1"])
        .arg(&url)
        .stdin(std::process::Stdio::null());
    let out = run(psql).await;
    assert!(out.status.success(), "psql {url}: {:?}", text(&out));
    f.wait_all_revoked(Duration::from_secs(15)).await;
    let status = f
        .proxy
        .terminate(Duration::from_secs(20))
        .expect("exits on SIGTERM");
    assert!(status.success(), "{status}");
    assert!(!path.exists(), "the socket file is removed at shutdown");
}

/// A config file for leasegate on `port` with the socket in `dir`, in a fresh directory.
fn config_with_socket(
    cfg: &ProxyConfig,
    name: &str,
    dir: &Path,
    port: u16,
) -> (tempfile::TempDir, PathBuf) {
    let home = root().tempdir(name);
    let path = cfg.write(home.path(), port, free_port());
    let text = std::fs::read_to_string(&path).expect("config");
    let line = format!(
        "[listen]\nunix_socket_dir = {:?}\n",
        dir.display().to_string()
    );
    std::fs::write(&path, text.replacen("[listen]\n", &line, 1)).expect("write config");
    (home, path)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_stale_socket_is_replaced_and_a_live_one_refused() {
    let dir = socket_dir();
    let port = free_port();
    let path = socket_path(dir.path(), port);
    let live = std::os::unix::net::UnixListener::bind(&path).expect("a live socket");
    let mount = fresh_mount("unix-stale").await;
    let pki = Pki::new();
    let cfg = ProxyConfig::new(&pki, &mount).grant("unix:user=root", &["myapp"], &["readonly"]);
    let (home, config) = config_with_socket(&cfg, "unix-live-", dir.path(), port);
    let out = refused_start(&config, "a live socket in the way");
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success());
    assert!(
        stderr.contains("is in use: another server listens on it"),
        "{stderr}"
    );
    assert!(path.exists(), "the live socket is left alone");
    drop(live); // now stale: the file stays, nothing listens on it
    assert!(path.exists());

    let log = home.path().join("leasegate.log");
    let mut child = std::process::Command::new(BIN)
        .arg("--config")
        .arg(&config)
        .env("NO_COLOR", "1")
        .stdin(std::process::Stdio::null())
        .stdout(std::fs::File::create(&log).expect("log"))
        .stderr(std::fs::File::create(home.path().join("stderr.log")).expect("log"))
        .spawn()
        .expect("spawn leasegate");
    root().register("TERM", child.id(), "leasegate");
    poll_until(Duration::from_secs(20), "leasegate listening", || async {
        let text = std::fs::read_to_string(&log).unwrap_or_default()
            + &std::fs::read_to_string(home.path().join("stderr.log")).unwrap_or_default();
        if text.contains("replacing a stale unix socket")
            && text.contains("leasegate listening on ")
        {
            Ok(())
        } else {
            Err(text)
        }
    })
    .await;
    let out = run(psql_as(None, dir.path(), port, "select 1")).await;
    let _ = std::process::Command::new("kill")
        .args(["-TERM", &child.id().to_string()])
        .status();
    let status = child.wait().expect("leasegate exits");
    assert!(
        out.status.success(),
        "psql over the replaced socket: {:?}",
        text(&out)
    );
    assert!(status.success(), "{status}");
    assert!(!path.exists(), "removed at shutdown");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_missing_or_writable_socket_dir_is_refused_by_check_config_and_at_start() {
    let dir = socket_dir();
    let missing = dir.path().join("missing");
    let cfg = ProxyConfig::offline(&Pki::new());
    let (_home, config) = config_with_socket(&cfg, "unix-missing-", &missing, free_port());
    let text = std::fs::read_to_string(&config).expect("config");
    let out = check_config(&text);
    let stderr =
        String::from_utf8_lossy(&out.stderr).to_string() + &String::from_utf8_lossy(&out.stdout);
    assert!(!out.status.success(), "{stderr}");
    assert!(
        stderr.contains("listen.unix_socket_dir") && stderr.contains("does not exist"),
        "{stderr}"
    );
    let out = refused_start(&config, "a missing socket dir");
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(stderr.contains("does not exist"), "{stderr}");

    std::fs::set_permissions(dir.path(), std::fs::Permissions::from_mode(0o777)).expect("chmod");
    let (_home, config) = config_with_socket(&cfg, "unix-open-", dir.path(), free_port());
    let out = refused_start(&config, "a world-writable socket dir");
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        stderr.contains("has mode 0777") && stderr.contains("chmod go-w"),
        "{stderr}"
    );

    std::fs::set_permissions(dir.path(), std::fs::Permissions::from_mode(0o755)).expect("chmod");
    std::os::unix::fs::chown(dir.path(), Some(65534), None).expect("chown");
    let out = refused_start(&config, "a socket dir owned by another user");
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(stderr.contains("is owned by uid 65534"), "{stderr}");
    std::os::unix::fs::chown(dir.path(), Some(0), None).expect("chown back");
}
