//! Certificates and identities an attacker might try: a certificate that is not valid yet, one
//! revoked through a CRL, a CA certificate or a server-only certificate presented as a client
//! certificate, a chain through an intermediate CA (accepted), a CN that looks like a URI,
//! and names that a glob must not match across `/` or `.`; and client keys other than ECDSA
//! P-256 (RSA, P-384, Ed25519), accepted. (Expired certificates and untrusted CAs are covered
//! in `rejections.rs`.)
//!
//! Every refusal is checked exactly (TLS alert, or SQLSTATE and message), and no creds request
//! may have reached Vault: no lease, no role.

use std::process::Command;

use rustls::AlertDescription;

use crate::harness::client::{Raw, conninfo, current_user, pg_connect, psql};
use crate::harness::fixture::{Fixture, GOOD_URI};
use crate::harness::pki::{ClientCert, Identity, pem_certificate};
use crate::harness::proxy::{BIN, ProcessOptions, set};
use crate::harness::security::{
    assert_alert, assert_fatal, creds_requests, fixture_edited, tls_startup, wait_auth_failures,
    wait_tls_failures,
};

/// Nothing was issued for a refused client, and Vault was not asked.
async fn assert_refused_without_vault(f: &Fixture) {
    f.assert_nothing_issued().await;
    assert_eq!(
        creds_requests(&f.proxy).await,
        0.0,
        "a refused client must not cause a Vault creds request"
    );
}

/// `cert` fails the TLS handshake with `alert`, counted as `reason`; nothing is issued and
/// the good client still works.
async fn assert_handshake_refused(
    f: &Fixture,
    cert: &ClientCert,
    alert: AlertDescription,
    reason: &str,
) {
    let answer = tls_startup(f.proxy.port, &f.pki, Some(cert), "readonly", "myapp").await;
    eprintln!("answer: {answer:?}");
    assert_alert(&answer, alert);
    wait_tls_failures(&f.proxy, reason, 1.0).await;
    assert_refused_without_vault(f).await;
    f.assert_good_client_works().await;
}

#[tokio::test]
async fn not_yet_valid_certificate_fails_the_handshake() {
    let f = Fixture::start("sec-notyet").await;
    let future = f
        .pki
        .client_with("future", Identity::Uri(GOOD_URI.into()), |p| {
            p.not_before = rcgen::date_time_ymd(2098, 1, 1);
            p.not_after = rcgen::date_time_ymd(2099, 1, 1);
        });
    // TLS has no "not yet valid" alert: certificate_expired covers "not currently valid".
    assert_handshake_refused(
        &f,
        &future,
        AlertDescription::CertificateExpired,
        "not_yet_valid",
    )
    .await;
}

#[tokio::test]
async fn certificate_revoked_by_crl_fails_the_handshake() {
    let mut revoked = None;
    let f = fixture_edited(
        "sec-crl",
        |cfg| cfg,
        ProcessOptions::default(),
        |config, pki| {
            // Same granted identity as the good client: only the CRL tells them apart.
            let cert = pki.client("revoked", Identity::Uri(GOOD_URI.into()));
            let crl = pki.crl("ca.crl", &[&cert]);
            set(
                config,
                "listen.crl",
                toml::Value::Array(vec![crl.display().to_string().into()]),
            );
            revoked = Some(cert);
        },
    )
    .await;
    let revoked = revoked.expect("revoked certificate issued");
    // psql (OpenSSL) sees the alert too.
    let info = conninfo(f.proxy.port, &f.pki, Some(&revoked), "readonly", "myapp");
    let out = psql(&info, "select 1").await;
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success(), "psql with a revoked cert must fail");
    assert!(
        stderr.contains("certificate revoked"),
        "psql says: {stderr}"
    );
    // With CRLs configured, revocation is checked along the whole chain and an unknown
    // status is a refusal: a chain through an intermediate CA that has no CRL fails closed.
    let chained = f
        .pki
        .intermediate_client("chained", Identity::Uri(GOOD_URI.into()));
    let answer = tls_startup(f.proxy.port, &f.pki, Some(&chained), "readonly", "myapp").await;
    assert_alert(&answer, AlertDescription::UnknownCA);
    wait_tls_failures(&f.proxy, "bad_certificate", 1.0).await;
    // The good client's certificate is not on the CRL and keeps working.
    assert_handshake_refused(
        &f,
        &revoked,
        AlertDescription::CertificateRevoked,
        "revoked",
    )
    .await;
}

