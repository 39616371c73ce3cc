//! `leases check`: the leases Vault lists under every configured `<mount>/creds/<role>`,
//! compared with what this instance holds (the revoker's ledger: every lease a session, a
//! prefetch pool or a revocation under way holds). What Vault has and nobody here holds is
//! reported, e.g. after a SIGKILL of another instance sharing the token.
//!
//! Vault's API does not say which token created a lease (`sys/leases/lookup` answers only its
//! id and times). So a lease counts as created by this instance's token when it was issued
//! at or after that token's `creation_time` (a lease issued before cannot be the token's);
//! that is a necessary condition, not proof, which is why README asks for mounts and roles
//! used by leasegate alone. A lease issued within the last `vault.timeout` is never revoked:
//! a creds call of this instance may still be answering for it.

use std::collections::{BTreeSet, HashSet};
use std::time::SystemTime;

use super::api::{CheckAnswer, Unheld};
use crate::registry::listing::time;
use crate::state::AppState;
use crate::vault::VaultError;
use crate::vault::leases::LeaseInfo;

/// Compares, and with `revoke` revokes the unheld leases taken as this instance's.
pub(crate) async fn check(state: &AppState, revoke: bool) -> Result<CheckAnswer, VaultError> {
    let vault = &state.vault;
    let paths = paths(state);
    let token_created = vault.token_created().await?;
    let mut listed = Vec::new();
    for path in &paths {
        listed.extend(vault.list_leases(path).await?);
    }
    // Read after the listing: a lease issued meanwhile is held by now or recent below.
    let held: HashSet<String> = state.revoker.held().into_iter().collect();
    let mut answer = CheckAnswer {
        paths: paths.into_iter().collect(),
        listed: listed.len(),
        held: listed.iter().filter(|id| held.contains(*id)).count(),
        unheld: Vec::new(),
        token_created: token_created.map(time),
    };
    let recent_from = SystemTime::now() - vault.request_timeout();
    for id in listed.into_iter().filter(|id| !held.contains(id)) {
        let info = match vault.lookup_lease(&id).await {
            Ok(info) => info,
            // Revoked or expired since it was listed.
            Err(VaultError::Status { status, .. }) if status.is_client_error() => continue,
            Err(e) => return Err(e),
        };
        let mut unheld = judge(&info, token_created, recent_from);
        if revoke && unheld.ours {
            match vault.revoke(&id).await {
                Ok(()) => unheld.revoked = true,
                Err(e) => unheld.error = Some(e.to_string()),
            }
            tracing::warn!(lease_id = %id, revoked = unheld.revoked, "leases check: revoking a lease no session holds");
        }
        answer.unheld.push(unheld);
    }
    Ok(answer)
}

/// Every `<mount>/creds/<role>` of the configured databases.
fn paths(state: &AppState) -> BTreeSet<String> {
    let live = state.live.load_full();
    live.databases
        .values()
        .flat_map(|db| {
            let mount = db.config.mount.clone();
            db.config
                .roles
                .iter()
                .map(move |r| format!("{mount}/creds/{r}"))
        })
        .collect()
}

/// Whether the lease is taken as this token's, and whether it is too recent to touch.
fn judge(info: &LeaseInfo, token_created: Option<SystemTime>, recent_from: SystemTime) -> Unheld {
    let recent = info.issued.is_none_or(|t| t >= recent_from);
    let after_token = matches!((info.issued, token_created), (Some(i), Some(c)) if i >= c);
    Unheld {
        lease_id: info.id.clone(),
        issued: info.issued.map(time),
        expires: info.expires.map(time),
        ours: after_token && !recent,
        recent,
        revoked: false,
        error: None,
    }
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use super::*;

    #[test]
    fn only_a_lease_issued_after_the_token_and_not_just_now_is_ours() {
        let t0 = SystemTime::UNIX_EPOCH + Duration::from_secs(1_000_000);
        let at = |s: u64| Some(t0 + Duration::from_secs(s));
        let lease = |issued| LeaseInfo {
            id: "db/creds/r/x".into(),
            issued,
            expires: None,
        };
        let recent_from = t0 + Duration::from_secs(100);
        let judged = |issued, token| {
            let u = judge(&lease(issued), token, recent_from);
            (u.ours, u.recent)
        };
        assert_eq!(judged(at(50), at(10)), (true, false));
        assert_eq!(
            judged(at(5), at(10)),
            (false, false),
            "older than the token"
        );
        assert_eq!(
            judged(at(150), at(10)),
            (false, true),
            "maybe a creds call in flight"
        );
        assert_eq!(
            judged(at(50), None),
            (false, false),
            "token age unknown: never ours"
        );
        assert_eq!(judged(None, at(10)), (false, true), "issue time unknown");
    }
}
