//! Who a client is, and the patterns grants and `[cluster]` match it with.
//!
//! A [`Principal`] is the identity a verified client certificate carries: its URI SANs, DNS
//! SANs and subject CN, plus the serial and SHA-256 fingerprint for audit lines. The leaf's
//! validity period is checked again where the identity is taken (defence in depth: the TLS
//! verifier checks it on every full handshake, and resumption is off).
//!
//! An identity is written `uri:<URI SAN>`, `dns:<DNS SAN>` or `cn:<subject CN>`
//! ([`IdentityPattern`], parsed when the configuration loads). A process on the local Unix
//! socket has no certificate: its identity ([`UnixIdentity`], `unix::`) is
//! `unix:user=<name>`, `unix:uid=<n>`, `unix:group=<name>` or `unix:gid=<n>`, and the two
//! families never meet: `unix:` patterns match Unix-socket sessions only, certificate
//! patterns never match them (a Unix principal has no certificate field, a certificate
//! principal no Unix one). `unix:uid=` and `unix:gid=` take a number, no wildcard. Patterns use two wildcards: `*`
//! matches any run of characters that contains no `/` and no `.`, so it never crosses a path
//! segment or a DNS label; `**` matches any run of characters at all. DNS names compare
//! case-insensitively, everything else exactly.

mod unix;
#[cfg(test)]
mod unix_tests;

use rustls::pki_types::CertificateDer;
use sha2::{Digest, Sha256};
use x509_parser::extensions::GeneralName;
use x509_parser::prelude::{ASN1Time, FromDer, X509Certificate};

pub use unix::{UnixGroup, UnixIdentity};

/// The kind of certificate field an identity pattern applies to.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum IdentityKind {
    /// A URI subject alternative name (e.g. a SPIFFE ID).
    Uri,
    /// A DNS subject alternative name.
    Dns,
    /// The subject common name.
    Cn,
    /// A Unix-socket peer's user name (`unix:user=`).
    UnixUser,
    /// A Unix-socket peer's uid (`unix:uid=`).
    UnixUid,
    /// A group of a Unix-socket peer, by name (`unix:group=`).
    UnixGroup,
    /// A group of a Unix-socket peer, by number (`unix:gid=`).
    UnixGid,
}

impl IdentityKind {
    /// The prefix used in config and messages.
    pub fn prefix(self) -> &'static str {
        match self {
            IdentityKind::Uri => "uri",
            IdentityKind::Dns => "dns",
            IdentityKind::Cn => "cn",
            IdentityKind::UnixUser => "unix:user",
            IdentityKind::UnixUid => "unix:uid",
            IdentityKind::UnixGroup => "unix:group",
            IdentityKind::UnixGid => "unix:gid",
        }
    }

    /// `kind:value` (`unix:kind=value` for the Unix kinds), as configured and as messages and
    /// audit lines show it.
    pub fn render(self, value: &str) -> String {
        match self {
            IdentityKind::Uri | IdentityKind::Dns | IdentityKind::Cn => {
                format!("{}:{value}", self.prefix())
            }
            _ => format!("{}={value}", self.prefix()),
        }
    }

    /// The kind of a pattern's `kind:` (or `unix:kind=`) head, and the rest.
    fn split(text: &str) -> Option<(IdentityKind, &str)> {
        let (prefix, rest) = text.split_once(':')?;
        Some(match prefix {
            "uri" => (IdentityKind::Uri, rest),
            "dns" => (IdentityKind::Dns, rest),
            "cn" => (IdentityKind::Cn, rest),
            "unix" => {
                let (kind, value) = rest.split_once('=')?;
                let kind = match kind {
                    "user" => IdentityKind::UnixUser,
                    "uid" => IdentityKind::UnixUid,
                    "group" => IdentityKind::UnixGroup,
                    "gid" => IdentityKind::UnixGid,
                    _ => return None,
                };
                (kind, value)
            }
            _ => return None,
        })
    }
}

/// A parsed `identity = "..."` pattern.
#[derive(Debug, Clone)]
pub struct IdentityPattern {
    /// The pattern as written, for messages.
    text: String,
    /// Which certificate field it applies to.
    kind: IdentityKind,
    /// The part after `kind:`, in lower case for DNS names.
    pattern: String,
    /// Literal text before the first `*`: a name that does not start with it cannot match.
    prefix_len: usize,
    /// Literal text after the last `*` (the whole pattern when there is none).
    suffix_len: usize,
}

