//! Credentials that cannot live as long as their session: OpenBao down past the credential's
//! TTL while a session is open, and a role whose TTL is shorter than `expiry_warning`. The
//! client is warned (01000) and then ended with 57P01 before the credential dies, as README's
//! failure table promises, and nothing is left.

use std::time::{Duration, Instant};

use crate::harness::bao::OwnBao;
use crate::harness::env;
use crate::harness::fixture::{Fixture, messages_until_closed, wait_all_revoked_on};
use crate::harness::metrics::value_or_zero;
use crate::harness::proxy::set;
use crate::harness::wire::Msg;

/// Severity and SQLSTATE of a NoticeResponse or ErrorResponse.
fn severity_code(msg: &Msg) -> (String, String) {
    let fields = msg.fields();
    let field = |c| fields.get(&c).cloned().unwrap_or_default();
    (field('S'), field('C'))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn vault_down_past_the_lease_ttl_warns_then_ends_the_session_before_it_expires() {
    const TTL: Duration = Duration::from_secs(15);
    let mut own = OwnBao::persistent().await;
    let pg = &env().pg;
    let mount = own.target.fresh_mount(pg, "renew-outage").await;
    own.target
        .set_role_ttl(&mount, "readonly", "15s", "1h")
        .await;
    let f = Fixture::on_own_bao(&own.target, mount, "1s", |t| {
        set(t, "databases.0.expiry_warning", "5s")
    })
    .await;
    // The credential is issued after this instant, so it dies no earlier than TTL after it.
    let asked = Instant::now();
    let mut w = f.raw_session("readonly").await;
    assert_eq!(w.query_column("select 1").await, vec![Some("1".into())]);
    own.kill();

    let events = messages_until_closed(&mut w, asked, TTL + Duration::from_secs(10))
        .await
        .unwrap_or_else(|seen| panic!("session still open past the TTL: {seen:?}"));
    eprintln!("renew-outage: {events:?}");
    let tags: Vec<u8> = events.iter().map(|(_, m)| m.tag).collect();
    assert_eq!(
        tags, b"NE",
        "a notice, then the error, then the close: {events:?}"
    );
    assert_eq!(
        severity_code(&events[0].1),
        ("WARNING".into(), "01000".into())
    );
    let (fatal_at, fatal) = &events[1];
    assert_eq!(severity_code(fatal), ("FATAL".into(), "57P01".into()));
    let message = fatal.fields().get(&'M').cloned().unwrap_or_default();
    assert!(
        message.contains("could not be renewed") && message.contains("\"readonly\""),
        "the FATAL says the renewals failed: {message:?}"
    );
    assert!(
        *fatal_at < TTL,
        "ended {fatal_at:?} after the credential was asked for, its TTL is {TTL:?}"
    );
    let m = f.proxy.metrics().await;
    let failed = value_or_zero(&m, "leasegate_lease_renewals_total", &[("result", "error")]);
    assert!(failed >= 1.0, "the failed renewals counted ({failed})");

    own.restart().await;
    wait_all_revoked_on(&own.target, pg, &f.mount, Duration::from_secs(60)).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn role_ttl_shorter_than_the_expiry_warning_warns_at_once_and_ends_in_time() {
    // An operator's typo: a 4 s TTL and max_ttl under the default 60 s expiry_warning.
    let f = Fixture::start("renew-tiny-ttl").await;
    crate::harness::bao::Target::shared()
        .set_role_ttl(&f.mount, "readonly", "4s", "4s")
        .await;
    let asked = Instant::now();
    let mut w = f.raw_session("readonly").await;
    let events = messages_until_closed(&mut w, asked, Duration::from_secs(10))
        .await
        .unwrap_or_else(|seen| panic!("session still open past the TTL: {seen:?}"));
    eprintln!("renew-tiny-ttl: {events:?}");
    let tags: Vec<u8> = events.iter().map(|(_, m)| m.tag).collect();
    assert_eq!(
        tags, b"NE",
        "a notice, then the error, then the close: {events:?}"
    );
    assert_eq!(
        severity_code(&events[1].1),
        ("FATAL".into(), "57P01".into())
    );
    assert!(
        events[1].0 < Duration::from_secs(4),
        "ended before the credential died"
    );
    f.wait_all_revoked(Duration::from_secs(10)).await;
}
