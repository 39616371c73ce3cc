//! What `leasegate leases check` asks Vault: the leases under a creds path
//! (`LIST sys/leases/lookup/<mount>/creds/<role>/`), one lease's times (`sys/leases/lookup`),
//! and when leasegate's current token was created (`auth/token/lookup-self`). Vault does not
//! say which token created a lease; the caller decides with the times (see README).

use std::time::{Duration, SystemTime};

use reqwest::{Method, StatusCode};
use serde::Deserialize;

use super::client::VaultClient;
use super::error::VaultError;
use crate::metrics::labels::VaultOp;

/// One lease as `sys/leases/lookup` describes it.
#[derive(Debug, Clone)]
pub(crate) struct LeaseInfo {
    /// The full lease id.
    pub id: String,
    /// When Vault issued it.
    pub issued: Option<SystemTime>,
    /// When it expires unless renewed.
    pub expires: Option<SystemTime>,
}

#[derive(Deserialize)]
struct Listed {
    data: Keys,
}

#[derive(Deserialize)]
struct Keys {
    #[serde(default)]
    keys: Vec<String>,
}

#[derive(Deserialize)]
struct Lookup {
    data: LookupData,
}

#[derive(Deserialize)]
struct LookupData {
    id: String,
    issue_time: Option<String>,
    expire_time: Option<String>,
}

#[derive(Deserialize)]
struct TokenLookup {
    data: TokenData,
}

#[derive(Deserialize)]
struct TokenData {
    /// Unix seconds.
    creation_time: Option<u64>,
}

impl VaultClient {
    /// `vault.timeout`: also how long a creds call of this instance may still be answering.
    pub(crate) fn request_timeout(&self) -> Duration {
        self.timeout
    }

    /// Every lease id under `prefix` (`<mount>/creds/<role>`); none when Vault answers 404,
    /// as OpenBao does when no lease exists there.
    pub(crate) async fn list_leases(&self, prefix: &str) -> Result<Vec<String>, VaultError> {
        let list = Method::from_bytes(b"LIST").map_err(|e| VaultError::Setup(e.to_string()))?;
        let path = format!("sys/leases/lookup/{prefix}/");
        match self.request(VaultOp::ListLeases, list, &path, None).await {
            Ok(resp) => {
                let listed: Listed = self.read_json("lease list", resp).await?;
                let keys = listed.data.keys.into_iter();
                Ok(keys.map(|k| format!("{prefix}/{k}")).collect())
            }
            Err(VaultError::Status { status, .. }) if status == StatusCode::NOT_FOUND => {
                Ok(Vec::new())
            }
            Err(e) => Err(e),
        }
    }

    /// `PUT sys/leases/lookup` for one lease.
    pub(crate) async fn lookup_lease(&self, lease_id: &str) -> Result<LeaseInfo, VaultError> {
        let body = serde_json::json!({ "lease_id": lease_id });
        let resp = self
            .request(
                VaultOp::LookupLease,
                Method::PUT,
                "sys/leases/lookup",
                Some(body),
            )
            .await?;
        let found: Lookup = self.read_json("lease lookup", resp).await?;
        let time = |t: Option<String>| t.as_deref().and_then(parse_time);
        Ok(LeaseInfo {
            id: found.data.id,
            issued: time(found.data.issue_time),
            expires: time(found.data.expire_time),
        })
    }

    /// When the current token was created (`creation_time` of `lookup-self`).
    pub(crate) async fn token_created(&self) -> Result<Option<SystemTime>, VaultError> {
        let path = "auth/token/lookup-self";
        let resp = self
            .request(VaultOp::Lookup, Method::GET, path, None)
            .await?;
        let found: TokenLookup = self.read_json("token lookup", resp).await?;
        Ok(found
            .data
            .creation_time
            .map(|s| SystemTime::UNIX_EPOCH + Duration::from_secs(s)))
    }
}

/// An RFC 3339 time as Vault writes it: fractional seconds optional, `Z` or a `±HH:MM`
/// offset (Vault writes the server's local time).
pub(crate) fn parse_time(text: &str) -> Option<SystemTime> {
    let text = text.trim();
    // The offset starts after the seconds ("YYYY-MM-DDTHH:MM:SS" is 19 bytes).
    let tail = text.get(19..)?;
    let (local, offset) = match tail.rfind(['+', '-']) {
        Some(i) => {
            let (date, zone) = text.split_at(19 + i);
            let sign: i64 = if zone.starts_with('-') { -1 } else { 1 };
            let (h, m) = zone.get(1..)?.split_once(':')?;
            let secs = h.parse::<i64>().ok()? * 3600 + m.parse::<i64>().ok()? * 60;
            (date, sign * secs)
        }
        None => (text, 0),
    };
    let at = humantime::parse_rfc3339_weak(local.trim_end_matches('Z')).ok()?;
    let shift = Duration::from_secs(offset.unsigned_abs());
    // Local time is UTC plus the offset.
    if offset >= 0 {
        at.checked_sub(shift)
    } else {
        at.checked_add(shift)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reads_vault_times_in_utc_and_with_offsets() {
        let utc = parse_time("2021-03-17T16:45:50Z").expect("utc");
        assert_eq!(parse_time("2021-03-17T11:45:50-05:00"), Some(utc));
        assert_eq!(parse_time("2021-03-17T18:45:50+02:00"), Some(utc));
        let frac = parse_time("2021-03-17T11:45:50.755312-05:00").expect("fraction");
        assert!(frac > utc && frac < utc + Duration::from_secs(1));
        assert_eq!(parse_time("soon"), None);
        assert_eq!(parse_time("2021-03-17T11:45:50+5"), None);
    }
}
