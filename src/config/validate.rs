//! Checks of the file as written that need no network: every problem is reported at once, as
//! one line each. Files must exist, secret files must not be readable by others (a warning
//! when their group can read them), values must be in range, and grants must name databases
//! and roles that are configured. What a method or mode needs (the keys that must be there)
//! is checked where the typed configuration is built ([`super::model`]).

use std::collections::HashSet;
use std::path::{Path, PathBuf};

use super::schema::{Database, File, Limits, TlsMode, VaultAuth};
use super::socket_dir;
use crate::protocol::options;
use crate::secret_files::{Finding, check_secret_file};

/// Most warm sessions per role and startup-parameter set: each is an upstream backend.
const MAX_WARM: usize = 64;

/// Every problem found, as lines; `source` is the file `file` was read from.
pub(super) fn problems(file: &File, source: Option<&Path>) -> Vec<String> {
    let mut problems = Vec::new();
    files(file, source, &mut problems);
    let address = &file.vault.address;
    if !(address.starts_with("http://") || address.starts_with("https://")) {
        problems.push(format!(
            "vault.address {address:?} must start with http:// or https://"
        ));
    }
    auth_mount(&file.vault.auth, &mut problems);
    limits(&file.limits, &mut problems);
    if file.runtime.worker_threads == Some(0) {
        problems.push("runtime.worker_threads must be at least 1".into());
    }
    if file.listen.max_connections == 0 {
        problems.push("listen.max_connections must be at least 1".into());
    }
    unix_socket(&file.listen, &mut problems);
    if file.cluster.as_ref().is_some_and(|c| c.peers.is_empty()) {
        problems.push("cluster.peers is empty: name the other instances".into());
    }
    databases(&file.databases, &mut problems);
    grants(file, &mut problems);
    problems
}

/// Things worth an operator's attention that do not refuse the configuration (secret files
/// their group can read).
pub(super) fn warnings(file: &File, source: Option<&Path>) -> Vec<String> {
    secret_file_findings(file, source)
        .filter_map(|f| match f {
            Finding::Warning(w) => Some(w),
            _ => None,
        })
        .collect()
}

/// `listen.unix_socket_mode` parses; `listen.unix_socket_dir` is fit for the socket.
fn unix_socket(listen: &super::schema::Listen, problems: &mut Vec<String>) {
    if let Some(mode) = &listen.unix_socket_mode
        && let Err(e) = socket_dir::parse_mode(mode)
    {
        problems.push(e);
    }
    if let Some(dir) = &listen.unix_socket_dir {
        let checked = socket_dir::check_dir(dir)
            .and_then(|()| socket_dir::check_length(dir, listen.address.port()));
        if let Err(e) = checked {
            problems.push(e);
        }
    }
}

fn auth_mount(auth: &VaultAuth, problems: &mut Vec<String>) {
    if !auth.mount().split('/').all(is_safe_path_segment) {
        problems.push(format!(
            "vault.auth.mount {:?} is not a valid Vault path",
            auth.mount()
        ));
    }
}

/// Every limit must be able to let a session through: integers at least 1, the rate a finite
/// number above 0 (`nan` would compare false everywhere and turn the bucket off).
fn limits(limits: &Limits, problems: &mut Vec<String>) {
    for (key, value) in [
        ("max_sessions", limits.max_sessions),
        (
            "max_sessions_per_identity",
            limits.max_sessions_per_identity,
        ),
        ("burst_per_identity", limits.burst_per_identity),
        ("cancels_per_second", limits.cancels_per_second),
        (
            "cancels_per_second_per_address",
            limits.cancels_per_second_per_address,
        ),
        ("max_concurrent_cancels", limits.max_concurrent_cancels),
    ] {
        if value == 0 {
            problems.push(format!("limits.{key} must be at least 1 (got 0)"));
        }
    }
    let rate = limits.new_sessions_per_second_per_identity;
    if !(rate.is_finite() && rate > 0.0) {
        problems.push(format!(
            "limits.new_sessions_per_second_per_identity must be a finite number above 0 (got {rate})"
        ));
    }
}

