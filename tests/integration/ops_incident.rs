//! Incident response through the admin socket (`[admin] socket`): `sessions list` shows the
//! live sessions with their facts (JSON lines and the psql-style table); `sessions end`
//! ends exactly the sessions it matches (by identity pattern, by id), each client sees FATAL
//! 57P01 with the operator's reason, its role and lease are gone within 2 s, the others go
//! on; nothing matched exits 1; a caller whose uid is not leasegate's is refused, by the
//! socket's permissions and, where those would allow it, by the SO_PEERCRED check itself;
//! `listen.end_sessions_on_revoke` ends what a reload no longer grants (and without it a
//! reload ends nothing); `leases check` finds a lease leasegate's token created outside any
//! session, and `--revoke` revokes it, while a lease issued before leasegate's token existed
//! is reported and left alone; a session ended mid-query leaves no backend; the socket is
//! created 0600, a live one kept, a stale one replaced, the file removed at shutdown.

use std::path::{Path, PathBuf};
use std::process::Output;
use std::time::Duration;

use serde_json::Value;
use tempfile::TempDir;

use crate::harness::bao::{leases, read_creds};
use crate::harness::client::tls_config;
use crate::harness::fixture::{Fixture, GOOD_URI};
use crate::harness::ops::{config_path, edit_config, log_count, output_text, reload};
use crate::harness::pg::dynamic_roles;
use crate::harness::pki::{ClientCert, Identity};
use crate::harness::proxy::{BIN, set};
use crate::harness::security::counter;
use crate::harness::wire::{PROTOCOL_3_0, Tls, Wire, first_error, tls_connect};
use crate::harness::{poll_until, root, set_mode};

const OTHER_URI: &str = "spiffe://leasegate.test/app/other";

/// A fixture whose leasegate has an admin socket (and `other` granted `readwrite`);
/// `edit` may change more of the config.
struct Incident {
    f: Fixture,
    other: ClientCert,
    /// Holds the socket (0755, so that another uid may reach the socket file itself).
    dir: TempDir,
}

impl Incident {
    async fn start(name: &str, edit: impl FnOnce(&mut toml::Table)) -> Incident {
        Incident::start_as(name, None, edit).await
    }

    /// As [`Incident::start`], logged in to Vault with `token` (default: the root token).
    async fn start_as(
        name: &str,
        token: Option<String>,
        edit: impl FnOnce(&mut toml::Table),
    ) -> Incident {
        let dir = root().tempdir("admin-");
        let socket = dir.path().join("admin.sock");
        let f = Fixture::start_edited(
            name,
            |mut cfg| {
                if let Some(token) = token {
                    cfg.vault_token = token;
                }
                cfg.grant(&format!("uri:{OTHER_URI}"), &["myapp"], &["readwrite"])
            },
            |t| {
                set(t, "admin.socket", socket.display().to_string());
                edit(t);
            },
        )
        .await;
        let other = f.pki.client("other", Identity::Uri(OTHER_URI.into()));
        Incident { f, other, dir }
    }

    fn socket(&self) -> PathBuf {
        self.dir.path().join("admin.sock")
    }

    /// A relaying raw session of `cert` as `role` on `myapp`.
    async fn open(&self, cert: &ClientCert, role: &str) -> Wire<Tls> {
        let stream = tls_connect(self.f.proxy.port, tls_config(&self.f.pki, Some(cert)))
            .await
            .expect("TLS connection to leasegate");
        let mut wire = Wire::new(stream);
        let login = wire
            .startup(PROTOCOL_3_0, &[("user", role), ("database", "myapp")])
            .await
            .expect("startup through leasegate");
        assert_eq!(
            login.messages.last().map(|m| m.tag),
            Some(b'Z'),
            "{login:?}"
        );
        wire
    }

    /// `leasegate ARGS --config <the proxy's config>`, run to its end.
    async fn console(&self, args: &[&str]) -> Output {
        run(config_path(&self.f.proxy).as_path(), args, None).await
    }

    /// `sessions list --json`, parsed.
    async fn list(&self) -> Vec<Value> {
        let out = self.console(&["sessions", "list", "--json"]).await;
        assert!(out.status.success(), "{}", output_text(&out));
        String::from_utf8_lossy(&out.stdout)
            .lines()
            .map(|l| serde_json::from_str(l).expect("one JSON object per line"))
            .collect()
    }

