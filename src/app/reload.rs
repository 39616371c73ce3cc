//! Reloading the configuration (SIGHUP, or the file watch). The new file loads whole; what
//! can change without dropping a session is applied: its [`ReloadableConfig`] (TLS material,
//! grants, databases, cluster peers, the session `[limits]`, `listen.login_timeout`,
//! `listen.tcp_keepalive`, `listen.shutdown_grace`, `listen.watch_interval`). Its
//! [`StaticConfig`] keeps its running value until a restart, and every key of it that changed
//! is named in a warning: the two are compared in their serialized form, whose keys are the
//! file's, so no list of keys is kept here. The configuration in force then becomes the
//! running one, so the watched files follow the new file's paths.

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use serde_json::Value;

use super::signals::Signals;
use crate::config::{Config, ReloadableConfig, StaticConfig};
use crate::error::EndReason;
use crate::metrics::labels::ReloadResult;
use crate::registry::Tracked;
use crate::state::{AppState, Live};
use crate::tasks::Tasks;

/// Reloads `path` into `state`. Returns the configuration now in force: the new one (with
/// the static settings kept at their running values), or `running` when the new file does
/// not load. A new cluster resolves its peers on `cluster`.
pub(crate) fn reload(state: &AppState, running: Config, path: &Path, cluster: &Tasks) -> Config {
    let refused = |e: &dyn std::fmt::Display| {
        tracing::error!(error = %e, "reload refused: keeping the running configuration");
        state.metrics.config_reload(ReloadResult::Error);
    };
    let new = match Config::load(path) {
        Ok(c) => c,
        Err(e) => {
            refused(&e);
            return running;
        }
    };
    let live = match Live::build(&new.reloadable, cluster) {
        Ok(l) => l,
        Err(e) => {
            refused(&e);
            return running;
        }
    };
    let (config, changed) = in_force(running, new);
    for key in changed {
        tracing::warn!("{key} changed: takes effect after a restart");
    }
    apply(state, &config, live);
    tracing::info!(
        databases = config.reloadable.databases.len(),
        grants = config.reloadable.grants.len(),
        "configuration reloaded"
    );
    state.metrics.config_reload(ReloadResult::Ok);
    if config.reloadable.listen.end_sessions_on_revoke {
        end_revoked(state);
    }
    config
}

/// Ends every open session the configuration now in force would refuse (its grant, database
/// or role removed), as `leasegate sessions end` does, with reason "grant removed".
fn end_revoked(state: &AppState) {
    let live = state.live.load_full();
    let refused = |t: &Tracked| {
        let f = &t.facts;
        let roles = live
            .databases
            .get(&f.database)
            .map(|d| d.config.roles.as_slice());
        let decision = live
            .policy
            .decide(&f.principal, &f.database, &f.role, roles);
        decision.is_err()
    };
    let ended = state.sessions.end_where(refused, &EndReason::GrantRemoved);
    for row in &ended {
        tracing::warn!(session = row.id, identities = ?row.identities, database = %row.database,
            role = %row.role, "grant removed by the reload: ending the session");
    }
}

/// What is in force after a reload from `running` to `new`: `new`'s reloadable settings with
/// `running`'s static ones; and the static keys whose new values wait for a restart.
fn in_force(running: Config, mut new: Config) -> (Config, Vec<String>) {
    // A `VAULT_TOKEN` taken from the environment at startup is not in the file: it stays.
    let token = running.fixed.vault.auth.inline_token().cloned();
    new.fixed.vault.auth.use_env_token(token);
    let changed = restart_only_changes(&running.fixed, &new.fixed);
    new.fixed = running.fixed;
    (new, changed)
}

/// Applies every reloadable setting. Each is named here, so that a new one does not compile
/// until it has its place.
fn apply(state: &AppState, config: &Config, live: Live) {
    let ReloadableConfig {
        // Into `live`, which every session starting from now on takes; `listen` also holds
        // `shutdown_grace` and `watch_interval`, which the drain and the file watch read from
        // the configuration in force.
        listen: _,
        grants: _,
        cluster: _,
        // Into `live` and the prefetch pools.
        databases: _,
        // Into the limiter (its counts live on) and the limit gauge.
        limits,
    } = &config.reloadable;
    state.live.store(Arc::new(live));
    state.prefetch.configure(config);
    state.limiter.set_limits(*limits);
    state
        .metrics
        .sessions_limit
        .set(i64::from(limits.max_sessions));
}

/// Every static key whose value differs, spelled as in the file (`listen.address`,
/// `vault.auth.role_id`), in alphabetical order.
pub(crate) fn restart_only_changes(old: &StaticConfig, new: &StaticConfig) -> Vec<String> {
    let (old, new) = (leaves(old), leaves(new));
    let keys: BTreeSet<&String> = old.keys().chain(new.keys()).collect();
    keys.into_iter()
        .filter(|k| old.get(*k) != new.get(*k))
        .cloned()
        .collect()
}

/// The settings serialized, as (dotted key, value) for every key that has a value.
fn leaves(settings: &StaticConfig) -> BTreeMap<String, Value> {
    let mut out = BTreeMap::new();
    match serde_json::to_value(settings) {
        Ok(value) => flatten(String::new(), value, &mut out),
        // Plain data always serializes (a unit test covers every key).
        Err(e) => tracing::error!(error = %e, "cannot compare the static settings"),
    }
    out
}

fn flatten(key: String, value: Value, out: &mut BTreeMap<String, Value>) {
    match value {
        Value::Object(map) => {
            for (name, value) in map {
                let inner = if key.is_empty() {
                    name
                } else {
                    format!("{key}.{name}")
                };
                flatten(inner, value, out);
            }
        }
        Value::Null => {}
        leaf => {
            out.insert(key, leaf);
        }
    }
}

