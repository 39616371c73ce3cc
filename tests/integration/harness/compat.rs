//! Client-compatibility support: the compatibility table every `compat_*` test contributes a
//! row to, running the external client scripts under `tests/clients/` with the connection in
//! `LG_*` environment variables, and looking up client versions.
//!
//! Table: each test writes `<target>/compat/rows/<slug>.json` (overwritten on every run, pass
//! or fail) and regenerates `<target>/compat/compat.md`, one Markdown table row per client
//! (rows of several tests of one client are merged). `<target>` is cargo's target directory;
//! `LEASEGATE_COMPAT_DIR` overrides `<target>/compat`. `scripts/compat-table.sh` copies the
//! table into README.md.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::process::{Output, Stdio};
use std::time::{Duration, Instant};

use serde_json::{Value, json};

use super::fixture::{Fixture, GOOD_URI};
use super::pki::{ClientCert, Pki};

/// The repository root.
pub fn repo() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
}

/// Directory of the compatibility table.
pub fn compat_dir() -> PathBuf {
    if let Some(dir) = std::env::var_os("LEASEGATE_COMPAT_DIR") {
        return PathBuf::from(dir);
    }
    // CARGO_TARGET_TMPDIR is <target>/tmp.
    let tmp = PathBuf::from(env!("CARGO_TARGET_TMPDIR"));
    tmp.parent().unwrap_or(&tmp).join("compat")
}

/// One test's contribution to the compatibility table. Written when dropped: `pass` unless
/// the test is panicking, then `FAIL` with the step it was in.
pub struct CompatRow {
    slug: String,
    /// Sort key of the client in the table (smaller first).
    order: u32,
    client: String,
    version: String,
    features: Vec<String>,
    step: String,
    started: Instant,
}

impl CompatRow {
    /// `slug` names the test (file name of the row), `client` the table row it merges into.
    pub fn new(slug: &str, order: u32, client: &str, version: &str) -> CompatRow {
        CompatRow {
            slug: slug.to_string(),
            order,
            client: client.to_string(),
            version: version.to_string(),
            features: Vec::new(),
            step: "setup".into(),
            started: Instant::now(),
        }
    }

    pub fn set_version(&mut self, version: &str) {
        self.version = version.to_string();
    }

    /// Starts exercising `feature`: it is listed in the row, and named if the test fails now.
    pub fn step(&mut self, feature: &str) {
        self.features.push(feature.to_string());
        self.step = feature.to_string();
    }

    /// Names what the test does now (for a failure) without listing it as a feature.
    pub fn phase(&mut self, what: &str) {
        self.step = what.to_string();
    }

    /// Lists features exercised elsewhere (e.g. by a script) without changing the step.
    pub fn features(&mut self, features: &[&str]) {
        self.features.extend(features.iter().map(|f| f.to_string()));
    }
}

impl Drop for CompatRow {
    fn drop(&mut self) {
        let failed = std::thread::panicking();
        let row = json!({
            "order": self.order,
            "client": self.client,
            "version": self.version,
            "features": self.features,
            "result": if failed { format!("FAIL ({})", self.step) } else { "pass".into() },
            "test": self.slug,
            "seconds": (self.started.elapsed().as_secs_f64() * 10.0).round() / 10.0,
        });
        if let Err(e) = write_row(&self.slug, &row) {
            eprintln!("compat table: cannot write row {}: {e}", self.slug);
        }
    }
}

fn write_row(slug: &str, row: &Value) -> std::io::Result<()> {
    let dir = compat_dir();
    let rows = dir.join("rows");
    std::fs::create_dir_all(&rows)?;
    let tmp = rows.join(format!(".{slug}.{}.tmp", std::process::id()));
    std::fs::write(&tmp, format!("{row}\n"))?;
    std::fs::rename(&tmp, rows.join(format!("{slug}.json")))?;
    let table = render_table(&rows)?;
    let tmp = dir.join(format!(".compat.md.{}.{slug}.tmp", std::process::id()));
    std::fs::write(&tmp, table)?;
    std::fs::rename(&tmp, dir.join("compat.md"))
}