    /// The listed session of `uri`.
    async fn row_of(&self, uri: &str) -> Value {
        let rows = self.list().await;
        let identity = format!("uri:{uri}");
        rows.into_iter()
            .find(|r| r["identities"][0] == identity.as_str())
            .unwrap_or_else(|| panic!("no session of {uri} listed"))
    }
}

/// `leasegate_admin_requests_total{command,result}`.
async fn admin_count(f: &Fixture, command: &str, result: &str) -> f64 {
    let labels = [("command", command), ("result", result)];
    counter(&f.proxy, "leasegate_admin_requests_total", &labels).await
}

/// `leasegate_sessions_ended_total{reason}`.
async fn ended_count(f: &Fixture, reason: &str) -> f64 {
    counter(
        &f.proxy,
        "leasegate_sessions_ended_total",
        &[("reason", reason)],
    )
    .await
}

/// Runs the leasegate CLI with `args` and `--config config`, as `uid` if given.
async fn run(config: &Path, args: &[&str], uid: Option<u32>) -> Output {
    let mut cmd = tokio::process::Command::new(BIN);
    cmd.args(args)
        .arg("--config")
        .arg(config)
        .env("NO_COLOR", "1");
    if let Some(uid) = uid {
        cmd.uid(uid).gid(uid);
    }
    tokio::time::timeout(Duration::from_secs(60), cmd.output())
        .await
        .expect("the console answers within 60 s")
        .expect("run the leasegate console")
}

async fn current_user(wire: &mut Wire<Tls>) -> String {
    let users = wire.query_column("select current_user::text").await;
    users[0].clone().expect("a current user")
}

/// The client of an ended session reads FATAL 57P01 with `message`, then the close.
async fn assert_ended(wire: &mut Wire<Tls>, message: &str) {
    let seen = wire
        .closed_within(Duration::from_secs(15))
        .await
        .expect("leasegate closes the ended session");
    let error = first_error(&seen).expect("an ErrorResponse before the close");
    assert_eq!(
        error.get(&'S').map(String::as_str),
        Some("FATAL"),
        "{error:?}"
    );
    assert_eq!(
        error.get(&'C').map(String::as_str),
        Some("57P01"),
        "{error:?}"
    );
    assert_eq!(
        error.get(&'M').map(String::as_str),
        Some(message),
        "{error:?}"
    );
}

