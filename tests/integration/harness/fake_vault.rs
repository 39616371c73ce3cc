//! A small local HTTP/1.1 server standing in for Vault, for faults the real OpenBao cannot
//! produce on demand: redirects to another origin, a 2xx creds answer with a broken or
//! stalled body, a creds answer that takes its time. A handler decides each answer; every
//! request (and every byte any connection sent) is recorded for the test to inspect.

use std::future::Future;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};

use super::poll_until;

/// One request as the fake received it.
#[derive(Clone, Debug)]
pub struct Request {
    pub method: String,
    /// Path and query, e.g. `/v1/t3-x/creds/readonly`.
    pub path: String,
    /// Header names in lower case, with their values.
    pub headers: Vec<(String, String)>,
    pub body: Vec<u8>,
}

impl Request {
    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers
            .iter()
            .find(|(n, _)| n == name)
            .map(|(_, v)| v.as_str())
    }

    pub fn body_text(&self) -> String {
        String::from_utf8_lossy(&self.body).into_owned()
    }
}

/// How the fake answers one request (the connection is closed after each answer).
pub enum Reply {
    /// A status and a JSON body.
    Json(u16, String),
    /// `307 Temporary Redirect` to this Location.
    Redirect(String),
    /// A 200 head announcing `announced` body bytes, then only `part` of them, then silence
    /// for `stall`, then the connection closes.
    Stall {
        announced: usize,
        part: String,
        stall: Duration,
    },
    /// Waits, then answers.
    After(Duration, Box<Reply>),
}

