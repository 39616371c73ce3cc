//! A real HAProxy (Debian package `haproxy`) in TCP mode in front of leasegate replicas, run
//! from the shipped example `deploy/haproxy/haproxy.cfg` with the test's loopback ports put in:
//! the bind address, the stats socket and one server line per replica (its client port, and
//! its metrics port for the `/readyz` check). HAProxy connects to the replicas from
//! 127.0.0.2 (`source`), so that leasegate can trust that address for PROXY headers while
//! everything else on the loopback, 127.0.0.1, stays untrusted. Stopped (SIGTERM) when
//! dropped; the watchdog stops it if the test binary dies.

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use tokio::io::{AsyncReadExt, AsyncWriteExt};

use super::{free_port, poll_until, root, tail};

/// The address HAProxy connects to the replicas from.
pub const LB_SOURCE: &str = "127.0.0.2";

/// One replica as HAProxy sees it.
#[derive(Clone, Debug)]
pub struct Server {
    /// `server` name in the config and in the stats.
    pub name: String,
    /// leasegate's client port.
    pub port: u16,
    /// leasegate's admin (metrics) port: `/readyz`.
    pub metrics_port: u16,
}

/// The shipped example configuration.
pub fn template() -> String {
    let path = Path::new(env!("CARGO_MANIFEST_DIR")).join("deploy/haproxy/haproxy.cfg");
    std::fs::read_to_string(&path).unwrap_or_else(|e| panic!("read {}: {e}", path.display()))
}

/// `template` with the frontend on `port`, the stats socket at `socket` and `servers` in
/// place of the example's server lines; every other line as shipped.
pub fn render(template: &str, port: u16, socket: &Path, servers: &[Server]) -> String {
    let mut out = Vec::new();
    let mut servers_written = false;
    for line in template.lines() {
        let trimmed = line.trim_start();
        let indent = &line[..line.len() - trimmed.len()];
        if trimmed.starts_with("bind :") {
            out.push(format!("{indent}bind 127.0.0.1:{port}"));
        } else if trimmed.starts_with("stats socket ") {
            let rest = trimmed
                .split_whitespace()
                .skip(3)
                .collect::<Vec<_>>()
                .join(" ");
            out.push(format!("{indent}stats socket {} {rest}", socket.display()));
        } else if trimmed.starts_with("server ") {
            if !servers_written {
                servers_written = true;
                out.extend(servers.iter().map(|s| {
                    format!(
                        "{indent}server {} 127.0.0.1:{} check port {} source {LB_SOURCE}",
                        s.name, s.port, s.metrics_port
                    )
                }));
            }
        } else {
            out.push(line.to_string());
        }
    }
    assert!(servers_written, "the template has no server lines");
    out.join("\n") + "\n"
}

/// A running HAProxy.
pub struct HaProxy {
    child: Child,
    /// The frontend port clients connect to.
    pub port: u16,
    /// The admin stats socket.
    pub socket: PathBuf,
    /// stdout and stderr (HAProxy logs to stdout).
    pub log: PathBuf,
    _dir: tempfile::TempDir,
}

impl HaProxy {
    /// Starts HAProxy in front of `servers` and waits until every one of them is UP.
    pub async fn start(servers: &[Server]) -> HaProxy {
        let dir = root().tempdir("haproxy-");
        let port = free_port();
        let socket = dir.path().join("admin.sock");
        let config = dir.path().join("haproxy.cfg");
        std::fs::write(&config, render(&template(), port, &socket, servers))
            .expect("write haproxy.cfg");
        let log = dir.path().join("haproxy.log");
        let out = std::fs::File::create(&log).expect("create haproxy.log");
        let err = out.try_clone().expect("dup log fd");
        let child = Command::new("haproxy")
            .arg("-db")
            .arg("-f")
            .arg(&config)
            .stdin(Stdio::null())
            .stdout(out)
            .stderr(err)
            .spawn()
            .expect("spawn haproxy (apt-get install haproxy)");
        root().register("TERM", child.id(), "haproxy");
        let lb = HaProxy {
            child,
            port,
            socket,
            log,
            _dir: dir,
        };
        for s in servers {
            lb.wait_status(&s.name, "UP", Duration::from_secs(20)).await;
        }
        lb
    }

