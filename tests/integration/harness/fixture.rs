//! The standard setup of a proxy test: a fresh mount, a PKI, one well-behaved client and a
//! leasegate that grants that client `readonly` on `myapp`, plus the checks most tests share.

use std::time::{Duration, Instant};

use super::bao::{Mount, Target, all_leases, fresh_mount};
use super::client::{Transport, current_user, pg_connect, raw_startup, tls_config};
use super::env;
use super::metrics::value_or_zero;
use super::pg::{Pg, dynamic_roles, dynamic_roles_on};
use super::pki::{ClientCert, Identity, Pki};
use super::poll_until;
use super::proxy::{Proxy, ProxyConfig};
use super::wire::{Msg, PROTOCOL_3_0, Tls, Wire, tls_connect};

/// URI SAN of the well-behaved client.
pub const GOOD_URI: &str = "spiffe://leasegate.test/app/good";

pub struct Fixture {
    pub mount: Mount,
    pub pki: Pki,
    /// Granted `readonly` on `myapp`.
    pub good: ClientCert,
    pub proxy: Proxy,
}

impl Fixture {
    /// The standard grant only.
    pub async fn start(name: &str) -> Fixture {
        Fixture::start_with(name, |cfg| cfg).await
    }

    /// The standard grant, then `customize` may change anything in the config.
    pub async fn start_with(
        name: &str,
        customize: impl FnOnce(ProxyConfig) -> ProxyConfig,
    ) -> Fixture {
        Fixture::start_edited(name, customize, |_| {}).await
    }

    /// As [`Fixture::start_with`], then `edit` may change the config file's TOML (settings
    /// `ProxyConfig` has no field for, see [`super::proxy::set`]).
    pub async fn start_edited(
        name: &str,
        customize: impl FnOnce(ProxyConfig) -> ProxyConfig,
        edit: impl FnOnce(&mut toml::Table),
    ) -> Fixture {
        let mount = fresh_mount(name).await;
        Fixture::with_mount(mount, Pki::new(), customize, edit).await
    }

    /// The standard grant on an existing `mount` with an existing `pki` (for tests that
    /// set Vault up before leasegate starts), then `customize` and `edit` as in
    /// [`Fixture::start_edited`].
    pub async fn with_mount(
        mount: Mount,
        pki: Pki,
        customize: impl FnOnce(ProxyConfig) -> ProxyConfig,
        edit: impl FnOnce(&mut toml::Table),
    ) -> Fixture {
        let good = pki.client("good", Identity::Uri(GOOD_URI.into()));
        let cfg = ProxyConfig::new(&pki, &mount).grant(
            &format!("uri:{GOOD_URI}"),
            &["myapp"],
            &["readonly"],
        );
        let proxy = Proxy::start_edited(customize(cfg), edit).await;
        Fixture {
            mount,
            pki,
            good,
            proxy,
        }
    }

    /// [`Fixture::with_mount`] on a `mount` of an OpenBao the test runs itself (`target`:
    /// its address and root token), with `vault.timeout` = `timeout` (short, so that the
    /// test's outages show quickly), then `edit`.
    pub async fn on_own_bao(
        target: &Target,
        mount: Mount,
        timeout: &str,
        edit: impl FnOnce(&mut toml::Table),
    ) -> Fixture {
        let (addr, token, timeout) = (
            target.addr.clone(),
            target.token.clone(),
            timeout.to_string(),
        );
        let customize = move |mut cfg: ProxyConfig| {
            cfg.vault_address = addr;
            cfg.vault_token = token;
            cfg.vault_timeout = Some(timeout);
            cfg
        };
        Fixture::with_mount(mount, Pki::new(), customize, edit).await
    }

    /// A raw protocol session of the good client as `role` on `myapp` (TLS, startup), ready
    /// for queries. Panics unless the login ends with ReadyForQuery.
    pub async fn raw_session(&self, role: &str) -> Wire<Tls> {
        let config = tls_config(&self.pki, Some(&self.good));
        let stream = tls_connect(self.proxy.port, config)
            .await
            .expect("TLS connection to leasegate");
        logged_in(stream, role).await
    }

    /// Asserts that leasegate issued nothing since it started: no creds request reached
    /// Vault, no lease was issued (not even one revoked again since), and no lease of this
    /// mount and no role with its prefix exists. For a test that had credentials issued
    /// before the refusal it checks, see [`Fixture::assert_nothing_issued_since`].
    pub async fn assert_nothing_issued(&self) {
        self.assert_nothing_issued_since(Issued::AT_START).await;
    }

