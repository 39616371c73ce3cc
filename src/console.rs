//! The operator's console, the client side of the admin socket: `leasegate sessions list`,
//! `leasegate sessions end` and `leasegate leases check`. The configuration file is read only
//! to find `[admin] socket`; everything else is asked of the running leasegate over it
//! (`client`), and printed as a `psql`-style table or as JSON lines (`table`).

mod client;
mod table;

use std::path::Path;
use std::process::ExitCode;

use anyhow::Context;
use clap::Subcommand;
use hyper::Method;

use crate::admin_socket::api::{self, CheckAnswer, CheckRequest, EndAnswer, EndRequest, Listed};

/// `leasegate sessions …`
#[derive(Debug, Subcommand)]
pub enum SessionsCommand {
    /// Every live session, prefetched credential and warm session.
    List {
        /// One JSON object per line instead of the table.
        #[arg(long)]
        json: bool,
    },
    /// End sessions: FATAL 57P01 to the client, the upstream closed, the lease revoked.
    /// Exit 0 when something was ended, 1 when nothing matched.
    End {
        /// The session id (`sessions list`).
        #[arg(long, conflicts_with_all = ["identity", "database", "role", "transport"], required_unless_present = "identity")]
        id: Option<u64>,
        /// Identity pattern, as in grants (`uri:spiffe://example.org/app/*`).
        #[arg(long)]
        identity: Option<String>,
        /// Only sessions on this database.
        #[arg(long)]
        database: Option<String>,
        /// Only sessions with this role.
        #[arg(long)]
        role: Option<String>,
        /// Only sessions that came over this transport (tcp, tls, unix).
        #[arg(long)]
        transport: Option<String>,
        /// What the client is told: `terminated by the operator: TEXT`.
        #[arg(long)]
        reason: Option<String>,
        /// Print what was ended as JSON lines.
        #[arg(long)]
        json: bool,
    },
}

/// `leasegate leases …`
#[derive(Debug, Subcommand)]
pub enum LeasesCommand {
    /// Leases Vault lists under the configured mounts and roles that no session or prefetch
    /// of this instance holds.
    Check {
        /// Revoke those this instance's token created (see README for how that is decided).
        #[arg(long)]
        revoke: bool,
        /// Print the answer as JSON.
        #[arg(long)]
        json: bool,
    },
}

/// Runs `sessions …` against the leasegate configured in `config`.
pub fn sessions(config: &Path, command: SessionsCommand) -> anyhow::Result<ExitCode> {
    let socket = client::socket_path(config)?;
    match command {
        SessionsCommand::List { json } => {
            let body = client::call(&socket, Method::GET, api::SESSIONS, None)?;
            if json {
                print!("{body}");
                return Ok(ExitCode::SUCCESS);
            }
            let rows: Vec<Listed> = body
                .lines()
                .map(serde_json::from_str)
                .collect::<Result<_, _>>()
                .context("reading the session list")?;
            print!("{}", table::sessions(&rows));
            Ok(ExitCode::SUCCESS)
        }
        SessionsCommand::End {
            id,
            identity,
            database,
            role,
            transport,
            reason,
            json,
        } => {
            let request = EndRequest {
                id,
                identity,
                database,
                role,
                transport,
                reason,
            };
            let body = serde_json::to_string(&request)?;
            let answer = client::call(&socket, Method::POST, api::SESSIONS_END, Some(body))?;
            let answer: EndAnswer = serde_json::from_str(&answer).context("reading the answer")?;
            end_report(&answer, json)
        }
    }
}

/// What `sessions end` prints; exit 1 when nothing matched.
fn end_report(answer: &EndAnswer, json: bool) -> anyhow::Result<ExitCode> {
    if answer.ended.is_empty() {
        eprintln!("leasegate: no session matched");
        return Ok(ExitCode::FAILURE);
    }
    for row in &answer.ended {
        if json {
            println!("{}", serde_json::to_string(row)?);
        } else {
            println!("{}", table::ended(row));
        }
    }
    if !answer.closed {
        eprintln!("leasegate: some of them were still closing when the command returned");
    }
    Ok(ExitCode::SUCCESS)
}

/// Runs `leases …` against the leasegate configured in `config`.
pub fn leases(config: &Path, command: LeasesCommand) -> anyhow::Result<ExitCode> {
    let socket = client::socket_path(config)?;
    let LeasesCommand::Check { revoke, json } = command;
    let body = serde_json::to_string(&CheckRequest { revoke })?;
    let answer = client::call(&socket, Method::POST, api::LEASES_CHECK, Some(body))?;
    if json {
        println!("{}", answer.trim_end());
        return Ok(ExitCode::SUCCESS);
    }
    let answer: CheckAnswer = serde_json::from_str(&answer).context("reading the answer")?;
    print!("{}", table::leases(&answer));
    Ok(ExitCode::SUCCESS)
}