    /// One admin command on the stats socket; its answer.
    pub async fn command(&self, command: &str) -> Result<String, String> {
        let exchange = async {
            let mut sock = tokio::net::UnixStream::connect(&self.socket).await?;
            sock.write_all(format!("{command}\n").as_bytes()).await?;
            let mut answer = String::new();
            sock.read_to_string(&mut answer).await?;
            Ok::<_, std::io::Error>(answer)
        };
        match tokio::time::timeout(Duration::from_secs(5), exchange).await {
            Ok(Ok(answer)) => Ok(answer),
            Ok(Err(e)) => Err(format!("stats socket: {e}")),
            Err(_) => Err("stats socket: no answer within 5 s".into()),
        }
    }

    /// The `status` column of `show stat` for the server `name` (`UP`, `DOWN`, `UP 1/2`...).
    pub async fn status(&self, name: &str) -> Result<String, String> {
        let csv = self.command("show stat").await?;
        let mut lines = csv.lines();
        let header: Vec<&str> = lines
            .next()
            .ok_or("empty show stat")?
            .trim_start_matches("# ")
            .split(',')
            .collect();
        let col = |n: &str| header.iter().position(|h| *h == n);
        let (sv, st) = (
            col("svname").ok_or("no svname")?,
            col("status").ok_or("no status")?,
        );
        lines
            .map(|l| l.split(',').collect::<Vec<_>>())
            .find(|f| f.get(sv) == Some(&name))
            .and_then(|f| f.get(st).map(|s| s.to_string()))
            .ok_or_else(|| format!("no server {name} in show stat:\n{csv}"))
    }

    /// Polls until the server `name` has status `want`.
    pub async fn wait_status(&self, name: &str, want: &str, within: Duration) {
        poll_until(
            within,
            &format!("HAProxy server {name} {want}"),
            || async move {
                match self.status(name).await {
                    Ok(s) if s == want => Ok(()),
                    Ok(s) => Err(format!("status {s}")),
                    Err(e) => Err(e),
                }
            },
        )
        .await;
    }

    /// Connections HAProxy had to retry or send elsewhere (a replica refused them): the
    /// `retries` part (`%rc`, `+N` when redispatched) of each `option tcplog` line, and how
    /// many lines there were.
    pub fn retried_connections(&self) -> (usize, usize) {
        let text = std::fs::read_to_string(&self.log).unwrap_or_default();
        let mut lines = 0;
        let mut retried = 0;
        for line in text.lines() {
            let counts = line.split_whitespace().find(|t| {
                let parts: Vec<&str> = t.split('/').collect();
                parts.len() == 5
                    && parts.iter().all(|p| {
                        !p.is_empty()
                            && p.trim_start_matches('+')
                                .bytes()
                                .all(|b| b.is_ascii_digit())
                    })
            });
            if let Some(counts) = counts {
                lines += 1;
                if counts.rsplit('/').next() != Some("0") {
                    retried += 1;
                }
            }
        }
        (retried, lines)
    }

    /// HAProxy's log so far.
    pub fn log_tail(&self) -> String {
        tail(&self.log, 4000)
    }
}

impl Drop for HaProxy {
    fn drop(&mut self) {
        let _ = Command::new("kill")
            .args(["-TERM", &self.child.id().to_string()])
            .status();
        let _ = self.child.wait();
        if std::thread::panicking() {
            eprintln!("---- haproxy log ----\n{}", self.log_tail());
        }
    }
}

#[test]
fn the_shipped_example_renders_with_the_test_ports() {
    let servers = [Server {
        name: "leasegate-0".into(),
        port: 1111,
        metrics_port: 2222,
    }];
    let text = render(&template(), 3333, Path::new("/tmp/x.sock"), &servers);
    assert!(text.contains("bind 127.0.0.1:3333\n"), "{text}");
    assert!(
        text.contains("stats socket /tmp/x.sock mode 600 level admin"),
        "{text}"
    );
    assert!(text.contains("server leasegate-0 127.0.0.1:1111 check port 2222 source 127.0.0.2"));
    assert!(
        !text.contains("leasegate-1"),
        "the example's servers are replaced"
    );
    assert!(text.contains("send-proxy-v2"), "as shipped");
}
