//! Grants: which certificate identities may use which Vault roles on which databases. The
//! identity patterns and their matching are [`crate::identity`]'s. Deny by default.

use crate::config::GrantConfig;
use crate::identity::Principal;
use crate::metrics::labels::AuthFailureReason;

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

/// The grant table (its identity patterns were parsed when the configuration loaded).
#[derive(Debug, Clone, Default)]
pub struct Policy {
    grants: Vec<GrantConfig>,
}

impl Policy {
    /// The table of the configured grants.
    pub fn new(grants: &[GrantConfig]) -> Policy {
        Policy {
            grants: grants.to_vec(),
        }
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
        for grant in &self.grants {
            let Some(identity) = grant.identity.matched(principal) else {
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
            identity: crate::identity::IdentityPattern::parse(identity).expect("pattern"),
            databases: dbs.iter().map(|s| s.to_string()).collect(),
            roles: roles.iter().map(|s| s.to_string()).collect(),
        }
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
