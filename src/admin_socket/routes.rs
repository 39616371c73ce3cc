//! The admin socket's requests: who asked (refused unless leasegate's uid or root), what was
//! asked, the answer, and one audit line and one `leasegate_admin_requests_total` count per
//! request.

use std::path::PathBuf;
use std::time::Duration;

use http_body_util::{BodyExt, Full, Limited};
use hyper::body::{Bytes, Incoming};
use hyper::{Method, Request, Response, StatusCode};
use serde::de::DeserializeOwned;

use super::api::{self, CheckRequest, EndAnswer, EndRequest, Listed};
use crate::audit::AuditEvent;
use crate::error::EndReason;
use crate::escape::printable;
use crate::identity::IdentityPattern;
use crate::metrics::labels::{AdminCommand, AdminResult};
use crate::registry::{Tracked, transport_named};
use crate::state::AppState;

/// Largest request body read.
const MAX_BODY: usize = 64 * 1024;
/// How long `sessions end` waits for the sessions it ended to close (their FATAL, the
/// upstream's close), beyond which it answers anyway.
const END_WAIT: Duration = crate::session::END_WITHIN.saturating_add(Duration::from_secs(2));
/// The reason when `--reason` is not given.
const DEFAULT_REASON: &str = "no reason given";

/// Who is on the other end of a connection.
pub(crate) struct Caller {
    /// `SO_PEERCRED` uid (`u32::MAX` when the kernel did not say).
    pub uid: u32,
    /// leasegate's own uid or root.
    pub allowed: bool,
    /// The socket's path, for the audit line.
    pub socket: PathBuf,
}

/// One answer, and how it counts.
struct Answer {
    /// The HTTP status: 200, 400 for a malformed request, 403 refused, 502 Vault failed.
    status: StatusCode,
    /// Plain text or JSON.
    body: String,
    /// The `leasegate_admin_requests_total{result}` value and the audit line's `result`.
    result: AdminResult,
    /// For the audit line: what was done.
    detail: Option<String>,
}

impl Answer {
    fn ok(body: String, detail: Option<String>) -> Answer {
        Answer {
            status: StatusCode::OK,
            body,
            result: AdminResult::Ok,
            detail,
        }
    }

    fn bad(text: String) -> Answer {
        Answer {
            status: StatusCode::BAD_REQUEST,
            body: format!("{text}\n"),
            result: AdminResult::BadRequest,
            detail: Some(text),
        }
    }
}

fn command_of(method: &Method, path: &str) -> AdminCommand {
    match (method, path) {
        (&Method::GET, api::SESSIONS) => AdminCommand::SessionsList,
        (&Method::POST, api::SESSIONS_END) => AdminCommand::SessionsEnd,
        (&Method::POST, api::LEASES_CHECK) => AdminCommand::LeasesCheck,
        _ => AdminCommand::Other,
    }
}

/// Answers one request of `caller`, auditing and counting it.
pub(crate) async fn answer(
    state: &AppState,
    caller: &Caller,
    req: Request<Incoming>,
) -> Response<Full<Bytes>> {
    let command = command_of(req.method(), req.uri().path());
    let answer = if !caller.allowed {
        Answer {
            status: StatusCode::FORBIDDEN,
            body: format!(
                "uid {} may not use the admin socket (only leasegate's own uid and root)\n",
                caller.uid
            ),
            result: AdminResult::Refused,
            detail: None,
        }
    } else {
        match command {
            AdminCommand::SessionsList => list(state),
            AdminCommand::SessionsEnd => match body::<EndRequest>(req).await {
                Ok(r) => end(state, r).await,
                Err(a) => a,
            },
            AdminCommand::LeasesCheck => match body::<CheckRequest>(req).await {
                Ok(r) => check(state, r).await,
                Err(a) => a,
            },
            AdminCommand::Other => Answer {
                status: StatusCode::NOT_FOUND,
                body: "not found\n".into(),
                result: AdminResult::BadRequest,
                detail: None,
            },
        }
    };
    let event = if caller.allowed {
        "admin_request"
    } else {
        "admin_refused"
    };
    let mut line = AuditEvent::admin(event, &caller.socket, caller.uid);
    line.command = Some(command.as_str());
    line.result = Some(answer.result.as_str());
    line.reason = answer.detail.map(|d| printable(&d));
    state.audit.record(line);
    state.metrics.admin_request(command, answer.result);
    let mut resp = Response::new(Full::new(Bytes::from(answer.body)));
    *resp.status_mut() = answer.status;
    resp
}