#[tokio::test]
async fn ca_certificate_used_as_client_certificate_is_refused() {
    let f = Fixture::start("sec-ca-leaf").await;
    // A CA certificate that chains to the trusted root and carries the granted identity:
    // only its basicConstraints (cA=true) make it unacceptable as an end entity.
    let sub_ca = f.pki.ca_as_client("subca", Identity::Uri(GOOD_URI.into()));
    assert_handshake_refused(
        &f,
        &sub_ca,
        AlertDescription::CertificateUnknown,
        "bad_certificate",
    )
    .await;
}

#[tokio::test]
async fn server_auth_only_certificate_is_refused_as_client_certificate() {
    let f = Fixture::start("sec-eku").await;
    let server_only = f
        .pki
        .client_with("serveronly", Identity::Uri(GOOD_URI.into()), |p| {
            p.extended_key_usages = vec![rcgen::ExtendedKeyUsagePurpose::ServerAuth];
        });
    assert_handshake_refused(
        &f,
        &server_only,
        AlertDescription::UnsupportedCertificate,
        "bad_certificate",
    )
    .await;
}

#[tokio::test]
async fn chain_through_an_intermediate_ca_is_accepted() {
    const CHAINED_URI: &str = "spiffe://leasegate.test/app/chained";
    let f = Fixture::start_with("sec-chain", |cfg| {
        cfg.grant(&format!("uri:{CHAINED_URI}"), &["myapp"], &["readonly"])
    })
    .await;
    let chained = f
        .pki
        .intermediate_client("chained", Identity::Uri(CHAINED_URI.into()));

    // Without the intermediate the leaf does not chain to client_ca.
    let mut leaf_only = chained.clone();
    leaf_only.chain.clear();
    let answer = tls_startup(f.proxy.port, &f.pki, Some(&leaf_only), "readonly", "myapp").await;
    assert_alert(&answer, AlertDescription::UnknownCA);
    wait_tls_failures(&f.proxy, "unknown_ca", 1.0).await;
    assert_refused_without_vault(&f).await;

    // Leaf + intermediate: accepted, with the leaf's identity.
    let session = pg_connect(f.proxy.port, &f.pki, Some(&chained), "readonly", "myapp")
        .await
        .expect("leaf + intermediate is accepted");
    let user = current_user(&session).await;
    assert!(user.starts_with(&f.mount.prefix), "session user {user}");
    drop(session);

    // libpq sends the chain from the certificate file, too.
    let info = conninfo(f.proxy.port, &f.pki, Some(&chained), "readonly", "myapp");
    let out = psql(&info, "select current_user").await;
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success() && stdout.trim().starts_with(&f.mount.prefix),
        "psql with leaf + intermediate: {} / {}",
        stdout,
        String::from_utf8_lossy(&out.stderr)
    );
    f.wait_all_revoked(std::time::Duration::from_secs(10)).await;
}

