//! The shared OpenBao dev server (started by the dev environment, see `devenv::bao`) and
//! the Vault HTTP calls the tests make directly: a fresh database secrets engine mount per
//! test, lease listing, reading and revoking creds. Calls go through a [`Target`] (the shared
//! server or an [`OwnBao`] a test runs itself: a persistent one that survives being killed,
//! or a dev server with TLS).

use std::path::PathBuf;
use std::process::Child;
use std::time::{Duration, Instant};

use devenv::bao::Mode;
use serde_json::{Value, json};

use super::pg::Pg;
use super::{env, next_id, root, tail};

/// Root token of the dev server.
pub use devenv::bao::ROOT_TOKEN;

/// The shared OpenBao dev server.
pub struct Bao {
    /// `http://127.0.0.1:PORT`
    pub addr: String,
    pub log: PathBuf,
}

/// A database secrets engine mount of one test.
#[derive(Clone, Debug)]
pub struct Mount {
    /// Mount path, e.g. `t3-session`.
    pub name: String,
    /// Username prefix of every dynamic role of this mount, e.g. `lgt3_`.
    pub prefix: String,
}

/// An OpenBao server the harness talks to directly: the shared dev server
/// ([`Target::shared`]) or one a test runs itself ([`OwnBao`]).
#[derive(Clone, Debug)]
pub struct Target {
    /// `http://127.0.0.1:PORT` or `https://...`
    pub addr: String,
    /// A token with root rights.
    pub token: String,
    /// CA of an https listener.
    pub ca_pem: Option<PathBuf>,
    /// Server log, quoted in failure messages.
    pub log: PathBuf,
}

impl Target {
    /// The shared dev server, with its root token.
    pub fn shared() -> Target {
        let bao = &env().bao;
        Target {
            addr: bao.addr.clone(),
            token: ROOT_TOKEN.to_string(),
            ca_pem: None,
            log: bao.log.clone(),
        }
    }

    fn http(&self) -> reqwest::Client {
        self.try_http().unwrap_or_else(|e| panic!("{e}"))
    }

    fn try_http(&self) -> Result<reqwest::Client, String> {
        let mut builder = reqwest::Client::builder().timeout(Duration::from_secs(30));
        if let Some(ca) = &self.ca_pem {
            let pem = std::fs::read(ca).map_err(|e| format!("read {}: {e}", ca.display()))?;
            let cert = reqwest::Certificate::from_pem(&pem)
                .map_err(|e| format!("{} is not a PEM certificate: {e}", ca.display()))?;
            builder = builder.add_root_certificate(cert);
        }
        builder
            .build()
            .map_err(|e| format!("build reqwest client: {e}"))
    }

    fn url(&self, path: &str) -> String {
        format!("{}/v1/{}", self.addr, path.trim_start_matches('/'))
    }

    /// A request with this target's token (`body` as JSON when given) → (status, body text).
    pub async fn request(
        &self,
        method: reqwest::Method,
        path: &str,
        body: Option<&Value>,
    ) -> Result<(reqwest::StatusCode, String), String> {
        let mut req = self
            .http()
            .request(method.clone(), self.url(path))
            .header("X-Vault-Token", &self.token);
        if let Some(body) = body {
            req = req.json(body);
        }
        let resp = req
            .send()
            .await
            .map_err(|e| format!("vault {method} {path}: {e}"))?;
        let status = resp.status();
        Ok((status, resp.text().await.unwrap_or_default()))
    }

    /// `POST`/`PUT`/... with a JSON body; panics (test setup) unless 2xx.
    pub async fn write(&self, method: reqwest::Method, path: &str, body: &Value) -> Value {
        let (status, text) = self
            .request(method, path, Some(body))
            .await
            .unwrap_or_else(|e| panic!("{e}"));
        assert!(
            status.is_success(),
            "vault {path}: {status}: {text}\nOpenBao log:\n{}",
            tail(&self.log, 4000)
        );
        serde_json::from_str(&text).unwrap_or(Value::Null)
    }