/// The JSON body of `req`, at most [`MAX_BODY`] bytes.
async fn body<T: DeserializeOwned>(req: Request<Incoming>) -> Result<T, Answer> {
    let bytes = Limited::new(req.into_body(), MAX_BODY)
        .collect()
        .await
        .map_err(|e| Answer::bad(format!("cannot read the request: {e}")))?
        .to_bytes();
    serde_json::from_slice(&bytes).map_err(|e| Answer::bad(format!("bad request: {e}")))
}

fn list(state: &AppState) -> Answer {
    let rows = state.sessions.list();
    let mut body = String::new();
    for row in &rows {
        if let Ok(line) = serde_json::to_string(row) {
            body.push_str(&line);
            body.push('\n');
        }
    }
    Answer::ok(body, Some(format!("{} listed", rows.len())))
}

/// Which sessions a `sessions end` request means, or why it is malformed.
fn matcher(req: &EndRequest) -> Result<impl Fn(&Tracked) -> bool + use<>, String> {
    let pattern = match (&req.id, &req.identity) {
        (Some(_), None)
            if req.database.is_none() && req.role.is_none() && req.transport.is_none() =>
        {
            None
        }
        (None, Some(p)) => Some(IdentityPattern::parse(p).map_err(|e| format!("--identity: {e}"))?),
        (Some(_), _) => {
            return Err("--id takes no --identity, --database, --role or --transport".into());
        }
        (None, None) => return Err("give --id or --identity".into()),
    };
    let transport = match req.transport.as_deref() {
        None => None,
        Some(name) => Some(transport_named(name).ok_or("--transport: tcp, tls or unix")?),
    };
    let (id, database, role) = (req.id, req.database.clone(), req.role.clone());
    Ok(move |t: &Tracked| {
        let facts = &t.facts;
        id.is_none_or(|id| t.id == id)
            && pattern.as_ref().is_none_or(|p| p.matches(&facts.principal))
            && database.as_ref().is_none_or(|d| *d == facts.database)
            && role.as_ref().is_none_or(|r| *r == facts.role)
            && transport.is_none_or(|t| t == facts.transport)
    })
}

/// The operator's reason, checked: it reaches the client's ErrorResponse.
fn reason(req: &EndRequest) -> Result<String, String> {
    let text = req.reason.as_deref().unwrap_or(DEFAULT_REASON).trim();
    if text.is_empty() || text.chars().count() > api::MAX_REASON {
        return Err(format!(
            "--reason must be 1 to {} characters",
            api::MAX_REASON
        ));
    }
    // The one escaping rule: text it would change could forge or reorder what is shown.
    if printable(text) != text {
        return Err(
            "--reason must not contain control characters, bidirectional controls or \\".into(),
        );
    }
    Ok(text.to_owned())
}

async fn end(state: &AppState, req: EndRequest) -> Answer {
    let (pick, text) = match (matcher(&req), reason(&req)) {
        (Ok(p), Ok(r)) => (p, r),
        (Err(e), _) | (_, Err(e)) => return Answer::bad(e),
    };
    let ended: Vec<Listed> = state
        .sessions
        .end_where(pick, &EndReason::Operator(text.clone()));
    let ids: Vec<u64> = ended.iter().filter_map(|l| l.id).collect();
    let closed = state.sessions.wait_gone(&ids, END_WAIT).await;
    let detail = format!("ended {ids:?}: {text}");
    let body = serde_json::to_string(&EndAnswer { ended, closed }).unwrap_or_default();
    let mut answer = Answer::ok(body, Some(detail));
    if ids.is_empty() {
        answer.result = AdminResult::NoMatch;
    }
    answer
}

