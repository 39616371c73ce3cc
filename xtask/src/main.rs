//! Developer tasks of the leasegate repository: `cargo xtask <task>` (the alias lives in
//! `.cargo/config.toml`; `cargo run -p xtask -- <task>` is the same).
//!
//! - `devenv up`: start PostgreSQL 15, an OpenBao dev server and a dev PKI on free loopback
//!   ports, detached, below one directory; print the variables as shell `export` lines.
//! - `devenv env`: print them again.
//! - `devenv down`: stop everything `up` started and remove the directory.
//!
//! The implementation is the `leasegate-devenv` library, which the integration tests use too.

#![forbid(unsafe_code)]

mod devenv;

use std::path::PathBuf;
use std::process::ExitCode;

use clap::{Args, Parser, Subcommand};

/// Developer tasks of the leasegate repository.
#[derive(Parser)]
#[command(
    name = "xtask",
    bin_name = "cargo xtask",
    about,
    disable_help_subcommand = true
)]
struct Cli {
    #[command(subcommand)]
    task: Task,
}

#[derive(Subcommand)]
enum Task {
    /// The dev environment: PostgreSQL, OpenBao and certificates on free loopback ports.
    #[command(subcommand)]
    Devenv(Devenv),
}

#[derive(Subcommand)]
enum Devenv {
    /// Start everything (detached) and print `export` lines: eval "$(cargo xtask devenv up)".
    Up(UpArgs),
    /// Print the `export` lines of a running environment again.
    Env(DirArg),
    /// Stop everything `up` started and remove its directory.
    Down(DownArgs),
}

/// Where the environment lives.
#[derive(Args)]
struct DirArg {
    /// The environment's directory (`up`: created; default a new /tmp/leasegate-devenv-*).
    #[arg(long, env = "DEVENV_DIR")]
    dir: Option<PathBuf>,
}

#[derive(Args)]
struct UpArgs {
    #[command(flatten)]
    dir: DirArg,
    /// PostgreSQL setting NAME=VALUE (repeatable), e.g. max_connections=500.
    #[arg(long = "pg-setting", value_name = "NAME=VALUE")]
    pg_settings: Vec<String>,
    /// No fsync, no full-page writes: faster, and nothing survives a crash.
    #[arg(long)]
    throwaway: bool,
    /// PostgreSQL also accepts TLS, with the dev server certificate (implies --certs).
    #[arg(long)]
    pg_tls: bool,
    /// Write the dev PKI: CA, server certificate for localhost, client certificate `app`.
    #[arg(long)]
    certs: bool,
    /// Pick one more free loopback port, printed as DEVENV_PORT_<NAME> (repeatable).
    #[arg(long = "port", value_name = "NAME")]
    ports: Vec<String>,
    /// Set up a database secrets engine at this mount with deploy/openbao-setup.sh (roles
    /// readonly and readwrite, a least-privilege leasegate token).
    #[arg(long)]
    mount: Option<String>,
    /// Username prefix of the mount's dynamic roles.
    #[arg(long, default_value = "lg_", requires = "mount")]
    prefix: String,
    /// Where the leasegate token goes (default: DIR/vault-token).
    #[arg(long, requires = "mount")]
    token_file: Option<PathBuf>,
}

#[derive(Args)]
struct DownArgs {
    #[command(flatten)]
    dir: DirArg,
    /// Stop the processes but keep the directory (logs, data) for a look.
    #[arg(long)]
    keep_dir: bool,
}

fn main() -> ExitCode {
    let Task::Devenv(cmd) = Cli::parse().task;
    let done = match cmd {
        Devenv::Up(a) => devenv::up(devenv::Up {
            dir: a.dir.dir,
            pg_settings: a.pg_settings,
            throwaway: a.throwaway,
            pg_tls: a.pg_tls,
            certs: a.certs,
            ports: a.ports,
            mount: a.mount.map(|mount| devenv::Mount {
                mount,
                prefix: a.prefix,
                token_file: a.token_file,
            }),
        }),
        Devenv::Env(a) => devenv::env(a.dir),
        Devenv::Down(a) => devenv::down(a.dir.dir, a.keep_dir),
    };
    match done {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("devenv: error: {e}");
            ExitCode::FAILURE
        }
    }
}
