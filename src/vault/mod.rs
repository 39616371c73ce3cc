//! Vault / OpenBao: the HTTP client and the calls leasegate makes (`client`), and the lease a
//! session holds with the revoker that guarantees it is revoked (`lease`).

pub mod auth;
pub mod client;
pub mod duration;
pub mod lease;

pub use client::{VaultClient, VaultError};
pub use lease::{Lease, LeaseGuard, Revoker};
