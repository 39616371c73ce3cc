//! PostgreSQL 15: a cluster made with initdb (SCRAM for every login, superuser `postgres`
//! with a password), its postmaster listening on 127.0.0.1 only, readiness, and SQL as the
//! superuser through `psql`.

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use crate::process::{self, RunAs};
use crate::{Context, Error, Result};

/// Settings for a cluster whose data may be lost: no fsync, no full-page writes (tests).
pub const THROWAWAY_SETTINGS: &[&str] = &[
    "fsync=off",
    "synchronous_commit=off",
    "full_page_writes=off",
];

/// A PostgreSQL 15 program (initdb, postgres, psql, pg_isready...) in [`bin_dir`].
pub fn bin(tool: &str) -> PathBuf {
    bin_dir().join(tool)
}

/// The directory of the PostgreSQL 15 programs: `$PGBIN` or `/usr/lib/postgresql/15/bin`.
pub fn bin_dir() -> PathBuf {
    std::env::var_os("PGBIN")
        .unwrap_or_else(|| "/usr/lib/postgresql/15/bin".into())
        .into()
}

/// How to reach a running server as its superuser.
#[derive(Clone, Debug)]
pub struct Conn {
    /// The TCP port on 127.0.0.1.
    pub port: u16,
    /// Password of the superuser `postgres` (SCRAM everywhere).
    pub password: String,
}

impl Conn {
    /// A libpq URL of database `db` as the superuser, over plain TCP.
    pub fn url(&self, db: &str) -> String {
        format!(
            "postgresql://postgres:{}@127.0.0.1:{}/{db}?sslmode=disable",
            self.password, self.port
        )
    }

    /// Runs `sql` in `db` as the superuser with psql; returns its unaligned output.
    pub fn psql(&self, db: &str, sql: &str) -> Result<String> {
        self.psql_each(db, &[sql])
    }

    /// Runs each of `statements` in `db` in its own transaction (one psql `-c` each, so that
    /// `CREATE DATABASE` may be one of them), in one psql process; stops at the first error.
    pub fn psql_each(&self, db: &str, statements: &[&str]) -> Result<String> {
        let mut cmd = Command::new(bin("psql"));
        cmd.args(["-X", "-q", "-A", "-t", "-v", "ON_ERROR_STOP=1"])
            .args(["-h", "127.0.0.1", "-U", "postgres", "-d", db])
            .arg("-p")
            .arg(self.port.to_string());
        for sql in statements {
            cmd.arg("-c").arg(sql);
        }
        let out = cmd
            .env("PGPASSWORD", &self.password)
            .env("PGSSLMODE", "disable")
            .env("PGCONNECT_TIMEOUT", "5")
            .stdin(Stdio::null())
            .output()
            .context(|| format!("run {}", bin("psql").display()))?;
        if out.status.success() {
            Ok(String::from_utf8_lossy(&out.stdout).into_owned())
        } else {
            Err(Error::new(format!(
                "psql {statements:?} failed: {}",
                String::from_utf8_lossy(&out.stderr).trim()
            )))
        }
    }

    /// Polls `select 1` until the server answers, at most `within`; fails early when `child`
    /// exits. `log` is quoted in the error.
    pub fn wait_ready(&self, child: &mut Child, log: &Path, within: Duration) -> Result<()> {
        let deadline = Instant::now() + within;
        loop {
            if let Ok(Some(status)) = child.try_wait() {
                return Err(Error::new(format!(
                    "postgres exited ({status}); {}:\n{}",
                    log.display(),
                    process::tail(log, 4000)
                )));
            }
            match self.psql("postgres", "select 1") {
                Ok(_) => return Ok(()),
                Err(e) if Instant::now() >= deadline => {
                    return Err(Error::new(format!(
                        "postgres not ready after {within:?}: {e}\n{}:\n{}",
                        log.display(),
                        process::tail(log, 4000)
                    )));
                }
                Err(_) => std::thread::sleep(Duration::from_millis(50)),
            }
        }
    }
}

/// A cluster on disk: `dir/data` made by initdb, sockets in `dir/sock`, owned by the OS user
/// `postgres` when we are root.
#[derive(Clone, Debug)]
pub struct Cluster {
    /// Holds data/, sock/ and the logs; the postmaster's working directory.
    pub dir: PathBuf,
    /// The data directory (`postmaster.pid` names the running postmaster).
    pub data: PathBuf,
    /// `unix_socket_directories`.
    pub sock: PathBuf,
    /// Who runs initdb and postgres.
    pub owner: Option<RunAs>,
    /// The superuser's password, given to initdb.
    pub password: String,
}

