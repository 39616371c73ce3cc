//! The shared PostgreSQL 15 cluster as tests see it (started by the dev environment, see
//! `devenv::pg`), clusters of one test that can be restarted, and superuser queries the
//! tests use to look at roles and activity, and backend process titles.

use std::process::Child;
use std::time::{Duration, Instant};

use super::free_port;

/// PostgreSQL 15 programs (initdb, postgres, psql, pgbench); `PGBIN` overrides.
pub use devenv::pg::bin as pg_bin;

/// Settings of every test cluster: room for many sessions, no durability.
pub fn test_settings() -> Vec<String> {
    let mut settings = vec!["max_connections=500".to_string()];
    settings.extend(devenv::pg::THROWAWAY_SETTINGS.iter().map(|s| s.to_string()));
    settings
}

/// A running cluster, listening on 127.0.0.1 only.
#[derive(Clone, Debug)]
pub struct Pg {
    pub port: u16,
    /// Password of the superuser `postgres` (SCRAM everywhere).
    pub password: String,
    /// Server log, shown when startup fails.
    pub log: std::path::PathBuf,
    /// Its Unix socket directory (`unix_socket_directories`).
    pub sock: std::path::PathBuf,
}

impl Pg {
    /// The test view of a server the dev environment started.
    pub fn of(server: &devenv::pg::Server) -> Pg {
        Pg {
            port: server.conn.port,
            password: server.conn.password.clone(),
            log: server.log.clone(),
            sock: server.cluster.sock.clone(),
        }
    }

    /// The dev environment's view (for `devenv::contract`).
    pub fn conn(&self) -> devenv::pg::Conn {
        devenv::pg::Conn {
            port: self.port,
            password: self.password.clone(),
        }
    }

    /// Runs SQL as superuser over TCP with psql (synchronous; for setup only).
    pub fn psql(&self, db: &str, sql: &str) -> Result<String, String> {
        self.conn().psql(db, sql).map_err(|e| e.to_string())
    }

    /// A superuser connection over plain TCP (the driver task runs on the caller's runtime).
    pub async fn superuser(&self) -> tokio_postgres::Client {
        let (client, conn) = tokio_postgres::Config::new()
            .host("127.0.0.1")
            .port(self.port)
            .user("postgres")
            .password(&self.password)
            .dbname("myapp")
            .connect_timeout(Duration::from_secs(5))
            .connect(tokio_postgres::NoTls)
            .await
            .expect("superuser connection to the test cluster");
        tokio::spawn(async move {
            let _ = conn.await;
        });
        client
    }
}

/// A PostgreSQL cluster of one test, for tests that restart it; set up like the shared one
/// (database `myapp`, the contract's group roles). Stopped and removed when dropped.
pub struct Cluster {
    pub pg: Pg,
    cluster: devenv::pg::Cluster,
    child: Option<Child>,
    starts: usize,
    _dir: tempfile::TempDir,
}

impl Cluster {
    /// initdb, start, set up (blocking: call it from `spawn_blocking` in async tests).
    pub fn start() -> Result<Cluster, String> {
        let dir = super::root().tempdir("pg-");
        let password = format!("pg-own-{}", super::next_id());
        let cluster =
            devenv::pg::Cluster::init(dir.path(), &password).map_err(|e| e.to_string())?;
        let mut cluster = Cluster {
            pg: Pg {
                port: free_port(),
                password,
                log: dir.path().join("postgres-1.log"),
                sock: cluster.sock.clone(),
            },
            cluster,
            child: None,
            starts: 0,
            _dir: dir,
        };
        cluster.spawn()?;
        devenv::contract::create_database(&cluster.pg.conn()).map_err(|e| e.to_string())?;
        Ok(cluster)
    }

    fn spawn(&mut self) -> Result<(), String> {
        self.starts += 1;
        self.pg.log = self
            .cluster
            .dir
            .join(format!("postgres-{}.log", self.starts));
        let mut child = self
            .cluster
            .spawn(self.pg.port, &test_settings(), &self.pg.log, false)
            .map_err(|e| e.to_string())?;
        super::root().register("INT", child.id(), "postgres");
        let ready = self
            .pg
            .conn()
            .wait_ready(&mut child, &self.pg.log, Duration::from_secs(60));
        self.child = Some(child);
        ready.map_err(|e| e.to_string())
    }

