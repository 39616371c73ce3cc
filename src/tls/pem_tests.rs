//! The PEM loaders: every private-key encoding operators hand us (PKCS#8, SEC1 `EC PRIVATE
//! KEY`, PKCS#1 `RSA PRIVATE KEY`), files holding the wrong kind of item, and garbage.

use super::*;
use base64::Engine;
use rustls::pki_types::PrivateKeyDer;

fn pem(label: &str, der: &[u8]) -> String {
    let body = base64::engine::general_purpose::STANDARD.encode(der);
    let lines: Vec<&str> = body
        .as_bytes()
        .chunks(64)
        .map(|c| std::str::from_utf8(c).unwrap_or_default())
        .collect();
    format!(
        "-----BEGIN {label}-----\n{}\n-----END {label}-----\n",
        lines.join("\n")
    )
}

fn write(dir: &tempfile::TempDir, name: &str, text: &str) -> std::path::PathBuf {
    let path = dir.path().join(name);
    std::fs::write(&path, text).expect("write");
    path
}

#[test]
fn every_private_key_encoding_is_read_and_the_first_key_wins() {
    let dir = tempfile::tempdir().expect("tempdir");
    let der = rcgen::KeyPair::generate().expect("key").serialize_der();
    for (label, kind) in [
        ("PRIVATE KEY", "pkcs8"),
        ("EC PRIVATE KEY", "sec1"),
        ("RSA PRIVATE KEY", "pkcs1"),
    ] {
        // A certificate before the key, as in a combined PEM file, is skipped.
        let cert = pem("CERTIFICATE", b"not read by the key loader");
        let path = write(&dir, kind, &format!("{cert}{}", pem(label, &der)));
        let key = load_key(&path).expect(label);
        let read = match key {
            PrivateKeyDer::Pkcs8(_) => "pkcs8",
            PrivateKeyDer::Sec1(_) => "sec1",
            PrivateKeyDer::Pkcs1(_) => "pkcs1",
            _ => "other",
        };
        assert_eq!(read, kind, "{label}");
        assert_eq!(key.secret_der(), der.as_slice());
    }
}

#[test]
fn a_file_without_the_wanted_item_is_named_in_the_error() {
    let dir = tempfile::tempdir().expect("tempdir");
    let der = rcgen::KeyPair::generate().expect("key").serialize_der();
    let key_only = write(&dir, "key.pem", &pem("PRIVATE KEY", &der));
    let cert_only = write(&dir, "cert.pem", &pem("CERTIFICATE", b"x"));
    let empty = write(&dir, "empty.pem", "");
    let encrypted = write(&dir, "enc.pem", &pem("ENCRYPTED PRIVATE KEY", &der));
    for (path, loaded) in [
        (&key_only, load_certs(&key_only).map(|_| ())),
        (&empty, load_certs(&empty).map(|_| ())),
        (&cert_only, load_key(&cert_only).map(|_| ())),
        (&encrypted, load_key(&encrypted).map(|_| ())),
    ] {
        let error = loaded.expect_err("nothing to load").to_string();
        assert!(error.contains(&path.display().to_string()), "{error}");
        assert!(error.contains("no PEM"), "{error}");
    }
}

#[test]
fn broken_base64_is_an_error_not_an_empty_file() {
    let dir = tempfile::tempdir().expect("tempdir");
    let path = write(
        &dir,
        "broken.pem",
        "-----BEGIN CERTIFICATE-----\n!!!!\n-----END CERTIFICATE-----\n",
    );
    let error = load_certs(&path).expect_err("broken").to_string();
    assert!(error.contains("broken.pem"), "{error}");
    assert!(load_key(&path).is_err());
}
