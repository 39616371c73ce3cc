//! Unit tests of the Vault client: the redirect policy, the lease id of broken answers,
//! clamped durations.

use super::*;
use crate::vault::body::lease_id_in;

fn url(s: &str) -> Url {
    Url::parse(s).expect("url")
}

#[test]
fn redirects_stay_within_the_configured_origin() {
    let https = url("https://vault.internal:8200");
    let same = url("https://vault.internal:8200/v1/database/creds/readonly");
    assert!(redirect_allowed(&https, &same, 1));
    assert!(redirect_allowed(
        &https,
        &url("https://VAULT.internal:8200/x"),
        1
    ));
    assert!(
        !redirect_allowed(&https, &same, MAX_REDIRECTS + 1),
        "too many hops"
    );
    for elsewhere in [
        "http://vault.internal:8200/v1/x",  // https to http
        "https://vault.internal:8201/v1/x", // another port
        "https://other.internal:8200/v1/x", // another host
        "https://vault.internal/v1/x",      // the default port is another port
        "ftp://vault.internal:8200/v1/x",   // another scheme
    ] {
        assert!(!redirect_allowed(&https, &url(elsewhere), 1), "{elsewhere}");
    }
    let http = url("http://127.0.0.1:8200/");
    assert!(redirect_allowed(
        &http,
        &url("http://127.0.0.1:8200/v1/x"),
        1
    ));
    assert!(!redirect_allowed(
        &http,
        &url("http://127.0.0.1:9999/v1/x"),
        1
    ));
    assert!(!redirect_allowed(
        &http,
        &url("https://127.0.0.1:8200/v1/x"),
        1
    ));
    let default_port = url("https://vault.example.org");
    assert!(redirect_allowed(
        &default_port,
        &url("https://vault.example.org:443/v1"),
        1
    ));
}

#[test]
fn the_lease_id_is_found_in_whole_broken_and_cut_off_bodies() {
    let id = "database/creds/readonly/AbC.123-x";
    let whole = format!(r#"{{"request_id":"r","lease_id":"{id}","data":{{"username":"u"}}}}"#);
    assert_eq!(lease_id_in(whole.as_bytes()).as_deref(), Some(id));
    let wrong_type = format!(r#"{{"lease_id": "{id}", "data": {{"password": 12}}}}"#);
    assert_eq!(lease_id_in(wrong_type.as_bytes()).as_deref(), Some(id));
    let cut = format!(r#"{{"request_id":"r","lease_id" : "{id}","renewable":true,"data":{{"pass"#);
    assert_eq!(lease_id_in(cut.as_bytes()).as_deref(), Some(id));
    for none in [
        r#"{"request_id":"r","lease_id":"database/creds/rea"#,
        r#"{"request_id":"r","lea"#,
        r#"{"lease_id":""}"#,
        r#"{"lease_id":42,"#,
        r#"{"lease_id":"a\"b","#,
        "{\"lease_id\":\"a\nb\",",
        "",
    ] {
        assert_eq!(lease_id_in(none.as_bytes()), None, "{none:?}");
    }
}

#[test]
fn absurd_renewal_durations_parse_clamped() {
    let renewed: RenewResponse = body::parse(
        "renew",
        format!(r#"{{"lease_duration":{}}}"#, u64::MAX).as_bytes(),
    )
    .expect("parses");
    assert_eq!(
        from_vault_secs(renewed.lease_duration),
        crate::lease_clock::MAX_VAULT_DURATION
    );
}
