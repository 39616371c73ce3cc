//! Reloading the configuration (SIGHUP, or the file watch): the new file is compared with the
//! running configuration key by key. What can change without dropping a session is applied
//! (TLS material, grants, databases, cluster peers, the session `[limits]`,
//! `listen.login_timeout`,
//! `listen.tcp_keepalive`, `listen.shutdown_grace`, `listen.watch_interval`); every other
//! changed key is named in a warning and stays as it was until a restart. The configuration
//! in force then becomes the running one, so the watched files follow the new file's paths.

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use secrecy::ExposeSecret;

use super::{AppState, Live, Signals};
use crate::config::{Config, VaultAuthConfig};
use crate::tasks::Tasks;

/// Reloads `path` into `state`. Returns the configuration now in force: the new one (with
/// the keys that need a restart kept at their running values), or `running` when the new file
/// does not load. A new cluster resolves its peers on `cluster`.
pub(crate) fn reload(state: &AppState, running: Config, path: &Path, cluster: &Tasks) -> Config {
    let mut config = match Config::load(path) {
        Ok(c) => c,
        Err(e) => {
            tracing::error!(error = %e, "reload refused: keeping the running configuration");
            return running;
        }
    };
    // A `VAULT_TOKEN` taken from the environment at startup is not in the file: it stays.
    let auth = &mut config.vault.auth;
    if auth.token.is_none() && auth.token_file.is_none() {
        auth.token = running.vault.auth.token.clone();
    }
    let live = match Live::build(&config, cluster) {
        Ok(l) => l,
        Err(e) => {
            tracing::error!(error = %e, "reload refused: keeping the running configuration");
            return running;
        }
    };
    for key in restart_only_changes(&running, &config) {
        tracing::warn!("{key} changed: takes effect after a restart");
    }
    keep_restart_only(&mut config, running);
    state.live.store(Arc::new(live));
    state.prefetch.configure(&config);
    state.limiter.set_limits(config.limits.clone());
    state
        .metrics
        .sessions_limit
        .set(i64::from(config.limits.max_sessions));
    tracing::info!(
        databases = config.databases.len(),
        grants = config.grants.len(),
        "configuration reloaded"
    );
    config
}

/// Every key whose new value is not applied by a reload, when it differs.
pub fn restart_only_changes(old: &Config, new: &Config) -> Vec<&'static str> {
    let mut changed = Vec::new();
    let mut check = |key: &'static str, differs: bool| {
        if differs {
            changed.push(key);
        }
    };
    check("listen.address", old.listen.address != new.listen.address);
    check(
        "listen.max_connections",
        old.listen.max_connections != new.listen.max_connections,
    );
    let metrics = |c: &Config| c.metrics.as_ref().map(|m| m.address);
    check("metrics.address", metrics(old) != metrics(new));
    let (ov, nv) = (&old.vault, &new.vault);
    check("vault.address", ov.address != nv.address);
    check("vault.ca_cert", ov.ca_cert != nv.ca_cert);
    check("vault.namespace", ov.namespace != nv.namespace);
    check("vault.timeout", ov.timeout != nv.timeout);
    auth_changes(&ov.auth, &nv.auth, &mut check);
    check("audit.path", old.audit.path != new.audit.path);
    let (ol, nl) = (&old.limits, &new.limits);
    check(
        "limits.cancels_per_second",
        ol.cancels_per_second != nl.cancels_per_second,
    );
    check(
        "limits.cancels_per_second_per_address",
        ol.cancels_per_second_per_address != nl.cancels_per_second_per_address,
    );
    check(
        "limits.max_concurrent_cancels",
        ol.max_concurrent_cancels != nl.max_concurrent_cancels,
    );
    check(
        "runtime.worker_threads",
        old.runtime.worker_threads != new.runtime.worker_threads,
    );
    changed
}

