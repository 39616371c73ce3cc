//! Shared integration-test harness.
//!
//! One PostgreSQL 15 cluster and one OpenBao dev server are started lazily, once per test
//! binary, and shared by every test. Each test then gets its own Vault mount (fresh role
//! prefix), its own PKI and its own `leasegate` process, so tests never see each other's
//! roles, leases or metrics.
//!
//! Statics are never dropped in a test binary, so cleanup is done by a detached watchdog
//! shell process that waits for the test process to exit, then stops every process listed
//! in the registry file and removes the scratch directory.

pub mod bao;
pub mod client;
pub mod compat;
pub mod fake_vault;
pub mod fixture;
pub mod metrics;
pub mod ops;
pub mod pg;
pub mod pki;
pub mod proxy;
pub mod security;
pub mod wire;

use std::fs::OpenOptions;
use std::future::Future;
use std::io::Write;
use std::net::TcpListener;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::OnceLock;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use std::os::unix::process::CommandExt;

pub use bao::{fresh_mount, leases};
pub use pg::dynamic_roles;

/// The scratch directory of this test binary and the registry of processes to stop.
pub struct Root {
    /// Everything the harness writes lives below this directory (removed by the watchdog).
    pub path: PathBuf,
    /// Lines `SIGNAL PID NAME`: processes the watchdog stops when the test binary is gone.
    registry: PathBuf,
}

/// The shared external services.
pub struct Env {
    pub pg: pg::Pg,
    pub bao: bao::Bao,
}

static ROOT: OnceLock<Result<Root, String>> = OnceLock::new();
static ENV: OnceLock<Result<Env, String>> = OnceLock::new();

/// The scratch root (created on first use, together with the cleanup watchdog).
pub fn root() -> &'static Root {
    match ROOT.get_or_init(Root::create) {
        Ok(root) => root,
        Err(e) => panic!("test harness: cannot create scratch directory: {e}"),
    }
}

/// PostgreSQL and OpenBao, started on first use.
pub fn env() -> &'static Env {
    let started = ENV.get_or_init(|| {
        let root = root();
        // Fail fast (before initdb) when OpenBao is not installed.
        let bao_bin = bao::binary()?;
        let pg = pg::Pg::start(root)?;
        let bao = bao::Bao::start(root, &bao_bin)?;
        Ok(Env { pg, bao })
    });
    match started {
        Ok(env) => env,
        Err(e) => panic!("test harness: cannot start PostgreSQL/OpenBao: {e}"),
    }
}

impl Root {
    fn create() -> Result<Root, String> {
        let dir = tempfile::Builder::new()
            .prefix("leasegate-it-")
            .tempdir_in("/tmp")
            .map_err(|e| format!("tempdir: {e}"))?;
        let path = dir.keep();
        // PostgreSQL runs as another OS user and must traverse this directory.
        set_mode(&path, 0o755)?;
        let registry = path.join("processes");
        std::fs::write(&registry, "").map_err(|e| format!("write registry: {e}"))?;
        spawn_watchdog(&path, &registry)?;
        Ok(Root { path, registry })
    }

    /// Records a process for the watchdog: it gets `signal` when the test binary exits,
    /// and SIGKILL if it is still alive 10 s later. `name` must occur in its command line
    /// (guards against PID reuse).
    pub fn register(&self, signal: &str, pid: u32, name: &str) {
        let line = format!("{signal} {pid} {name}\n");
        let written = OpenOptions::new()
            .append(true)
            .open(&self.registry)
            .and_then(|mut f| f.write_all(line.as_bytes()));
        if let Err(e) = written {
            panic!("test harness: cannot register pid {pid}: {e}");
        }
    }

    /// A new directory below the root, removed when the returned guard drops.
    pub fn tempdir(&self, prefix: &str) -> tempfile::TempDir {
        match tempfile::Builder::new()
            .prefix(prefix)
            .tempdir_in(&self.path)
        {
            Ok(dir) => dir,
            Err(e) => panic!("test harness: tempdir: {e}"),
        }
    }
}

const WATCHDOG: &str = r#"
alive() { [ -r "/proc/$1/cmdline" ] && tr '\0' ' ' < "/proc/$1/cmdline" 2>/dev/null | grep -q -- "$2"; }
while [ -e "/proc/$1" ] && ! grep -q '^State:.*[ZX]' "/proc/$1/status" 2>/dev/null; do sleep 0.2; done
while read -r sig pid name; do alive "$pid" "$name" && kill "-$sig" "$pid" 2>/dev/null; done < "$2"
i=0
while [ $i -lt 50 ]; do
  left=0
  while read -r sig pid name; do alive "$pid" "$name" && left=1; done < "$2"
  [ $left -eq 0 ] && break
  sleep 0.2; i=$((i+1))
done
while read -r sig pid name; do alive "$pid" "$name" && kill -9 "$pid" 2>/dev/null; done < "$2"
rm -rf "$3"
"#;

fn spawn_watchdog(root: &Path, registry: &Path) -> Result<(), String> {
    Command::new("sh")
        .arg("-c")
        .arg(WATCHDOG)
        .arg("leasegate-test-watchdog")
        .arg(std::process::id().to_string())
        .arg(registry)
        .arg(root)
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        // Own process group: a Ctrl-C aimed at `cargo test` must not kill the cleaner.
        .process_group(0)
        .spawn()
        .map(drop)
        .map_err(|e| format!("spawn watchdog: {e}"))
}

pub fn set_mode(path: &Path, mode: u32) -> Result<(), String> {
    use std::os::unix::fs::PermissionsExt;
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(mode))
        .map_err(|e| format!("chmod {}: {e}", path.display()))
}

/// A loopback TCP port that was free a moment ago and has not been handed out before by
/// this process.
pub fn free_port() -> u16 {
    static HANDED_OUT: std::sync::Mutex<Vec<u16>> = std::sync::Mutex::new(Vec::new());
    for _ in 0..100 {
        let port = TcpListener::bind("127.0.0.1:0")
            .and_then(|l| l.local_addr())
            .map(|a| a.port())
            .expect("bind an ephemeral loopback port");
        let mut seen = HANDED_OUT.lock().unwrap_or_else(|p| p.into_inner());
        if !seen.contains(&port) {
            seen.push(port);
            return port;
        }
    }
    panic!("no free loopback port found");
}

/// A loopback port nothing listens on (for "service down" tests).
pub fn closed_port() -> u16 {
    free_port()
}

/// Unique number per test in this binary (mount names, role prefixes).
pub fn next_id() -> usize {
    static NEXT: AtomicUsize = AtomicUsize::new(1);
    NEXT.fetch_add(1, Ordering::Relaxed)
}

/// Polls `check` every 50 ms until it returns `Ok`, or panics after `timeout` with the last
/// state it reported. `what` names the awaited condition in the panic message.
pub async fn poll_until<F, Fut>(timeout: Duration, what: &str, mut check: F)
where
    F: FnMut() -> Fut,
    Fut: Future<Output = Result<(), String>>,
{
    let deadline = Instant::now() + timeout;
    loop {
        let last = match check().await {
            Ok(()) => return,
            Err(state) => state,
        };
        if Instant::now() >= deadline {
            panic!("timed out after {timeout:?} waiting for {what}; last state: {last}");
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// Last `max` bytes of a text file, for failure messages.
pub fn tail(path: &Path, max: usize) -> String {
    let text = std::fs::read_to_string(path).unwrap_or_default();
    let start = text.len().saturating_sub(max);
    let start = (start..text.len())
        .find(|i| text.is_char_boundary(*i))
        .unwrap_or(text.len());
    text[start..].to_string()
}