/// The Markdown table of every row file in `rows`, one line per client.
pub fn render_table(rows: &Path) -> std::io::Result<String> {
    // client -> (order, versions, features, results)
    type Merged = (u64, Vec<String>, Vec<String>, Vec<String>);
    let mut by_client: BTreeMap<String, Merged> = BTreeMap::new();
    let mut files: Vec<PathBuf> = std::fs::read_dir(rows)?
        .filter_map(|e| e.ok().map(|e| e.path()))
        .filter(|p| p.extension().is_some_and(|x| x == "json"))
        .collect();
    files.sort();
    for file in files {
        let Ok(text) = std::fs::read_to_string(&file) else {
            continue;
        };
        let Ok(row) = serde_json::from_str::<Value>(&text) else {
            continue;
        };
        let client = row["client"].as_str().unwrap_or("?").to_string();
        let entry = by_client.entry(client).or_default();
        entry.0 = row["order"].as_u64().unwrap_or(99);
        let version = row["version"].as_str().unwrap_or("").to_string();
        if !version.is_empty() && !entry.1.contains(&version) {
            entry.1.push(version);
        }
        for f in row["features"].as_array().into_iter().flatten() {
            if let Some(f) = f.as_str()
                && !entry.2.iter().any(|x| x == f)
            {
                entry.2.push(f.to_string());
            }
        }
        entry
            .3
            .push(row["result"].as_str().unwrap_or("?").to_string());
    }
    let mut clients: Vec<(String, Merged)> = by_client.into_iter().collect();
    clients.sort_by(|a, b| (a.1.0, &a.0).cmp(&(b.1.0, &b.0)));
    let mut out = String::from(
        "| Client | Version | Features exercised (TLS verify-full + client certificate, unless a Unix socket) | Result |\n\
         |---|---|---|---|\n",
    );
    for (client, (_, versions, features, results)) in clients {
        let failed: Vec<&String> = results.iter().filter(|r| *r != "pass").collect();
        let result = if failed.is_empty() {
            "pass".to_string()
        } else {
            failed
                .iter()
                .map(|s| s.as_str())
                .collect::<Vec<_>>()
                .join("; ")
        };
        out.push_str(&format!(
            "| {} | {} | {} | {} |\n",
            cell(&client),
            cell(&versions.join(", ")),
            cell(&features.join("; ")),
            cell(&result)
        ));
    }
    Ok(out)
}

fn cell(s: &str) -> String {
    s.replace('|', "\\|").replace('\n', " ")
}

// ---------------------------------------------------------------- versions

/// First line of `<program> --version` (trimmed), or the error.
pub fn tool_version(program: &Path) -> String {
    match std::process::Command::new(program)
        .arg("--version")
        .stdin(Stdio::null())
        .output()
    {
        Ok(out) if out.status.success() => String::from_utf8_lossy(&out.stdout)
            .lines()
            .next()
            .unwrap_or("")
            .trim()
            .to_string(),
        Ok(out) => format!("? ({})", out.status),
        Err(e) => panic!("cannot run {} --version: {e}", program.display()),
    }
}

/// The version of crate `name` in Cargo.lock.
pub fn locked_crate_version(name: &str) -> String {
    let lock = std::fs::read_to_string(repo().join("Cargo.lock")).unwrap_or_default();
    let mut lines = lock.lines();
    while let Some(line) = lines.next() {
        if line.trim() == format!("name = \"{name}\"")
            && let Some(v) = lines
                .next()
                .and_then(|l| l.trim().strip_prefix("version = "))
        {
            return v.trim_matches('"').to_string();
        }
    }
    "?".into()
}

// ---------------------------------------------------------------- external client scripts

/// `LG_*` variables describing a leasegate connection for the client scripts.
pub fn client_env(
    port: u16,
    pki: &Pki,
    cert: &ClientCert,
    user: &str,
    db: &str,
) -> Vec<(String, String)> {
    let path = |p: &Path| p.display().to_string();
    vec![
        ("LG_HOST".into(), "localhost".into()),
        ("LG_HOSTADDR".into(), "127.0.0.1".into()),
        ("LG_PORT".into(), port.to_string()),
        ("LG_DBNAME".into(), db.into()),
        ("LG_USER".into(), user.into()),
        ("LG_SSLROOTCERT".into(), path(pki.ca_pem())),
        ("LG_SSLCERT".into(), path(&cert.cert)),
        ("LG_SSLKEY".into(), path(&cert.key)),
    ]
}

/// What a client script reported.
#[derive(Debug)]
pub struct ScriptRun {
    /// The script, for messages.
    pub what: String,
    /// Exit status 0.
    pub success: bool,
    /// Exit status as text.
    pub status: String,
    /// The last line of stdout that parses as a JSON object (`Null` if none).
    pub result: Value,
    pub stdout: String,
    pub stderr: String,
    pub elapsed: Duration,
}

impl ScriptRun {
    /// Panics with the script's output unless it exited 0 with a JSON result line.
    #[track_caller]
    pub fn assert_ok(&self) {
        if !self.success || self.result.is_null() {
            panic!(
                "{} failed ({}) after {:?}\n--- stdout ---\n{}\n--- stderr ---\n{}",
                self.what, self.status, self.elapsed, self.stdout, self.stderr
            );
        }
    }