fn auth_changes(
    old: &VaultAuthConfig,
    new: &VaultAuthConfig,
    check: &mut impl FnMut(&'static str, bool),
) {
    let token = |a: &VaultAuthConfig| a.token.as_ref().map(|t| t.expose_secret().to_owned());
    check("vault.auth.method", old.method != new.method);
    check("vault.auth.mount", old.mount != new.mount);
    check("vault.auth.token", token(old) != token(new));
    check("vault.auth.token_file", old.token_file != new.token_file);
    check("vault.auth.role_id", old.role_id != new.role_id);
    check(
        "vault.auth.role_id_file",
        old.role_id_file != new.role_id_file,
    );
    check(
        "vault.auth.secret_id_file",
        old.secret_id_file != new.secret_id_file,
    );
    check("vault.auth.role", old.role != new.role);
    check("vault.auth.jwt_file", old.jwt_file != new.jwt_file);
    check("vault.auth.cert", old.cert != new.cert);
    check("vault.auth.key", old.key != new.key);
}

/// Puts the running values of the restart-only keys back into `new`, so that the running
/// configuration says what is really in force (and a later reload warns again).
fn keep_restart_only(new: &mut Config, old: Config) {
    new.listen.address = old.listen.address;
    new.listen.max_connections = old.listen.max_connections;
    new.metrics = old.metrics;
    new.vault = old.vault;
    new.audit = old.audit;
    new.limits.cancels_per_second = old.limits.cancels_per_second;
    new.limits.cancels_per_second_per_address = old.limits.cancels_per_second_per_address;
    new.limits.max_concurrent_cancels = old.limits.max_concurrent_cancels;
    new.runtime = old.runtime;
}

/// The files whose content a reload applies: the configuration file, the listen TLS files
/// and CRLs, the cluster peer certificate, key and CA, and the upstream CAs.
pub fn watched_files(config: &Config, path: &Path) -> Vec<PathBuf> {
    let listen = &config.listen;
    let mut files = vec![
        path.to_owned(),
        listen.cert.clone(),
        listen.key.clone(),
        listen.client_ca.clone(),
    ];
    files.extend(listen.crl.iter().cloned());
    if let Some(cluster) = &config.cluster {
        files.extend([cluster.cert.clone(), cluster.key.clone()]);
        files.extend(cluster.ca_cert.iter().cloned());
    }
    files.extend(config.databases.iter().filter_map(|d| d.ca_cert.clone()));
    files
}

/// Modification times of the watched files.
fn files_changed_at(config: &Config, path: &Path) -> Vec<Option<SystemTime>> {
    watched_files(config, path)
        .iter()
        .map(|p| std::fs::metadata(p).and_then(|m| m.modified()).ok())
        .collect()
}

/// Serves SIGHUP and the optional file watch until SIGTERM or SIGINT; returns the running
/// configuration then, and the signal's name.
pub(super) async fn until_stopped(
    state: &AppState,
    mut running: Config,
    path: &Path,
    signals: &mut Signals,
    cluster: &Tasks,
) -> (Config, &'static str) {
    let arm = |every: Option<Duration>| every.map(tokio::time::interval);
    let mut every = running.listen.watch_interval;
    let mut watch = arm(every);
    let mut seen = files_changed_at(&running, path);
    loop {
        let tick = async {
            match watch.as_mut() {
                Some(w) => {
                    w.tick().await;
                }
                None => std::future::pending().await,
            }
        };
        tokio::select! {
            s = signals.next() => match s {
                "SIGHUP" => running = reload(state, running, path, cluster),
                other => return (running, other),
            },
            () = tick => {
                if files_changed_at(&running, path) == seen {
                    continue;
                }
                tracing::info!("configuration or TLS files changed: reloading");
                running = reload(state, running, path, cluster);
            }
        }
        // The running configuration may name other files, or another interval, now.
        seen = files_changed_at(&running, path);
        if running.listen.watch_interval != every {
            every = running.listen.watch_interval;
            watch = arm(every);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const BASE: &str = r#"
[listen]
address = "127.0.0.1:6432"
cert = "/etc/lg/server.pem"
key = "/etc/lg/server-key.pem"
client_ca = "/etc/lg/ca.pem"
[vault]
address = "http://127.0.0.1:8200"
[vault.auth]
method = "token"
token = "s.one"
[metrics]
address = "127.0.0.1:9187"
"#;

    fn parse(text: &str) -> Config {
        Config::parse(text).expect("parses")
    }

    #[test]
    fn every_restart_only_key_is_named() {
        let old = parse(BASE);
        assert!(restart_only_changes(&old, &parse(BASE)).is_empty());
        let changed = BASE
            .replace("127.0.0.1:6432", "127.0.0.1:6433")
            .replace("127.0.0.1:9187", "127.0.0.1:9188")
            .replace("http://127.0.0.1:8200", "http://127.0.0.1:8201")
            .replace("token = \"s.one\"", "token = \"s.two\"\nmount = \"tok\"")
            .replace(
                "[listen]\n",
                "[listen]\nmax_connections = 5\nlogin_timeout = \"3s\"\n",
            )
            + "[audit]\npath = \"/var/log/a.log\"\n[runtime]\nworker_threads = 1\n";
        let keys = restart_only_changes(&old, &parse(&changed));
        assert_eq!(
            keys,
            [
                "listen.address",
                "listen.max_connections",
                "metrics.address",
                "vault.address",
                "vault.auth.mount",
                "vault.auth.token",
                "audit.path",
                "runtime.worker_threads",
            ]
        );
    }

    #[test]
    fn restart_only_keys_keep_their_running_values() {
        let old = parse(BASE);
        let mut new = parse(
            &(BASE
                .replace("127.0.0.1:6432", "127.0.0.1:6433")
                .replace("[listen]\n", "[listen]\nlogin_timeout = \"3s\"\n")
                + "[runtime]\nworker_threads = 1\n[limits]\nmax_sessions = 7\n"),
        );
        keep_restart_only(&mut new, old);
        assert_eq!(new.listen.address.port(), 6432, "not applied: kept");
        assert_eq!(new.runtime.worker_threads, None, "not applied: kept");
        assert_eq!(new.listen.login_timeout, Duration::from_secs(3), "applied");
        assert_eq!(new.limits.max_sessions, 7, "applied");
        let again = parse(&BASE.replace("127.0.0.1:6432", "127.0.0.1:6433"));
        assert_eq!(
            restart_only_changes(&new, &again),
            ["listen.address"],
            "a later reload still warns"
        );
    }

    #[test]
    fn watched_files_follow_the_configuration() {
        let text = BASE.replace(
            "client_ca = \"/etc/lg/ca.pem\"",
            "client_ca = \"/etc/lg/ca.pem\"\ncrl = [\"/etc/lg/ca.crl\"]",
        ) + "[[databases]]\nname = \"d\"\nhost = \"h\"\nmount = \"m\"\nroles = [\"r\"]\n\
             tls = \"verify-ca\"\nca_cert = \"/etc/lg/pg-ca.pem\"\n";
        let files = watched_files(&parse(&text), Path::new("/etc/lg/leasegate.toml"));
        let names: Vec<String> = files.iter().map(|p| p.display().to_string()).collect();
        assert_eq!(
            names,
            [
                "/etc/lg/leasegate.toml",
                "/etc/lg/server.pem",
                "/etc/lg/server-key.pem",
                "/etc/lg/ca.pem",
                "/etc/lg/ca.crl",
                "/etc/lg/pg-ca.pem",
            ]
        );
    }
}