/// The `lookup-self` answer of a token that never expires.
pub fn lookup_self_ok() -> Reply {
    Reply::Json(200, r#"{"data":{"ttl":0,"renewable":false}}"#.into())
}

/// A running fake Vault.
pub struct FakeVault {
    pub port: u16,
    requests: Arc<Mutex<Vec<Request>>>,
    bytes: Arc<Mutex<Vec<u8>>>,
    connections: Arc<AtomicUsize>,
}

impl FakeVault {
    /// Starts the fake on a free loopback port; `handler` answers each request. Runs until
    /// the test's runtime ends.
    pub async fn start<F, Fut>(handler: F) -> FakeVault
    where
        F: Fn(Request) -> Fut + Send + Sync + 'static,
        Fut: Future<Output = Reply> + Send + 'static,
    {
        let listener = TcpListener::bind("127.0.0.1:0")
            .await
            .expect("bind fake vault");
        let port = listener.local_addr().expect("fake vault addr").port();
        let fake = FakeVault {
            port,
            requests: Arc::default(),
            bytes: Arc::default(),
            connections: Arc::default(),
        };
        let (requests, bytes, connections) = (
            fake.requests.clone(),
            fake.bytes.clone(),
            fake.connections.clone(),
        );
        let handler = Arc::new(handler);
        tokio::spawn(async move {
            while let Ok((mut sock, _)) = listener.accept().await {
                connections.fetch_add(1, Ordering::SeqCst);
                let (requests, bytes, handler) = (requests.clone(), bytes.clone(), handler.clone());
                tokio::spawn(async move {
                    let Some(request) = read_request(&mut sock, &bytes).await else {
                        return;
                    };
                    requests.lock().expect("requests").push(request.clone());
                    let reply = handler(request).await;
                    answer(sock, reply).await;
                });
            }
        });
        fake
    }

    /// `http://127.0.0.1:PORT`
    pub fn addr(&self) -> String {
        format!("http://127.0.0.1:{}", self.port)
    }

    /// Every request received so far.
    pub fn requests(&self) -> Vec<Request> {
        self.requests.lock().expect("requests").clone()
    }

    /// Every byte any connection sent, request or not.
    pub fn received(&self) -> Vec<u8> {
        self.bytes.lock().expect("bytes").clone()
    }

    /// TCP connections accepted so far.
    pub fn connections(&self) -> usize {
        self.connections.load(Ordering::SeqCst)
    }

    /// Polls until a request matching `method` and `path` arrived; returns it.
    pub async fn wait_request(&self, method: &str, path: &str, within: Duration) -> Request {
        let what = format!("{method} {path} at the fake Vault");
        poll_until(within, &what, || async move {
            if self.find(method, path).is_some() {
                Ok(())
            } else {
                let seen: Vec<String> = self
                    .requests()
                    .iter()
                    .map(|r| format!("{} {}", r.method, r.path))
                    .collect();
                Err(format!("requests so far: {seen:?}"))
            }
        })
        .await;
        self.find(method, path).expect("request arrived")
    }

    /// The first request with `method` and `path`.
    pub fn find(&self, method: &str, path: &str) -> Option<Request> {
        self.requests()
            .into_iter()
            .find(|r| r.method == method && r.path == path)
    }
}

/// Reads one request (head and `content-length` body), recording every byte; `None` when
/// the peer closes first.
async fn read_request(sock: &mut TcpStream, bytes: &Mutex<Vec<u8>>) -> Option<Request> {
    let mut got = Vec::new();
    let mut buf = vec![0u8; 16 * 1024];
    loop {
        if let Some(request) = parse(&got) {
            return Some(request);
        }
        match sock.read(&mut buf).await {
            Ok(0) | Err(_) => return None,
            Ok(n) => {
                got.extend_from_slice(&buf[..n]);
                bytes.lock().expect("bytes").extend_from_slice(&buf[..n]);
            }
        }
    }
}

fn parse(got: &[u8]) -> Option<Request> {
    let end = got.windows(4).position(|w| w == b"\r\n\r\n")?;
    let head = String::from_utf8_lossy(&got[..end]).into_owned();
    let mut lines = head.split("\r\n");
    let mut first = lines.next()?.split(' ');
    let (method, path) = (first.next()?.to_string(), first.next()?.to_string());
    let headers: Vec<(String, String)> = lines
        .filter_map(|l| l.split_once(':'))
        .map(|(n, v)| (n.trim().to_ascii_lowercase(), v.trim().to_string()))
        .collect();
    let length = headers
        .iter()
        .find(|(n, _)| n == "content-length")
        .and_then(|(_, v)| v.parse::<usize>().ok())
        .unwrap_or(0);
    let body = got.get(end + 4..end + 4 + length)?.to_vec();
    Some(Request {
        method,
        path,
        headers,
        body,
    })
}

async fn answer(mut sock: TcpStream, reply: Reply) {
    let mut reply = reply;
    while let Reply::After(wait, next) = reply {
        tokio::time::sleep(wait).await;
        reply = *next;
    }
    let head = |status: u16, length: usize, extra: &str| {
        format!(
            "HTTP/1.1 {status} Fake\r\ncontent-type: application/json\r\n\
             content-length: {length}\r\n{extra}connection: close\r\n\r\n"
        )
    };
    match reply {
        Reply::Json(status, body) => {
            let text = head(status, body.len(), "") + &body;
            let _ = sock.write_all(text.as_bytes()).await;
        }
        Reply::Redirect(location) => {
            let text = head(307, 0, &format!("location: {location}\r\n"));
            let _ = sock.write_all(text.as_bytes()).await;
        }
        Reply::Stall {
            announced,
            part,
            stall,
        } => {
            let text = head(200, announced, "") + &part;
            let _ = sock.write_all(text.as_bytes()).await;
            let _ = sock.flush().await;
            // Silence; a client that gives up closes its side, which ends the wait early.
            let mut sink = [0u8; 1024];
            let _ = tokio::time::timeout(stall, async {
                while let Ok(n) = sock.read(&mut sink).await {
                    if n == 0 {
                        break;
                    }
                }
            })
            .await;
        }
        Reply::After(..) => unreachable!("unwrapped above"),
    }
    let _ = sock.shutdown().await;
}