/// An intermediate CA in `client_ca` becomes a trust anchor: leasegate warns at start and in
/// `check-config`, naming it, and indeed a leaf sent without the intermediate now passes.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_intermediate_in_client_ca_is_named_as_a_trust_anchor() {
    const CHAINED_URI: &str = "spiffe://leasegate.test/app/anchored";
    let chained = std::sync::Arc::new(std::sync::Mutex::new(None));
    let slot = chained.clone();
    let f = fixture_edited(
        "sec-ca-inter",
        |cfg| cfg.grant(&format!("uri:{CHAINED_URI}"), &["myapp"], &["readonly"]),
        ProcessOptions::default(),
        move |t, pki| {
            let cert = pki.intermediate_client("anchored", Identity::Uri(CHAINED_URI.into()));
            let root = std::fs::read_to_string(pki.ca_pem()).expect("read CA");
            let bundle = pki.dir().join("client-ca-with-intermediate.pem");
            std::fs::write(&bundle, root + &pem_certificate(&cert.chain[0])).expect("bundle");
            set(t, "listen.client_ca", bundle.display().to_string());
            *slot.lock().expect("slot") = Some(cert);
        },
    )
    .await;
    let chained = chained.lock().expect("slot").take().expect("issued");
    let inter_cn = "anchored intermediate CA";
    let warned = |text: &str| {
        text.lines().any(|l| {
            l.contains(" WARN ")
                && l.contains(&format!("CN={inter_cn}"))
                && l.contains("not self-signed")
                && l.contains("trust anchor")
        })
    };
    let log = f.proxy.log_text();
    assert!(
        warned(&log),
        "start-up log should name the intermediate:\n{log}"
    );
    let anchors = log
        .lines()
        .filter(|l| l.contains("not self-signed"))
        .count();
    assert_eq!(
        anchors, 1,
        "only the intermediate, not the root, is warned about:\n{log}"
    );

    let out = Command::new(BIN)
        .args(["check-config", "--config"])
        .arg(f.proxy.dir().join("leasegate.toml"))
        .env("NO_COLOR", "1")
        .output()
        .expect("run check-config");
    let said = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(out.status.success(), "a warning, not a refusal: {said}");
    assert!(
        warned(&said),
        "check-config should show the warning: {said}"
    );

    // What the warning means: the leaf alone (no intermediate sent) is now accepted, because
    // the intermediate itself is trusted (with only the root in client_ca it is refused:
    // chain_through_an_intermediate_ca_is_accepted).
    let mut leaf_only = chained.clone();
    leaf_only.chain.clear();
    let answer = tls_startup(f.proxy.port, &f.pki, Some(&leaf_only), "readonly", "myapp").await;
    assert!(matches!(answer, Raw::Ready), "leaf only: {answer:?}");
    f.wait_all_revoked(std::time::Duration::from_secs(10)).await;
}

#[tokio::test]
async fn common_name_that_looks_like_a_uri_does_not_match_a_uri_grant() {
    const ID: &str = "spiffe://example.org/app/x";
    let f = Fixture::start_with("sec-cn-uri", |cfg| {
        cfg.grant(&format!("uri:{ID}"), &["myapp"], &["readonly"])
    })
    .await;
    let impostor = f.pki.client("impostor", Identity::Cn(ID.into()));
    let answer = tls_startup(f.proxy.port, &f.pki, Some(&impostor), "readonly", "myapp").await;
    eprintln!("answer: {answer:?}");
    let message = assert_fatal(&answer, "28000", &[&format!("\"cn:{ID}\""), "has no grant"]);
    assert!(
        !message.contains("uri:"),
        "identity shown as a CN: {message:?}"
    );
    wait_auth_failures(&f.proxy, "no_grant", 1.0).await;
    assert_refused_without_vault(&f).await;

    // The same text as a URI SAN is granted.
    let real = f.pki.client("real", Identity::Uri(ID.into()));
    let answer = tls_startup(f.proxy.port, &f.pki, Some(&real), "readonly", "myapp").await;
    assert!(
        matches!(answer, Raw::Ready),
        "URI SAN {ID} is granted: {answer:?}"
    );
    f.wait_all_revoked(std::time::Duration::from_secs(10)).await;
}

#[tokio::test]
async fn glob_star_does_not_cross_slash_or_dot() {
    let f = Fixture::start_with("sec-glob", |cfg| {
        cfg.grant("uri:spiffe://example.org/app/*", &["myapp"], &["readonly"])
            .grant("dns:*.example.org", &["myapp"], &["readonly"])
    })
    .await;
    let refused = [
        (
            "deeper",
            Identity::Uri("spiffe://example.org/app/x/y".into()),
        ),
        (
            "dotted",
            Identity::Uri("spiffe://example.org/app/x.y".into()),
        ),
        (
            "sibling",
            Identity::Uri("spiffe://example.org/apps/x".into()),
        ),
        ("twolabels", Identity::Dns("a.b.example.org".into())),
        ("suffix", Identity::Dns("evil-example.org".into())),
    ];
    for (i, (name, id)) in refused.iter().enumerate() {
        let cert = f.pki.client(name, id.clone());
        let answer = tls_startup(f.proxy.port, &f.pki, Some(&cert), "readonly", "myapp").await;
        eprintln!("{id:?}: {answer:?}");
        let shown = match id {
            Identity::Uri(u) => format!("\"uri:{u}\""),
            Identity::Dns(d) => format!("\"dns:{d}\""),
            Identity::Cn(c) => format!("\"cn:{c}\""),
        };
        assert_fatal(&answer, "28000", &[&shown, "has no grant"]);
        wait_auth_failures(&f.proxy, "no_grant", (i + 1) as f64).await;
    }
    assert_refused_without_vault(&f).await;

    // One segment / one label is what the globs are for.
    for (name, id) in [
        (
            "onesegment",
            Identity::Uri("spiffe://example.org/app/x".into()),
        ),
        ("onelabel", Identity::Dns("db.example.org".into())),
    ] {
        let cert = f.pki.client(name, id.clone());
        let answer = tls_startup(f.proxy.port, &f.pki, Some(&cert), "readonly", "myapp").await;
        assert!(
            matches!(answer, Raw::Ready),
            "{id:?} is granted: {answer:?}"
        );
    }
    assert_eq!(
        creds_requests(&f.proxy).await,
        2.0,
        "one creds request per granted session"
    );
    f.wait_all_revoked(std::time::Duration::from_secs(10)).await;
}

