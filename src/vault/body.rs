//! Vault answer and request bodies that may hold secrets (issued passwords, tokens,
//! secret_ids, JWTs): read chunk by chunk into memory that is zeroized when dropped, within a
//! deadline, with a size limit; parsed without echoing values into error text; login bodies
//! serialised once into zeroizing memory and handed to the HTTP client without a copy.

use std::time::Duration;

use bytes::Bytes;
use serde::Serialize;
use serde::de::DeserializeOwned;
use tokio::time::Instant;
use zeroize::Zeroizing;

use super::error::VaultError;

/// Largest answer body leasegate reads (a creds answer is well under 4 KiB).
const MAX_BODY: usize = 1 << 20;

/// A body read so far.
pub(crate) type SecretBytes = Zeroizing<Vec<u8>>;

/// Reads `resp`'s body until its end or `deadline` (`timeout` is what the error reports).
/// On failure the part read so far comes back with the error, so a caller can still find
/// what the answer began with (a lease id).
pub(crate) async fn read(
    mut resp: reqwest::Response,
    deadline: Instant,
    timeout: Duration,
) -> Result<SecretBytes, (SecretBytes, VaultError)> {
    let expected = resp.content_length().unwrap_or(0).min(MAX_BODY as u64) as usize;
    let mut body = Zeroizing::new(Vec::with_capacity(expected.max(1024)));
    loop {
        let chunk = match tokio::time::timeout_at(deadline, resp.chunk()).await {
            Ok(Ok(Some(chunk))) => chunk,
            Ok(Ok(None)) => return Ok(body),
            Ok(Err(e)) if e.is_timeout() => return Err((body, VaultError::Timeout(timeout))),
            Ok(Err(e)) => {
                let e = VaultError::Unreachable(format!("reading the answer: {e}"));
                return Err((body, e));
            }
            Err(_) => return Err((body, VaultError::Timeout(timeout))),
        };
        if body.len() + chunk.len() > MAX_BODY {
            let e = VaultError::Malformed(format!("answer larger than {MAX_BODY} bytes"));
            return Err((body, e));
        }
        append(&mut body, &chunk);
    }
}

/// Appends without leaving a copy behind: a full buffer is replaced by a larger zeroizing
/// one (the old one is wiped as it drops) instead of being reallocated in place.
fn append(body: &mut SecretBytes, chunk: &[u8]) {
    if body.capacity() - body.len() < chunk.len() {
        let wanted = (body.len() + chunk.len()).max(body.capacity() * 2);
        let mut bigger = Zeroizing::new(Vec::with_capacity(wanted));
        bigger.extend_from_slice(body);
        *body = bigger;
    }
    body.extend_from_slice(chunk);
}

/// Parses a JSON answer. The error names what is missing or where the syntax broke, never
/// a value (serde's "invalid type: string \"...\"" would quote a secret).
pub(crate) fn parse<T: DeserializeOwned>(what: &str, body: &[u8]) -> Result<T, VaultError> {
    serde_json::from_slice(body).map_err(|e| VaultError::Malformed(describe(what, &e)))
}

fn describe(what: &str, e: &serde_json::Error) -> String {
    let text = e.to_string();
    if text.starts_with("missing field") {
        format!("{what}: {text}")
    } else {
        format!(
            "{what}: {:?} error at line {} column {}",
            e.classify(),
            e.line(),
            e.column()
        )
    }
}

/// A serialised request body holding a secret. No `Debug`, no `Clone`: it is sent once and
/// wiped when the HTTP client drops the last reference to it.
pub(crate) struct SecretBody(SecretBytes);

impl SecretBody {
    /// Serialises `value` as JSON straight into zeroizing memory. `secret_len` is the length
    /// of the secret text inside, so the buffer is large enough from the start (JSON
    /// escaping at most sextuples a character) and never reallocates.
    pub(crate) fn json(value: &impl Serialize, secret_len: usize) -> Result<Self, VaultError> {
        let mut buf = Zeroizing::new(Vec::with_capacity(secret_len * 6 + 1024));
        serde_json::to_writer(&mut *buf, value)
            .map_err(|e| VaultError::Setup(format!("login body: {e}")))?;
        Ok(SecretBody(buf))
    }

    /// The bytes, as the HTTP client takes them (no copy; zeroized when the last clone goes).
    pub(crate) fn into_bytes(self) -> Bytes {
        Bytes::from_owner(self.0)
    }

    /// The serialised JSON (tests).
    #[cfg(test)]
    pub(crate) fn as_slice(&self) -> &[u8] {
        &self.0
    }
}

/// A creds answer read only for its lease id (everything else is skipped unparsed).
#[derive(serde::Deserialize)]
struct LeaseIdOnly {
    #[serde(default)]
    lease_id: String,
}

/// The lease id of a creds answer: from the parsed JSON when it parses, else, best effort,
/// the first complete `"lease_id": "..."` in a broken or cut-off body.
pub(crate) fn lease_id_in(body: &[u8]) -> Option<String> {
    if let Ok(only) = serde_json::from_slice::<LeaseIdOnly>(body) {
        return (!only.lease_id.is_empty()).then_some(only.lease_id);
    }
    let key = b"\"lease_id\"";
    let at = body.windows(key.len()).position(|w| w == key)? + key.len();
    let rest = trim_start(&body[at..]);
    let rest = trim_start(rest.strip_prefix(b":")?);
    let rest = rest.strip_prefix(b"\"")?;
    let end = rest.iter().position(|&b| b == b'"')?;
    let id = &rest[..end];
    // Only plain printable text (no escapes, no control characters) is taken as an id.
    let plain = !id.is_empty()
        && id.len() <= 1024
        && id.iter().all(|b| b.is_ascii_graphic() && *b != b'\\');
    plain.then(|| String::from_utf8_lossy(id).into_owned())
}

fn trim_start(b: &[u8]) -> &[u8] {
    let n = b.iter().take_while(|c| c.is_ascii_whitespace()).count();
    &b[n..]
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parse_errors_never_quote_values() {
        #[derive(serde::Deserialize)]
        #[allow(dead_code)]
        struct Creds {
            password: String,
        }
        let e = parse::<Creds>("creds", br#"{"password": 12345678}"#)
            .err()
            .expect("wrong type");
        assert!(!e.to_string().contains("12345678"), "{e}");
        let e = parse::<Creds>("creds", br#"{"password": ["hunter2"]}"#)
            .err()
            .expect("wrong type");
        assert!(!e.to_string().contains("hunter2"), "{e}");
        let e = parse::<Creds>("creds", br#"{"user": "x"}"#)
            .err()
            .expect("missing");
        assert!(e.to_string().contains("missing field `password`"), "{e}");
    }

    #[test]
    fn append_keeps_every_byte() {
        let mut body = Zeroizing::new(Vec::with_capacity(2));
        for chunk in [&b"ab"[..], b"cde", b"", b"fghijklmnop"] {
            append(&mut body, chunk);
        }
        assert_eq!(&body[..], b"abcdefghijklmnop");
    }

    #[test]
    fn secret_body_is_the_json_of_the_value() {
        let body = SecretBody::json(&serde_json::json!({"secret_id": "s\"3"}), 4).expect("json");
        assert_eq!(body.as_slice(), br#"{"secret_id":"s\"3"}"#);
    }
}