async fn check(state: &AppState, req: CheckRequest) -> Answer {
    match super::leases::check(state, req.revoke).await {
        Ok(found) => {
            let revoked = found.unheld.iter().filter(|u| u.revoked).count();
            let detail = format!("{} unheld, {revoked} revoked", found.unheld.len());
            Answer::ok(
                serde_json::to_string(&found).unwrap_or_default(),
                Some(detail),
            )
        }
        Err(e) => Answer {
            status: StatusCode::BAD_GATEWAY,
            body: format!("Vault: {e}\n"),
            result: AdminResult::Error,
            detail: Some(e.to_string()),
        },
    }
}

#[cfg(test)]
mod tests {
    use std::sync::Arc;

    use tokio_util::sync::CancellationToken;

    use super::*;
    use crate::identity::Principal;
    use crate::metrics::Metrics;
    use crate::net::Transport;
    use crate::registry::{NewSession, Registry};

    fn request(id: Option<u64>, identity: Option<&str>) -> EndRequest {
        EndRequest {
            id,
            identity: identity.map(str::to_owned),
            ..EndRequest::default()
        }
    }

    #[test]
    fn an_end_request_names_an_id_or_an_identity_pattern() {
        assert!(matcher(&request(None, None)).is_err(), "neither");
        let mut both = request(Some(1), Some("uri:x"));
        assert!(matcher(&both).is_err(), "both");
        both.identity = None;
        both.role = Some("readonly".into());
        assert!(matcher(&both).is_err(), "--id with a filter");
        let bad = matcher(&request(None, Some("spiffe://no-kind"))).err();
        assert!(bad.is_some_and(|e| e.starts_with("--identity")));
        let mut wrong = request(None, Some("uri:x"));
        wrong.transport = Some("udp".into());
        assert!(matcher(&wrong).is_err());
    }

    #[test]
    fn patterns_and_filters_pick_sessions() {
        let registry = Registry::new(Arc::new(Metrics::new()));
        let facts = |uri: &str, role: &str| NewSession {
            transport: Transport::Tls,
            client_addr: "127.0.0.1:1".into(),
            principal: Principal::new(vec![uri.into()], Vec::new(), None),
            database: "myapp".into(),
            role: role.into(),
        };
        let a = registry.register(
            facts("spiffe://t/app/a", "readonly"),
            CancellationToken::new(),
        );
        let b = registry.register(
            facts("spiffe://t/app/b", "readwrite"),
            CancellationToken::new(),
        );
        let picked = |req: &EndRequest| {
            let pick = matcher(req).expect("valid");
            registry
                .sessions()
                .iter()
                .filter(|t| pick(t))
                .map(|t| t.id)
                .collect::<Vec<_>>()
        };
        assert_eq!(
            picked(&request(None, Some("uri:spiffe://t/app/*"))),
            [a.id, b.id]
        );
        let mut role = request(None, Some("uri:spiffe://t/app/*"));
        role.role = Some("readwrite".into());
        assert_eq!(picked(&role), [b.id]);
        let mut db = request(None, Some("uri:spiffe://t/**"));
        db.database = Some("other".into());
        assert!(picked(&db).is_empty());
        assert_eq!(picked(&request(Some(a.id), None)), [a.id]);
        let mut unix = request(None, Some("uri:spiffe://t/**"));
        unix.transport = Some("unix".into());
        assert!(picked(&unix).is_empty());
    }

    #[test]
    fn the_reason_is_short_printable_text() {
        let with = |text: &str| {
            let mut r = request(Some(1), None);
            r.reason = Some(text.into());
            reason(&r)
        };
        assert_eq!(
            reason(&request(Some(1), None)).as_deref(),
            Ok(DEFAULT_REASON)
        );
        assert_eq!(with(" key leaked ").as_deref(), Ok("key leaked"));
        assert!(with("").is_err());
        assert!(with("a\nforged line").is_err());
        assert!(with("\u{1b}[31m").is_err());
        assert!(with("abc\u{202e}fed").is_err(), "bidirectional control");
        assert!(with(&"x".repeat(api::MAX_REASON + 1)).is_err());
        assert!(
            with(&"é".repeat(api::MAX_REASON)).is_ok(),
            "characters, not bytes"
        );
    }
}