    /// `GET`; panics unless 2xx.
    pub async fn read(&self, path: &str) -> Value {
        let (status, text) = self
            .request(reqwest::Method::GET, path, None)
            .await
            .unwrap_or_else(|e| panic!("{e}"));
        assert!(status.is_success(), "vault GET {path}: {status}: {text}");
        serde_json::from_str(&text).unwrap_or(Value::Null)
    }

    /// Configures a new database secrets engine mount on this server for the cluster `pg`,
    /// with the contract's roles `readonly` and `readwrite` (default_ttl 5m, max_ttl 1h)
    /// and a username prefix unique to this test.
    pub async fn fresh_mount(&self, pg: &Pg, test_name: &str) -> Mount {
        let n = next_id();
        let clean: String = test_name
            .chars()
            .map(|c| if c.is_ascii_alphanumeric() { c } else { '-' })
            .collect();
        let mount = Mount {
            name: format!("t{n}-{clean}"),
            prefix: format!("lgt{n}_"),
        };
        let post = reqwest::Method::POST;
        self.write(
            post.clone(),
            &format!("sys/mounts/{}", mount.name),
            &json!({"type": "database"}),
        )
        .await;
        let config = devenv::contract::connection_config(&pg.conn(), &mount.prefix);
        self.write(post.clone(), &format!("{}/config/pg", mount.name), &config)
            .await;
        for role in devenv::contract::ROLES {
            self.set_role_ttl(&mount, role, "5m", "1h").await;
        }
        mount
    }

    /// (Re)defines the contract's role `readonly` or `readwrite` of `mount` with these
    /// TTLs (durations as Vault takes them, e.g. "4s", "1h").
    pub async fn set_role_ttl(&self, mount: &Mount, role: &str, default_ttl: &str, max_ttl: &str) {
        let body = devenv::contract::role(role, default_ttl, max_ttl)
            .unwrap_or_else(|e| panic!("set_role_ttl: {e}"));
        self.write(
            reqwest::Method::POST,
            &format!("{}/roles/{role}", mount.name),
            &body,
        )
        .await;
    }

    /// The contract's role (TTLs 5m and 1h) whose revocation does not end the role's
    /// backends: for tests that show leasegate itself leaves no backend behind.
    pub async fn set_role_without_terminate(&self, mount: &Mount, role: &str) {
        let body = devenv::contract::role_keeping_backends(role, "5m", "1h")
            .unwrap_or_else(|e| panic!("set_role_without_terminate: {e}"));
        self.write(
            reqwest::Method::POST,
            &format!("{}/roles/{role}", mount.name),
            &body,
        )
        .await;
    }

    /// Lease ids (suffixes) currently held for `mount`'s `role`; OpenBao's 404 means none.
    pub async fn leases(&self, mount: &Mount, role: &str) -> Vec<String> {
        let path = format!("sys/leases/lookup/{}/creds/{role}/", mount.name);
        let list = reqwest::Method::from_bytes(b"LIST").expect("LIST is a valid method");
        let (status, text) = self
            .request(list, &path, None)
            .await
            .unwrap_or_else(|e| panic!("{e}"));
        if status == reqwest::StatusCode::NOT_FOUND {
            return Vec::new();
        }
        assert!(status.is_success(), "vault LIST {path}: {status}: {text}");
        let body: Value = serde_json::from_str(&text).expect("lease list is JSON");
        body["data"]["keys"]
            .as_array()
            .map(|keys| {
                keys.iter()
                    .filter_map(|k| k.as_str().map(String::from))
                    .collect()
            })
            .unwrap_or_default()
    }

    /// All leases of the mount, both roles.
    pub async fn all_leases(&self, mount: &Mount) -> Vec<String> {
        let mut all = self.leases(mount, "readonly").await;
        all.extend(self.leases(mount, "readwrite").await);
        all
    }

    /// Revokes every lease of `mount` (test cleanup after leasegate could not).
    pub async fn revoke_mount_leases(&self, mount: &Mount) {
        self.write(
            reqwest::Method::PUT,
            &format!("sys/leases/revoke-prefix/{}", mount.name),
            &json!({}),
        )
        .await;
    }

    /// Creates a policy `name` from HCL text.
    pub async fn put_policy(&self, name: &str, hcl: &str) {
        self.write(
            reqwest::Method::PUT,
            &format!("sys/policies/acl/{name}"),
            &json!({ "policy": hcl }),
        )
        .await;
    }
}