/// The files whose content a reload applies: the configuration file, the listen TLS files
/// and CRLs, the cluster peer certificate, key and CA, and the upstream CAs.
pub(crate) fn watched_files(config: &Config, path: &Path) -> Vec<PathBuf> {
    let listen = &config.reloadable.listen;
    let mut files = vec![
        path.to_owned(),
        listen.cert.clone(),
        listen.key.clone(),
        listen.client_ca.clone(),
    ];
    files.extend(listen.crl.iter().cloned());
    if let Some(cluster) = &config.reloadable.cluster {
        files.extend([
            cluster.cert.clone(),
            cluster.key.clone(),
            cluster.ca_cert.clone(),
        ]);
    }
    let databases = &config.reloadable.databases;
    files.extend(
        databases
            .iter()
            .filter_map(|d| d.tls.ca_cert().map(Path::to_owned)),
    );
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
    let mut every = running.reloadable.listen.watch_interval;
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
        if running.reloadable.listen.watch_interval != every {
            every = running.reloadable.listen.watch_interval;
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

    fn changes(old: &str, new: &str) -> Vec<String> {
        restart_only_changes(&parse(old).fixed, &parse(new).fixed)
    }

    #[test]
    fn every_static_key_is_named() {
        assert!(changes(BASE, BASE).is_empty());
        let changed = BASE
            .replace("127.0.0.1:6432", "127.0.0.1:6433")
            .replace("127.0.0.1:9187", "127.0.0.1:9188")
            .replace(
                "address = \"http://127.0.0.1:8200\"",
                "address = \"http://127.0.0.1:8201\"\nca_cert = \"/ca\"\nnamespace = \"ns\"\n\
                 timeout = \"9s\"",
            )
            .replace(
                "token = \"s.one\"",
                "token = \"s.two\"\nmount = \"tok\"\ntoken_file = \"/t\"",
            )
            .replace(
                "[listen]\n",
                "[listen]\nmax_connections = 5\nlogin_timeout = \"3s\"\n",
            )
            + "[admin]\nsocket = \"/run/lg/admin.sock\"\n\
               [audit]\npath = \"/var/log/a.log\"\n[runtime]\nworker_threads = 1\n\
               [limits]\ncancels_per_second = 1\ncancels_per_second_per_address = 1\n\
               max_concurrent_cancels = 1\nmax_sessions = 3\n";
        assert_eq!(
            changes(BASE, &changed),
            [
                "admin.socket",
                "audit.path",
                "limits.cancels_per_second",
                "limits.cancels_per_second_per_address",
                "limits.max_concurrent_cancels",
                "listen.address",
                "listen.max_connections",
                "metrics.address",
                "runtime.worker_threads",
                "vault.address",
                "vault.auth.mount",
                "vault.auth.token",
                "vault.auth.token_file",
                "vault.ca_cert",
                "vault.namespace",
                "vault.timeout",
            ],
            "every static key, and none of the reloadable ones (login_timeout, max_sessions)"
        );
        let dropped = BASE.replace("[metrics]\naddress = \"127.0.0.1:9187\"\n", "");
        assert_eq!(changes(BASE, &dropped), ["metrics.address"]);
    }

    #[test]
    fn auth_keys_are_named_as_the_file_spells_them() {
        let approle = |keys: &str| {
            BASE.replace(
                "method = \"token\"\ntoken = \"s.one\"",
                &format!("method = \"approle\"\nsecret_id_file = \"/s\"\n{keys}"),
            )
        };
        assert_eq!(
            changes(
                &approle("role_id = \"a\""),
                &approle("role_id_file = \"/r\"")
            ),
            ["vault.auth.role_id", "vault.auth.role_id_file"]
        );
        assert_eq!(
            changes(BASE, &approle("role_id = \"a\"")),
            [
                "vault.auth.method",
                "vault.auth.role_id",
                "vault.auth.secret_id_file",
                "vault.auth.token"
            ]
        );
    }

    #[test]
    fn static_settings_keep_their_running_values() {
        let old = parse(BASE);
        let new = parse(
            &(BASE
                .replace("127.0.0.1:6432", "127.0.0.1:6433")
                .replace("[listen]\n", "[listen]\nlogin_timeout = \"3s\"\n")
                + "[runtime]\nworker_threads = 1\n[limits]\nmax_sessions = 7\n"),
        );
        let (new, changed) = in_force(old, new);
        assert_eq!(changed, ["listen.address", "runtime.worker_threads"]);
        assert_eq!(new.fixed.listen.address.port(), 6432, "not applied: kept");
        assert_eq!(new.fixed.runtime.worker_threads, None, "not applied: kept");
        let reloadable = &new.reloadable;
        assert_eq!(
            reloadable.listen.login_timeout,
            Duration::from_secs(3),
            "applied"
        );
        assert_eq!(reloadable.limits.max_sessions, 7, "applied");
        let again = parse(&BASE.replace("127.0.0.1:6432", "127.0.0.1:6433"));
        assert_eq!(
            restart_only_changes(&new.fixed, &again.fixed),
            ["listen.address"],
            "a later reload still warns"
        );
    }

    #[test]
    fn a_token_from_the_environment_is_no_change() {
        let no_token = BASE.replace("token = \"s.one\"\n", "");
        let mut running = parse(&no_token);
        let env = secrecy::SecretString::from("s.env".to_owned());
        running.fixed.vault.auth.use_env_token(Some(env));
        let (config, changed) = in_force(running, parse(&no_token));
        assert!(changed.is_empty(), "{changed:?}");
        assert!(config.fixed.vault.auth.inline_token().is_some());
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