impl IdentityPattern {
    /// Parses `uri:…`, `dns:…`, `cn:…`, `unix:user=…`, `unix:uid=…`, `unix:group=…` or
    /// `unix:gid=…`.
    pub fn parse(text: &str) -> Result<IdentityPattern, String> {
        let (kind, pattern) = IdentityKind::split(text).ok_or_else(|| {
            format!(
                "identity {text:?} must start with uri:, dns:, cn:, unix:user=, unix:uid=, \
                 unix:group= or unix:gid="
            )
        })?;
        if pattern.is_empty() {
            return Err(format!("identity {text:?} has an empty pattern"));
        }
        if matches!(kind, IdentityKind::UnixUid | IdentityKind::UnixGid)
            && pattern.parse::<u32>().is_err()
        {
            return Err(format!(
                "identity {text:?}: a uid or gid is a number (no wildcards)"
            ));
        }
        let pattern = if kind == IdentityKind::Dns {
            pattern.to_ascii_lowercase()
        } else {
            pattern.to_owned()
        };
        let prefix_len = pattern.find('*').unwrap_or(pattern.len());
        let suffix_len = pattern.len() - pattern.rfind('*').map_or(0, |i| i + 1);
        Ok(IdentityPattern {
            text: text.to_owned(),
            kind,
            pattern,
            prefix_len,
            suffix_len,
        })
    }

    /// The pattern as written in the configuration.
    pub fn as_str(&self) -> &str {
        &self.text
    }

    /// Glob match with a cheap literal prefix/suffix test first, so that large grant tables
    /// cost a few byte comparisons per grant that cannot apply.
    fn matches_value(&self, value: &[u8]) -> bool {
        let pattern = self.pattern.as_bytes();
        let prefix = &pattern[..self.prefix_len];
        let suffix = &pattern[pattern.len() - self.suffix_len..];
        if self.prefix_len == pattern.len() {
            return pattern == value;
        }
        value.len() >= prefix.len() + suffix.len()
            && value.starts_with(prefix)
            && value.ends_with(suffix)
            && glob_match(pattern, value)
    }

    /// True when the pattern matches one of the principal's identities.
    pub fn matches(&self, principal: &Principal) -> bool {
        self.matched(principal).is_some()
    }

    /// The first of the principal's identities the pattern matches, normalized as it was
    /// compared (`kind:value`, DNS names in lower case).
    pub fn matched(&self, principal: &Principal) -> Option<String> {
        principal.identities().find_map(|(kind, value)| {
            if kind != self.kind {
                return None;
            }
            let value = if kind == IdentityKind::Dns {
                std::borrow::Cow::Owned(value.to_ascii_lowercase())
            } else {
                std::borrow::Cow::Borrowed(value)
            };
            self.matches_value(value.as_bytes())
                .then(|| kind.render(&value))
        })
    }
}

/// Glob match with `*` (any run, possibly empty, without `/` or `.`) and `**` (any run).
/// Dynamic programming over the text, one pass per pattern token: O(pattern × text) time,
/// O(text) memory, no recursion, so hostile names can neither blow the stack nor miss a
/// match by greedy backtracking.
pub fn glob_match(pattern: &[u8], text: &[u8]) -> bool {
    // ok[j]: the pattern tokens seen so far match text[..j].
    let mut ok = vec![false; text.len() + 1];
    ok[0] = true;
    let mut p = 0;
    while p < pattern.len() {
        if pattern[p] == b'*' {
            let double = pattern.get(p + 1) == Some(&b'*');
            p += if double { 2 } else { 1 };
            for j in 1..=text.len() {
                let extend = ok[j - 1] && (double || !matches!(text[j - 1], b'/' | b'.'));
                ok[j] = ok[j] || extend;
            }
        } else {
            let c = pattern[p];
            p += 1;
            for j in (1..=text.len()).rev() {
                ok[j] = ok[j - 1] && text[j - 1] == c;
            }
            ok[0] = false;
        }
    }
    ok[text.len()]
}

/// Who a client is, as its certificate says.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct Principal {
    /// URI subject alternative names (SPIFFE IDs among them).
    pub uris: Vec<String>,
    /// DNS subject alternative names.
    pub dns_names: Vec<String>,
    /// Subject common name, if any.
    pub common_name: Option<String>,
    /// Certificate serial number, hex.
    pub serial: String,
    /// SHA-256 of the certificate DER, hex.
    pub fingerprint: String,
    /// A Unix-socket peer's identity (then there is no certificate: the fields above are
    /// empty).
    pub unix: Option<Box<UnixIdentity>>,
}

