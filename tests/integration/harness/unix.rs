//! Helpers of the Unix-socket tests (`unix_socket`, `unix_socket_ops`): a socket directory
//! every user can traverse, a leasegate with the socket there and `unix:` grants, psql over
//! the socket as another OS user (runuser), and the audit lines.

use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::process::Output;
use std::time::Duration;

use serde_json::Value;

use super::fixture::Fixture;
use super::proxy::set;
use super::root;

/// OS user outside every grant and outside the socket's group.
pub const OUTSIDER: &str = "nobody";

/// A directory for the socket that every user can traverse and only root can write to.
pub fn socket_dir() -> tempfile::TempDir {
    let dir = tempfile::Builder::new()
        .prefix("lg-sock-")
        .tempdir_in("/tmp")
        .expect("socket dir");
    std::fs::set_permissions(dir.path(), std::fs::Permissions::from_mode(0o755)).expect("chmod");
    dir
}

/// A leasegate with the socket in `dir` (mode `mode` if given), the `unix:` grants given
/// (readonly on myapp), and the audit log in a file.
pub async fn start(
    name: &str,
    dir: &Path,
    mode: Option<&str>,
    grants: &[&str],
) -> (Fixture, PathBuf) {
    let audit = root().tempdir("unix-audit-").keep().join("audit.log");
    let audit_path = audit.display().to_string();
    let dir_text = dir.display().to_string();
    let grants: Vec<String> = grants.iter().map(|g| g.to_string()).collect();
    let mode = mode.map(str::to_owned);
    let f = Fixture::start_edited(
        name,
        |mut cfg| {
            for g in &grants {
                cfg = cfg.grant(g, &["myapp"], &["readonly"]);
            }
            cfg
        },
        |t| {
            set(t, "listen.unix_socket_dir", dir_text);
            if let Some(mode) = mode {
                set(t, "listen.unix_socket_mode", mode);
            }
            set(t, "audit.path", audit_path);
        },
    )
    .await;
    (f, audit)
}

pub fn socket_path(dir: &Path, port: u16) -> PathBuf {
    dir.join(format!(".s.PGSQL.{port}"))
}

/// psql over the socket, as `os_user` (via runuser) or as root.
pub fn psql_as(os_user: Option<&str>, dir: &Path, port: u16, sql: &str) -> tokio::process::Command {
    let conninfo = format!(
        "host={} port={port} dbname=myapp user=readonly",
        dir.display()
    );
    super::client::psql_command_as(os_user, &conninfo, sql)
}

pub async fn run(mut cmd: tokio::process::Command) -> Output {
    tokio::time::timeout(Duration::from_secs(60), cmd.output())
        .await
        .expect("client finished within 60 s")
        .expect("run client")
}

pub fn text(out: &Output) -> (String, String) {
    (
        String::from_utf8_lossy(&out.stdout).trim().to_string(),
        String::from_utf8_lossy(&out.stderr).trim().to_string(),
    )
}

pub fn audit_events(audit: &Path) -> Vec<Value> {
    std::fs::read_to_string(audit)
        .unwrap_or_default()
        .lines()
        .map(|l| serde_json::from_str(l).expect("audit line is JSON"))
        .collect()
}
