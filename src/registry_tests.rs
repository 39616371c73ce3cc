//! The registry: registration and its guard, ends and their reasons, the state shown.

use super::*;
use crate::metrics::labels::SessionEndReason as R;

fn session(uri: &str) -> NewSession {
    NewSession {
        transport: Transport::Tls,
        client_addr: "127.0.0.1:5000".into(),
        principal: Principal::new(vec![uri.into()], Vec::new(), None),
        database: "myapp".into(),
        role: "readonly".into(),
    }
}

fn ended(metrics: &Metrics, reason: R) -> bool {
    let line = format!(
        "leasegate_sessions_ended_total{{reason=\"{}\"}} 1",
        reason.as_str()
    );
    metrics.render().contains(&line)
}

#[test]
fn a_session_is_listed_until_its_guard_drops_and_counts_its_end_once() {
    let metrics = Arc::new(Metrics::new());
    let registry = Registry::new(metrics.clone());
    let a = registry.register(session("spiffe://t/a"), CancellationToken::new());
    let b = registry.register(session("spiffe://t/b"), CancellationToken::new());
    assert_ne!(a.id, b.id);
    let rows = registry.list();
    assert_eq!(rows.len(), 2);
    assert_eq!(rows[0].identities, ["uri:spiffe://t/a"]);
    assert_eq!(
        (rows[0].kind, rows[0].state.as_str()),
        (Kind::Session, "setup")
    );
    a.ended(R::Client);
    drop(a);
    assert_eq!(registry.list().len(), 1);
    assert!(ended(&metrics, R::Client));
    drop(b);
    assert!(ended(&metrics, R::Error), "no reason seen: error");
}

#[test]
fn an_end_stops_the_session_with_its_reason_and_matches_by_predicate() {
    let metrics = Arc::new(Metrics::new());
    let registry = Registry::new(metrics.clone());
    let (stop_a, stop_b) = (CancellationToken::new(), CancellationToken::new());
    let a = registry.register(session("spiffe://t/a"), stop_a.clone());
    let _b = registry.register(session("spiffe://t/b"), stop_b.clone());
    let reason = EndReason::Operator("leaked key".into());
    let done = registry.end_where(|t| t.facts.principal.uris[0].ends_with("/a"), &reason);
    assert_eq!(done.len(), 1);
    assert!(stop_a.is_cancelled() && !stop_b.is_cancelled());
    assert_eq!(
        a.stopped().client_message(),
        "terminated by the operator: leaked key"
    );
    assert!(!a.end(EndReason::GrantRemoved), "ended once");
    // The client leaving afterwards does not change why it ended.
    a.ended(R::Client);
    drop(a);
    assert!(ended(&metrics, R::Operator));
}

#[test]
fn a_stop_without_reason_is_shutdown() {
    let metrics = Arc::new(Metrics::new());
    let registry = Registry::new(metrics.clone());
    let stop = CancellationToken::new();
    let a = registry.register(session("spiffe://t/a"), stop.clone());
    stop.cancel();
    assert_eq!(a.stopped().sqlstate().code(), "57P01");
    drop(a);
    assert!(ended(&metrics, R::Shutdown));
}

#[test]
fn the_state_follows_the_traffic() {
    let registry = Registry::new(Arc::new(Metrics::new()));
    let a = registry.register(session("spiffe://t/a"), CancellationToken::new());
    let state = || registry.list()[0].state.clone();
    assert_eq!(state(), "setup");
    a.to_client.store(0, 0, b'I', false);
    a.relaying();
    assert_eq!(state(), "idle");
    a.to_upstream.store(20, 1, b'B', false);
    assert_eq!(state(), "active", "a request not answered yet");
    a.to_client.store(40, 1, b'T', false);
    assert_eq!(state(), "in transaction");
    a.to_upstream.store(30, 1, b'B', true);
    assert_eq!(state(), "active", "extended protocol awaiting Sync");
    a.to_upstream.store(35, 2, b'B', false);
    a.to_client.store(60, 2, b'I', false);
    assert_eq!(state(), "idle");
    let row = &registry.list()[0];
    assert_eq!((row.bytes_to_upstream, row.bytes_to_client), (35, 60));
}

#[tokio::test]
async fn waits_for_ended_sessions_to_go() {
    let registry = Registry::new(Arc::new(Metrics::new()));
    let a = registry.register(session("spiffe://t/a"), CancellationToken::new());
    let id = a.id;
    let waiting = {
        let registry = registry.clone();
        tokio::spawn(async move { registry.wait_gone(&[id], Duration::from_secs(30)).await })
    };
    tokio::task::yield_now().await;
    drop(a);
    assert!(waiting.await.expect("join"));
    assert!(registry.wait_gone(&[id], Duration::ZERO).await);
}

#[test]
fn credential_and_renewals_are_listed() {
    let registry = Registry::new(Arc::new(Metrics::new()));
    let a = registry.register(session("spiffe://t/a"), CancellationToken::new());
    a.credential(
        "v-user",
        "database/creds/readonly/abc",
        Some(Duration::from_secs(60)),
    );
    let row = &registry.list()[0];
    assert_eq!(row.upstream_user.as_deref(), Some("v-user"));
    assert_eq!(row.lease_id.as_deref(), Some("database/creds/readonly/abc"));
    assert!(row.lease_expires.is_some() && row.last_renewed.is_none());
    a.renewed(Duration::from_secs(120));
    assert!(registry.list()[0].last_renewed.is_some());
    assert_eq!(transport_named("unix"), Some(Transport::Unix));
    assert_eq!(transport_named("udp"), None);
}
