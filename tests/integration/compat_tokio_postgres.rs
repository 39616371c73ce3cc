//! tokio-postgres (a pure-Rust protocol implementation) through leasegate over rustls with full
//! certificate and host-name verification and a client certificate: simple and extended
//! queries, pipelining, messages larger than 16 MiB both ways, COPY in and out (text and
//! binary), LISTEN/NOTIFY between two sessions, NoticeResponse and ParameterStatus relayed
//! while the session runs, startup parameters forwarded, and cancelling an extended-protocol
//! query. (Cancelling a simple query is in `cancel.rs`.)

use std::collections::BTreeMap;
use std::time::{Duration, Instant};

use bytes::Bytes;
use futures_util::{SinkExt, StreamExt, pin_mut};
use sha2::{Digest, Sha256};
use tokio::sync::{mpsc, watch};
use tokio_postgres::binary_copy::BinaryCopyOutStream;
use tokio_postgres::error::SqlState;
use tokio_postgres::types::Type;
use tokio_postgres::{AsyncMessage, Client, Config, SimpleQueryMessage};

use crate::harness::client::{MakeRustls, tls_config};
use crate::harness::compat::{CompatRow, locked_crate_version};
use crate::harness::fixture::{Fixture, GOOD_URI};
use crate::harness::poll_until;

const CLIENT: &str = "tokio-postgres (rustls)";
const ORDER: u32 = 30;

fn row(slug: &str) -> CompatRow {
    CompatRow::new(
        slug,
        ORDER,
        CLIENT,
        &format!("tokio-postgres {}", locked_crate_version("tokio-postgres")),
    )
}

async fn fixture(name: &str) -> Fixture {
    Fixture::start_with(name, |cfg| {
        cfg.grant(&format!("uri:{GOOD_URI}"), &["myapp"], &["readwrite"])
    })
    .await
}

/// Connection settings for leasegate on `port` as `role`; the server certificate is verified
/// against the test CA and the name `localhost` by rustls.
fn config(port: u16, role: &str) -> Config {
    config_for_name("localhost", port, role)
}

/// As [`config`], verifying the server certificate against `name` instead.
fn config_for_name(name: &str, port: u16, role: &str) -> Config {
    let mut c = Config::new();
    c.host(name)
        .hostaddr(std::net::Ipv4Addr::LOCALHOST.into())
        .port(port)
        .user(role)
        .dbname("myapp")
        .ssl_mode(tokio_postgres::config::SslMode::Require)
        .connect_timeout(Duration::from_secs(15));
    c
}

/// Session parameters the driver task publishes (tokio-postgres keeps them per connection).
const WATCHED: &[&str] = &[
    "application_name",
    "TimeZone",
    "DateStyle",
    "server_version",
    "client_encoding",
    "search_path",
];

/// A session whose connection task forwards asynchronous messages (notifications, notices)
/// and publishes ParameterStatus values.
struct Driven {
    client: Client,
    messages: mpsc::UnboundedReceiver<AsyncMessage>,
    params: watch::Receiver<BTreeMap<String, String>>,
    tls: MakeRustls,
}

async fn connect_driven(f: &Fixture, cfg: Config) -> Driven {
    let tls = MakeRustls(tls_config(&f.pki, Some(&f.good)));
    let (client, mut conn) = cfg
        .connect(tls.clone())
        .await
        .expect("tokio-postgres connects through leasegate");
    let (msg_tx, messages) = mpsc::unbounded_channel();
    let (param_tx, params) = watch::channel(BTreeMap::new());
    tokio::spawn(async move {
        loop {
            let next = std::future::poll_fn(|cx| {
                let polled = conn.poll_message(cx);
                let snapshot: BTreeMap<String, String> = WATCHED
                    .iter()
                    .filter_map(|k| conn.parameter(k).map(|v| (k.to_string(), v.to_string())))
                    .collect();
                param_tx.send_if_modified(|current| {
                    let changed = *current != snapshot;
                    *current = snapshot;
                    changed
                });
                polled
            })
            .await;
            match next {
                Some(Ok(m)) => {
                    let _ = msg_tx.send(m);
                }
                Some(Err(e)) => {
                    eprintln!("tokio-postgres connection ended: {e}");
                    break;
                }
                None => break,
            }
        }
    });
    Driven {
        client,
        messages,
        params,
        tls,
    }
}

/// Waits (≤ 10 s) until the published parameter `name` equals `value`.
async fn wait_param(d: &Driven, name: &str, value: &str) {
    let rx = d.params.clone();
    poll_until(
        Duration::from_secs(10),
        &format!("ParameterStatus {name}={value}"),
        || {
            let current = rx.borrow().get(name).cloned();
            async move {
                if current.as_deref() == Some(value) {
                    Ok(())
                } else {
                    Err(format!("{name} = {current:?}"))
                }
            }
        },
    )
    .await;
}

