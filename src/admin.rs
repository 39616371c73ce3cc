//! The admin HTTP server: `/metrics` (Prometheus text), `/healthz` (the process is alive) and
//! `/readyz` (accepting sessions and not draining).
//!
//! The server has no authentication, so it bounds what a peer can hold: at most
//! [`MAX_CONNECTIONS`] connections are served at once (a permit is taken before `accept`, so
//! further connections wait in the kernel's accept queue and cost leasegate no file
//! descriptor), request headers must arrive within [`HEADER_READ_TIMEOUT`] (also the idle
//! time allowed between keep-alive requests), and a connection lasts at most
//! [`CONNECTION_TIMEOUT`].

use std::convert::Infallible;
use std::sync::Arc;
use std::time::Duration;

use http_body_util::Full;
use hyper::body::{Bytes, Incoming};
use hyper::server::conn::http1;
use hyper::service::service_fn;
use hyper::{Method, Request, Response, StatusCode};
use hyper_util::rt::TokioIo;
use tokio::net::TcpListener;
use tokio::sync::Semaphore;

use crate::metrics::Metrics;
use crate::tasks::Tasks;

/// Admin connections served at once.
pub(crate) const MAX_CONNECTIONS: usize = 64;
/// Limit for a request's headers to arrive, from the connection's start or the previous
/// response (an idle connection is closed after this long).
pub(crate) const HEADER_READ_TIMEOUT: Duration = Duration::from_secs(5);
/// Limit for a whole admin connection, requests and responses included.
pub(crate) const CONNECTION_TIMEOUT: Duration = Duration::from_secs(30);

fn respond(status: StatusCode, content_type: &str, body: String) -> Response<Full<Bytes>> {
    let mut resp = Response::new(Full::new(Bytes::from(body)));
    *resp.status_mut() = status;
    if let Ok(v) = content_type.parse() {
        resp.headers_mut().insert(hyper::header::CONTENT_TYPE, v);
    }
    resp
}

fn route(metrics: &Metrics, ready: bool, req: &Request<Incoming>) -> Response<Full<Bytes>> {
    if req.method() != Method::GET && req.method() != Method::HEAD {
        return respond(
            StatusCode::METHOD_NOT_ALLOWED,
            "text/plain",
            "GET only\n".into(),
        );
    }
    match req.uri().path() {
        "/metrics" => respond(
            StatusCode::OK,
            "application/openmetrics-text; version=1.0.0; charset=utf-8",
            metrics.render(),
        ),
        "/healthz" => respond(StatusCode::OK, "text/plain", "ok\n".into()),
        "/readyz" if ready => respond(StatusCode::OK, "text/plain", "ready\n".into()),
        "/readyz" => respond(
            StatusCode::SERVICE_UNAVAILABLE,
            "text/plain",
            "not ready\n".into(),
        ),
        _ => respond(StatusCode::NOT_FOUND, "text/plain", "not found\n".into()),
    }
}

/// Serves `metrics` and, on `/readyz`, what `ready` says, until the token of `tasks` is
/// cancelled; connections are served on `tasks` too.
pub(crate) async fn serve(
    listener: TcpListener,
    metrics: Arc<Metrics>,
    ready: impl Fn() -> bool + Send + Sync + 'static,
    tasks: Tasks,
) {
    let ready = Arc::new(ready);
    let stop = tasks.stop();
    let permits = Arc::new(Semaphore::new(MAX_CONNECTIONS));
    loop {
        let permit = tokio::select! {
            p = permits.clone().acquire_owned() => match p {
                Ok(p) => p,
                Err(_) => return,
            },
            _ = stop.cancelled() => return,
        };
        let (tcp, _) = tokio::select! {
            r = listener.accept() => match r {
                Ok(c) => c,
                Err(e) => {
                    // EMFILE and friends: back off briefly instead of spinning.
                    tracing::warn!(error = %e, "admin accept failed");
                    tokio::time::sleep(Duration::from_millis(50)).await;
                    continue;
                }
            },
            _ = stop.cancelled() => return,
        };
        let (metrics, ready) = (metrics.clone(), ready.clone());
        let stop = stop.clone();
        tasks.spawn(async move {
            let service = service_fn(move |req| {
                let resp = route(&metrics, ready(), &req);
                async move { Ok::<_, Infallible>(resp) }
            });
            let conn = http1::Builder::new()
                .timer(hyper_util::rt::TokioTimer::new())
                .header_read_timeout(HEADER_READ_TIMEOUT)
                .serve_connection(TokioIo::new(tcp), service);
            tokio::select! {
                _ = tokio::time::timeout(CONNECTION_TIMEOUT, conn) => {}
                _ = stop.cancelled() => {}
            }
            drop(permit);
        });
    }
}
