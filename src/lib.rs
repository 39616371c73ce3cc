//! leasegate: a PostgreSQL wire-protocol proxy that authenticates clients by their TLS client
//! certificate and logs them in upstream with a per-session dynamic credential from Vault or
//! OpenBao, revoking it when the session ends.
//!
//! # Layout
//! The modules stand on floors: a module imports from its own floor or lower, and never in a
//! circle (`scripts/check-layout.py` checks both against this table, and `--edges` lists every
//! import).
//!
//! ```text
//! floor 7  main.rs       the binary: CLI, logging, load the configuration, run the app
//! floor 6  app           process wiring: build the state, start the listener, the admin
//!                        server and the revoker, signals, reload (app::reload), the drain
//! floor 5  listener      accept loop, connection permits, one task per session
//!          admin         /metrics /healthz /readyz, given the registry and a readiness fn
//! floor 4  session       one session: handshake, grants, credential, upstream login,
//!                        relay, lease upkeep, close
//! floor 3  state         AppState (the services sessions share), Live (the reloadable
//!                        snapshot a session takes when it starts)
//! floor 2  upstream      Database (what to connect to, and connecting), login (SCRAM),
//!                        the startup parameters allowed through
//!          cancel        proxy key ↔ upstream key, forwarding upstream, the cancel gate
//!          cluster       cancels with unknown keys forwarded to peer instances, once
//!          prefetch      credentials issued ahead of demand
//!          error         session errors → SQLSTATE, message, metric label
//!          audit         the JSON audit log of session starts, ends and refusals
//! floor 1  vault         error ← token ← body ← client ← lease (the revoker)
//!                        ← creds; login ← auth (keeping leasegate's token alive)
//!          tls           client-facing acceptor and verifier; upstream connector
//!          policy        grants: identity + database + role → allow or why not
//!          limits        global and per-identity session limits and rate buckets
//! floor 0  config        schema (serde) → validate → model (typed: static | reloadable)
//!          lease_clock   when to renew, whether a grant is final, when to warn and end,
//!                        retry backoff: pure decisions (watcher, prefetch, tokens, revoker)
//!          tasks         the one tracker background tasks run on, the token each part stops
//!                        with (app::shutdown builds the tree)
//!          identity      identity kinds, patterns, globs; Principal from a certificate
//!          protocol      framing, startup/SSL/cancel packets, options, messages we send
//!                        and their SQLSTATEs (protocol::sqlstate)
//!          metrics       the Prometheus registry from one table; the label sets as types
//!                        (metrics::labels)
//!          escape        the one escaping rule for client- and certificate-supplied names
//!          secret_files  permission checks of key, token and secret-ID files
//!          net           socket options for client and upstream connections
//!          runtime       the session threads (one current-thread runtime per core) and
//!                        handing an accepted socket to the least-loaded one
//! ```
//!
//! # One session, step by step
//! 1. [`listener::accept_loop`] takes a connection permit, accepts, tunes the socket
//!    (`net::tune_socket`) and spawns [`session::run`] on the task tracker with a child of
//!    the sessions' stop token, on the session thread with the fewest sessions
//!    ([`runtime::Shards::spawn_tcp`]), where the session stays. The session takes the current [`state::Live`] and keeps it.
//! 2. [`session::handshake::accept`], under `listen.login_timeout`: SSLRequest → `S` (or
//!    direct TLS), the rustls acceptor of [`tls::server::acceptor`] with its client-certificate
//!    verifier, [`identity::Principal::from_certificate`], then the StartupMessage
//!    ([`protocol::startup::read_initial_packet`]). A CancelRequest instead goes to the cancel
//!    path: admitted by [`cancel::gate::CancelGate::admit`], routed by [`cancel::route`],
//!    sent by [`cancel::forward`] or [`cluster::Cluster::forward`]; nothing is answered.
//! 3. `Session::authorize` asks [`policy::Policy::decide`]; a denial is FATAL 28000
//!    ([`session::handshake::report`] writes it), before any Vault call.
//! 4. `startup_settings` checks the client's startup parameters
//!    ([`upstream::params::check`]: 42501 for one not allowed), then
//!    [`limits::Limiter::acquire`] counts the session under the identity the grant matched
//!    (53300 over a limit).
//! 5. `Session::credential` takes a prefetched credential ([`prefetch::Prefetcher::take`]) or
//!    reads `creds/<role>` ([`vault::VaultClient::creds`]); the [`vault::LeaseGuard`] exists
//!    from the moment Vault answered, so every later failure still revokes the lease.
//! 6. `login_upstream`, under the database's `connect_timeout`: [`upstream::Database::connect`]
//!    (TCP, then TLS per the entry) and [`upstream::login()`] (SCRAM to the verified server
//!    signature; ParameterStatus and BackendKeyData collected).
//! 7. `Session::relay` registers the cancel key ([`cancel::CancelMap::register`]);
//!    `relay_session` sends AuthenticationOk, the ParameterStatus messages, leasegate's own
//!    BackendKeyData and ReadyForQuery ([`protocol::messages`]), then relays bytes
//!    ([`session::relay::relay`]) while [`session::lifecycle::watch`] renews the lease, warns
//!    before the end and ends the session when it must.
//! 8. Close: [`session::close::close`] cancels a busy upstream first (a statement still
//!    running), sends Terminate and waits for the upstream to close; then the guard is
//!    dropped and the [`vault::Revoker`] revokes the lease (retrying with backoff), and the
//!    limit slot is released; the metrics and the audit line ([`audit::AuditLog::record`])
//!    record how it went.

#![forbid(unsafe_code)]
#![warn(missing_docs)]

pub(crate) mod admin;
pub mod app;
pub(crate) mod audit;
pub(crate) mod cancel;
pub mod cluster;
pub mod config;
pub(crate) mod error;
pub(crate) mod escape;
pub mod identity;
pub(crate) mod lease_clock;
pub(crate) mod limits;
pub(crate) mod listener;
pub mod metrics;
pub(crate) mod net;
pub mod policy;
pub(crate) mod prefetch;
pub mod protocol;
pub mod runtime;
pub(crate) mod secret_files;
pub(crate) mod session;
pub(crate) mod state;
pub(crate) mod tasks;
pub mod tls;
pub mod upstream;
pub mod vault;

#[cfg(test)]
mod error_chain_tests;
#[cfg(test)]
mod readme_tests;