/// Within 2 s of its end, the session's role is gone from pg_roles and its lease from Vault.
async fn assert_gone_within_2s(i: &Incident, user: &str, row: &Value) {
    let (mount, prefix) = (&i.f.mount, i.f.mount.prefix.clone());
    let role = row["role"].as_str().expect("role").to_owned();
    let lease = row["lease_id"].as_str().expect("lease id").to_owned();
    let (role, lease, user) = (&role, &lease, user);
    poll_until(
        Duration::from_secs(2),
        "the ended session's role and lease gone",
        || {
            let prefix = prefix.clone();
            async move {
                let roles = dynamic_roles(&prefix).await;
                let held = leases(mount, role).await;
                let lease_held = held.iter().any(|l| lease.ends_with(l.as_str()));
                if roles.iter().any(|r| r == user) || lease_held {
                    Err(format!("roles {roles:?}, leases of {role}: {held:?}"))
                } else {
                    Ok(())
                }
            }
        },
    )
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sessions_list_shows_each_session_with_its_facts_as_json_and_as_a_table() {
    let i = Incident::start("ops-incident-list", |_| {}).await;
    let mut good = i.open(&i.f.good, "readonly").await;
    let mut other = i.open(&i.other, "readwrite").await;
    let (good_user, other_user) = (
        current_user(&mut good).await,
        current_user(&mut other).await,
    );
    other.simple_query("begin").await.expect("begin");

    let rows = i.list().await;
    assert_eq!(rows.len(), 2, "two sessions, nothing else: {rows:?}");
    for (uri, user, role, state) in [
        (GOOD_URI, &good_user, "readonly", "idle"),
        (OTHER_URI, &other_user, "readwrite", "in transaction"),
    ] {
        let row = i.row_of(uri).await;
        assert_eq!(row["kind"], "session", "{row}");
        assert_eq!(row["transport"], "tls", "{row}");
        assert!(
            row["client_addr"]
                .as_str()
                .is_some_and(|a| a.starts_with("127.0.0.1:")),
            "{row}"
        );
        let cn = uri.rsplit('/').next().unwrap_or_default();
        let identities = serde_json::json!([format!("uri:{uri}"), format!("cn:{cn}")]);
        assert_eq!(row["identities"], identities, "every identity: {row}");
        assert_eq!(row["database"], "myapp", "{row}");
        assert_eq!(row["role"], role, "{row}");
        assert_eq!(
            row["upstream_user"],
            user.as_str(),
            "the role the session runs as: {row}"
        );
        let lease = row["lease_id"].as_str().expect("lease id");
        let held = leases(&i.f.mount, role).await;
        assert!(
            held.iter().any(|l| lease.ends_with(l.as_str())),
            "{lease} in {held:?}"
        );
        assert!(
            row["started"].as_str().is_some_and(|t| t.ends_with('Z')),
            "{row}"
        );
        assert!(row["lease_expires"].is_string(), "{row}");
        assert!(row["bytes_to_upstream"].as_u64() > Some(0), "{row}");
        assert!(row["bytes_to_client"].as_u64() > Some(0), "{row}");
        assert_eq!(row["state"], state, "{row}");
    }

    let out = i.console(&["sessions", "list"]).await;
    assert!(out.status.success(), "{}", output_text(&out));
    let table = String::from_utf8_lossy(&out.stdout).into_owned();
    let lines: Vec<&str> = table.lines().collect();
    assert!(
        lines[0].starts_with(" id |  kind   | transport |"),
        "{table}"
    );
    assert!(lines[1].starts_with("----+---------+"), "{table}");
    assert_eq!(lines.last().copied(), Some("(2 rows)"), "{table}");
    let good_row = i.row_of(GOOD_URI).await;
    let lease = good_row["lease_id"].as_str().expect("lease id");
    let line = lines
        .iter()
        .find(|l| l.contains(&format!("uri:{GOOD_URI}")))
        .expect("the good session's line");
    assert!(
        line.contains(&format!("| {} |", &lease[lease.len() - 8..])),
        "{line}"
    );
    assert!(
        !line.contains(lease),
        "the table shows the lease id's last 8 characters: {line}"
    );
    assert!(
        line.contains(&good_user) && line.contains("| idle"),
        "{line}"
    );
    assert_eq!(
        counter(
            &i.f.proxy,
            "leasegate_admin_requests_total",
            &[("command", "sessions_list"), ("result", "ok")]
        )
        .await,
        5.0,
        "every request counted: four JSON lists, one table"
    );
    good.terminate().await;
    other.terminate().await;
    i.f.wait_all_revoked(Duration::from_secs(10)).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sessions_end_by_identity_ends_only_the_matching_session_and_revokes_at_once() {
    let i = Incident::start("ops-incident-end", |_| {}).await;
    let mut good = i.open(&i.f.good, "readonly").await;
    let mut other = i.open(&i.other, "readwrite").await;
    let other_user = current_user(&mut other).await;
    let row = i.row_of(OTHER_URI).await;

    let out = i
        .console(&[
            "sessions",
            "end",
            "--identity",
            "uri:spiffe://leasegate.test/app/oth*",
            "--database",
            "myapp",
            "--reason",
            "key leaked",
        ])
        .await;
    assert!(out.status.success(), "{}", output_text(&out));
    let printed = String::from_utf8_lossy(&out.stdout).into_owned();
    assert_eq!(printed.lines().count(), 1, "{printed}");
    assert!(
        printed.contains(&format!("ended session {}", row["id"])),
        "{printed}"
    );
    assert!(
        printed.contains(OTHER_URI) && printed.contains("readwrite"),
        "{printed}"
    );

    assert_ended(&mut other, "terminated by the operator: key leaked").await;
    assert_gone_within_2s(&i, &other_user, &row).await;
    assert_eq!(good.query_column("select 1").await, [Some("1".to_owned())]);
    let rows = i.list().await;
    assert_eq!(rows.len(), 1, "{rows:?}");
    assert_eq!(rows[0]["identities"][0], format!("uri:{GOOD_URI}"));
    assert_eq!(ended_count(&i.f, "operator").await, 1.0);
    assert_eq!(ended_count(&i.f, "client").await, 0.0);
    let log = i.f.proxy.log_text();
    let audited = log.lines().any(|l| {
        l.contains("\"event\":\"admin_request\"")
            && l.contains("\"command\":\"sessions_end\"")
            && l.contains("\"caller_uid\":0")
            && l.contains("key leaked")
    });
    assert!(
        audited,
        "the request is audited with the caller's uid:\n{log}"
    );
    let end_line = "\"reason\":\"ended_by_leasegate: terminated by the operator: key leaked\"";
    assert!(
        log.lines()
            .any(|l| l.contains("\"event\":\"session_end\"") && l.contains(end_line)),
        "the session's end line names the operator's reason:\n{log}"
    );
    good.terminate().await;
    i.f.wait_all_revoked(Duration::from_secs(10)).await;
    assert_eq!(
        ended_count(&i.f, "client").await,
        1.0,
        "every session end counts once"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sessions_end_by_id_and_nothing_matched_exits_1() {
    let i = Incident::start("ops-incident-id", |_| {}).await;
    let mut good = i.open(&i.f.good, "readonly").await;
    let user = current_user(&mut good).await;
    let row = i.row_of(GOOD_URI).await;
    let id = row["id"].as_u64().expect("id").to_string();

    for args in [
        &["sessions", "end", "--id", "999999"][..],
        &[
            "sessions",
            "end",
            "--identity",
            "uri:spiffe://leasegate.test/app/nobody",
        ],
        &[
            "sessions",
            "end",
            "--identity",
            &format!("uri:{GOOD_URI}"),
            "--role",
            "readwrite",
        ],
    ] {
        let out = i.console(args).await;
        assert_eq!(
            out.status.code(),
            Some(1),
            "{args:?}: {}",
            output_text(&out)
        );
        assert!(
            output_text(&out).contains("no session matched"),
            "{}",
            output_text(&out)
        );
    }
    let bad = i
        .console(&["sessions", "end", "--identity", "spiffe:no-kind"])
        .await;
    assert_eq!(bad.status.code(), Some(1), "{}", output_text(&bad));
    assert!(
        output_text(&bad).contains("--identity"),
        "{}",
        output_text(&bad)
    );
    assert_eq!(
        good.query_column("select 1").await,
        [Some("1".to_owned())],
        "untouched"
    );

    let out = i.console(&["sessions", "end", "--id", &id]).await;
    assert!(out.status.success(), "{}", output_text(&out));
    assert_ended(&mut good, "terminated by the operator: no reason given").await;
    assert_gone_within_2s(&i, &user, &row).await;
    assert_eq!(
        (
            admin_count(&i.f, "sessions_end", "no_match").await,
            admin_count(&i.f, "sessions_end", "bad_request").await,
            admin_count(&i.f, "sessions_end", "ok").await
        ),
        (3.0, 1.0, 1.0)
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_caller_of_another_uid_is_refused_by_the_file_mode_and_by_its_peer_uid() {
    let i = Incident::start("ops-incident-uid", |_| {}).await;
    let mut good = i.open(&i.f.good, "readonly").await;
    let socket = i.socket();
    let mode = std::fs::metadata(&socket)
        .map(|m| std::os::unix::fs::PermissionsExt::mode(&m.permissions()));
    assert_eq!(mode.ok().map(|m| m & 0o777), Some(0o600), "created 0600");
    // The console reads only `[admin] socket`: a config `nobody` may read.
    set_mode(i.dir.path(), 0o755).expect("chmod the socket's directory");
    let config = i.dir.path().join("console.toml");
    std::fs::write(
        &config,
        format!("[admin]\nsocket = {:?}\n", socket.display().to_string()),
    )
    .expect("write console.toml");
    set_mode(&config, 0o644).expect("chmod console.toml");
    const NOBODY: u32 = 65534;

    let out = run(&config, &["sessions", "list"], Some(NOBODY)).await;
    assert_eq!(out.status.code(), Some(1), "{}", output_text(&out));
    assert!(
        output_text(&out).contains("permission denied"),
        "{}",
        output_text(&out)
    );

    // Were the file open to everyone, the peer's uid still decides.
    set_mode(&socket, 0o666).expect("chmod the socket");
    let before = log_count(&i.f.proxy, "\"event\":\"admin_refused\"");
    for args in [&["sessions", "list"][..], &["sessions", "end", "--id", "1"]] {
        let out = run(&config, args, Some(NOBODY)).await;
        assert_eq!(out.status.code(), Some(1), "{}", output_text(&out));
        let text = output_text(&out);
        assert!(
            text.contains("refused by leasegate") && text.contains("uid 65534"),
            "{text}"
        );
    }
    assert_eq!(
        good.query_column("select 1").await,
        [Some("1".to_owned())],
        "not ended"
    );
    assert_eq!(
        (
            admin_count(&i.f, "sessions_list", "refused").await,
            admin_count(&i.f, "sessions_end", "refused").await
        ),
        (1.0, 1.0)
    );
    let log = i.f.proxy.log_text();
    let lines: Vec<&str> = log
        .lines()
        .filter(|l| l.contains("\"event\":\"admin_refused\"") && l.contains("\"caller_uid\":65534"))
        .collect();
    assert_eq!(
        (lines.len(), before),
        (2, 0),
        "each refusal audited with the uid:\n{log}"
    );
    // The owner (root here) is still served.
    assert_eq!(i.list().await.len(), 1);
    good.terminate().await;
}

/// Removes the `[[grants]]` entry of `identity` from the running config.
fn remove_grant(i: &Incident, identity: &str) {
    edit_config(&i.f.proxy, |t| {
        let grants = t
            .get_mut("grants")
            .and_then(|g| g.as_array_mut())
            .expect("grants");
        grants.retain(|g| g.get("identity").and_then(|v| v.as_str()) != Some(identity));
    });
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn end_sessions_on_revoke_ends_what_the_reload_no_longer_grants() {
    let i = Incident::start("ops-incident-revoke", |t| {
        set(t, "listen.end_sessions_on_revoke", true);
    })
    .await;
    let mut good = i.open(&i.f.good, "readonly").await;
    let mut other = i.open(&i.other, "readwrite").await;
    let other_user = current_user(&mut other).await;
    let row = i.row_of(OTHER_URI).await;

    remove_grant(&i, &format!("uri:{OTHER_URI}"));
    reload(&i.f.proxy, "configuration reloaded").await;
    assert_ended(&mut other, "terminated by the operator: grant removed").await;
    assert_gone_within_2s(&i, &other_user, &row).await;
    assert_eq!(
        good.query_column("select 1").await,
        [Some("1".to_owned())],
        "still granted"
    );
    let ended = counter(
        &i.f.proxy,
        "leasegate_sessions_ended_total",
        &[("reason", "grant_removed")],
    );
    assert_eq!(ended.await, 1.0);
    good.terminate().await;
    i.f.wait_all_revoked(Duration::from_secs(10)).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn by_default_a_reload_that_removes_a_grant_ends_no_open_session() {
    let i = Incident::start("ops-incident-norevoke", |_| {}).await;
    let mut other = i.open(&i.other, "readwrite").await;
    remove_grant(&i, &format!("uri:{OTHER_URI}"));
    reload(&i.f.proxy, "configuration reloaded").await;
    assert_eq!(
        other.query_column("select 1").await,
        [Some("1".to_owned())],
        "open sessions go on"
    );
    assert_eq!(i.list().await.len(), 1);
    let ended = counter(
        &i.f.proxy,
        "leasegate_sessions_ended_total",
        &[("reason", "grant_removed")],
    );
    assert_eq!(ended.await, 0.0);
    other.terminate().await;
    i.f.wait_all_revoked(Duration::from_secs(10)).await;
}

/// `leases check --json [--revoke]`, parsed.
async fn check(i: &Incident, revoke: bool) -> Value {
    let mut args = vec!["leases", "check", "--json"];
    if revoke {
        args.push("--revoke");
    }
    let out = i.console(&args).await;
    assert!(out.status.success(), "{}", output_text(&out));
    serde_json::from_slice(&out.stdout).expect("leases check answers JSON")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn leases_check_finds_and_revokes_a_lease_no_session_holds() {
    // A short vault.timeout: a lease younger than it is never judged (a creds call may be
    // answering for it).
    let i = Incident::start("ops-incident-leases", |t| set(t, "vault.timeout", "1s")).await;
    let mut good = i.open(&i.f.good, "readonly").await;
    let held = i.row_of(GOOD_URI).await["lease_id"]
        .as_str()
        .expect("lease")
        .to_owned();
    // Issued with leasegate's token (the dev root token), outside any session: what a
    // SIGKILLed instance sharing the token leaves behind.
    let orphan = read_creds(&i.f.mount, "readwrite").await;

    let last = std::sync::Mutex::new(Value::Null);
    poll_until(Duration::from_secs(10), "the orphan lease judged", || {
        let (i, last, orphan) = (&i, &last, &orphan.lease_id);
        async move {
            let found = check(i, false).await;
            let unheld = found["unheld"].as_array().cloned().unwrap_or_default();
            let judged = match unheld.iter().find(|u| u["lease_id"] == orphan.as_str()) {
                Some(u) if u["ours"] == true => Ok(()),
                other => Err(format!("{other:?} in {found}")),
            };
            *last.lock().expect("lock") = found;
            judged
        }
    })
    .await;
    let found = last.into_inner().expect("lock");
    assert_eq!(found["listed"], 2, "{found}");
    assert_eq!(found["held"], 1, "the session's lease is held: {found}");
    let unheld = found["unheld"].as_array().expect("unheld");
    assert_eq!(unheld.len(), 1, "{found}");
    assert!(unheld.iter().all(|u| u["lease_id"] != held.as_str()));
    assert_eq!(
        unheld[0]["revoked"], false,
        "reported only, without --revoke"
    );
    assert!(
        dynamic_roles(&i.f.mount.prefix)
            .await
            .contains(&orphan.username)
    );

    let revoked = check(&i, true).await;
    let unheld = revoked["unheld"].as_array().expect("unheld");
    assert_eq!(unheld.len(), 1, "{revoked}");
    assert_eq!(unheld[0]["revoked"], true, "{revoked}");
    let lease_suffix = orphan
        .lease_id
        .rsplit('/')
        .next()
        .unwrap_or_default()
        .to_owned();
    assert!(
        !leases(&i.f.mount, "readwrite")
            .await
            .contains(&lease_suffix)
    );
    assert!(
        !dynamic_roles(&i.f.mount.prefix)
            .await
            .contains(&orphan.username)
    );
    assert_eq!(
        good.query_column("select 1").await,
        [Some("1".to_owned())],
        "held: untouched"
    );
    assert_eq!(check(&i, false).await["unheld"], serde_json::json!([]));

    let out = i.console(&["leases", "check"]).await;
    let text = String::from_utf8_lossy(&out.stdout).into_owned();
    assert!(
        text.starts_with("1 leases under 2 paths: 1 held by this instance, 0 not held"),
        "{text}"
    );
    good.terminate().await;
    i.f.wait_all_revoked(Duration::from_secs(10)).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_console_says_when_there_is_no_admin_socket() {
    let f = Fixture::start("ops-incident-nosocket").await;
    let out = run(&config_path(&f.proxy), &["sessions", "list"], None).await;
    assert_eq!(out.status.code(), Some(1), "{}", output_text(&out));
    assert!(
        output_text(&out).contains("has no [admin] socket"),
        "{}",
        output_text(&out)
    );
    let dir = root().tempdir("nosocket-");
    let config = dir.path().join("console.toml");
    let socket = dir.path().join("admin.sock");
    std::fs::write(
        &config,
        format!("[admin]\nsocket = {:?}\n", socket.display().to_string()),
    )
    .expect("write console.toml");
    let out = run(&config, &["sessions", "list"], None).await;
    assert_eq!(out.status.code(), Some(1), "{}", output_text(&out));
    assert!(
        output_text(&out).contains("no admin socket at"),
        "{}",
        output_text(&out)
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_missing_socket_directory_is_a_startup_error() {
    let mount = crate::harness::bao::fresh_mount("ops-incident-nodir").await;
    let pki = crate::harness::pki::Pki::new();
    let cfg = crate::harness::proxy::ProxyConfig::new(&pki, &mount);
    let dir = root().tempdir("nodir-");
    let ports = (crate::harness::free_port(), crate::harness::free_port());
    let path = cfg.write(dir.path(), ports.0, ports.1);
    let missing = dir.path().join("missing");
    let mut text = std::fs::read_to_string(&path).expect("read config");
    text.push_str(&format!(
        "\n[admin]\nsocket = {:?}\n",
        missing.join("admin.sock").display().to_string()
    ));
    std::fs::write(&path, text).expect("write config");
    let out = crate::harness::proxy::refused_start(&path, "an admin socket in a missing directory");
    assert!(!out.status.success(), "{}", output_text(&out));
    let want = format!("directory {} does not exist", missing.display());
    assert!(output_text(&out).contains(&want), "{}", output_text(&out));
    let checked = crate::harness::proxy::run_to_exit(
        &[
            "check-config".as_ref(),
            "--config".as_ref(),
            path.as_os_str(),
        ],
        "check-config",
    );
    assert_eq!(checked.status.code(), Some(1), "{}", output_text(&checked));
    assert!(
        output_text(&checked).contains(&want),
        "{}",
        output_text(&checked)
    );
}

/// Waits until `sessions list` shows `n` rows of `kind` (pooled: no id, role `readonly`,
/// state `waiting`, a lease Vault lists), then checks the table form shows them too.
async fn wait_pooled_rows(i: &Incident, kind: &str, n: usize) {
    let mount = &i.f.mount;
    poll_until(
        Duration::from_secs(15),
        &format!("{n} {kind} rows listed"),
        || async move {
            let rows = i.list().await;
            let held = leases(mount, "readonly").await;
            let listed = rows
                .iter()
                .filter(|r| {
                    r["kind"] == kind
                        && r["id"].is_null()
                        && r["role"] == "readonly"
                        && r["state"] == "waiting"
                        && r["upstream_user"].is_string()
                        && r["lease_id"]
                            .as_str()
                            .is_some_and(|l| held.iter().any(|h| l.ends_with(h.as_str())))
                })
                .count();
            if listed == n {
                Ok(())
            } else {
                Err(format!("{rows:?}, leases {held:?}"))
            }
        },
    )
    .await;
    let out = i.console(&["sessions", "list"]).await;
    let table = String::from_utf8_lossy(&out.stdout).into_owned();
    let cell = format!("| {kind} ");
    let shown = table
        .lines()
        .filter(|l| l.contains(&cell) && l.contains("| waiting"))
        .count();
    assert_eq!(shown, n, "{table}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn prefetched_credentials_are_listed_as_such() {
    let i = Incident::start("ops-incident-prefetch", |t| {
        let mut pools = toml::Table::new();
        pools.insert("readonly".into(), 1.into());
        set(t, "databases.0.prefetch", pools);
    })
    .await;
    wait_pooled_rows(&i, "prefetched", 1).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn warm_sessions_are_listed_as_such() {
    let i = Incident::start("ops-incident-warm", |t| {
        let mut warm = toml::Table::new();
        warm.insert("readonly".into(), 2.into());
        set(t, "databases.0.warm", warm);
    })
    .await;
    wait_pooled_rows(&i, "warm", 2).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_live_socket_is_kept_a_stale_one_replaced_and_the_file_removed_at_shutdown() {
    let mut i = Incident::start("ops-incident-socket", |_| {}).await;
    let socket = i.socket();
    // A second instance (other ports) on the same socket: refused, the first keeps it.
    let mut second = crate::harness::ops::read_config(&i.f.proxy);
    let port = || format!("127.0.0.1:{}", crate::harness::free_port());
    set(&mut second, "listen.address", port());
    set(&mut second, "metrics.address", port());
    let path = i.f.proxy.dir().join("second.toml");
    std::fs::write(&path, toml::to_string(&second).expect("toml")).expect("write second.toml");
    let out = crate::harness::proxy::refused_start(&path, "a second instance on a live socket");
    assert!(
        output_text(&out).contains("another process is listening on it"),
        "{}",
        output_text(&out)
    );
    assert_eq!(i.list().await.len(), 0, "the first instance still answers");

    // SIGKILL leaves the file behind; the next start replaces it.
    i.f.proxy.kill();
    assert!(socket.exists(), "a stale socket stays after SIGKILL");
    let cfg = crate::harness::proxy::ProxyConfig::new(&i.f.pki, &i.f.mount).grant(
        &format!("uri:{GOOD_URI}"),
        &["myapp"],
        &["readonly"],
    );
    let socket_text = socket.display().to_string();
    let mut next = crate::harness::proxy::Proxy::start_edited(cfg, |t| {
        set(t, "admin.socket", socket_text);
    })
    .await;
    let out = run(&config_path(&next), &["sessions", "list"], None).await;
    assert!(out.status.success(), "{}", output_text(&out));
    assert!(next.log_text().contains("replacing a stale admin socket"));
    assert!(
        next.terminate(Duration::from_secs(20)).is_some(),
        "leasegate exits on SIGTERM"
    );
    assert!(!socket.exists(), "the socket file is removed at shutdown");
}

/// `pg_stat_activity.state` of backend `pid`, if it exists.
async fn backend_state(pid: i32) -> Option<String> {
    let su = crate::harness::env().pg.superuser().await;
    let row = su
        .query_opt(
            "select coalesce(state, '') from pg_stat_activity where pid = $1",
            &[&pid],
        )
        .await
        .expect("query pg_stat_activity");
    row.map(|r| r.get(0))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_session_ended_mid_query_leaves_no_backend() {
    let i = Incident::start("ops-incident-busy", |_| {}).await;
    // Its revocation only drops the role: nothing but leasegate's close ends the backend.
    crate::harness::bao::Target::shared()
        .set_role_without_terminate(&i.f.mount, "readonly")
        .await;
    let mut w = i.open(&i.f.good, "readonly").await;
    let pid: i32 = w.query_column("select pg_backend_pid()::text").await[0]
        .as_deref()
        .and_then(|p| p.parse().ok())
        .expect("backend pid");
    let query = crate::harness::wire::query_message("select pg_sleep(300)");
    w.send(&query).await.expect("send the query");
    poll_until(
        Duration::from_secs(10),
        "the query running",
        || async move {
            match backend_state(pid).await.as_deref() {
                Some("active") => Ok(()),
                other => Err(format!("{other:?}")),
            }
        },
    )
    .await;
    let row = i.row_of(GOOD_URI).await;
    assert_eq!(row["state"], "active", "{row}");
    let id = row["id"].as_u64().expect("id").to_string();

    let out = i
        .console(&["sessions", "end", "--id", &id, "--reason", "runaway query"])
        .await;
    assert!(out.status.success(), "{}", output_text(&out));
    assert_ended(&mut w, "terminated by the operator: runaway query").await;
    poll_until(
        Duration::from_secs(5),
        "the busy backend gone",
        || async move {
            match backend_state(pid).await {
                None => Ok(()),
                Some(state) => Err(format!("backend {pid} still there: {state}")),
            }
        },
    )
    .await;
    i.f.wait_all_revoked(Duration::from_secs(10)).await;
    let busy = counter(
        &i.f.proxy,
        "leasegate_upstream_closes_total",
        &[("how", "busy")],
    )
    .await;
    assert_eq!(busy, 1.0, "cancelled first, then closed");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn leases_check_leaves_alone_a_lease_older_than_leasegates_token() {
    let mount = crate::harness::bao::fresh_mount("ops-incident-oldlease").await;
    // Issued with another token (root) before leasegate's token existed: not its token's.
    let old = read_creds(&mount, "readonly").await;
    let issued_second = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .expect("clock")
        .as_secs();
    // The token's creation time counts whole seconds: wait for the next one.
    poll_until(Duration::from_secs(3), "the next second", || async move {
        let now = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH);
        match now.map(|d| d.as_secs()) {
            Ok(s) if s > issued_second => Ok(()),
            other => Err(format!("{other:?}")),
        }
    })
    .await;
    let token = crate::harness::bao::Target::shared()
        .write(
            reqwest::Method::POST,
            "auth/token/create",
            &serde_json::json!({"ttl": "1h", "display_name": "ops-incident"}),
        )
        .await["auth"]["client_token"]
        .as_str()
        .expect("client_token")
        .to_owned();
    let dir = root().tempdir("admin-");
    let socket = dir.path().join("admin.sock").display().to_string();
    let pki = crate::harness::pki::Pki::new();
    let mut cfg = crate::harness::proxy::ProxyConfig::new(&pki, &mount);
    cfg.vault_token = token;
    cfg.vault_timeout = Some("1s".into());
    let proxy =
        crate::harness::proxy::Proxy::start_edited(cfg, |t| set(t, "admin.socket", socket)).await;
    let config = config_path(&proxy);
    // Once older than vault.timeout, the lease is judged by its age against the token's.
    let judged = std::sync::Mutex::new(Value::Null);
    poll_until(Duration::from_secs(10), "the old lease judged", || {
        let (config, judged) = (&config, &judged);
        async move {
            let out = run(config, &["leases", "check", "--json"], None).await;
            let found: Value = serde_json::from_slice(&out.stdout).map_err(|e| e.to_string())?;
            let recent = found["unheld"][0]["recent"].clone();
            *judged.lock().expect("lock") = found;
            if recent == false {
                Ok(())
            } else {
                Err(format!("recent: {recent}"))
            }
        }
    })
    .await;
    let found = judged.into_inner().expect("lock");
    let unheld = found["unheld"].as_array().expect("unheld");
    assert_eq!(unheld.len(), 1, "{found}");
    assert_eq!(unheld[0]["lease_id"], old.lease_id.as_str(), "{found}");
    assert_eq!(unheld[0]["ours"], false, "issued before the token: {found}");
    let out = run(&config, &["leases", "check", "--revoke"], None).await;
    let text = String::from_utf8_lossy(&out.stdout).into_owned();
    assert!(text.contains("left alone: not this token's"), "{text}");
    let suffix = old
        .lease_id
        .rsplit('/')
        .next()
        .unwrap_or_default()
        .to_owned();
    assert!(
        leases(&mount, "readonly").await.contains(&suffix),
        "left in Vault by --revoke"
    );
    crate::harness::bao::revoke(&old.lease_id).await;
}
