//! The token upkeep in paused time, against a scripted Vault: renewals before expiry, a
//! token capped at its max TTL replaced before it expires, logins again after a failed
//! renewal or a token Vault no longer accepts, login retries backing off, the logout.

use std::sync::Mutex;

use reqwest::StatusCode;
use secrecy::{ExposeSecret, SecretString};

use super::*;
use crate::vault::testing::unreachable;

const S: fn(u64) -> Duration = Duration::from_secs;

type LoginScript = Box<dyn Fn(usize) -> bool + Send + Sync>;
type RenewScript = Box<dyn Fn(usize) -> Result<Renewed, VaultError> + Send + Sync>;
type LookupScript = Box<dyn Fn() -> Result<(), VaultError> + Send + Sync>;

/// What the scripted Vault saw, with (paused) times; tokens by secret.
#[derive(Default)]
struct Seen {
    logins: Vec<Instant>,
    renewals: Vec<(Instant, String)>,
    revoked: Vec<(Instant, String)>,
}

/// Logins hand out tokens `t0`, `t1`... of `ttl`; renewals and lookups answer as scripted.
struct Script {
    store: TokenStore,
    metrics: Metrics,
    ttl: Duration,
    /// Whether leasegate owns the tokens (false: an operator's token).
    owned: bool,
    seen: Mutex<Seen>,
    login_works: LoginScript,
    renew: RenewScript,
    lookup: LookupScript,
}

impl Script {
    /// Renews in full, looks up fine, logs in every time.
    fn new(ttl: Duration) -> Script {
        Script {
            store: TokenStore::default(),
            metrics: Metrics::new(),
            ttl,
            owned: true,
            seen: Mutex::default(),
            login_works: Box::new(|_| true),
            renew: Box::new(move |_| {
                Ok(Renewed {
                    duration: ttl,
                    renewable: true,
                })
            }),
            lookup: Box::new(|| Ok(())),
        }
    }

    fn seen(&self) -> std::sync::MutexGuard<'_, Seen> {
        self.seen.lock().expect("seen")
    }

    fn logins(&self) -> Vec<Instant> {
        self.seen().logins.clone()
    }

    fn renewals(&self) -> Vec<(Instant, String)> {
        self.seen().renewals.clone()
    }

    fn revoked(&self) -> Vec<(Instant, String)> {
        self.seen().revoked.clone()
    }
}

fn ready<T: Send + 'static>(answer: Result<T, VaultError>) -> Call<'static, T> {
    Box::pin(async move { answer })
}

impl TokenApi for Script {
    fn tokens(&self) -> &TokenStore {
        &self.store
    }

    fn metrics(&self) -> &Metrics {
        &self.metrics
    }

    fn login(&self) -> Call<'_, Token> {
        let mut seen = self.seen();
        let n = seen.logins.len();
        seen.logins.push(Instant::now());
        if !(self.login_works)(n) {
            return ready(Err(unreachable()));
        }
        let secret = SecretString::from(format!("t{n}"));
        ready(Ok(Token::new(secret, self.ttl, true, self.owned)))
    }

    fn renew_self<'a>(&'a self, token: &'a Token) -> Call<'a, Renewed> {
        let mut seen = self.seen();
        let n = seen.renewals.len();
        let secret = token.secret().expose_secret().to_owned();
        seen.renewals.push((Instant::now(), secret));
        ready((self.renew)(n))
    }

    fn lookup_self<'a>(&'a self, _token: &'a Token) -> Call<'a, ()> {
        ready((self.lookup)())
    }

    fn revoke_self<'a>(&'a self, token: &'a Token) -> Call<'a, ()> {
        let secret = token.secret().expose_secret().to_owned();
        self.seen().revoked.push((Instant::now(), secret));
        ready(Ok(()))
    }
}

fn approle() -> Upkeep {
    Upkeep {
        method: "approle",
        replace_final: true,
        token_file: None,
    }
}

/// Runs the upkeep (and the logout) for `d` of paused time.
async fn run_for(api: &Script, upkeep: &Upkeep, d: Duration) {
    let stop = CancellationToken::new();
    let stopper = async {
        tokio::time::sleep(d).await;
        stop.cancel();
    };
    tokio::join!(keep(api, upkeep, &stop), stopper);
}

