//! leasegate: a PostgreSQL wire-protocol proxy that authenticates clients by their TLS client
//! certificate and logs them in upstream with a per-session dynamic credential from Vault or
//! OpenBao, revoking it when the session ends.
//!
//! # Layout
//! - [`app`]: shared state, reload, listener and admin startup, signals, graceful drain.
//! - [`audit`]: the JSON audit log of session starts, ends and refusals.
//! - [`config`]: the TOML schema, defaults and validation.
//! - [`secret_files`]: permission checks of key, token and secret-ID files.
//! - [`escape`]: the one escaping rule for client- and certificate-supplied names in
//!   messages, log fields and the audit log.
//! - [`error`]: session errors and their single mapping to SQLSTATE, message and metric label.
//! - [`limits`]: global and per-identity session limits and rate buckets.
//! - [`listener`]: accept loop, connection limit, socket options.
//! - `lease_clock`: when to renew, whether a grant is final, when to warn and end a session,
//!   retry backoff: pure decisions, used by the session watcher, prefetch, token upkeep and
//!   the revoker.
//! - [`tls`]: client-facing acceptor and verifier, certificate identity, upstream TLS.
//! - [`protocol`]: pre-authentication packets, startup option values as PostgreSQL reads them,
//!   messages leasegate writes, message framing.
//! - [`session`]: one session end to end: handshake, policy, credential, login, relay, close.
//! - [`prefetch`]: credentials issued ahead of demand, per database and role.
//! - `tasks`: where background tasks run (the one tracker) and the token each part stops
//!   with; `app` builds the shutdown tree from them.
//! - [`policy`]: grants: identity + database + role → allow or the reason for denial.
//! - [`vault`]: the Vault HTTP client, leases, the guard and the revoker.
//! - [`upstream`]: the startup settings allowed through, upstream connect (TLS per config) and
//!   login (SCRAM, MD5 where allowed).
//! - [`cancel`]: proxy cancel keys, their forwarding upstream, where a cancel goes, and the
//!   rate limits and in-flight cap every cancel passes first.
//! - [`cluster`]: forwarding cancels with unknown keys to peer instances, once, as
//!   PeerCancelRequests; the peer configuration checked at load, peers resolved in the
//!   background.
//! - [`metrics`] and [`admin`]: the Prometheus registry and `/metrics`, `/healthz`, `/readyz`.

#![forbid(unsafe_code)]
#![warn(missing_docs)]

pub mod admin;
pub mod app;
pub mod audit;
pub mod cancel;
pub mod cluster;
pub mod config;
pub mod error;
pub mod escape;
pub(crate) mod lease_clock;
pub mod limits;
pub mod listener;
pub mod metrics;
pub mod policy;
pub mod prefetch;
pub mod protocol;
pub mod secret_files;
pub mod session;
pub(crate) mod tasks;
pub mod tls;
pub mod upstream;
pub mod vault;
