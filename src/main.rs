//! The `leasegate` command line: run the proxy, or check a configuration file.

#![forbid(unsafe_code)]

use std::path::PathBuf;
use std::process::ExitCode;

use anyhow::Context;
use clap::{Parser, Subcommand, ValueEnum};
use leasegate::config::Config;

/// PostgreSQL proxy with mutual TLS in and per-session Vault/OpenBao credentials out.
#[derive(Parser)]
#[command(version, about)]
struct Cli {
    /// Configuration file (TOML).
    #[arg(long, global = true, value_name = "PATH")]
    config: Option<PathBuf>,
    /// Log line format on stderr; filter with RUST_LOG (default "info").
    #[arg(long, global = true, value_enum, default_value_t = LogFormat::Text)]
    log_format: LogFormat,
    #[command(subcommand)]
    command: Option<Command>,
}

#[derive(Subcommand)]
enum Command {
    /// Validate the configuration and exit: 0 when valid, 1 with every problem listed.
    CheckConfig {
        /// Also log in to Vault with the configured auth method.
        #[arg(long)]
        online: bool,
    },
}

#[derive(Clone, Copy, ValueEnum)]
enum LogFormat {
    Text,
    Json,
}

fn init_logging(format: LogFormat) {
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info"));
    use std::io::IsTerminal;
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_ansi(std::io::stderr().is_terminal())
        .with_writer(std::io::stderr);
    match format {
        LogFormat::Text => builder.init(),
        LogFormat::Json => builder.json().init(),
    }
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    init_logging(cli.log_format);
    match run(cli) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("leasegate: {e:#}");
            ExitCode::FAILURE
        }
    }
}

fn run(cli: Cli) -> anyhow::Result<()> {
    let path = cli
        .config
        .context("--config PATH is required (see leasegate --help)")?;
    if let Some(Command::CheckConfig { online }) = cli.command {
        let config = Config::load_unvalidated(&path)?;
        check(&config, online)?;
        println!("{}: configuration is valid", path.display());
        return Ok(());
    }
    let config = Config::load(&path)?;
    let mut builder = tokio::runtime::Builder::new_multi_thread();
    if let Some(n) = config.runtime.worker_threads {
        builder.worker_threads(n);
    }
    let runtime = builder
        .enable_all()
        .build()
        .context("starting the async runtime")?;
    runtime.block_on(leasegate::app::run(config, path))?;
    Ok(())
}

/// Every problem at once: the schema's cross-references and files, then what needs more than
/// parsing (TLS material loads and is in date, the Vault token is present) and, with `online`,
/// whether Vault accepts the configured login.
fn check(config: &Config, online: bool) -> anyhow::Result<()> {
    for warning in config.warnings() {
        tracing::warn!("{warning}");
    }
    let mut problems = config.problems();
    let listen = &config.listen;
    let exists = |p: &std::path::Path| p.exists();
    if [&listen.cert, &listen.key, &listen.client_ca]
        .iter()
        .all(|p| exists(p))
        && let Err(e) = leasegate::tls::server::acceptor(listen)
    {
        problems.push(format!("listen TLS: {e}"));
    }
    for (key, path) in [
        ("listen.cert", &listen.cert),
        ("listen.client_ca", &listen.client_ca),
    ] {
        if exists(path)
            && let Err(e) = leasegate::tls::check_validity(path)
        {
            problems.push(format!("{key}: {e}"));
        }
    }
    if online {
        let runtime = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .context("starting the async runtime")?;
        if let Err(e) = runtime.block_on(check_vault(config)) {
            problems.push(format!("vault: {e}"));
        }
    }
    for db in config
        .databases
        .iter()
        .filter(|d| d.ca_cert.iter().all(|p| exists(p)))
    {
        if let Err(e) = leasegate::tls::upstream::connector(db) {
            problems.push(format!("database {:?} TLS: {e}", db.name));
        }
    }
    if config.vault.auth.method == leasegate::config::AuthMethod::Token
        && config.vault.auth.token_file.iter().all(|p| exists(p))
        && let Err(e) = leasegate::vault::client::load_token(&config.vault.auth)
    {
        problems.push(e.to_string());
    }
    if problems.is_empty() {
        Ok(())
    } else {
        anyhow::bail!("invalid configuration:\n  - {}", problems.join("\n  - "))
    }
}

/// Logs in to Vault as leasegate would.
async fn check_vault(config: &Config) -> anyhow::Result<()> {
    let metrics = std::sync::Arc::new(leasegate::metrics::Metrics::new());
    let client = leasegate::vault::VaultClient::new(&config.vault, metrics)?;
    leasegate::vault::auth::login(&client, &config.vault.auth).await?;
    Ok(())
}
