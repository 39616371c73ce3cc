use postgres_protocol::authentication::sasl::{ChannelBinding, ScramSha256};

use super::*;

/// A server-first message and the error it must give.
type Hostile = (&'static str, fn(&ScramError) -> bool);
/// A password and the same binding for both clients.
type Differential = (&'static [u8], fn() -> (Binding, ChannelBinding));

const RFC_NONCE: &str = "rOprNGfwEbeRWgbNEkqO";
const RFC_SERVER_FIRST: &str =
    "r=rOprNGfwEbeRWgbNEkqO%hvYDpWUa2RaTCAfuxFIlj)hNlF$k0,s=W22ZaJ0SNY7soEsUEjb6gQ==,i=4096";

fn rfc_exchange() -> Scram {
    let (scram, first) = Scram::with_nonce(
        "user",
        b"pencil",
        Binding::Unsupported,
        RFC_NONCE.to_owned(),
    );
    assert_eq!(first, "n,,n=user,r=rOprNGfwEbeRWgbNEkqO");
    scram
}

#[test]
fn the_rfc_7677_exchange_gives_its_proof_and_accepts_its_signature() {
    let mut scram = rfc_exchange();
    let last = scram
        .client_final(RFC_SERVER_FIRST.as_bytes())
        .expect("client-final");
    assert_eq!(
        last,
        "c=biws,r=rOprNGfwEbeRWgbNEkqO%hvYDpWUa2RaTCAfuxFIlj)hNlF$k0,\
         p=dHzbZapWIk4jUhN+Ute9ytag9zjfMHgsqmmiz7AndVQ="
    );
    scram
        .verify(b"v=6rriTRBi23WpRR/wtup+mMhUZUn/dB5nLTJRsjl95G4=")
        .expect("the server's signature");
}

#[test]
fn a_wrong_server_signature_or_a_server_error_is_refused() {
    let mut scram = rfc_exchange();
    scram
        .client_final(RFC_SERVER_FIRST.as_bytes())
        .expect("final");
    assert!(matches!(
        scram.verify(b"v=7rriTRBi23WpRR/wtup+mMhUZUn/dB5nLTJRsjl95G4="),
        Err(ScramError::Signature)
    ));
    // Nothing more is accepted once the exchange is over.
    assert!(matches!(
        scram.verify(b"v=6rriTRBi23WpRR/wtup+mMhUZUn/dB5nLTJRsjl95G4="),
        Err(ScramError::State)
    ));

    let mut scram = rfc_exchange();
    scram
        .client_final(RFC_SERVER_FIRST.as_bytes())
        .expect("final");
    assert!(matches!(
        scram.verify(b"e=invalid-proof"),
        Err(ScramError::Server(e)) if e == "invalid-proof"
    ));

    let mut scram = rfc_exchange();
    scram
        .client_final(RFC_SERVER_FIRST.as_bytes())
        .expect("final");
    assert!(matches!(
        scram.verify(b"v=not base64!"),
        Err(ScramError::Malformed(_))
    ));
}

#[test]
fn hostile_server_first_messages_are_refused_before_any_pbkdf2() {
    let cases: &[Hostile] = &[
        // The nonce must extend the client's, by at least one character.
        ("r=someoneelse,s=W22ZaJ0SNY7soEsUEjb6gQ==,i=4096", |e| {
            matches!(e, ScramError::Nonce)
        }),
        (
            "r=rOprNGfwEbeRWgbNEkqO,s=W22ZaJ0SNY7soEsUEjb6gQ==,i=4096",
            |e| matches!(e, ScramError::Nonce),
        ),
        // A core burnt per login, or no rounds at all.
        (
            "r=rOprNGfwEbeRWgbNEkqOx,s=W22ZaJ0SNY7soEsUEjb6gQ==,i=4000000000",
            |e| matches!(e, ScramError::Iterations(4_000_000_000)),
        ),
        (
            "r=rOprNGfwEbeRWgbNEkqOx,s=W22ZaJ0SNY7soEsUEjb6gQ==,i=0",
            |e| matches!(e, ScramError::Iterations(0)),
        ),
        // Malformed: order, base64, numbers, a mandatory extension, nothing.
        (
            "s=W22ZaJ0SNY7soEsUEjb6gQ==,r=rOprNGfwEbeRWgbNEkqOx,i=4096",
            |e| matches!(e, ScramError::Malformed(_)),
        ),
        ("r=rOprNGfwEbeRWgbNEkqOx,s=!!!,i=4096", |e| {
            matches!(e, ScramError::Malformed(_))
        }),
        (
            "r=rOprNGfwEbeRWgbNEkqOx,s=W22ZaJ0SNY7soEsUEjb6gQ==,i=-1",
            |e| matches!(e, ScramError::Malformed(_)),
        ),
        (
            "m=ext,r=rOprNGfwEbeRWgbNEkqOx,s=W22ZaJ0SNY7soEsUEjb6gQ==,i=4096",
            |e| matches!(e, ScramError::Malformed(_)),
        ),
        ("", |e| matches!(e, ScramError::Malformed(_))),
    ];
    for (message, expected) in cases {
        let mut scram = rfc_exchange();
        let err = scram.client_final(message.as_bytes()).expect_err(message);
        assert!(expected(&err), "{message}: {err:?}");
    }
    let mut scram = rfc_exchange();
    assert!(matches!(
        scram.client_final(b"r=\xff\xfe,s=,i=1"),
        Err(ScramError::Malformed(_))
    ));
    // Out of order: a server-final before any server-first.
    let mut scram = rfc_exchange();
    assert!(matches!(scram.verify(b"v=AAAA"), Err(ScramError::State)));
}

#[test]
fn the_same_messages_as_the_postgres_protocol_client_for_every_binding() {
    let cases: [Differential; 4] = [
        (b"A1a-generated-by-vault-Zz09", || {
            (Binding::Unsupported, ChannelBinding::unsupported())
        }),
        (b"pass word\xc2\xa0with nbsp", || {
            (Binding::Unrequested, ChannelBinding::unrequested())
        }),
        (b"\xff\xfe not utf-8", || {
            (Binding::Unsupported, ChannelBinding::unsupported())
        }),
        (b"tls-bound", || {
            (
                Binding::EndPoint(vec![7u8; 32]),
                ChannelBinding::tls_server_end_point(vec![7u8; 32]),
            )
        }),
    ];
    for (i, (password, bindings)) in cases.into_iter().enumerate() {
        let (ours_binding, theirs_binding) = bindings();
        let mut theirs = ScramSha256::new(password, theirs_binding);
        let first = std::str::from_utf8(theirs.message())
            .expect("utf-8")
            .to_owned();
        // The nonce follows the first ",r=" (a nonce holds no comma but may hold "r=").
        let (_, nonce) = first.split_once(",r=").expect("nonce");
        let nonce = nonce.to_owned();
        let (mut ours, our_first) = Scram::with_nonce("", password, ours_binding, nonce.clone());
        assert_eq!(our_first, first, "case {i}");

        let server_first = format!("r={nonce}SERVERpart,s=c2FsdHktc2FsdA==,i={}", 1000 + i);
        theirs.update(server_first.as_bytes()).expect("theirs");
        let ours_final = ours.client_final(server_first.as_bytes()).expect("ours");
        assert_eq!(
            ours_final.as_bytes(),
            theirs.message(),
            "case {i}: client-final"
        );

        // The signature ours expects is the one theirs accepts.
        let State::Final { server_signature } = &ours.state else {
            panic!("case {i}: not waiting for server-final");
        };
        let server_final = format!("v={}", STANDARD.encode(&server_signature[..]));
        theirs
            .finish(server_final.as_bytes())
            .expect("theirs accepts");
        ours.verify(server_final.as_bytes()).expect("ours accepts");
    }
}

#[test]
fn an_ascii_password_is_used_as_it_is_and_nfkc_is_applied_otherwise() {
    assert_eq!(&saslprep(b"Vault-A1b2")[..], b"Vault-A1b2");
    // U+00A0 (no-break space) maps to a space; U+2168 (ROMAN NUMERAL NINE) to "IX".
    assert_eq!(&saslprep("a\u{a0}b\u{2168}".as_bytes())[..], b"a bIX");
    // Prohibited (a control character) or not UTF-8: the raw bytes.
    assert_eq!(&saslprep(b"a\x07b")[..], b"a\x07b");
    assert_eq!(&saslprep(b"\xff")[..], b"\xff");
}
