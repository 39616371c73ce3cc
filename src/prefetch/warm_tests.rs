//! The warm pool without a database: sessions over loopback sockets whose far end the test
//! holds (so it can close it or talk on it), leases from a scripted Vault. A session is
//! handed out once and only for its own parameter set and entry; a miss remembers the set;
//! one the server closed is never handed out; a reload that changes the entry retires them;
//! the snapshot lists what waits.

use bytes::BytesMut;
use tokio::io::AsyncWriteExt;
use tokio::net::{TcpListener, TcpStream};

use super::*;
use crate::lease_clock::{Jitter, Term};
use crate::tasks::Tasks;
use crate::upstream::UpstreamStream;
use crate::vault::testing::ScriptedVault;

fn settings(pairs: &[(&str, &str)]) -> Settings {
    pairs
        .iter()
        .map(|(k, v)| (k.to_string(), v.to_string()))
        .collect()
}

fn config(port: u16) -> Config {
    crate::prefetch::tests::app_config(&format!("port = {port}\nwarm = {{ readonly = 2 }}"))
}

struct Setup {
    pool: WarmPool,
    vault: Arc<ScriptedVault>,
    metrics: Arc<Metrics>,
    db: DatabaseConfig,
}

fn setup() -> Setup {
    let vault = Arc::new(ScriptedVault::new(Duration::from_secs(3600)));
    let metrics = Arc::new(Metrics::new());
    let revoker = Revoker::spawn(vault.clone(), metrics.clone(), &Tasks::detached());
    let config = config(5432);
    let db = config.reloadable.databases[0].clone();
    let pool = WarmPool::new(&config, vault.clone(), revoker, metrics.clone());
    Setup {
        pool,
        vault,
        metrics,
        db,
    }
}

/// A logged-in looking session over loopback; the far end is returned to the test.
async fn session(s: &Setup, n: usize) -> (WarmSession, TcpStream) {
    let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
    let near = TcpStream::connect(listener.local_addr().expect("addr"))
        .await
        .expect("connect");
    let (far, _) = listener.accept().await.expect("accept");
    let (lease, guard) = s
        .vault
        .creds("database", "readonly", &s.pool.revoker)
        .await
        .expect("scripted creds");
    let now = Instant::now();
    let w = WarmSession {
        term: Term::issued(now, lease.duration, lease.renewable, Jitter::new(0.5)),
        created: now,
        created_at: SystemTime::now(),
        lease,
        guard,
        logged_in: LoggedIn {
            stream: UpstreamStream::Plain(near),
            to_client: BytesMut::new(),
            cancel_key: Some((1000 + n as i32, 7)),
            ready_status: b'I',
            leftover: BytesMut::new(),
        },
    };
    (w, far)
}

/// Puts `w` into the pool under `set`.
fn pool_it(s: &Setup, set: &Settings, w: WarmSession) {
    let mut pools = s.pool.lock();
    let pool = pools
        .get_mut(&("app".to_owned(), "readonly".to_owned()))
        .expect("pool");
    if !pool.sets.iter().any(|x| x.settings == *set) {
        want(pool, set.clone(), Instant::now());
    }
    let at = pool
        .sets
        .iter()
        .position(|x| x.settings == *set)
        .expect("set");
    pool.sets[at].ready.push_back(w);
}

fn count(s: &Setup, result: &str) -> bool {
    let line = format!("leasegate_warm_sessions_total{{result=\"{result}\"}} 1");
    s.metrics.render().contains(&line)
}

#[test]
fn equal_settings_in_any_order_are_one_set() {
    let a = canonical(&settings(&[("application_name", "a"), ("TimeZone", "UTC")]));
    let b = canonical(&settings(&[("TimeZone", "UTC"), ("application_name", "a")]));
    assert_eq!(a, b);
    let c = canonical(&settings(&[("TimeZone", "UTC"), ("application_name", "b")]));
    assert_ne!(a, c);
    assert_ne!(a, canonical(&settings(&[("application_name", "a")])));
}

