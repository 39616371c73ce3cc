//! The standard setup of a proxy test: a fresh mount, a PKI, one well-behaved client and a
//! leasegate that grants that client `readonly` on `myapp`, plus the checks most tests share.

use std::time::Duration;

use super::bao::{Mount, all_leases, fresh_mount};
use super::client::{Transport, current_user, pg_connect, raw_startup, tls_config};
use super::pg::dynamic_roles;
use super::pki::{ClientCert, Identity, Pki};
use super::poll_until;
use super::proxy::{Proxy, ProxyConfig};

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
        let mount = fresh_mount(name).await;
        let pki = Pki::new();
        let good = pki.client("good", Identity::Uri(GOOD_URI.into()));
        let cfg = ProxyConfig::new(&pki, &mount).grant(
            &format!("uri:{GOOD_URI}"),
            &["myapp"],
            &["readonly"],
        );
        let proxy = Proxy::start(customize(cfg)).await;
        Fixture {
            mount,
            pki,
            good,
            proxy,
        }
    }

    /// Asserts that right now no lease of this mount and no role with its prefix exists.
    pub async fn assert_nothing_issued(&self) {
        let roles = dynamic_roles(&self.mount.prefix).await;
        assert!(
            roles.is_empty(),
            "no dynamic role expected, found {roles:?}"
        );
        let leases = all_leases(&self.mount).await;
        assert!(leases.is_empty(), "no lease expected, found {leases:?}");
    }

    /// Polls until every lease of this mount is gone and no role with its prefix remains.
    pub async fn wait_all_revoked(&self, timeout: Duration) {
        wait_all_revoked(&self.mount, timeout).await;
    }

    /// The good client logs in through the raw protocol and with tokio-postgres, and the
    /// session user is a dynamic role of this mount. Cleans up after itself.
    pub async fn assert_good_client_works(&self) {
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
    }
}

/// Polls until no lease of `mount` and no role with its prefix remains.
pub async fn wait_all_revoked(mount: &Mount, timeout: Duration) {
    poll_until(
        timeout,
        "all leases revoked and roles dropped",
        || async move {
            let roles = dynamic_roles(&mount.prefix).await;
            let leases = all_leases(mount).await;
            if roles.is_empty() && leases.is_empty() {
                Ok(())
            } else {
                Err(format!("roles {roles:?}, leases {leases:?}"))
            }
        },
    )
    .await;
}
