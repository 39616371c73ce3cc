//! Integration tests: the real `leasegate` binary against a real PostgreSQL 15 cluster and a
//! real OpenBao dev server, driven only through the documented contract (config file, CLI,
//! PostgreSQL wire protocol, /metrics).
//!
//! One test binary, so every test shares one PostgreSQL and one OpenBao (see `harness`).
//! Each test gets its own Vault mount, role prefix, PKI and leasegate process.

mod harness;

mod cancel;
mod cli;
mod concurrency;
mod faults;
mod metrics;
mod rejections;
mod selftest;
mod session;