    /// Fast shutdown (SIGINT, like `pg_ctl stop -m fast`: open sessions are terminated),
    /// waits for the postmaster to exit, at most `within`.
    pub fn stop_fast(&mut self, within: Duration) -> Result<(), String> {
        let Some(mut child) = self.child.take() else {
            return Ok(());
        };
        devenv::process::send(child.id(), devenv::process::Signal::Int);
        let deadline = Instant::now() + within;
        loop {
            match child.try_wait() {
                Ok(Some(_)) => return Ok(()),
                Ok(None) if Instant::now() < deadline => {
                    std::thread::sleep(Duration::from_millis(20));
                }
                _ => {
                    let _ = child.kill();
                    let _ = child.wait();
                    return Err(format!("postgres did not stop within {within:?}"));
                }
            }
        }
    }

    /// `pg_ctl restart -m fast`: fast shutdown, then start again on the same port; returns
    /// when the cluster answers queries (blocking).
    pub fn restart_fast(&mut self) -> Result<(), String> {
        self.stop_fast(Duration::from_secs(30))?;
        self.spawn()
    }
}

impl Drop for Cluster {
    fn drop(&mut self) {
        if let Err(e) = self.stop_fast(Duration::from_secs(10)) {
            eprintln!("dedicated cluster: {e}");
        }
    }
}

/// Roles whose name starts with `prefix` (the per-mount username prefix), sorted.
pub async fn dynamic_roles(prefix: &str) -> Vec<String> {
    dynamic_roles_on(&super::env().pg, prefix).await
}

/// Roles of the cluster `pg` whose name starts with `prefix`, sorted.
pub async fn dynamic_roles_on(pg: &Pg, prefix: &str) -> Vec<String> {
    let client = pg.superuser().await;
    let rows = client
        .query(
            "select rolname::text from pg_roles where starts_with(rolname, $1) order by 1",
            &[&prefix],
        )
        .await
        .expect("query pg_roles");
    rows.iter().map(|r| r.get::<_, String>(0)).collect()
}

/// Number of active backends of roles with `prefix` whose query contains `fragment`.
pub async fn active_queries(prefix: &str, fragment: &str) -> i64 {
    let client = super::env().pg.superuser().await;
    let row = client
        .query_one(
            "select count(*) from pg_stat_activity where starts_with(usename, $1) \
             and state = 'active' and strpos(query, $2) > 0",
            &[&prefix, &fragment],
        )
        .await
        .expect("query pg_stat_activity");
    row.get(0)
}

/// Waits (at most 15 s) until exactly one backend of roles with `prefix` runs a query
/// containing `fragment`: the statement a test is about to cancel has started upstream.
pub async fn wait_one_active(prefix: &str, fragment: &str) {
    let what = format!("one active {fragment} backend");
    super::poll_until(Duration::from_secs(15), &what, || async move {
        match active_queries(prefix, fragment).await {
            1 => Ok(()),
            n => Err(format!("{n} active {fragment} backends")),
        }
    })
    .await;
}

/// Process titles of the backends of cluster `pg` (the children of its postmaster) that
/// contain `needle` (a role prefix, a role, a database name), e.g.
/// `postgres: lgt3_abc myapp 127.0.0.1(40022) startup`. A backend still starting (in
/// authentication, or sleeping in `post_auth_delay`) is not in `pg_stat_activity`; its title
/// shows it.
pub fn backend_titles(pg: &Pg, needle: &str) -> Vec<String> {
    let data = pg.log.parent().expect("cluster directory").join("data");
    let pid_file = data.join("postmaster.pid");
    let postmaster: u32 = std::fs::read_to_string(&pid_file)
        .ok()
        .and_then(|t| t.lines().next().and_then(|l| l.trim().parse().ok()))
        .unwrap_or_else(|| panic!("no postmaster pid in {}", pid_file.display()));
    let mut titles = Vec::new();
    let Ok(procs) = std::fs::read_dir("/proc") else {
        panic!("cannot list /proc");
    };
    for entry in procs.flatten() {
        let Some(pid) = entry
            .file_name()
            .to_str()
            .and_then(|n| n.parse::<u32>().ok())
        else {
            continue;
        };
        // Field 4 of /proc/<pid>/stat is the parent pid; the command name in field 2 may
        // hold spaces but ends with the last ')'.
        let Ok(stat) = std::fs::read_to_string(format!("/proc/{pid}/stat")) else {
            continue;
        };
        let parent = stat
            .rsplit_once(')')
            .and_then(|(_, rest)| rest.split_whitespace().nth(1))
            .and_then(|p| p.parse::<u32>().ok());
        if parent != Some(postmaster) {
            continue;
        }
        let Ok(cmdline) = std::fs::read(format!("/proc/{pid}/cmdline")) else {
            continue;
        };
        let title = String::from_utf8_lossy(&cmdline)
            .replace('\0', " ")
            .trim()
            .to_string();
        if title.contains(needle) {
            titles.push(format!("{pid}: {title}"));
        }
    }
    titles
}
