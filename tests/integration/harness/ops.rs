//! What the operations tests (`ops_*` modules) share: files of the repository and the output
//! of the tools run on them, the running leasegate's config file rewritten and reloaded with
//! SIGHUP, log lines awaited with a deadline, and certificates as leasegate presents them.

use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};
use std::time::Duration;

use rcgen::{ExtendedKeyUsagePurpose, SanType, SerialNumber, date_time_ymd};
use rustls::pki_types::CertificateDer;

use super::client::{PgSession, tls_config};
use super::fixture::Fixture;
use super::pki::{ClientCert, Identity, Pki};
use super::proxy::Proxy;
use super::wire::tls_connect;
use super::{poll_until, tail};

/// A path inside the repository (the crate's manifest directory).
pub fn repo(path: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join(path)
}

/// A finished command's stdout followed by its stderr, for assertions and failure messages.
pub fn output_text(out: &Output) -> String {
    format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    )
}

/// `python3 scripts/check-deploy.py ARGS...` (its helpers for the live tests: writing a
/// prometheus.yml, listing the dashboard's queries, checking metric names against a scrape).
pub fn check_deploy(args: &[&str]) -> Output {
    Command::new("python3")
        .arg(repo("scripts/check-deploy.py"))
        .args(args)
        .stdin(Stdio::null())
        .output()
        .expect("run python3 scripts/check-deploy.py")
}

// ------------------------------------------------------------------------------- log lines

/// Number of lines of leasegate's log containing `needle`.
pub fn log_count(proxy: &Proxy, needle: &str) -> usize {
    proxy
        .log_text()
        .lines()
        .filter(|l| l.contains(needle))
        .count()
}

/// Polls the log until more than `before` lines contain `needle`.
pub async fn wait_log(proxy: &Proxy, needle: &str, before: usize) {
    poll_until(
        Duration::from_secs(10),
        &format!("a new log line with {needle:?}"),
        || async move {
            match log_count(proxy, needle) {
                n if n > before => Ok(()),
                n => Err(format!(
                    "{n} such lines; log tail:\n{}",
                    tail(&proxy.log, 1500)
                )),
            }
        },
    )
    .await;
}

// ------------------------------------------------------------------------------- config file

/// Sends SIGHUP and waits for the log line `needle` that answers it.
pub async fn reload(proxy: &Proxy, needle: &str) {
    let before = log_count(proxy, needle);
    proxy.signal("HUP");
    wait_log(proxy, needle, before).await;
}

/// The running leasegate's config file.
pub fn config_path(proxy: &Proxy) -> PathBuf {
    proxy.dir().join("leasegate.toml")
}

/// The running leasegate's config file, parsed.
pub fn read_config(proxy: &Proxy) -> toml::Table {
    std::fs::read_to_string(config_path(proxy))
        .expect("read leasegate.toml")
        .parse()
        .expect("leasegate.toml is TOML")
}

/// Replaces the config file atomically (a reload never reads half a file).
pub fn write_config_text(proxy: &Proxy, text: &str) {
    let path = config_path(proxy);
    let tmp = path.with_extension("toml.new");
    std::fs::write(&tmp, text).expect("write new config");
    std::fs::rename(&tmp, &path).expect("replace leasegate.toml");
}

/// Edits the running leasegate's config file with `edit` (atomically replaced).
pub fn edit_config(proxy: &Proxy, edit: impl FnOnce(&mut toml::Table)) {
    let mut config = read_config(proxy);
    edit(&mut config);
    write_config_text(proxy, &toml::to_string(&config).expect("serialise config"));
}

// ------------------------------------------------------------------------------- certificates

/// The leaf certificate leasegate presents in a new handshake.
pub async fn presented_cert(f: &Fixture) -> CertificateDer<'static> {
    let tls = tls_connect(f.proxy.port, tls_config(&f.pki, Some(&f.good)))
        .await
        .expect("TLS handshake with leasegate");
    let (_, conn) = tls.get_ref();
    conn.peer_certificates()
        .and_then(|c| c.first())
        .expect("server certificate")
        .clone()
        .into_owned()
}

/// The first certificate of a PEM file.
pub fn pem_cert(path: &Path) -> CertificateDer<'static> {
    let pem = std::fs::read(path).expect("read PEM");
    use rustls::pki_types::pem::PemObject;
    CertificateDer::pem_slice_iter(&pem)
        .next()
        .expect("a certificate")
        .expect("PEM certificate")
}

/// A server certificate for localhost/127.0.0.1 from the test CA with serial `serial`.
pub fn server_cert(pki: &Pki, name: &str, serial: u64, expired: bool) -> ClientCert {
    pki.client_with(name, Identity::Dns("localhost".into()), |p| {
        p.subject_alt_names
            .push(SanType::IpAddress(std::net::Ipv4Addr::LOCALHOST.into()));
        p.extended_key_usages = vec![ExtendedKeyUsagePurpose::ServerAuth];
        p.serial_number = Some(SerialNumber::from(serial));
        if expired {
            p.not_before = date_time_ymd(2020, 1, 1);
            p.not_after = date_time_ymd(2021, 1, 1);
        }
    })
}

/// Lower-case hex of `bytes`, without separators.
pub fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

/// Serial as hex without separators or leading zeros, lower case.
pub fn norm_serial(s: &str) -> String {
    let s: String = s
        .chars()
        .filter(|c| c.is_ascii_hexdigit())
        .collect::<String>()
        .to_ascii_lowercase();
    s.trim_start_matches('0').to_string()
}

/// A certificate's serial number as [`norm_serial`] writes it.
pub fn cert_serial(der: &CertificateDer<'_>) -> String {
    use x509_parser::prelude::{FromDer, X509Certificate};
    let (_, x509) = X509Certificate::from_der(der.as_ref()).expect("parse certificate");
    norm_serial(&hex(x509.raw_serial()))
}

// ------------------------------------------------------------------------------- sessions

/// A query through `s` answers; `what` names the session in the failure message.
pub async fn assert_query_works(s: &PgSession, what: &str) {
    let n: i64 = s
        .client
        .query_one("select count(*) from generate_series(1, 10)", &[])
        .await
        .unwrap_or_else(|e| panic!("{what}: query failed: {e:?}"))
        .get(0);
    assert_eq!(n, 10, "{what}");
}