#[tokio::test(start_paused = true)]
async fn a_token_is_renewed_before_it_expires_for_as_long_as_it_runs() {
    let api = Script::new(S(30));
    let start = Instant::now();
    run_for(&api, &approle(), S(300)).await;
    assert_eq!(api.logins(), [start], "one login");
    let renewals = api.renewals();
    assert!(renewals.len() >= 14, "{} renewals in 300 s", renewals.len());
    let mut granted = start;
    for (at, secret) in &renewals {
        assert_eq!(secret, "t0");
        // Two thirds of the 30 s, minus up to a tenth as jitter: well before the expiry.
        let after = *at - granted;
        assert!(
            after >= S(17) && after <= S(20),
            "renewed {after:?} after the grant"
        );
        granted = *at;
    }
    let revoked: Vec<String> = api.revoked().into_iter().map(|(_, t)| t).collect();
    assert_eq!(revoked, ["t0"], "the logout revokes the token");
}

#[tokio::test(start_paused = true)]
async fn a_token_capped_at_its_max_ttl_is_replaced_before_it_expires() {
    // 29 s of the 30 s asked for is the cap (token upkeep used to allow a second of slack
    // and renew on): the token is replaced before those 29 s are over.
    let api = Script {
        renew: Box::new(|n| {
            Ok(Renewed {
                duration: if n == 0 { S(29) } else { S(30) },
                renewable: true,
            })
        }),
        ..Script::new(S(30))
    };
    run_for(&api, &approle(), S(60)).await;
    let (capped_at, _) = api.renewals()[0];
    let logins = api.logins();
    assert_eq!(logins.len(), 2, "{logins:?}");
    let replaced = logins[1] - capped_at;
    assert!(
        replaced >= S(19) && replaced < S(28),
        "replaced {replaced:?} after a 29 s grant: once less than a third of the TTL was left"
    );
    // The replaced token parents no lease: revoked at once.
    let revoked = api.revoked();
    assert_eq!(revoked[0], (logins[1], "t0".to_owned()), "{revoked:?}");
    assert!(api.renewals()[1..].iter().all(|(_, t)| t == "t1"));
}

#[tokio::test(start_paused = true)]
async fn a_failed_renewal_of_the_current_token_logs_in_again_at_once() {
    let api = Script {
        renew: Box::new(|n| {
            if n == 0 {
                Err(unreachable())
            } else {
                Ok(Renewed {
                    duration: S(30),
                    renewable: true,
                })
            }
        }),
        ..Script::new(S(30))
    };
    run_for(&api, &approle(), S(40)).await;
    let (failed_at, _) = api.renewals()[0];
    assert_eq!(api.logins()[1], failed_at);
}

#[tokio::test(start_paused = true)]
async fn a_token_vault_no_longer_accepts_is_replaced_at_the_next_health_check() {
    let api = Script {
        lookup: Box::new(|| {
            Err(VaultError::Status {
                status: StatusCode::FORBIDDEN,
                detail: "permission denied".into(),
            })
        }),
        ..Script::new(S(3600))
    };
    run_for(&api, &approle(), S(20)).await;
    let logins = api.logins();
    assert_eq!(logins.len(), 2, "{logins:?}");
    let after = logins[1] - logins[0];
    assert!(
        after >= HEALTH_EVERY && after < HEALTH_EVERY + CHECK_EVERY,
        "{after:?}"
    );
}

#[tokio::test(start_paused = true)]
async fn failed_logins_are_retried_backing_off_up_to_thirty_seconds() {
    let api = Script {
        login_works: Box::new(|n| n >= 8),
        ..Script::new(S(3600))
    };
    run_for(&api, &approle(), S(200)).await;
    let logins = api.logins();
    assert_eq!(logins.len(), 9, "{logins:?}");
    let gaps: Vec<Duration> = logins.windows(2).map(|w| w[1] - w[0]).collect();
    let first = Duration::from_millis(500);
    assert!(gaps[0] >= first && gaps[0] <= first * 3 / 2, "{gaps:?}");
    for pair in gaps.windows(2) {
        assert!(pair[1] >= pair[0], "spacing grows: {gaps:?}");
    }
    assert_eq!(gaps[gaps.len() - 2..], [S(30), S(30)], "capped: {gaps:?}");
    let text = api.metrics.render();
    assert!(
        text.contains(r#"leasegate_vault_auth_renewals_total{result="error"} 8"#),
        "{text}"
    );
}

#[tokio::test(start_paused = true)]
async fn an_operators_token_is_neither_replaced_nor_revoked() {
    let api = Script {
        owned: false,
        renew: Box::new(|_| {
            Ok(Renewed {
                duration: S(10),
                renewable: true,
            })
        }),
        ..Script::new(S(30))
    };
    let operator = Upkeep {
        method: "token",
        replace_final: false,
        token_file: None,
    };
    run_for(&api, &operator, S(60)).await;
    assert_eq!(api.logins().len(), 1);
    assert_eq!(api.renewals().len(), 1, "capped: not renewed again");
    assert!(api.revoked().is_empty());
}