    /// Prints the run, lists `features` (check name → feature) in `row` (a check the script
    /// skipped is left out), names the failed checks as the row's phase, and asserts that the
    /// script passed and every listed check is there and ok. Returns the checks.
    pub fn report(
        &self,
        row: &mut CompatRow,
        features: &[(&str, &str)],
    ) -> &serde_json::Map<String, Value> {
        eprintln!(
            "{} ({:?}): {}\n{}",
            self.what,
            self.elapsed,
            self.stdout.trim(),
            self.stderr.trim()
        );
        for (name, feature) in features {
            if self.result["checks"][*name].get("skipped").is_none() {
                row.features(&[feature]);
            }
        }
        let failed = self.failed_checks();
        if !failed.is_empty() {
            row.phase(&failed.join(", "));
        }
        self.assert_ok();
        let checks = self.result["checks"]
            .as_object()
            .unwrap_or_else(|| panic!("{}: no checks object: {:#}", self.what, self.result));
        for (name, _) in features {
            let c = checks
                .get(*name)
                .unwrap_or_else(|| panic!("check {name} missing: {:#}", self.result));
            assert_eq!(c["ok"], true, "check {name}: {c:#}");
        }
        checks
    }

    /// Names of the checks in `result.checks` whose `ok` is not true.
    pub fn failed_checks(&self) -> Vec<String> {
        self.result["checks"]
            .as_object()
            .map(|checks| {
                checks
                    .iter()
                    .filter(|(_, c)| c["ok"] != true)
                    .map(|(name, _)| name.clone())
                    .collect()
            })
            .unwrap_or_default()
    }
}

/// Panics unless check `name` of a script's report names a dynamic role of `f`'s mount as its
/// `session_user` (the client logged in as the grant name and ran as a role leasegate got).
#[track_caller]
pub fn assert_dynamic_role(checks: &serde_json::Map<String, Value>, name: &str, f: &Fixture) {
    assert!(
        checks[name]["session_user"]
            .as_str()
            .is_some_and(|u| u.starts_with(&f.mount.prefix)),
        "{name}: the session ran as a dynamic role of this mount: {:#}",
        checks[name]
    );
}

/// Every upstream connection of the fixture's sessions was closed at ReadyForQuery: none as
/// busy (a busy close means a statement was still running, or leasegate's request and
/// ReadyForQuery counts went wrong, e.g. after a COPY over the extended protocol).
pub async fn assert_no_busy_closes(f: &Fixture) {
    let (busy, _) = upstream_closes(f).await;
    assert_eq!(busy, 0.0, "upstream connections closed while busy");
}

/// `leasegate_upstream_closes_total` of the fixture's proxy: (closed busy, closed idle).
pub async fn upstream_closes(f: &Fixture) -> (f64, f64) {
    let closes = |how| super::security::counter(&f.proxy, "leasegate_upstream_closes_total", how);
    (
        closes(&[("how", "busy")]).await,
        closes(&[("how", "idle")]).await,
    )
}

/// The end a client script that cancelled shares: its `cancels` CancelRequests went upstream,
/// every lease of the fixture was revoked, and every upstream connection was closed at
/// ReadyForQuery (the cancelled statements had ended): none as busy.
pub async fn assert_cancels_forwarded_and_clean_end(f: &Fixture, cancels: f64) {
    let forwarded = [("result", "forwarded")];
    super::security::wait_counter(
        &f.proxy,
        "leasegate_cancel_requests_total",
        &forwarded,
        cancels,
    )
    .await;
    f.wait_all_revoked(Duration::from_secs(15)).await;
    assert_no_busy_closes(f).await;
}

/// A fixture whose test client (the `GOOD_URI` certificate) may use role `readwrite` on
/// `myapp`: what every client script connects as.
pub async fn client_fixture(name: &str) -> Fixture {
    Fixture::start_with(name, |cfg| {
        cfg.grant(&format!("uri:{GOOD_URI}"), &["myapp"], &["readwrite"])
    })
    .await
}

/// Runs `program script` (script relative to the repository) against `f`'s proxy as its test
/// client with role `readwrite` on `myapp` (the `LG_*` variables of [`client_env`]).
pub async fn run_client(f: &Fixture, program: &str, script: &str, limit: Duration) -> ScriptRun {
    let mut cmd = tokio::process::Command::new(program);
    cmd.arg(repo().join(script)).env("PYTHONUNBUFFERED", "1");
    for (k, v) in client_env(f.proxy.port, &f.pki, &f.good, "readwrite", "myapp") {
        cmd.env(k, v);
    }
    let name = script.rsplit('/').next().unwrap_or(script);
    run_script(cmd, name, limit).await
}

