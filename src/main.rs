//! The `leasegate` command line: run the proxy, check a configuration file, or ask the
//! running proxy about its sessions and leases (`leasegate::console`).

// `deny`, not `forbid`: `take_env_token` needs one narrowly scoped exception (the library
// keeps `forbid`).
#![deny(unsafe_code)]

use std::path::PathBuf;
use std::process::ExitCode;

use anyhow::Context;
use clap::{Parser, Subcommand, ValueEnum};
use leasegate::config::Config;
use secrecy::SecretString;

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
    /// The running leasegate's sessions, over its admin socket (`[admin] socket`).
    Sessions {
        #[command(subcommand)]
        command: leasegate::console::SessionsCommand,
    },
    /// The leases Vault lists against what the running leasegate holds.
    Leases {
        #[command(subcommand)]
        command: leasegate::console::LeasesCommand,
    },
}

#[derive(Clone, Copy, ValueEnum)]
enum LogFormat {
    Text,
    Json,
}

/// Reads `VAULT_TOKEN` once and removes it from the process: from the environment (so no
/// later reader and no child process sees it) and from the memory behind
/// `/proc/<pid>/environ`, which `remove_var` alone leaves untouched.
#[allow(unsafe_code)]
fn take_env_token() -> Option<SecretString> {
    const NAME: &[u8] = b"VAULT_TOKEN=";
    let value = std::env::var_os("VAULT_TOKEN")?;
    // The environment strings the process started with, found before the variable is
    // removed from the environment array (removal forgets the pointers, not the bytes).
    #[cfg(target_os = "linux")]
    let originals: Vec<*mut std::ffi::c_char> = {
        unsafe extern "C" {
            static environ: *const *mut std::ffi::c_char;
        }
        let mut found = Vec::new();
        // SAFETY: `main` calls this before anything else, while the process has one thread,
        // so nothing modifies the environment concurrently. `environ` is the C library's
        // NULL-terminated array of NUL-terminated strings; it is only read here.
        unsafe {
            let mut entry = environ;
            while !entry.is_null() && !(*entry).is_null() {
                let text = std::ffi::CStr::from_ptr(*entry).to_bytes();
                if text.starts_with(NAME) {
                    found.push(*entry);
                }
                entry = entry.add(1);
            }
        }
        found
    };
    // SAFETY: single-threaded (see above): no other thread reads or writes the environment.
    unsafe { std::env::remove_var("VAULT_TOKEN") };
    #[cfg(target_os = "linux")]
    for entry in originals {
        // SAFETY: `entry` points to a NUL-terminated string of the initial environment (or
        // one the C library keeps for the life of the process); it is no longer reachable
        // through `environ`, and overwriting its bytes before the NUL keeps it a valid
        // (empty) C string. Still one thread.
        unsafe {
            let len = std::ffi::CStr::from_ptr(entry).to_bytes().len();
            std::ptr::write_bytes(entry, 0, len);
        }
    }
    let bytes = zeroize::Zeroizing::new(value.into_encoded_bytes());
    let token = std::str::from_utf8(&bytes).ok()?.trim();
    (!token.is_empty()).then(|| SecretString::from(token.to_owned()))
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
    // First, while this is the only thread: nothing else may read the environment meanwhile.
    let env_token = take_env_token();
    let cli = Cli::parse();
    init_logging(cli.log_format);
    match run(cli, env_token) {
        Ok(code) => code,
        Err(e) => {
            eprintln!("leasegate: {e:#}");
            ExitCode::FAILURE
        }
    }
}