/// A fresh Ed25519 key, and the same as PKCS#8 v1 PEM: the form `openssl genpkey` writes and
/// OpenSSL 3.0 reads (rcgen writes v2, with the public key, which libpq's OpenSSL 3.0 refuses
/// as "unsupported").
fn ed25519_with_v1_pem() -> (rcgen::KeyPair, String) {
    use base64::Engine;
    const V1_HEAD: [u8; 16] = [
        0x30, 0x2e, 0x02, 0x01, 0x00, 0x30, 0x05, 0x06, 0x03, 0x2b, 0x65, 0x70, 0x04, 0x22, 0x04,
        0x20,
    ];
    let key = rcgen::KeyPair::generate_for(&rcgen::PKCS_ED25519).expect("an Ed25519 key");
    let der = key.serialize_der();
    // v2: SEQUENCE, version 1, the same algorithm and seed, then the public key.
    assert_eq!(
        der[5..16],
        V1_HEAD[5..],
        "an Ed25519 PKCS#8 key: {der:02x?}"
    );
    let mut v1 = V1_HEAD.to_vec();
    v1.extend_from_slice(&der[16..48]);
    let b64 = base64::engine::general_purpose::STANDARD.encode(&v1);
    (
        key,
        format!("-----BEGIN PRIVATE KEY-----\n{b64}\n-----END PRIVATE KEY-----\n"),
    )
}

/// Client certificates with the keys PKIs hand out besides ECDSA P-256 (RSA from a corporate
/// CA or Vault's PKI engine with `key_type = "rsa"`, P-384, Ed25519): accepted from libpq
/// (OpenSSL) and from rustls, each session as a dynamic role.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rsa_p384_and_ed25519_client_certificates_are_accepted() {
    let f = Fixture::start("sec-certs-key-types").await;
    let rsa = rcgen::KeyPair::generate_rsa_for(&rcgen::PKCS_RSA_SHA256, rcgen::RsaKeySize::_2048);
    let p384 = rcgen::KeyPair::generate_for(&rcgen::PKCS_ECDSA_P384_SHA384);
    let (ed25519, v1_pem) = ed25519_with_v1_pem();
    let keys = [
        ("rsa2048", rsa.expect("an RSA key")),
        ("p384", p384.expect("a P-384 key")),
        ("ed25519", ed25519),
    ];
    for (name, key) in keys {
        let cert = f
            .pki
            .client_with_key(name, Identity::Uri(GOOD_URI.into()), key);
        if name == "ed25519" {
            std::fs::write(&cert.key, &v1_pem).expect("the key as PKCS#8 v1");
        }
        let out = psql(
            &conninfo(f.proxy.port, &f.pki, Some(&cert), "readonly", "myapp"),
            "select current_user",
        )
        .await;
        let user = String::from_utf8_lossy(&out.stdout).trim().to_owned();
        assert!(
            out.status.success() && user.starts_with(&f.mount.prefix),
            "{name} via psql: {user} {}",
            String::from_utf8_lossy(&out.stderr)
        );
        let s = pg_connect(f.proxy.port, &f.pki, Some(&cert), "readonly", "myapp")
            .await
            .unwrap_or_else(|e| panic!("{name} via rustls: {e}"));
        assert!(
            current_user(&s).await.starts_with(&f.mount.prefix),
            "{name}"
        );
    }
    f.wait_all_revoked(std::time::Duration::from_secs(15)).await;
}