/// Runs a client script to completion (`timeout` bounds it). The caller checks the outcome:
/// records versions from the JSON line first, then calls [`ScriptRun::assert_ok`].
pub async fn run_script(
    mut cmd: tokio::process::Command,
    what: &str,
    timeout: Duration,
) -> ScriptRun {
    cmd.stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .kill_on_drop(true);
    let started = Instant::now();
    let child = cmd
        .spawn()
        .unwrap_or_else(|e| panic!("cannot start {what}: {e}"));
    let out: Output = tokio::time::timeout(timeout, child.wait_with_output())
        .await
        .unwrap_or_else(|_| panic!("{what} did not finish within {timeout:?}"))
        .unwrap_or_else(|e| panic!("{what}: {e}"));
    let stdout = String::from_utf8_lossy(&out.stdout).into_owned();
    let result = stdout
        .lines()
        .rev()
        .filter_map(|l| serde_json::from_str::<Value>(l.trim()).ok())
        .find(Value::is_object)
        .unwrap_or(Value::Null);
    ScriptRun {
        what: what.to_string(),
        success: out.status.success(),
        status: out.status.to_string(),
        result,
        stdout,
        stderr: String::from_utf8_lossy(&out.stderr).into_owned(),
        elapsed: started.elapsed(),
    }
}

/// Panics unless `python3` can import psycopg (3.x), naming the install command.
pub fn require_psycopg() {
    let out = std::process::Command::new("python3")
        .args(["-c", "import psycopg; print(psycopg.__version__)"])
        .stdin(Stdio::null())
        .output();
    match out {
        Ok(o) if o.status.success() => {}
        Ok(o) => panic!(
            "psycopg 3 is not installed for python3 ({}). Install it with \
             `pip install -r tests/clients/python/requirements.txt`",
            String::from_utf8_lossy(&o.stderr).trim()
        ),
        Err(e) => panic!(
            "python3 is not available ({e}); install Python 3, then \
             `pip install -r tests/clients/python/requirements.txt`"
        ),
    }
}

/// Panics unless `node` runs and `tests/clients/node/node_modules/pg` is installed, naming
/// the install command.
pub fn require_node_pg() {
    match std::process::Command::new("node")
        .arg("--version")
        .stdin(Stdio::null())
        .output()
    {
        Ok(o) if o.status.success() => {}
        Ok(o) => panic!(
            "`node --version` failed ({}); install Node.js ≥ 18",
            o.status
        ),
        Err(e) => panic!(
            "Node.js is not available ({e}); install Node.js ≥ 18 (Debian: apt-get install nodejs npm), \
             then `npm ci --prefix tests/clients/node`"
        ),
    }
    let pg = repo().join("tests/clients/node/node_modules/pg/package.json");
    assert!(
        pg.exists(),
        "the Node.js `pg` driver is not installed ({} is missing). Install it with \
         `npm ci --prefix tests/clients/node`",
        pg.display()
    );
}

/// Whether a client a test needs is installed. When it is not, prints why and how to install
/// it and returns false, so the test skips that client (scripts/test.sh installs every client;
/// with `LEASEGATE_COMPAT_STRICT=1` a missing client fails the test instead).
pub fn client_available(client: &str, probe: std::io::Result<Output>, install: &str) -> bool {
    let why = match &probe {
        Ok(o) if o.status.success() => return true,
        Ok(o) => format!(
            "{}: {}",
            o.status,
            String::from_utf8_lossy(&o.stderr).trim()
        ),
        Err(e) => e.to_string(),
    };
    let message = format!("{client} is not installed ({why}); install it with: {install}");
    assert!(
        std::env::var_os("LEASEGATE_COMPAT_STRICT").is_none(),
        "{message}"
    );
    eprintln!("SKIPPED: {message}");
    false
}

/// The `__version__` of Python module `module` for `python3`, or None (the test skips, see
/// [`client_available`]) when it cannot be imported.
pub fn python_module(module: &str, install: &str) -> Option<String> {
    let probe = std::process::Command::new("python3")
        .args([
            "-c",
            &format!("import {module}; print({module}.__version__)"),
        ])
        .stdin(Stdio::null())
        .output();
    let version = probe
        .as_ref()
        .map(|o| String::from_utf8_lossy(&o.stdout).trim().to_string())
        .unwrap_or_default();
    client_available(&format!("Python module {module}"), probe, install).then_some(version)
}