impl Principal {
    /// A principal from its identity parts (serial and fingerprint empty).
    pub fn new(uris: Vec<String>, dns_names: Vec<String>, common_name: Option<String>) -> Self {
        Principal {
            uris,
            dns_names,
            common_name,
            ..Principal::default()
        }
    }

    /// Parses the end-entity certificate of a verified chain; refuses one that is not valid
    /// now (expired or not yet valid).
    pub fn from_certificate(cert: &CertificateDer<'_>) -> Result<Principal, String> {
        let (_, x509) = X509Certificate::from_der(cert.as_ref())
            .map_err(|e| format!("client certificate does not parse: {e}"))?;
        let validity = x509.validity();
        let now = ASN1Time::now();
        if now > validity.not_after {
            return Err(format!(
                "client certificate has expired (valid until {})",
                validity.not_after
            ));
        }
        if now < validity.not_before {
            return Err(format!(
                "client certificate is not yet valid (valid from {})",
                validity.not_before
            ));
        }
        let mut principal = Principal {
            serial: x509.raw_serial_as_string().replace(':', ""),
            fingerprint: hex(&Sha256::digest(cert.as_ref())),
            ..Principal::default()
        };
        if let Ok(Some(san)) = x509.subject_alternative_name() {
            for name in &san.value.general_names {
                match name {
                    GeneralName::URI(u) => principal.uris.push((*u).to_owned()),
                    GeneralName::DNSName(d) => principal.dns_names.push((*d).to_owned()),
                    _ => {}
                }
            }
        }
        principal.common_name = x509
            .subject()
            .iter_common_name()
            .next()
            .and_then(|cn| cn.as_str().ok())
            .map(str::to_owned);
        Ok(principal)
    }

    /// A Unix-socket peer (no certificate).
    pub fn from_unix(identity: UnixIdentity) -> Principal {
        Principal {
            unix: Some(Box::new(identity)),
            ..Principal::default()
        }
    }

    /// Every identity as (kind, value): URIs, then DNS names, then the CN; for a Unix peer
    /// its user, uid, group names and gids.
    pub fn identities(&self) -> impl Iterator<Item = (IdentityKind, &str)> {
        self.uris
            .iter()
            .map(|u| (IdentityKind::Uri, u.as_str()))
            .chain(
                self.dns_names
                    .iter()
                    .map(|d| (IdentityKind::Dns, d.as_str())),
            )
            .chain(
                self.common_name
                    .iter()
                    .map(|c| (IdentityKind::Cn, c.as_str())),
            )
            .chain(self.unix.iter().flat_map(|u| unix_identities(u)))
    }

    /// The identity used in messages: the first URI SAN, else DNS SAN, else CN.
    pub fn display_name(&self) -> String {
        self.identities()
            .next()
            .map(|(k, v)| k.render(v))
            .unwrap_or_else(|| "(certificate without identity)".to_owned())
    }

    /// Every identity, `kind:value`, for audit lines.
    pub fn all_identities(&self) -> Vec<String> {
        self.identities().map(|(k, v)| k.render(v)).collect()
    }
}

