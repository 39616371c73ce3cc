//! Vault / OpenBao: the HTTP client and the calls leasegate makes (`client`), and the lease a
//! session holds with the revoker that guarantees it is revoked (`lease`).

pub mod auth;
pub(crate) mod body;
pub mod client;
pub mod duration;
pub mod lease;
pub mod login;
#[cfg(test)]
mod testing;

pub use client::{VaultClient, VaultError};
pub use lease::{Lease, LeaseGuard, Revoker};