/// Every file that holds a secret, by key, and whether every user reading it refuses the
/// configuration (`false`: a warning). The Kubernetes service-account token (`jwt_file`) is
/// left out: the kubelet mounts it world-readable itself.
fn secret_files<'a>(
    file: &'a File,
    source: Option<&'a Path>,
) -> Vec<(&'static str, &'a Path, bool)> {
    let auth = &file.vault.auth;
    let mut files = vec![("listen.key", file.listen.key.as_path(), true)];
    if let Some(cluster) = &file.cluster {
        files.push(("cluster.key", &cluster.key, true));
    }
    let optional = [
        ("vault.auth.key", &auth.key, true),
        ("vault.auth.token_file", &auth.token_file, true),
        ("vault.auth.secret_id_file", &auth.secret_id_file, true),
        ("vault.auth.role_id_file", &auth.role_id_file, false),
    ];
    for (key, path, strict) in optional {
        files.extend(path.as_deref().map(|p| (key, p, strict)));
    }
    if auth.token.is_some()
        && let Some(source) = source
    {
        files.push((
            "the configuration file (it holds vault.auth.token)",
            source,
            true,
        ));
    }
    files
}

/// What `check_secret_file` says of every secret file.
fn secret_file_findings<'a>(
    file: &'a File,
    source: Option<&'a Path>,
) -> impl Iterator<Item = Finding> + 'a {
    secret_files(file, source)
        .into_iter()
        .map(|(key, path, strict)| check_secret_file(key, path, strict))
}

/// Every named file must exist; secret files must not be readable by others.
fn files(file: &File, source: Option<&Path>, problems: &mut Vec<String>) {
    let mut files: Vec<(&str, &PathBuf)> = vec![
        ("listen.cert", &file.listen.cert),
        ("listen.key", &file.listen.key),
        ("listen.client_ca", &file.listen.client_ca),
    ];
    files.extend(file.listen.crl.iter().map(|p| ("listen.crl", p)));
    files.extend(file.vault.ca_cert.iter().map(|p| ("vault.ca_cert", p)));
    let auth = &file.vault.auth;
    for (key, path) in [
        ("vault.auth.token_file", &auth.token_file),
        ("vault.auth.role_id_file", &auth.role_id_file),
        ("vault.auth.secret_id_file", &auth.secret_id_file),
        ("vault.auth.cert", &auth.cert),
        ("vault.auth.key", &auth.key),
    ] {
        files.extend(path.iter().map(|p| (key, p)));
    }
    if let Some(cluster) = &file.cluster {
        files.push(("cluster.cert", &cluster.cert));
        files.push(("cluster.key", &cluster.key));
        files.extend(cluster.ca_cert.iter().map(|p| ("cluster.ca_cert", p)));
    }
    files.extend(
        file.databases
            .iter()
            .filter_map(|d| d.ca_cert.as_ref())
            .map(|p| ("databases.ca_cert", p)),
    );
    for (key, path) in files {
        if let Err(e) = std::fs::metadata(path) {
            problems.push(format!("{key}: cannot read {}: {e}", path.display()));
        }
    }
    problems.extend(secret_file_findings(file, source).filter_map(|f| match f {
        Finding::Problem(p) => Some(p),
        _ => None,
    }));
}

fn databases(databases: &[Database], problems: &mut Vec<String>) {
    let mut seen = HashSet::new();
    for db in databases {
        if !seen.insert(db.name.as_str()) {
            problems.push(format!("database {:?} is configured twice", db.name));
        }
        database(db, problems);
    }
}

