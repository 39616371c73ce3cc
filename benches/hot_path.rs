//! Micro-benchmarks for the code every session runs: startup-packet parsing, grant matching
//! with 10 and 10,000 grants, and certificate identity extraction.
//!
//! Run: `cargo bench --bench hot_path`

use std::hint::black_box;

use bytes::{BufMut, BytesMut};
use criterion::{Criterion, criterion_group, criterion_main};
use leasegate::config::GrantConfig;
use leasegate::identity::{IdentityPattern, Principal};
use leasegate::policy::Policy;
use leasegate::protocol::startup::parse_initial_packet;

fn startup_packet() -> BytesMut {
    let body: &[u8] = b"user\0readonly\0database\0myapp\0application_name\0psql\0client_encoding\0UTF8\0DateStyle\0ISO, MDY\0\0";
    let mut b = BytesMut::new();
    b.put_u32(8 + body.len() as u32);
    b.put_u32(196_608);
    b.put_slice(body);
    b
}

fn grants(n: usize) -> Vec<GrantConfig> {
    (0..n)
        .map(|i| GrantConfig {
            identity: IdentityPattern::parse(&format!("uri:spiffe://example.org/ns/team{i}/sa/*"))
                .expect("pattern"),
            databases: vec!["myapp".into()],
            roles: vec!["readonly".into()],
        })
        .collect()
}

fn bench_startup(c: &mut Criterion) {
    let packet = startup_packet();
    c.bench_function("parse_startup_packet", |b| {
        b.iter(|| parse_initial_packet(black_box(packet.clone())))
    });
}

fn bench_grants(c: &mut Criterion) {
    let roles = vec!["readonly".to_string(), "readwrite".to_string()];
    for n in [10usize, 10_000] {
        let policy = Policy::new(&grants(n));
        // The last grant matches: the worst case for a linear scan.
        let principal = Principal::new(
            vec![format!("spiffe://example.org/ns/team{}/sa/billing", n - 1)],
            vec![],
            Some("billing".into()),
        );
        c.bench_function(&format!("grant_match_{n}"), |b| {
            b.iter(|| {
                policy.decide(
                    black_box(&principal),
                    black_box("myapp"),
                    black_box("readonly"),
                    Some(&roles),
                )
            })
        });
    }
}

fn bench_identity(c: &mut Criterion) {
    let mut params =
        rcgen::CertificateParams::new(vec!["billing.example.org".to_string()]).expect("params");
    params.subject_alt_names.push(rcgen::SanType::URI(
        "spiffe://example.org/ns/prod/sa/billing"
            .try_into()
            .expect("uri"),
    ));
    params
        .distinguished_name
        .push(rcgen::DnType::CommonName, "billing");
    let key = rcgen::KeyPair::generate().expect("key");
    let cert = params.self_signed(&key).expect("cert");
    let der = cert.der().clone();
    c.bench_function("certificate_identity", |b| {
        b.iter(|| Principal::from_certificate(black_box(&der)))
    });
}

criterion_group!(benches, bench_startup, bench_grants, bench_identity);
criterion_main!(benches);
