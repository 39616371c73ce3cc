//! Shared integration-test harness.
//!
//! One PostgreSQL 15 cluster and one OpenBao dev server are started lazily, once per test
//! binary, and shared by every test. Each test then gets its own Vault mount (fresh role
//! prefix), its own PKI and its own `leasegate` process, so tests never see each other's
//! roles, leases or metrics. Starting them is the dev environment's job (the
//! `leasegate-devenv` crate, which `cargo xtask devenv`, the demo and the benchmarks use
//! too); this harness adds what tests need on top.
//!
//! Statics are never dropped in a test binary, so cleanup is done by a detached watchdog
//! shell process that waits for the test process to exit, then stops every process listed
//! in the registry file (`devenv::process::Registry`) and removes the scratch directory.

pub mod bao;
pub mod client;
pub mod compat;
pub mod fake_vault;
pub mod fixture;
pub mod fleet;
pub mod haproxy;
pub mod metrics;
pub mod ops;
pub mod pg;
pub mod pki;
pub mod proxy;
pub mod security;
pub mod unix;
pub mod wire;

use std::future::Future;
use std::path::PathBuf;
use std::sync::OnceLock;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, Instant};

pub use bao::{fresh_mount, leases};
pub use devenv::process::{set_mode, tail};
pub use pg::dynamic_roles;

/// The scratch directory of this test binary and the registry of processes to stop.
pub struct Root {
    /// Everything the harness writes lives below this directory (removed by the watchdog).
    pub path: PathBuf,
    /// Lines `SIGNAL PID NAME`: processes the watchdog stops when the test binary is gone.
    registry: devenv::process::Registry,
}

/// The shared external services.
pub struct Env {
    pub pg: pg::Pg,
    pub bao: bao::Bao,
    /// The CA of the shared cluster's server certificate (it accepts TLS and plaintext; the
    /// certificate names localhost, 127.0.0.1 and ::1).
    pub pg_ca: std::path::PathBuf,
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

/// PostgreSQL and OpenBao, started on first use (in parallel, by the dev environment).
pub fn env() -> &'static Env {
    let started = ENV.get_or_init(|| {
        let root = root();
        let opts = devenv::stack::Options {
            pg_settings: pg::test_settings(),
            pg_tls: true,
            ..Default::default()
        };
        let stack =
            devenv::stack::start(&root.path, &opts, &root.registry).map_err(|e| e.to_string())?;
        let pg_ca = stack
            .pki
            .as_ref()
            .map(|p| p.ca.clone())
            .ok_or("the dev environment wrote no PKI")?;
        Ok(Env {
            pg_ca,
            pg: pg::Pg::of(&stack.pg),
            bao: bao::Bao {
                addr: stack.bao.addr.clone(),
                log: stack.bao.log.clone(),
            },
        })
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
        set_mode(&path, 0o755).map_err(|e| e.to_string())?;
        let registry = devenv::process::Registry::create(&path.join(devenv::state::REGISTRY))
            .map_err(|e| e.to_string())?;
        // Statics are never dropped: the watchdog cleans up once this process has exited.
        registry
            .watch(std::process::id(), &path)
            .map_err(|e| e.to_string())?;
        Ok(Root { path, registry })
    }

    /// Records a process for the watchdog: it gets `signal` when the test binary exits,
    /// and SIGKILL if it is still alive 10 s later. `name` must occur in its command line
    /// (guards against PID reuse).
    pub fn register(&self, signal: &str, pid: u32, name: &str) {
        let registered = signal
            .parse()
            .and_then(|signal| self.registry.register(signal, pid, name));
        if let Err(e) = registered {
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

/// A loopback TCP port that was free a moment ago and has not been handed out before by
/// this process.
pub fn free_port() -> u16 {
    devenv::ports::free_port().unwrap_or_else(|e| panic!("test harness: {e}"))
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