/// `POST`/`PUT` with the root token on the shared server; panics (test setup) unless 2xx.
pub async fn write(method: reqwest::Method, path: &str, body: &Value) -> Value {
    Target::shared().write(method, path, body).await
}

/// Configures a new database secrets engine mount on the shared server with the contract's
/// roles `readonly` and `readwrite`, and a username prefix unique to this test.
pub async fn fresh_mount(test_name: &str) -> Mount {
    Target::shared().fresh_mount(&env().pg, test_name).await
}

/// Lease ids (suffixes) currently held for `mount`'s `role`; OpenBao's 404 means none.
pub async fn leases(mount: &Mount, role: &str) -> Vec<String> {
    Target::shared().leases(mount, role).await
}

/// All leases of the mount, both roles.
pub async fn all_leases(mount: &Mount) -> Vec<String> {
    Target::shared().all_leases(mount).await
}

/// Dynamic credentials read directly from OpenBao (harness self-test).
pub struct Creds {
    pub lease_id: String,
    pub username: String,
    pub password: String,
}

pub async fn read_creds(mount: &Mount, role: &str) -> Creds {
    let path = format!("{}/creds/{role}", mount.name);
    let body = Target::shared().read(&path).await;
    let field = |v: &Value| v.as_str().expect("creds field is a string").to_string();
    Creds {
        lease_id: field(&body["lease_id"]),
        username: field(&body["data"]["username"]),
        password: field(&body["data"]["password"]),
    }
}

pub async fn revoke(lease_id: &str) {
    write(
        reqwest::Method::PUT,
        "sys/leases/revoke",
        &json!({ "lease_id": lease_id }),
    )
    .await;
}

// ---------------------------------------------------------------- servers of one test

/// How an [`OwnBao`] runs.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Kind {
    /// Raft storage on disk; initialised and unsealed by the harness; survives restarts.
    Persistent,
    /// Dev server (in memory, root token `root`) with a TLS listener and generated CA.
    DevTls,
    /// Dev server (in memory, root token `root`) over plain HTTP: a restart loses its state.
    Dev,
}

/// An OpenBao server of one test (killed when dropped): [`OwnBao::persistent`] keeps its
/// state on disk (single-node raft) so it can be killed and restarted, [`OwnBao::dev_tls`]
/// serves https.
pub struct OwnBao {
    pub target: Target,
    kind: Kind,
    port: u16,
    child: Option<Child>,
    unseal_key: Option<String>,
    starts: usize,
    dir: tempfile::TempDir,
}

impl OwnBao {
    /// A non-dev server with raft storage, initialised (one key share) and unsealed; its
    /// root token is `target.token`.
    pub async fn persistent() -> OwnBao {
        let mut bao = OwnBao::spawn_new(Kind::Persistent);
        bao.wait_for(&[501], "answering (uninitialised)").await;
        let init = bao
            .target
            .write(
                reqwest::Method::PUT,
                "sys/init",
                &json!({"secret_shares": 1, "secret_threshold": 1}),
            )
            .await;
        let key = init["keys_base64"][0]
            .as_str()
            .expect("sys/init returns keys_base64")
            .to_string();
        bao.target.token = init["root_token"]
            .as_str()
            .expect("sys/init returns root_token")
            .to_string();
        bao.unseal_key = Some(key);
        bao.unseal().await;
        bao
    }

    /// A dev server (root token `root`) listening with TLS; `target.ca_pem` is its CA.
    pub async fn dev_tls() -> OwnBao {
        let mut bao = OwnBao::spawn_new(Kind::DevTls);
        bao.wait_for(&[200], "active").await;
        bao
    }

    /// A dev server (in memory, root token `root`) over plain HTTP; [`OwnBao::restart`]
    /// brings it back empty, as a dev server that crashed comes back.
    pub async fn dev() -> OwnBao {
        let mut bao = OwnBao::spawn_new(Kind::Dev);
        bao.wait_for(&[200], "active").await;
        bao
    }