impl Cluster {
    /// Creates `dir` (mode 0755, so that the server user can enter it) and runs initdb with
    /// SCRAM, UTF-8, locale C and the superuser `postgres` with `password`.
    pub fn init(dir: &Path, password: &str) -> Result<Cluster> {
        let owner = process::postgres_user()?;
        let initdb = bin("initdb");
        if !initdb.exists() {
            return Err(Error::new(format!(
                "{} not found: install the PostgreSQL 15 server (Debian: apt-get install \
                 postgresql-15) or set PGBIN",
                initdb.display()
            )));
        }
        let cluster = Cluster {
            dir: dir.to_path_buf(),
            data: dir.join("data"),
            sock: dir.join("sock"),
            owner,
            password: password.to_string(),
        };
        process::make_dir(dir, 0o755)?;
        process::make_dir(&cluster.sock, 0o755)?;
        let pwfile = dir.join("pwfile");
        process::write_private(&pwfile, password)?;
        for p in [dir, cluster.sock.as_path(), pwfile.as_path()] {
            process::chown(p, owner)?;
        }
        let log = dir.join("initdb.log");
        let mut cmd = Command::new(&initdb);
        cmd.arg("-D")
            .arg(&cluster.data)
            .args(["-U", "postgres", "--auth=scram-sha-256", "--encoding=UTF8"])
            .args(["--locale=C", "--no-sync"])
            .arg(format!("--pwfile={}", pwfile.display()));
        let status = process::prepare(&mut cmd, dir, owner, &log, false)?
            .status()
            .context(|| format!("run {}", initdb.display()))?;
        let _ = std::fs::remove_file(&pwfile);
        if !status.success() {
            return Err(Error::new(format!(
                "initdb failed ({status}); {}:\n{}",
                log.display(),
                process::tail(&log, 4000)
            )));
        }
        Ok(cluster)
    }

    /// Copies a server certificate and key into the cluster directory (owned by the server
    /// user, key 0600, as PostgreSQL insists) and returns the settings that turn TLS on.
    pub fn install_tls(&self, cert: &Path, key: &Path) -> Result<Vec<String>> {
        let (cert_to, key_to) = (self.dir.join("server.pem"), self.dir.join("server-key.pem"));
        std::fs::copy(cert, &cert_to).context(|| format!("copy {}", cert.display()))?;
        let key_pem = std::fs::read_to_string(key).context(|| format!("read {}", key.display()))?;
        process::write_private(&key_to, &key_pem)?;
        for p in [&cert_to, &key_to] {
            process::chown(p, self.owner)?;
        }
        Ok(vec![
            "ssl=on".into(),
            format!("ssl_cert_file={}", cert_to.display()),
            format!("ssl_key_file={}", key_to.display()),
        ])
    }

    /// Starts the postmaster on 127.0.0.1:`port` with `settings` (`name=value`, after the
    /// defaults, so they win), logging to `log`. Returns at once: see [`Conn::wait_ready`].
    pub fn spawn(&self, port: u16, settings: &[String], log: &Path, detach: bool) -> Result<Child> {
        let mut cmd = Command::new(bin("postgres"));
        cmd.arg("-D")
            .arg(&self.data)
            .arg("-p")
            .arg(port.to_string());
        let defaults = [
            "listen_addresses=127.0.0.1".to_string(),
            format!("unix_socket_directories={}", self.sock.display()),
        ];
        for setting in defaults.iter().chain(settings) {
            cmd.arg("-c").arg(setting);
        }
        process::prepare(&mut cmd, &self.dir, self.owner, log, detach)?
            .spawn()
            .context(|| format!("spawn {}", bin("postgres").display()))
    }

    /// The PID of the running postmaster, from `postmaster.pid`.
    pub fn postmaster_pid(&self) -> Result<u32> {
        let file = self.data.join("postmaster.pid");
        std::fs::read_to_string(&file)
            .ok()
            .and_then(|t| t.lines().next().and_then(|l| l.trim().parse().ok()))
            .ok_or_else(|| Error::new(format!("no postmaster pid in {}", file.display())))
    }
}

/// A postmaster of a [`Cluster`], started and answering queries.
pub struct Server {
    /// Where it lives on disk, and as whom it runs.
    pub cluster: Cluster,
    /// How to reach it.
    pub conn: Conn,
    /// The server log.
    pub log: PathBuf,
    /// The postmaster (for the caller to stop, wait for, or drop).
    pub child: Child,
}

/// initdb in `dir`, start on a free port (or `port`) with `settings`, wait until it answers
/// (at most 60 s). `register` is called with the postmaster's PID as soon as it runs.
pub fn start(
    dir: &Path,
    settings: &[String],
    tls: Option<(&Path, &Path)>,
    detach: bool,
    register: &dyn Fn(u32) -> Result<()>,
) -> Result<Server> {
    let password = process::random_hex(16)?;
    let cluster = Cluster::init(dir, &password)?;
    let mut all = settings.to_vec();
    if let Some((cert, key)) = tls {
        let mut on = cluster.install_tls(cert, key)?;
        on.append(&mut all);
        all = on;
    }
    let port = crate::ports::free_port()?;
    let log = dir.join("postgres.log");
    let mut child = cluster.spawn(port, &all, &log, detach)?;
    register(child.id())?;
    let conn = Conn { port, password };
    conn.wait_ready(&mut child, &log, Duration::from_secs(60))?;
    Ok(Server {
        cluster,
        conn,
        log,
        child,
    })
}