fn run(cli: Cli, env_token: Option<SecretString>) -> anyhow::Result<ExitCode> {
    let path = cli
        .config
        .context("--config PATH is required (see leasegate --help)")?;
    match cli.command {
        Some(Command::CheckConfig { online }) => {
            check(&path, env_token, online)?;
            println!("{}: configuration is valid", path.display());
            return Ok(ExitCode::SUCCESS);
        }
        Some(Command::Sessions { command }) => return leasegate::console::sessions(&path, command),
        Some(Command::Leases { command }) => return leasegate::console::leases(&path, command),
        None => {}
    }
    let mut config = Config::load(&path)?;
    // The `VAULT_TOKEN` taken at startup serves `method = "token"` when neither `token` nor
    // `token_file` is configured (the documented order: inline, file, environment).
    config.fixed.vault.auth.use_env_token(env_token);
    // The control plane on a runtime of its own; sessions on the session threads (one
    // current-thread runtime per core: leasegate::runtime).
    let control = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .thread_name("lg-control")
        .build()
        .context("starting the async runtime")?;
    let pool = leasegate::runtime::ShardPool::start(config.fixed.runtime.worker_threads)
        .context("starting the session threads")?;
    let result = control.block_on(leasegate::app::run(config, path, pool.shards()));
    // Sessions first (the drain is over: what is left is dropped), then the control plane
    // their Vault calls ran on.
    pool.stop();
    drop(control);
    result?;
    Ok(ExitCode::SUCCESS)
}

/// Every problem at once: the schema's cross-references and files, then, when the typed
/// configuration could be built, what needs more than parsing (see [`check_typed`]).
fn check(
    path: &std::path::Path,
    env_token: Option<SecretString>,
    online: bool,
) -> anyhow::Result<()> {
    let examined = Config::examine(path)?;
    for warning in &examined.warnings {
        tracing::warn!("{warning}");
    }
    let mut problems = examined.problems;
    if let Some(mut config) = examined.config {
        config.fixed.vault.auth.use_env_token(env_token);
        check_typed(&config, online, &mut problems)?;
    }
    if problems.is_empty() {
        Ok(())
    } else {
        anyhow::bail!("invalid configuration:\n  - {}", problems.join("\n  - "))
    }
}

/// TLS material loads and is in date, the cluster certificate is one the peers accept, the
/// Vault token is present, and, with `online`, Vault accepts the configured login.
fn check_typed(config: &Config, online: bool, problems: &mut Vec<String>) -> anyhow::Result<()> {
    let listen = &config.reloadable.listen;
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
    check_cluster(config, problems);
    let admin = config.fixed.admin.as_ref();
    problems.extend(admin.and_then(|a| leasegate::admin_socket::problem(&a.socket)));
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
        .reloadable
        .databases
        .iter()
        .filter(|d| d.tls.ca_cert().is_none_or(exists))
    {
        if let Err(e) = leasegate::tls::upstream::connector(db) {
            problems.push(format!("database {:?} TLS: {e}", db.name));
        }
    }
    let auth = &config.fixed.vault.auth;
    if auth.is_token()
        && auth.token_file().is_none_or(exists)
        && let Err(e) = leasegate::vault::client::load_token(auth)
    {
        problems.push(e.to_string());
    }
    Ok(())
}

/// `[cluster]` checked as its peers will see it, once its files exist (missing files are
/// already reported); problems `config.problems()` found too are not repeated.
fn check_cluster(config: &Config, problems: &mut Vec<String>) {
    let Some(cluster) = &config.reloadable.cluster else {
        return;
    };
    if ![&cluster.cert, &cluster.key, &cluster.ca_cert]
        .iter()
        .all(|p| p.exists())
    {
        return;
    }
    for problem in leasegate::cluster::problems(cluster, &config.reloadable.listen) {
        if !problems.contains(&problem) {
            problems.push(problem);
        }
    }
}

/// Logs in to Vault as leasegate would.
async fn check_vault(config: &Config) -> anyhow::Result<()> {
    let metrics = std::sync::Arc::new(leasegate::metrics::Metrics::new());
    let vault = &config.fixed.vault;
    let client = leasegate::vault::VaultClient::new(vault, metrics)?;
    leasegate::vault::auth::check_login(&client, &vault.auth).await?;
    Ok(())
}