fn simple_values(msgs: &[SimpleQueryMessage]) -> Vec<Vec<Option<String>>> {
    msgs.iter()
        .filter_map(|m| match m {
            SimpleQueryMessage::Row(r) => Some(
                (0..r.len())
                    .map(|i| r.get(i).map(String::from))
                    .collect::<Vec<_>>(),
            ),
            _ => None,
        })
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tokio_postgres_queries_pipelining_and_large_messages() {
    let mut row = row("tokio-postgres-1-queries");
    let f = fixture("compat-tp-queries").await;
    let d = connect_driven(&f, config(f.proxy.port, "readonly")).await;
    let c = &d.client;

    row.step("simple query (multi-statement)");
    let msgs = c
        .simple_query("select 1 as one; select 'two', null::text")
        .await
        .expect("simple query");
    assert_eq!(
        simple_values(&msgs),
        vec![vec![Some("1".into())], vec![Some("two".into()), None]]
    );

    row.step("prepared statements with parameters");
    let stmt = c
        .prepare("select $1::int8 + 1, $2::text || '!', $3::bytea, $4::float8 * 2")
        .await
        .expect("prepare");
    assert_eq!(stmt.params()[0], Type::INT8);
    for i in 0..5i64 {
        let r = c
            .query_one(&stmt, &[&i, &format!("v{i}"), &vec![i as u8; 3], &1.25f64])
            .await
            .expect("execute prepared statement");
        assert_eq!(r.get::<_, i64>(0), i + 1);
        assert_eq!(r.get::<_, String>(1), format!("v{i}!"));
        assert_eq!(r.get::<_, Vec<u8>>(2), vec![i as u8; 3]);
        assert_eq!(r.get::<_, f64>(3), 2.5);
    }
    let typed = c
        .prepare_typed("select $1 || 'x'", &[Type::TEXT])
        .await
        .expect("prepare_typed");
    let r = c.query_one(&typed, &[&"a"]).await.expect("typed statement");
    assert_eq!(r.get::<_, String>(0), "ax");

    row.step("pipelining (52 queries in flight)");
    let started = Instant::now();
    let futures: Vec<_> = (0..50i32)
        .map(|i| async move {
            c.query_one("select $1::int * 3", &[&i])
                .await
                .map(|r| r.get::<_, i32>(0))
        })
        .collect();
    let (joined, sleepy, other) = tokio::join!(
        futures_util::future::join_all(futures),
        c.query_one("select pg_sleep(0.05)::text, 7", &[]),
        c.simple_query("select 'simple in the pipeline'"),
    );
    let values: Vec<i32> = joined
        .into_iter()
        .map(|r| r.expect("pipelined query"))
        .collect();
    assert_eq!(values, (0..50).map(|i| i * 3).collect::<Vec<_>>());
    assert_eq!(sleepy.expect("pipelined sleep").get::<_, i32>(1), 7);
    assert_eq!(
        simple_values(&other.expect("pipelined simple query")),
        vec![vec![Some("simple in the pipeline".into())]]
    );
    eprintln!("52 pipelined queries in {:?}", started.elapsed());

    row.step("17 MiB result row");
    let big = 17 * 1024 * 1024;
    let started = Instant::now();
    let r = c
        .query_one("select repeat('x', 17*1024*1024)", &[])
        .await
        .expect("17 MiB result");
    let text: &str = r.get(0);
    assert_eq!(text.len(), big);
    assert!(text.bytes().all(|b| b == b'x'), "17 MiB of 'x'");
    eprintln!("17 MiB row received in {:?}", started.elapsed());

    row.step("17 MiB parameter");
    let payload: String = (0..big).map(|i| (b'a' + (i % 26) as u8) as char).collect();
    let digest = format!("{:x}", Sha256::digest(payload.as_bytes()));
    let started = Instant::now();
    let r = c
        .query_one(
            "select length($1::text), encode(sha256(convert_to($1::text, 'UTF8')), 'hex')",
            &[&payload],
        )
        .await
        .expect("17 MiB parameter");
    assert_eq!(r.get::<_, i32>(0) as usize, big);
    assert_eq!(
        r.get::<_, String>(1),
        digest,
        "the server saw the same bytes"
    );
    eprintln!("17 MiB parameter sent in {:?}", started.elapsed());

    row.step("wrong host name refused");
    let wrong = config_for_name("wrong-name.invalid", f.proxy.port, "readonly");
    let err = match wrong.connect(d.tls.clone()).await {
        Ok(_) => panic!("a wrong server name must be refused"),
        Err(e) => format!("{e:?}"),
    };
    assert!(
        err.contains("NotValidForName") || err.contains("certificate"),
        "wrong host name refused by the certificate check: {err}"
    );
}

/// COPY text rows: id, a name with characters COPY escapes, in canonical text form.
fn copy_rows(n: usize) -> String {
    let mut s = String::new();
    for i in 0..n {
        s.push_str(&format!(
            "{i}\tname {i} with \\t tab, \\n newline, \\\\ backslash ✓ {}\n",
            "p".repeat(i % 50)
        ));
    }
    s
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tokio_postgres_copy_in_and_copy_out() {
    let mut row = row("tokio-postgres-2-copy");
    let f = fixture("compat-tp-copy").await;
    let d = connect_driven(&f, config(f.proxy.port, "readwrite")).await;
    let c = &d.client;
    c.batch_execute("create temp table c (id int primary key, name text)")
        .await
        .expect("create temp table");

    row.step("COPY IN (20000 rows)");
    let data = copy_rows(20_000);
    let sink = c
        .copy_in("COPY c (id, name) FROM STDIN")
        .await
        .expect("start COPY IN");
    pin_mut!(sink);
    for chunk in data.as_bytes().chunks(64 * 1024 + 7) {
        sink.send(Bytes::copy_from_slice(chunk))
            .await
            .expect("send COPY data");
    }
    let copied = sink.finish().await.expect("finish COPY IN");
    assert_eq!(copied, 20_000);

    row.step("COPY OUT text");
    let stream = c
        .copy_out("COPY (select id, name from c order by id) TO STDOUT")
        .await
        .expect("start COPY OUT");
    pin_mut!(stream);
    let mut out = Vec::new();
    while let Some(chunk) = stream.next().await {
        out.extend_from_slice(&chunk.expect("COPY OUT data"));
    }
    assert_eq!(out.len(), data.len(), "COPY OUT size");
    assert!(
        out == data.as_bytes(),
        "COPY OUT returns exactly what COPY IN sent"
    );

    row.step("COPY OUT binary");
    let stream = c
        .copy_out(
            "COPY (select id, name from c where id < 100 order by id) TO STDOUT (FORMAT binary)",
        )
        .await
        .expect("start binary COPY OUT");
    let rows = BinaryCopyOutStream::new(stream, &[Type::INT4, Type::TEXT]);
    pin_mut!(rows);
    let mut n = 0;
    while let Some(r) = rows.next().await {
        let r = r.expect("binary COPY row");
        assert_eq!(r.get::<i32>(0), n);
        assert!(
            r.get::<&str>(1)
                .contains("with \t tab, \n newline, \\ backslash ✓")
        );
        n += 1;
    }
    assert_eq!(n, 100);

    row.step("COPY error recovery");
    let sink = c
        .copy_in::<_, Bytes>("COPY c (id, name) FROM STDIN")
        .await
        .expect("start COPY IN");
    pin_mut!(sink);
    sink.send(Bytes::from_static(b"1\tduplicate key\n"))
        .await
        .expect("send");
    let err = sink
        .finish()
        .await
        .expect_err("duplicate key fails the COPY");
    assert_eq!(err.code(), Some(&SqlState::UNIQUE_VIOLATION), "{err:?}");
    let r = c
        .query_one("select count(*) from c", &[])
        .await
        .expect("usable");
    assert_eq!(r.get::<_, i64>(0), 20_000);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tokio_postgres_notify_notice_and_parameter_status() {
    let mut row = row("tokio-postgres-3-async");
    let f = fixture("compat-tp-async").await;
    let mut cfg = config(f.proxy.port, "readonly");
    cfg.application_name("compat-listener");
    let mut listener = connect_driven(&f, cfg).await;
    let notifier = connect_driven(&f, config(f.proxy.port, "readonly")).await;

    row.step("LISTEN/NOTIFY (poll_message)");
    listener
        .client
        .batch_execute("LISTEN compat_channel")
        .await
        .expect("LISTEN");
    let sent = Instant::now();
    notifier
        .client
        .execute("select pg_notify('compat_channel', $1)", &[&"payload ✓"])
        .await
        .expect("NOTIFY");
    // The listener is idle: the notification must arrive without it sending anything.
    let note = tokio::time::timeout(Duration::from_secs(10), async {
        loop {
            match listener.messages.recv().await {
                Some(AsyncMessage::Notification(n)) => return n,
                Some(_) => continue,
                None => panic!("listener connection closed"),
            }
        }
    })
    .await
    .expect("notification within 10 s");
    assert_eq!(note.channel(), "compat_channel");
    assert_eq!(note.payload(), "payload ✓");
    eprintln!("notification delivered after {:?}", sent.elapsed());

    row.step("NoticeResponse");
    listener
        .client
        .batch_execute("DO $$ BEGIN RAISE NOTICE 'hello'; RAISE WARNING 'careful' USING ERRCODE = '01R01'; END $$")
        .await
        .expect("DO block");
    let mut notices = Vec::new();
    while notices.len() < 2 {
        match tokio::time::timeout(Duration::from_secs(10), listener.messages.recv()).await {
            Ok(Some(AsyncMessage::Notice(n))) => notices.push(n),
            Ok(Some(_)) => {}
            other => panic!("two notices expected, got {notices:?} then {other:?}"),
        }
    }
    assert_eq!(notices[0].message(), "hello");
    assert_eq!(notices[0].severity(), "NOTICE");
    assert_eq!(notices[0].code(), &SqlState::SUCCESSFUL_COMPLETION);
    assert_eq!(notices[1].message(), "careful");
    assert_eq!(notices[1].severity(), "WARNING");
    assert_eq!(notices[1].code().code(), "01R01");

    row.step("ParameterStatus after SET");
    wait_param(&listener, "application_name", "compat-listener").await;
    let version = listener.params.borrow().get("server_version").cloned();
    assert!(
        version.as_deref().is_some_and(|v| v.starts_with("15")),
        "server_version ParameterStatus: {version:?}"
    );
    listener
        .client
        .batch_execute("SET application_name = 'x'; SET TimeZone = 'America/Sao_Paulo'")
        .await
        .expect("SET");
    wait_param(&listener, "application_name", "x").await;
    wait_param(&listener, "TimeZone", "America/Sao_Paulo").await;
    let shown = listener
        .client
        .simple_query("SHOW application_name")
        .await
        .expect("SHOW");
    assert_eq!(simple_values(&shown), vec![vec![Some("x".into())]]);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tokio_postgres_startup_parameters_are_forwarded() {
    let mut row = row("tokio-postgres-4-startup");
    let f = fixture("compat-tp-startup").await;
    row.step("startup parameters (application_name, options: search_path, TimeZone, DateStyle)");
    let mut cfg = config(f.proxy.port, "readonly");
    cfg.application_name("compat-app").options(
        "-c search_path=compat_schema,public -c TimeZone=Asia/Tokyo -c DateStyle=SQL,DMY \
         -c statement_timeout=12345",
    );
    let d = connect_driven(&f, cfg).await;
    let shown = d
        .client
        .simple_query(
            "SHOW application_name; SHOW search_path; SHOW TimeZone; SHOW DateStyle; \
             SHOW statement_timeout",
        )
        .await
        .expect("SHOW");
    assert_eq!(
        simple_values(&shown),
        vec![
            vec![Some("compat-app".into())],
            vec![Some("compat_schema,public".into())],
            vec![Some("Asia/Tokyo".into())],
            vec![Some("SQL, DMY".into())],
            vec![Some("12345ms".into())],
        ]
    );
    // The startup ParameterStatus messages reflect the forwarded settings too.
    wait_param(&d, "application_name", "compat-app").await;
    wait_param(&d, "TimeZone", "Asia/Tokyo").await;
    wait_param(&d, "DateStyle", "SQL, DMY").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tokio_postgres_cancels_an_extended_protocol_query() {
    let mut row = row("tokio-postgres-5-cancel");
    let f = fixture("compat-tp-cancel").await;
    let d = connect_driven(&f, config(f.proxy.port, "readonly")).await;
    row.step("cancel of an extended-protocol query");
    let token = d.client.cancel_token();
    let client = std::sync::Arc::new(d.client);
    let running = client.clone();
    let query = tokio::spawn(async move {
        running
            .query("select pg_sleep($1)", &[&30f64])
            .await
            .map(drop)
    });
    let prefix = f.mount.prefix.clone();
    crate::harness::pg::wait_one_active(&prefix, "pg_sleep").await;
    let sent = Instant::now();
    token
        .cancel_query(d.tls.clone())
        .await
        .expect("send CancelRequest");
    let err = tokio::time::timeout(Duration::from_secs(5), query)
        .await
        .expect("cancelled within 5 s")
        .expect("query task")
        .expect_err("the query is cancelled");
    assert_eq!(err.code(), Some(&SqlState::QUERY_CANCELED), "{err:?}");
    eprintln!(
        "extended-protocol query cancelled after {:?}",
        sent.elapsed()
    );
    let r = client
        .query_one("select $1::int", &[&5])
        .await
        .expect("session usable after the cancel");
    assert_eq!(r.get::<_, i32>(0), 5);
}