/// A Unix peer's identities: user, uid, group names, gids.
fn unix_identities(u: &UnixIdentity) -> impl Iterator<Item = (IdentityKind, &str)> {
    let names = u.groups.iter().filter_map(|g| g.name.as_deref());
    u.user
        .iter()
        .map(|n| (IdentityKind::UnixUser, n.as_str()))
        .chain(std::iter::once((
            IdentityKind::UnixUid,
            u.uid_text.as_str(),
        )))
        .chain(names.map(|n| (IdentityKind::UnixGroup, n)))
        .chain(
            u.groups
                .iter()
                .map(|g| (IdentityKind::UnixGid, g.gid_text.as_str())),
        )
}

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn principal(uris: &[&str], dns: &[&str], cn: Option<&str>) -> Principal {
        Principal::new(
            uris.iter().map(|s| s.to_string()).collect(),
            dns.iter().map(|s| s.to_string()).collect(),
            cn.map(str::to_owned),
        )
    }

    #[test]
    fn glob_semantics() {
        assert!(glob_match(b"spiffe://x/app/*", b"spiffe://x/app/billing"));
        assert!(!glob_match(
            b"spiffe://x/app/*",
            b"spiffe://x/app/billing/extra"
        ));
        assert!(glob_match(
            b"spiffe://x/**",
            b"spiffe://x/app/billing/extra"
        ));
        assert!(glob_match(b"*.example.org", b"db.example.org"));
        assert!(!glob_match(b"*.example.org", b"a.b.example.org"));
        assert!(!glob_match(b"*.example.org", b"example.org"));
        assert!(glob_match(b"app-*-prod", b"app-billing-prod"));
        assert!(!glob_match(b"exact", b"exactly"));
        assert!(!glob_match(
            b"a*",
            &[b'a'; 10_000]
                .iter()
                .chain(b"/")
                .copied()
                .collect::<Vec<_>>()
        ));
    }

    #[test]
    fn prefix_and_suffix_prechecks_agree_with_the_glob() {
        let p = |s: &str| IdentityPattern::parse(s).expect("parses");
        let uri = |u: &str| principal(&[u], &[], None);
        assert!(p("uri:spiffe://x/a/*/b").matches(&uri("spiffe://x/a/q/b")));
        assert!(!p("uri:spiffe://x/a/*/b").matches(&uri("spiffe://x/a/q/c")));
        assert!(p("uri:spiffe://x/**").matches(&uri("spiffe://x/")));
        assert!(
            !p("uri:ab*ba").matches(&uri("aba")),
            "prefix and suffix may not overlap"
        );
        assert!(p("uri:exact").matches(&uri("exact")));
        assert!(!p("uri:exact").matches(&uri("exactly")));
    }

    #[test]
    fn cn_and_uri_are_not_confused() {
        let p = IdentityPattern::parse("uri:spiffe://x/app").expect("parses");
        assert!(!p.matches(&principal(&[], &[], Some("spiffe://x/app"))));
        let p = IdentityPattern::parse("cn:uri:spiffe://x/app").expect("parses");
        assert!(!p.matches(&principal(&["spiffe://x/app"], &[], None)));
        assert!(IdentityPattern::parse("spiffe://x").is_err());
        assert!(IdentityPattern::parse("email:a@b").is_err());
    }

    #[test]
    fn extracts_sans_and_cn() {
        let mut params =
            rcgen::CertificateParams::new(vec!["db.example.org".to_string()]).expect("params");
        params.subject_alt_names.push(rcgen::SanType::URI(
            "spiffe://example.org/app/billing".try_into().expect("uri"),
        ));
        params
            .distinguished_name
            .push(rcgen::DnType::CommonName, "billing");
        let key = rcgen::KeyPair::generate().expect("key");
        let cert = params.self_signed(&key).expect("cert");
        let p = Principal::from_certificate(cert.der()).expect("parses");
        assert_eq!(p.uris, vec!["spiffe://example.org/app/billing"]);
        assert_eq!(p.dns_names, vec!["db.example.org"]);
        assert_eq!(p.common_name.as_deref(), Some("billing"));
        assert_eq!(p.display_name(), "uri:spiffe://example.org/app/billing");
        assert_eq!(p.fingerprint.len(), 64);
        assert!(!p.serial.is_empty());
    }

    #[test]
    fn certificates_outside_their_validity_are_refused() {
        let key = rcgen::KeyPair::generate().expect("key");
        let mut expired = rcgen::CertificateParams::new(vec!["a.example".into()]).expect("params");
        expired.not_before = rcgen::date_time_ymd(2020, 1, 1);
        expired.not_after = rcgen::date_time_ymd(2021, 1, 1);
        let cert = expired.self_signed(&key).expect("cert");
        let err = Principal::from_certificate(cert.der()).expect_err("expired");
        assert!(err.contains("has expired"), "{err}");
        let mut future = rcgen::CertificateParams::new(vec!["a.example".into()]).expect("params");
        future.not_before = rcgen::date_time_ymd(2098, 1, 1);
        future.not_after = rcgen::date_time_ymd(2099, 1, 1);
        let cert = future.self_signed(&key).expect("cert");
        let err = Principal::from_certificate(cert.der()).expect_err("not yet valid");
        assert!(err.contains("not yet valid"), "{err}");
    }

    #[test]
    fn garbage_is_an_error() {
        assert!(Principal::from_certificate(&CertificateDer::from(vec![1, 2, 3])).is_err());
    }
}