    /// Asserts that leasegate issued nothing since `before` (read with [`Fixture::issued`]
    /// right before the attempt that must not issue anything), and that nothing is
    /// outstanding now.
    pub async fn assert_nothing_issued_since(&self, before: Issued) {
        let now = self.issued().await;
        assert_eq!(
            now, before,
            "nothing issued expected: leasegate's counters moved (a credential issued and \
             revoked again counts too)"
        );
        self.assert_nothing_outstanding().await;
    }

    /// leasegate's issue counters now, as a baseline for
    /// [`Fixture::assert_nothing_issued_since`].
    pub async fn issued(&self) -> Issued {
        Issued::read(&self.proxy).await
    }

    /// Asserts that right now no lease of this mount and no role with its prefix exists
    /// (whatever was issued before has been revoked). Reads only OpenBao and PostgreSQL, so
    /// it also works after leasegate exited.
    pub async fn assert_nothing_outstanding(&self) {
        let roles = dynamic_roles(&self.mount.prefix).await;
        assert!(
            roles.is_empty(),
            "no dynamic role expected, found {roles:?}"
        );
        let leases = all_leases(&self.mount).await;
        assert!(leases.is_empty(), "no lease expected, found {leases:?}");
    }

    /// Polls (up to `within`) until `leasegate_lease_revocations_total{result="ok"}` is `n`,
    /// no revocation is waiting, and, when `active` is given, `leasegate_leases_active` is it.
    pub async fn wait_revocations_ok(&self, n: f64, active: Option<f64>, within: Duration) {
        let proxy = &self.proxy;
        poll_until(within, "revocations finished", || async move {
            let m = proxy.metrics().await;
            let ok = value_or_zero(&m, "leasegate_lease_revocations_total", &[("result", "ok")]);
            let held = value_or_zero(&m, "leasegate_leases_active", &[]);
            let pending = value_or_zero(&m, "leasegate_revocations_pending", &[]);
            if ok == n && pending == 0.0 && active.is_none_or(|a| a == held) {
                Ok(())
            } else {
                Err(format!(
                    "revocations ok {ok}, leases active {held}, pending {pending}"
                ))
            }
        })
        .await;
    }

    /// Polls until every lease of this mount is gone and no role with its prefix remains.
    /// On a time-out it also says what leasegate reports (when it still answers): its open
    /// sessions and its revocations, so a session still open tells from a revocation retried.
    pub async fn wait_all_revoked(&self, timeout: Duration) {
        let (proxy, mount) = (&self.proxy, &self.mount);
        poll_until(
            timeout,
            "all leases revoked and roles dropped",
            || async move {
                let roles = dynamic_roles(&mount.prefix).await;
                let leases = all_leases(mount).await;
                if roles.is_empty() && leases.is_empty() {
                    return Ok(());
                }
                let leasegate = match proxy.get("/metrics").await {
                    Ok((200, m)) => {
                        let read =
                            |name: &str, labels: &[(&str, &str)]| value_or_zero(&m, name, labels);
                        format!(
                            "sessions active {}, leases active {}, revocations pending {}, \
                             ok {}, error {}",
                            read("leasegate_sessions_active", &[]),
                            read("leasegate_leases_active", &[]),
                            read("leasegate_revocations_pending", &[]),
                            read("leasegate_lease_revocations_total", &[("result", "ok")]),
                            read("leasegate_lease_revocations_total", &[("result", "error")]),
                        )
                    }
                    other => format!("no metrics: {other:?}"),
                };
                Err(format!(
                    "roles {roles:?}, leases {leases:?}; leasegate: {leasegate}"
                ))
            },
        )
        .await;
    }

    /// Polls until the leases of `role` and the mount's dynamic roles are gone and exactly one
    /// revocation succeeded: the lease issued for a failed login was revoked.
    pub async fn wait_failed_login_revoked(&self, role: &str) {
        let (proxy, mount) = (&self.proxy, &self.mount);
        poll_until(
            Duration::from_secs(10),
            "lease of the failed login revoked",
            || async move {
                let roles = dynamic_roles(&mount.prefix).await;
                let leases = super::bao::leases(mount, role).await;
                let m = proxy.metrics().await;
                let revoked = crate::harness::metrics::value_or_zero(
                    &m,
                    "leasegate_lease_revocations_total",
                    &[("result", "ok")],
                );
                if roles.is_empty() && leases.is_empty() && revoked == 1.0 {
                    Ok(())
                } else {
                    Err(format!(
                        "roles {roles:?}, leases {leases:?}, revocations ok {revoked}"
                    ))
                }
            },
        )
        .await;
    }

