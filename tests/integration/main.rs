//! Integration tests: the real `leasegate` binary against a real PostgreSQL 15 cluster and a
//! real OpenBao dev server, driven only through the documented contract (config file, CLI,
//! PostgreSQL wire protocol, /metrics).
//!
//! One test binary, so every test shares one PostgreSQL and one OpenBao (see `harness`).
//! Each test gets its own Vault mount, role prefix, PKI and leasegate process.

mod harness;

mod burst;
mod cancel;
mod cli;
mod client_cert;
mod compat_asyncpg;
mod compat_cluster;
mod compat_jdbc;
mod compat_node;
mod compat_pgx;
mod compat_php;
mod compat_protocol;
mod compat_psql;
mod compat_psycopg;
mod compat_ruby;
mod compat_sqlalchemy;
mod compat_sqlx;
mod compat_tokio_postgres;
mod concurrency;
mod faults;
mod faults_openbao_server;
mod faults_pools;
mod faults_postgres;
mod faults_postgres_server;
mod faults_process;
mod faults_renewal;
mod faults_slow_vault;
mod faults_vault;
mod lb_cancel;
mod lb_crash;
mod lb_proxy_protocol;
mod lb_rolling;
mod lifecycle;
mod metrics;
mod ops_audit;
mod ops_deploy;
mod ops_incident;
mod ops_prometheus;
mod ops_readiness;
mod ops_reload;
mod ops_scripts;
mod rejections;
mod resilience;
mod runtime;
mod sec_admin;
mod sec_backend;
mod sec_cancel;
mod sec_certs;
mod sec_cluster;
mod sec_files;
mod sec_identity;
mod sec_input;
mod sec_keying;
mod sec_limits;
mod sec_params;
mod sec_params_clients;
mod sec_resume;
mod sec_secrets;
mod sec_upstream;
mod sec_vault;
mod selftest;
mod session;
mod shutdown;
mod unix_socket;
mod unix_socket_ops;
mod upstream_errors;
mod upstream_tls;
mod vault_auth;
mod warm;
mod warm_params;
