//! Vault / OpenBao: the HTTP client and the calls leasegate makes (`client`, with answer and
//! secret request bodies in `body`), leasegate's own tokens (`token`), how it gets one
//! (`login`) and keeps it alive and revokes it (`auth`), and the lease a session holds with
//! the revoker that guarantees it is revoked (`lease`).

pub mod auth;
pub(crate) mod body;
pub mod client;
pub mod lease;
pub mod login;
#[cfg(test)]
pub(crate) mod testing;
pub mod token;

pub use client::{VaultClient, VaultError};
pub use lease::{Lease, LeaseGuard, Revoker};