    /// The good client logs in through the raw protocol and with tokio-postgres, and the
    /// session user is a dynamic role of this mount. Cleans up after itself.
    pub async fn assert_good_client_works(&self) {
        let active = |m: &str| value_or_zero(m, "leasegate_sessions_active", &[]);
        let before = active(&self.proxy.metrics().await);
        let raw = raw_startup(
            self.proxy.port,
            Transport::Tls(tls_config(&self.pki, Some(&self.good))),
            "readonly",
            "myapp",
        )
        .await;
        assert!(
            matches!(raw, super::client::Raw::Ready),
            "good client should log in, got {raw:?}"
        );
        // The raw session is closed; wait until leasegate has ended it, so that it no longer
        // counts against a per-identity session limit of the next one.
        let proxy = &self.proxy;
        poll_until(
            Duration::from_secs(10),
            "the raw session of the good client ended",
            || async move {
                match active(&proxy.metrics().await) {
                    n if n <= before => Ok(()),
                    n => Err(format!("leasegate_sessions_active {n}, before {before}")),
                }
            },
        )
        .await;
        let session = pg_connect(
            self.proxy.port,
            &self.pki,
            Some(&self.good),
            "readonly",
            "myapp",
        )
        .await
        .expect("good client connects with tokio-postgres");
        let user = current_user(&session).await;
        assert!(
            user.starts_with(&self.mount.prefix),
            "session user {user} should start with {}",
            self.mount.prefix
        );
        // Close the session now: on a current-thread runtime the connection task could not
        // run while the Proxy's Drop blocks, and leasegate would wait out its drain for it.
        drop(session.client);
        let _ = session.driver.await;
    }
}

/// What a leasegate has had issued so far, from two counters that only grow: comparing two
/// readings shows whether anything was issued in between, even a credential revoked again.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct Issued {
    /// `leasegate_leases_issued_total`: leases leasegate took charge of.
    pub leases: f64,
    /// `leasegate_vault_requests_total{op="creds"}` over every status: Vault was asked for a
    /// credential, whether or not it answered with one.
    pub creds_requests: f64,
}

impl Issued {
    /// A leasegate process starts with both counters at zero.
    pub const AT_START: Issued = Issued {
        leases: 0.0,
        creds_requests: 0.0,
    };

    /// Both counters from `proxy`'s /metrics now.
    pub async fn read(proxy: &Proxy) -> Issued {
        let m = proxy.metrics().await;
        Issued {
            leases: value_or_zero(&m, "leasegate_leases_issued_total", &[]),
            creds_requests: value_or_zero(&m, "leasegate_vault_requests_total", &[("op", "creds")]),
        }
    }
}

/// Polls until no lease of `mount` and no role with its prefix remains.
pub async fn wait_all_revoked(mount: &Mount, timeout: Duration) {
    wait_all_revoked_on(&Target::shared(), &env().pg, mount, timeout).await;
}

/// Like [`wait_all_revoked`] for a mount on `bao` whose roles live in the cluster `pg`.
pub async fn wait_all_revoked_on(bao: &Target, pg: &Pg, mount: &Mount, timeout: Duration) {
    poll_until(
        timeout,
        "all leases revoked and roles dropped",
        || async move {
            let roles = dynamic_roles_on(pg, &mount.prefix).await;
            let leases = bao.all_leases(mount).await;
            if roles.is_empty() && leases.is_empty() {
                Ok(())
            } else {
                Err(format!("roles {roles:?}, leases {leases:?}"))
            }
        },
    )
    .await;
}

/// Every message the server sends until it closes the connection, with its arrival time
/// relative to `since`; `Err` with what arrived when the connection is still open after
/// `within`.
pub async fn messages_until_closed(
    wire: &mut Wire<Tls>,
    since: Instant,
    within: Duration,
) -> Result<Vec<(Duration, Msg)>, Vec<(Duration, Msg)>> {
    let deadline = Instant::now() + within;
    let mut seen = Vec::new();
    loop {
        let left = deadline.saturating_duration_since(Instant::now());
        if left.is_zero() {
            return Err(seen);
        }
        match wire.recv_within(left).await {
            Ok(Some(msg)) => seen.push((since.elapsed(), msg)),
            Ok(None) => return Err(seen),
            // EOF or reset: closed.
            Err(_) => return Ok(seen),
        }
    }
}

/// Sends the startup packet as `role` on `myapp` over `stream` (already past SSL negotiation
/// and TLS, or a Unix socket) and returns the session. Panics unless the login ends with
/// ReadyForQuery.
pub async fn logged_in<S>(stream: S, role: &str) -> Wire<S>
where
    S: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin,
{
    let mut wire = Wire::new(stream);
    let login = wire
        .startup(PROTOCOL_3_0, &[("user", role), ("database", "myapp")])
        .await
        .expect("startup through leasegate");
    let last = login.messages.last().map(|m| m.tag);
    assert_eq!(
        last,
        Some(b'Z'),
        "login as {role} should end with ReadyForQuery: {:?}",
        login.messages
    );
    wire
}