    fn spawn_new(kind: Kind) -> OwnBao {
        let dir = root().tempdir("bao-");
        let port = devenv::ports::free_pair().unwrap_or_else(|e| panic!("OpenBao port: {e}"));
        let scheme = if kind == Kind::DevTls {
            "https"
        } else {
            "http"
        };
        let mut bao = OwnBao {
            target: Target {
                addr: format!("{scheme}://127.0.0.1:{port}"),
                token: ROOT_TOKEN.to_string(),
                ca_pem: (kind == Kind::DevTls).then(|| dir.path().join("vault-ca.pem")),
                log: dir.path().join("bao-1.log"),
            },
            kind,
            port,
            child: None,
            unseal_key: None,
            starts: 0,
            dir,
        };
        bao.spawn();
        bao
    }

    fn spawn(&mut self) {
        let bin = devenv::bao::binary().unwrap_or_else(|e| panic!("{e}"));
        let dir = self.dir.path();
        self.starts += 1;
        self.target.log = dir.join(format!("bao-{}.log", self.starts));
        let mode = match self.kind {
            // OpenBao 2 has no `file` storage; single-node raft keeps state on disk.
            Kind::Persistent => Mode::write_raft_config(dir, self.port)
                .unwrap_or_else(|e| panic!("OpenBao config: {e}")),
            Kind::DevTls => Mode::DevTls,
            Kind::Dev => Mode::Dev,
        };
        let child = devenv::bao::spawn(&bin, dir, self.port, &mode, &self.target.log, false)
            .unwrap_or_else(|e| panic!("{e}"));
        root().register("KILL", child.id(), "bao");
        self.child = Some(child);
    }

    /// `GET /v1/sys/health` status (200 active, 501 uninitialised, 503 sealed).
    pub async fn health(&self) -> Option<u16> {
        // A dev-tls server writes its CA while starting: no client before it is there.
        let http = self.target.try_http().ok()?;
        let url = self.target.url("sys/health");
        let resp = http.get(url).send().await.ok()?;
        Some(resp.status().as_u16())
    }

    async fn wait_for(&mut self, statuses: &[u16], what: &str) {
        let deadline = Instant::now() + Duration::from_secs(60);
        loop {
            if let Some(child) = self.child.as_mut()
                && let Ok(Some(status)) = child.try_wait()
            {
                panic!(
                    "OpenBao exited ({status}):\n{}",
                    tail(&self.target.log, 4000)
                );
            }
            let health = self.health().await;
            if health.is_some_and(|s| statuses.contains(&s)) {
                return;
            }
            assert!(
                Instant::now() < deadline,
                "OpenBao not {what} after 60 s (health {health:?}):\n{}",
                tail(&self.target.log, 4000)
            );
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    /// Seals a persistent server (`sys/seal`, as `bao operator seal` does): it answers 503
    /// until [`OwnBao::unseal`].
    pub async fn seal(&mut self) {
        assert_eq!(
            self.kind,
            Kind::Persistent,
            "only a persistent server seals"
        );
        self.target
            .write(reqwest::Method::PUT, "sys/seal", &json!({}))
            .await;
        self.wait_for(&[503], "sealed").await;
    }

    /// Unseals a sealed persistent server; returns when it is active.
    pub async fn unseal(&mut self) {
        self.wait_for(&[503], "answering (sealed)").await;
        let key = self
            .unseal_key
            .clone()
            .expect("persistent server has a key");
        self.target
            .write(reqwest::Method::PUT, "sys/unseal", &json!({ "key": key }))
            .await;
        self.wait_for(&[200], "active").await;
    }

    /// SIGKILL: the server is gone at once, without a shutdown.
    pub fn kill(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }

    /// Starts a killed persistent server again and unseals it, or a plain dev server again
    /// (empty: its state was in memory); returns when it is active.
    pub async fn restart(&mut self) {
        assert_ne!(self.kind, Kind::DevTls, "a TLS dev server does not restart");
        self.kill();
        self.spawn();
        if self.kind == Kind::Persistent {
            self.unseal().await;
        } else {
            self.wait_for(&[200], "active").await;
        }
    }
}

impl Drop for OwnBao {
    fn drop(&mut self) {
        self.kill();
    }
}
