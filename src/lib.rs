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
//! floor 5  listener      accept loop, connection permits, one task per session; the
//!                        local Unix socket (listener::unix)
//!          console       the client side of the admin socket (`sessions`, `leases check`)
//!          admin         /metrics /healthz /readyz, given the registry and a readiness fn
//!          admin_socket  the operator's console over a local Unix socket: sessions list and
//!                        end, leases check
//! floor 4  session       one session: handshake, grants, credential, upstream login,
//!                        relay, lease upkeep, close
//! floor 3  state         AppState (the services sessions share), Live (the reloadable
//!                        snapshot a session takes when it starts)
//!          registry      the live sessions (and pooled credentials) as the operator's
//!                        console lists and ends them
//! floor 2  upstream      Database (what to connect to, and connecting), login (SCRAM),
//!                        the startup parameters allowed through
//!          cancel        proxy key ↔ upstream key, forwarding upstream, the cancel gate
//!          cluster       cancels with unknown keys forwarded to the peer owning them (by
//!                        the replica id in the key), once
//!          prefetch      credentials issued ahead of demand; warm upstream sessions
//!                        (prefetch::warm), each logged in with a lease of its own
//!          error         session errors → SQLSTATE, message, metric label
//!          audit         the JSON audit log of session starts, ends and refusals
//! floor 1  vault         error ← token ← body ← client ← lease (the revoker, its window in
//!                        pacing)
//!                        ← creds; login ← auth (keeping leasegate's token alive)
//!          tls           client-facing acceptor and verifier; upstream connector
//!          policy        grants: identity + database + role → allow or why not
//!          limits        global and per-identity session limits and rate buckets; the
//!                        listeners' connection slots, cancels' overflow (limits::slots)
//! floor 0  config        schema (serde) → validate → model (typed: static | reloadable)
//!          lease_clock   when to renew, whether a grant is final, when to warn and end,
//!                        retry backoff: pure decisions (watcher, prefetch, tokens, revoker)
//!          tasks         the one tracker background tasks run on, the token each part stops
//!                        with (app::shutdown builds the tree)
//!          identity      identity kinds, patterns, globs; Principal from a certificate
//!                        or a Unix-socket peer (identity::unix: uid, gid, names)
//!          protocol      framing, startup/SSL/cancel packets, options, messages we send
//!                        and their SQLSTATEs (protocol::sqlstate)
//!          metrics       the Prometheus registry from one table; the label sets as types
//!                        (metrics::labels)
//!          escape        the one escaping rule for client- and certificate-supplied names
//!          secret_files  permission checks of key, token and secret-ID files
//!          net           socket options for client and upstream connections
//!          fd_limit      the open-file limit raised at start for `max_connections`
//!          proxy_header  the PROXY protocol header (v1, v2) of a trusted load balancer
//!          runtime       the session threads (one current-thread runtime per core) and
//!                        handing an accepted socket to the least-loaded one
//! ```
//!
//! # One session, step by step
//! 1. [`listener::accept_loop`] takes a connection permit, accepts, tunes the socket
//!    (`net::tune_socket`) and spawns [`session::run`] on the task tracker with a child of
//!    the sessions' stop token, on the session thread with the fewest sessions
//!    ([`runtime::Shards::spawn`]), where the session stays. The session takes the
//!    current [`state::Live`] and keeps it.
//! 2. Under `listen.login_timeout`: from a `listen.proxy_protocol_from` address the PROXY
//!    header first ([`proxy_header::client_address`]: its source becomes the client address),
//!    then [`session::handshake::accept`]: SSLRequest → `S` (or
//!    direct TLS), the rustls acceptor of [`tls::server::acceptor`] with its client-certificate
//!    verifier, [`identity::Principal::from_certificate`], then the StartupMessage
//!    ([`protocol::startup::read_initial_packet`]). A CancelRequest instead goes to the cancel
//!    path: admitted by [`cancel::gate::CancelGate::admit`], routed by [`cancel::route`],
//!    sent by [`cancel::forward`] or [`cluster::Cluster::forward`]; nothing is answered, and
//!    the connection closes once the upstream (or the peer) has closed its own.
//! 3. `Session::authorize` asks [`policy::Policy::decide`]; a denial is FATAL 28000
//!    ([`session::handshake::report`] writes it), before any Vault call.
//! 4. `startup_settings` checks the client's startup parameters
//!    ([`upstream::params::check`]: 42501 for one not allowed), then
//!    [`limits::Limiter::acquire`] counts the session under the identity the grant matched
//!    (53300 over a limit). The session is then listed in [`registry::Registry`] (state
//!    `setup`) until its guard drops: `sessions list` shows it, `sessions end` (or a reload
//!    with `end_sessions_on_revoke`) stops it with a reason the watcher's 57P01 names.
//!    A warm session waiting for this entry, role and startup-parameter set
//!    ([`prefetch::warm::WarmPool::take`]) skips steps 5 and 6: `Session::serve_warm` relays
//!    over it (step 7) with its own lease.
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
//!
//! A client of the local Unix socket ([`listener::unix::accept_loop`]) differs only in step 2:
//! [`session::unix::run`] takes its uid and gid from the kernel (`SO_PEERCRED`) and its names
//! from the user and group databases, answers an SSLRequest `N` and reads the StartupMessage
//! in plaintext; from step 3 on it is the same session (`ClientStream::Unix`).

#![forbid(unsafe_code)]
#![warn(missing_docs)]

pub(crate) mod admin;
pub mod admin_socket;
pub mod app;
pub(crate) mod audit;
pub(crate) mod cancel;
pub mod cluster;
pub mod config;
pub mod console;
pub(crate) mod error;
pub(crate) mod escape;
pub(crate) mod fd_limit;
pub mod identity;
pub(crate) mod lease_clock;
pub(crate) mod limits;
pub(crate) mod listener;
pub mod metrics;
pub(crate) mod net;
pub mod policy;
pub(crate) mod prefetch;
pub mod protocol;
pub(crate) mod proxy_header;
pub(crate) mod registry;
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
