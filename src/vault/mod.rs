//! Vault / OpenBao, in floors (each module imports only from the ones above it in this list):
//! - `error` ([`VaultError`]): a leaf (durations are clamped by `crate::lease_clock`).
//! - `token`: leasegate's own tokens and their store.
//! - `body`: answer and secret request bodies in zeroizing memory.
//! - `client`: the HTTP client, its requests, renew and revoke.
//! - `pacing`: how many revocations may run at once (creds calls keep priority).
//! - `lease`: the lease a session holds, its guard and the revoker that guarantees the
//!   revocation (it calls the client).
//! - `leases`: listing and looking up leases, for `leases check`.
//! - `creds`: the creds call, which guards the lease it issues with the revoker.
//! - `login` (how leasegate gets a token) and `auth` (keeping it alive, revoking it).

pub mod auth;
pub(crate) mod body;
pub mod client;
mod creds;
pub(crate) mod error;
pub(crate) mod lease;
pub(crate) mod leases;
pub(crate) mod login;
pub(crate) mod pacing;
#[cfg(test)]
pub(crate) mod testing;
pub(crate) mod token;

pub use client::VaultClient;
pub use error::VaultError;
pub(crate) use lease::{Lease, LeaseGuard, Revoker};