fn database(db: &Database, problems: &mut Vec<String>) {
    if db.roles.is_empty() {
        problems.push(format!("database {:?} lists no roles", db.name));
    }
    for role in &db.roles {
        if !is_safe_path_segment(role) {
            problems.push(format!(
                "database {:?}: role {role:?} may only contain letters, digits, '-', '_' and '.'",
                db.name
            ));
        }
    }
    if !db.mount.split('/').all(is_safe_path_segment) {
        problems.push(format!(
            "database {:?}: mount {:?} is not a valid Vault path",
            db.name, db.mount
        ));
    }
    for role in db.prefetch.keys().filter(|r| !db.roles.contains(r)) {
        problems.push(format!(
            "database {:?}: prefetch names role {role:?}, which is not in its roles",
            db.name
        ));
    }
    for role in db.warm.keys().filter(|r| !db.roles.contains(r)) {
        problems.push(format!(
            "database {:?}: warm names role {role:?}, which is not in its roles",
            db.name
        ));
    }
    for (role, &n) in db.warm.iter().filter(|(_, n)| **n > MAX_WARM) {
        problems.push(format!(
            "database {:?}: warm = {{ {role} = {n} }} is more than {MAX_WARM} sessions per role",
            db.name
        ));
    }
    let socket = socket_dir::upstream_socket(&db.host, db.port);
    if let Some(path) = &socket
        && path.as_os_str().len() > socket_dir::PATH_MAX
    {
        problems.push(format!(
            "database {:?}: the upstream socket {} is {} bytes long, at most {} fit in a Unix socket address",
            db.name,
            path.display(),
            path.as_os_str().len(),
            socket_dir::PATH_MAX
        ));
    }
    if socket.is_some() && db.tls != TlsMode::Disable {
        problems.push(format!(
            "database {:?}: host {:?} is a Unix socket directory, where TLS does not apply: set tls = \"disable\"",
            db.name, db.host
        ));
    } else if db.tls == TlsMode::VerifyFull
        && rustls::pki_types::ServerName::try_from(db.host.as_str()).is_err()
    {
        problems.push(format!(
            "database {:?}: tls = verify-full needs a host name or IP address to check the certificate against, and {:?} is neither",
            db.name, db.host
        ));
    }
    for name in &db.allow_startup_parameters {
        if let Some(why) = startup_parameter_problem(name) {
            problems.push(format!(
                "database {:?}: allow_startup_parameters: {name:?} {why}",
                db.name
            ));
        }
    }
}

/// Grants must name configured databases, and roles those databases list.
fn grants(file: &File, problems: &mut Vec<String>) {
    for (i, grant) in file.grants.iter().enumerate() {
        for name in grant.databases.iter().filter(|n| *n != "*") {
            let Some(db) = file.databases.iter().find(|d| &d.name == name) else {
                problems.push(format!(
                    "grants[{i}] ({}) names database {name:?}, which is not configured",
                    grant.identity
                ));
                continue;
            };
            for role in grant.roles.iter().filter(|r| *r != "*") {
                if !db.roles.contains(role) {
                    problems.push(format!(
                        "grants[{i}] ({}) names role {role:?}, which database {name:?} does not list",
                        grant.identity
                    ));
                }
            }
        }
    }
}

/// Why `name` cannot be in `allow_startup_parameters`, if it cannot: it must look like a
/// setting name and not be a parameter leasegate handles itself (any case).
pub(super) fn startup_parameter_problem(name: &str) -> Option<&'static str> {
    let lower = name.to_ascii_lowercase();
    if options::is_protocol_parameter(&lower) || lower == "fallback_application_name" {
        Some("is a startup parameter leasegate handles itself, not a setting")
    } else if lower == "post_auth_delay" {
        Some("makes the server sleep after the login, holding a connection slot")
    } else if !options::is_setting_name(name) {
        Some("is not a setting name (letters, digits and '_', parts separated by '.')")
    } else {
        None
    }
}

/// True for names that can stand in a Vault URL path segment without escaping.
pub(super) fn is_safe_path_segment(s: &str) -> bool {
    !s.is_empty()
        && s != "."
        && s != ".."
        && s.len() <= 128
        && s.bytes()
            .all(|b| b.is_ascii_alphanumeric() || b"-_.".contains(&b))
}