#[tokio::test]
async fn a_session_goes_to_one_client_of_its_own_set_and_a_miss_remembers_the_set() {
    let s = setup();
    let (w, _far) = session(&s, 1).await;
    let lease_id = w.lease.id.clone();
    pool_it(&s, &Vec::new(), w);
    let listed = s.pool.snapshot();
    assert_eq!(listed.len(), 1);
    assert_eq!(
        (listed[0].database.as_str(), listed[0].role.as_str()),
        ("app", "readonly")
    );
    assert_eq!(listed[0].lease_id, lease_id);
    assert!(listed[0].lease_expires.is_some());

    // Another set: the cold path, and the pool now keeps that set too.
    let other = settings(&[("application_name", "x")]);
    assert!(s.pool.take(&s.db, "readonly", &other).is_none());
    assert!(count(&s, "miss"));
    let sets = s.pool.lock().values().next().map(|p| p.sets.len());
    assert_eq!(sets, Some(2));
    // Another role: no warm sessions there, not even a miss.
    assert!(s.pool.take(&s.db, "readwrite", &[]).is_none());

    let taken = s.pool.take(&s.db, "readonly", &[]).expect("a hit");
    assert_eq!(taken.guard.id(), lease_id);
    assert_eq!(taken.logged_in.cancel_key, Some((1001, 7)));
    assert!(count(&s, "hit"));
    assert!(s.pool.take(&s.db, "readonly", &[]).is_none(), "never twice");
    assert!(s.pool.snapshot().is_empty());
}

#[tokio::test]
async fn a_session_whose_server_closed_or_spoke_is_never_handed_out() {
    let s = setup();
    let (idle, _far_idle) = session(&s, 1).await;
    assert!(!idle.gone(), "an idle backend is alive");
    let (closed, far_closed) = session(&s, 2).await;
    drop(far_closed);
    let (spoke, mut far_spoke) = session(&s, 3).await;
    far_spoke.write_all(b"E").await.expect("write");
    // Loopback delivers at once; poll briefly anyway, the kernel decides.
    for _ in 0..100 {
        if closed.gone() && spoke.gone() {
            break;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    assert!(closed.gone(), "EOF seen");
    assert!(spoke.gone(), "an unasked message seen");
    pool_it(&s, &Vec::new(), closed);
    pool_it(&s, &Vec::new(), spoke);
    pool_it(&s, &Vec::new(), idle);
    let taken = s.pool.take(&s.db, "readonly", &[]).expect("the live one");
    assert_eq!(taken.logged_in.cancel_key, Some((1001, 7)));
    let text = s.metrics.render();
    assert!(
        text.contains(r#"leasegate_warm_sessions_total{result="gone"} 2"#),
        "{text}"
    );
}

#[tokio::test]
async fn a_reload_that_changes_the_entry_retires_its_sessions() {
    let s = setup();
    let (w, _far) = session(&s, 1).await;
    pool_it(&s, &Vec::new(), w);
    // The same entry again: nothing changes.
    s.pool.configure(&config(5432));
    assert_eq!(s.pool.snapshot().len(), 1);
    // Another port: the waiting session is for a server the entry no longer names.
    let changed = config(5433);
    s.pool.configure(&changed);
    assert!(s.pool.snapshot().is_empty());
    let retiring = s
        .pool
        .lock()
        .values()
        .map(|p| p.retiring.len())
        .sum::<usize>();
    assert_eq!(retiring, 1, "closed and revoked by the next pass");
    // A client holding the old snapshot of the entry gets nothing from the new pool.
    assert!(s.pool.take(&s.db, "readonly", &[]).is_none());
    let new_db = &changed.reloadable.databases[0];
    assert!(
        s.pool.take(new_db, "readonly", &[]).is_none(),
        "not filled yet"
    );
}

#[tokio::test]
async fn beyond_the_set_limit_the_least_recently_wanted_set_retires() {
    let s = setup();
    let (w, _far) = session(&s, 1).await;
    pool_it(&s, &Vec::new(), w);
    for i in 0..MAX_SETS {
        let set = settings(&[("application_name", &format!("app{i}"))]);
        assert!(s.pool.take(&s.db, "readonly", &set).is_none());
    }
    let pools = s.pool.lock();
    let pool = pools.values().next().expect("pool");
    assert_eq!(pool.sets.len(), MAX_SETS);
    assert!(
        pool.sets.iter().all(|x| !x.settings.is_empty()),
        "the empty set was wanted least recently"
    );
    assert_eq!(pool.retiring.len(), 1, "its session retires");
}
