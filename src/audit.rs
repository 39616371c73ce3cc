//! The audit log: one JSON line per session start, session end and refusal, with who (every
//! certificate identity, serial, fingerprint), from where, which database and role, which
//! upstream user and lease, how long and how many bytes. Never a password or token: the
//! event types have no field that could hold one.

use std::io::Write;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::SystemTime;

use serde::Serialize;
use tokio::sync::mpsc;

use crate::tls::identity::Principal;

/// One audit line.
#[derive(Debug, Serialize, Default, Clone)]
pub struct AuditEvent {
    /// RFC 3339 time with milliseconds.
    pub time: String,
    /// `session_start`, `session_end` or `refused`.
    pub event: &'static str,
    /// The client's address.
    pub client_addr: String,
    /// Every identity of the certificate (`uri:…`, `dns:…`, `cn:…`).
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub identities: Vec<String>,
    /// Certificate serial, hex.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub cert_serial: Option<String>,
    /// SHA-256 of the certificate, hex.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub cert_sha256: Option<String>,
    /// Requested database.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub database: Option<String>,
    /// Requested Vault role.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub role: Option<String>,
    /// Database user Vault issued.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub upstream_user: Option<String>,
    /// Vault lease id.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub lease_id: Option<String>,
    /// Session duration (end events).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub duration_ms: Option<u64>,
    /// Bytes client → upstream (end events).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub bytes_to_upstream: Option<u64>,
    /// Bytes upstream → client (end events).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub bytes_to_client: Option<u64>,
    /// Why the session ended, or why the client was refused.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub reason: Option<String>,
    /// SQLSTATE the client was sent (refusals and failures).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub sqlstate: Option<String>,
}

impl AuditEvent {
    /// An event of `kind` for a client, stamped now.
    pub fn new(event: &'static str, peer: SocketAddr) -> AuditEvent {
        AuditEvent {
            time: humantime::format_rfc3339_millis(SystemTime::now()).to_string(),
            event,
            client_addr: peer.to_string(),
            ..AuditEvent::default()
        }
    }

    /// Adds the certificate's identities.
    pub fn principal(mut self, p: &Principal) -> AuditEvent {
        self.identities = p.all_identities();
        self.cert_serial = Some(p.serial.clone());
        self.cert_sha256 = Some(p.fingerprint.clone());
        self
    }

    /// The same facts as a new event of another kind, stamped now.
    pub fn again(&self, event: &'static str) -> AuditEvent {
        AuditEvent {
            time: humantime::format_rfc3339_millis(SystemTime::now()).to_string(),
            event,
            ..self.clone()
        }
    }

    /// Adds the client-visible outcome of a refusal or failure.
    pub fn error(mut self, err: &crate::error::SessionError) -> AuditEvent {
        self.reason = Some(err.to_string());
        self.sqlstate = Some(err.sqlstate().to_owned());
        self
    }

    /// Adds the requested database and role.
    pub fn request(mut self, database: &str, role: &str) -> AuditEvent {
        self.database = Some(printable(database));
        self.role = Some(printable(role));
        self
    }
}

/// A client-supplied name with every control character (C0, DEL, C1) escaped, so audit lines
/// stay one printable line whatever a hostile client sends.
fn printable(name: &str) -> String {
    name.chars()
        .flat_map(|c| {
            let escape = c.is_control();
            let (a, b) = if escape {
                (Some(c.escape_unicode()), None)
            } else {
                (None, Some(c))
            };
            a.into_iter().flatten().chain(b)
        })
        .collect()
}

/// Where audit lines go. Cloning shares the writer.
#[derive(Clone)]
pub struct AuditLog {
    tx: mpsc::UnboundedSender<AuditEvent>,
}

impl AuditLog {
    /// Starts the writer task: `None` or `-` writes to stderr, a path appends to that file.
    pub fn spawn(path: Option<PathBuf>) -> std::io::Result<AuditLog> {
        let mut out: Box<dyn Write + Send> = match path.as_ref().filter(|p| p.as_os_str() != "-") {
            Some(p) => Box::new(
                std::fs::OpenOptions::new()
                    .create(true)
                    .append(true)
                    .open(p)?,
            ),
            None => Box::new(std::io::stderr()),
        };
        let (tx, mut rx) = mpsc::unbounded_channel::<AuditEvent>();
        tokio::task::spawn_blocking(move || {
            while let Some(event) = rx.blocking_recv() {
                let Ok(mut line) = serde_json::to_vec(&event) else {
                    continue;
                };
                line.push(b'\n');
                if let Err(e) = out.write_all(&line).and_then(|()| out.flush()) {
                    tracing::error!(error = %e, "cannot write the audit log");
                }
            }
        });
        Ok(AuditLog { tx })
    }

    /// Queues one line.
    pub fn record(&self, event: AuditEvent) {
        let _ = self.tx.send(event);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn control_characters_are_escaped() {
        assert_eq!(printable("ro\u{7}\u{7f}\u{85}x"), "ro\\u{7}\\u{7f}\\u{85}x");
    }

    #[test]
    fn serializes_only_present_fields() {
        let p = Principal::new(vec!["spiffe://x/a".into()], vec![], Some("a".into()));
        let mut e = AuditEvent::new("refused", "127.0.0.1:5000".parse().expect("addr"))
            .principal(&p)
            .request("myapp", "readonly");
        e.sqlstate = Some("28000".into());
        let v: serde_json::Value = serde_json::to_value(&e).expect("json");
        assert_eq!(v["event"], "refused");
        assert_eq!(
            v["identities"],
            serde_json::json!(["uri:spiffe://x/a", "cn:a"])
        );
        assert_eq!(v["database"], "myapp");
        assert!(v.get("lease_id").is_none());
    }
}
