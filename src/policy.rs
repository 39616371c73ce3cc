//! Grants: which certificate identities may use which Vault roles on which databases.
//!
//! An identity is written `uri:<URI SAN>`, `dns:<DNS SAN>` or `cn:<subject CN>`. Patterns use
//! two wildcards: `*` matches any run of characters that contains no `/` and no `.`, so it never
//! crosses a path segment or a DNS label; `**` matches any run of characters at all. DNS names
//! compare case-insensitively, everything else exactly. Deny by default.

use crate::config::GrantConfig;
use crate::metrics::labels::AuthFailureReason;
use crate::tls::identity::Principal;

/// The kind of certificate field an identity pattern applies to.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum IdentityKind {
    /// A URI subject alternative name (e.g. a SPIFFE ID).
    Uri,
    /// A DNS subject alternative name.
    Dns,
    /// The subject common name.
    Cn,
}

impl IdentityKind {
    /// The prefix used in config and messages.
    pub fn prefix(self) -> &'static str {
        match self {
            IdentityKind::Uri => "uri",
            IdentityKind::Dns => "dns",
            IdentityKind::Cn => "cn",
        }
    }
}

/// A parsed `identity = "..."` pattern.
#[derive(Debug, Clone)]
pub struct IdentityPattern {
    kind: IdentityKind,
    pattern: String,
    /// Literal text before the first `*`: a name that does not start with it cannot match.
    prefix_len: usize,
    /// Literal text after the last `*` (the whole pattern when there is none).
    suffix_len: usize,
}

impl IdentityPattern {
    /// Parses `uri:…`, `dns:…` or `cn:…`.
    pub fn parse(text: &str) -> Result<IdentityPattern, String> {
        let (prefix, pattern) = text
            .split_once(':')
            .ok_or_else(|| format!("identity {text:?} must start with uri:, dns: or cn:"))?;
        let kind = match prefix {
            "uri" => IdentityKind::Uri,
            "dns" => IdentityKind::Dns,
            "cn" => IdentityKind::Cn,
            _ => {
                return Err(format!(
                    "identity {text:?} must start with uri:, dns: or cn:"
                ));
            }
        };
        if pattern.is_empty() {
            return Err(format!("identity {text:?} has an empty pattern"));
        }
        let pattern = if kind == IdentityKind::Dns {
            pattern.to_ascii_lowercase()
        } else {
            pattern.to_owned()
        };
        let prefix_len = pattern.find('*').unwrap_or(pattern.len());
        let suffix_len = pattern.len() - pattern.rfind('*').map_or(0, |i| i + 1);
        Ok(IdentityPattern {
            kind,
            pattern,
            prefix_len,
            suffix_len,
        })
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
                .then(|| format!("{}:{value}", kind.prefix()))
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

/// Why a request was refused.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Denial {
    /// No grant matches any identity of the certificate.
    NoGrant,
    /// Grants match the identity, but none covers the database.
    DatabaseNotGranted,
    /// Grants cover the database, but not the role.
    RoleNotGranted,
}

impl Denial {
    /// Metric label for `leasegate_auth_failures_total{reason}`.
    pub(crate) fn label(&self) -> AuthFailureReason {
        match self {
            Denial::NoGrant => AuthFailureReason::NoGrant,
            Denial::DatabaseNotGranted => AuthFailureReason::DatabaseNotGranted,
            Denial::RoleNotGranted => AuthFailureReason::RoleNotGranted,
        }
    }
}

/// The compiled grant table.
#[derive(Debug, Clone, Default)]
pub struct Policy {
    grants: Vec<(IdentityPattern, GrantConfig)>,
}

impl Policy {
    /// Compiles the configured grants; patterns were checked by config validation, any that
    /// still fail to parse are skipped (they could never match).
    pub fn new(grants: &[GrantConfig]) -> Policy {
        let grants = grants
            .iter()
            .filter_map(|g| {
                IdentityPattern::parse(&g.identity)
                    .ok()
                    .map(|p| (p, g.clone()))
            })
            .collect();
        Policy { grants }
    }

    /// Decides whether `principal` may use `role` on `database`. `database_roles` are the roles
    /// the database entry lists (`None` when the database is not configured at all). Allowed:
    /// the identity the allowing grant matched, normalized (`kind:value`, DNS names in lower
    /// case): the name the per-identity limits count under, whatever else the certificate
    /// carries.
    pub fn decide(
        &self,
        principal: &Principal,
        database: &str,
        role: &str,
        database_roles: Option<&[String]>,
    ) -> Result<String, Denial> {
        let mut identity_matched = false;
        let mut database_matched = false;
        for (pattern, grant) in &self.grants {
            let Some(identity) = pattern.matched(principal) else {
                continue;
            };
            identity_matched = true;
            let Some(db_roles) = database_roles else {
                continue;
            };
            if !grant.databases.iter().any(|d| d == "*" || d == database) {
                continue;
            }
            database_matched = true;
            let role_listed = db_roles.iter().any(|r| r == role);
            if role_listed && grant.roles.iter().any(|r| r == "*" || r == role) {
                return Ok(identity);
            }
        }
        Err(if !identity_matched {
            Denial::NoGrant
        } else if !database_matched {
            Denial::DatabaseNotGranted
        } else {
            Denial::RoleNotGranted
        })
    }
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

    fn grant(identity: &str, dbs: &[&str], roles: &[&str]) -> GrantConfig {
        GrantConfig {
            identity: identity.into(),
            databases: dbs.iter().map(|s| s.to_string()).collect(),
            roles: roles.iter().map(|s| s.to_string()).collect(),
        }
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
    fn decisions_name_what_was_missing() {
        let policy = Policy::new(&[
            grant("uri:spiffe://x/app/billing", &["myapp"], &["readonly"]),
            grant("dns:*.ops.example.org", &["*"], &["*"]),
        ]);
        let roles = vec!["readonly".to_string(), "readwrite".to_string()];
        let billing = principal(&["spiffe://x/app/billing"], &[], Some("billing"));
        assert_eq!(
            policy.decide(&billing, "myapp", "readonly", Some(&roles)),
            Ok("uri:spiffe://x/app/billing".to_string())
        );
        assert_eq!(
            policy.decide(&billing, "myapp", "readwrite", Some(&roles)),
            Err(Denial::RoleNotGranted)
        );
        assert_eq!(
            policy.decide(&billing, "other", "readonly", Some(&roles)),
            Err(Denial::DatabaseNotGranted)
        );
        assert_eq!(
            policy.decide(&billing, "nodb", "readonly", None),
            Err(Denial::DatabaseNotGranted)
        );
        let stranger = principal(&["spiffe://x/app/other"], &[], None);
        assert_eq!(
            policy.decide(&stranger, "myapp", "readonly", Some(&roles)),
            Err(Denial::NoGrant)
        );
        let ops = principal(&["spiffe://x/random/1"], &["Admin.OPS.example.org"], None);
        assert_eq!(
            policy.decide(&ops, "myapp", "readwrite", Some(&roles)),
            Ok("dns:admin.ops.example.org".to_string()),
            "the identity the grant matched, normalized, not the certificate's first"
        );
        assert_eq!(
            policy.decide(&ops, "myapp", "superuser", Some(&roles)),
            Err(Denial::RoleNotGranted)
        );
    }
}
