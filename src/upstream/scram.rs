//! The client side of SCRAM-SHA-256 and SCRAM-SHA-256-PLUS (RFC 5802, RFC 7677) for the
//! upstream login. The message flow is small; what matters is done by well-kept code:
//! PBKDF2, HMAC and SHA-256 by aws-lc (the TLS library's own crypto), SASLprep by
//! `stringprep`. Every session logs in once with a fresh password, so the 4,096-round PBKDF2
//! is paid on every session setup: aws-lc keys the HMAC once for all rounds (two SHA-256
//! blocks a round, where re-keying each round costs four). The password, the salted password
//! and the keys derived from it are zeroized when dropped.
//!
//! A hostile or broken server cannot make it loop: the iteration count is capped, the nonce
//! must extend the client's, and the login is believed only once the server's signature
//! (proof that it knows the password too) checks out, compared in constant time.

use std::num::NonZeroU32;

use aws_lc_rs::{constant_time, digest, hmac, pbkdf2};
use base64::Engine;
use base64::engine::general_purpose::STANDARD;
use zeroize::Zeroizing;

/// The most PBKDF2 rounds a server may ask for (PostgreSQL's default is 4,096): more would let
/// a server burn a core per login.
pub(crate) const MAX_ITERATIONS: u32 = 100_000;
/// Length of the client nonce, printable characters.
const NONCE_LEN: usize = 24;

/// Why a SCRAM exchange failed (the server's fault, or a wrong password).
#[derive(Debug, thiserror::Error)]
pub(crate) enum ScramError {
    /// A server message that is not what RFC 5802 says it must be.
    #[error("malformed SCRAM {0} message")]
    Malformed(&'static str),
    /// The server's nonce does not extend the client's.
    #[error("the server's SCRAM nonce does not extend the client's")]
    Nonce,
    /// The server asked for more rounds than [`MAX_ITERATIONS`].
    #[error("the server asked for {0} SCRAM iterations (at most {MAX_ITERATIONS} are accepted)")]
    Iterations(u32),
    /// The server-final message carried `e=`.
    #[error("the server ended SCRAM: {0}")]
    Server(String),
    /// The server's signature is wrong: it does not know the password.
    #[error("the server's SCRAM signature is invalid")]
    Signature,
    /// A message arrived in the wrong order.
    #[error("SCRAM message out of order")]
    State,
}

/// Channel binding, as the GS2 header says it.
pub(crate) enum Binding {
    /// The client cannot bind (plaintext connection): `n`.
    Unsupported,
    /// The client could bind but the server did not offer `-PLUS`: `y`.
    Unrequested,
    /// `tls-server-end-point` with this hash of the server's certificate: `p=`.
    EndPoint(Vec<u8>),
}

impl Binding {
    /// The GS2 header that starts the client-first message.
    fn gs2_header(&self) -> &'static str {
        match self {
            Binding::Unsupported => "n,,",
            Binding::Unrequested => "y,,",
            Binding::EndPoint(_) => "p=tls-server-end-point,,",
        }
    }

    /// The `c=` attribute: the header and the binding data, base64.
    fn attribute(&self) -> String {
        let mut input = self.gs2_header().as_bytes().to_vec();
        if let Binding::EndPoint(hash) = self {
            input.extend_from_slice(hash);
        }
        STANDARD.encode(input)
    }
}

/// Where the exchange is.
enum State {
    /// Client-first sent; waiting for server-first.
    First {
        /// The client's nonce.
        nonce: String,
        /// The password after SASLprep.
        password: Zeroizing<Vec<u8>>,
        /// What the GS2 header announced.
        binding: Binding,
    },
    /// Client-final sent; waiting for server-final.
    Final {
        /// What the server's final message must carry.
        server_signature: Zeroizing<[u8; 32]>,
    },
    /// Over (verified or failed).
    Done,
}

/// One SCRAM exchange: [`Scram::start`], [`Scram::client_final`], [`Scram::verify`].
pub(crate) struct Scram {
    /// Where the exchange is.
    state: State,
    /// The client-first message without its GS2 header (part of the signed AuthMessage).
    first_bare: String,
}

impl Scram {
    /// Starts an exchange: the state and the client-first message to send.
    pub(crate) fn start(password: &[u8], binding: Binding) -> (Scram, String) {
        use rand::RngExt;
        let mut rng = rand::rng();
        let nonce: String = (0..NONCE_LEN)
            .map(|_| match rng.random_range(0x21u8..0x7f) {
                // ',' separates attributes: not allowed in a nonce.
                b',' => '~',
                c => c as char,
            })
            .collect();
        Scram::with_nonce("", password, binding, nonce)
    }

    /// [`Scram::start`] with a given user name (PostgreSQL ignores it: empty) and nonce.
    fn with_nonce(user: &str, password: &[u8], binding: Binding, nonce: String) -> (Scram, String) {
        let first_bare = format!("n={user},r={nonce}");
        let first = format!("{}{first_bare}", binding.gs2_header());
        let state = State::First {
            nonce,
            password: saslprep(password),
            binding,
        };
        (Scram { state, first_bare }, first)
    }

    /// The client-final message for the server-first message `server_first`. Runs PBKDF2:
    /// call it off the async threads.
    pub(crate) fn client_final(&mut self, server_first: &[u8]) -> Result<String, ScramError> {
        let State::First {
            nonce,
            password,
            binding,
        } = std::mem::replace(&mut self.state, State::Done)
        else {
            return Err(ScramError::State);
        };
        let server_first =
            std::str::from_utf8(server_first).map_err(|_| ScramError::Malformed("server-first"))?;
        let first = ServerFirst::parse(server_first)?;
        if !first.nonce.starts_with(&nonce) || first.nonce.len() == nonce.len() {
            return Err(ScramError::Nonce);
        }
        let rounds = NonZeroU32::new(first.iterations)
            .filter(|n| n.get() <= MAX_ITERATIONS)
            .ok_or(ScramError::Iterations(first.iterations))?;

        let mut salted = Zeroizing::new([0u8; 32]);
        pbkdf2::derive(
            pbkdf2::PBKDF2_HMAC_SHA256,
            rounds,
            &first.salt,
            &password,
            &mut salted[..],
        );
        let salted_key = hmac::Key::new(hmac::HMAC_SHA256, &salted[..]);
        let client_key = Zeroizing::new(tag(&salted_key, b"Client Key"));
        let stored_key = digest::digest(&digest::SHA256, &client_key[..]);

        let without_proof = format!("c={},r={}", binding.attribute(), first.nonce);
        let auth_message = format!("{},{server_first},{without_proof}", self.first_bare);
        let stored = hmac::Key::new(hmac::HMAC_SHA256, stored_key.as_ref());
        let signature = tag(&stored, auth_message.as_bytes());
        let mut proof = Zeroizing::new(*client_key);
        for (p, s) in proof.iter_mut().zip(signature) {
            *p ^= s;
        }

        let server_key = Zeroizing::new(tag(&salted_key, b"Server Key"));
        let server = hmac::Key::new(hmac::HMAC_SHA256, &server_key[..]);
        self.state = State::Final {
            server_signature: Zeroizing::new(tag(&server, auth_message.as_bytes())),
        };
        Ok(format!("{without_proof},p={}", STANDARD.encode(&proof[..])))
    }

    /// Checks the server-final message: `Ok` only when the server proved it knows the
    /// password.
    pub(crate) fn verify(&mut self, server_final: &[u8]) -> Result<(), ScramError> {
        let State::Final { server_signature } = std::mem::replace(&mut self.state, State::Done)
        else {
            return Err(ScramError::State);
        };
        let text =
            std::str::from_utf8(server_final).map_err(|_| ScramError::Malformed("server-final"))?;
        // Extensions may follow the verifier: only the first attribute counts.
        let first = text.split(',').next().unwrap_or_default();
        if let Some(error) = first.strip_prefix("e=") {
            return Err(ScramError::Server(error.chars().take(100).collect()));
        }
        let verifier = first
            .strip_prefix("v=")
            .and_then(|v| STANDARD.decode(v).ok())
            .ok_or(ScramError::Malformed("server-final"))?;
        constant_time::verify_slices_are_equal(&verifier, &server_signature[..])
            .map_err(|_| ScramError::Signature)
    }
}

/// HMAC-SHA-256 of `data` under `key`.
fn tag(key: &hmac::Key, data: &[u8]) -> [u8; 32] {
    let mut out = [0u8; 32];
    out.copy_from_slice(hmac::sign(key, data).as_ref());
    out
}

/// The password as PostgreSQL hashes it: SASLprep when the password is valid UTF-8 and
/// SASLprep accepts it, the bytes as they are otherwise (PostgreSQL does the same).
fn saslprep(password: &[u8]) -> Zeroizing<Vec<u8>> {
    use std::borrow::Cow;
    let prepared = std::str::from_utf8(password)
        .ok()
        .and_then(|p| stringprep::saslprep(p).ok());
    Zeroizing::new(match prepared {
        // A mapped password is a new string: moved, not copied, so the one copy is zeroized.
        Some(Cow::Owned(mapped)) => mapped.into_bytes(),
        Some(Cow::Borrowed(same)) => same.as_bytes().to_vec(),
        None => password.to_vec(),
    })
}

/// The attributes of a server-first message.
struct ServerFirst<'a> {
    /// The client's nonce and the server's.
    nonce: &'a str,
    /// The salt, decoded.
    salt: Vec<u8>,
    /// PBKDF2 rounds.
    iterations: u32,
}

impl<'a> ServerFirst<'a> {
    /// `r=…,s=…,i=…` in this order, optional extensions after (a mandatory `m=` first is
    /// refused: none is defined).
    fn parse(message: &'a str) -> Result<Self, ScramError> {
        let bad = ScramError::Malformed("server-first");
        let mut attrs = message.split(',');
        let mut next = |name: &str| {
            attrs
                .next()
                .and_then(|a| a.strip_prefix(name))
                .filter(|v| !v.is_empty())
        };
        let nonce = next("r=").ok_or(ScramError::Malformed("server-first"))?;
        let salt = next("s=")
            .and_then(|s| STANDARD.decode(s).ok())
            .ok_or(ScramError::Malformed("server-first"))?;
        let iterations = next("i=").and_then(|i| i.parse::<u32>().ok()).ok_or(bad)?;
        if !nonce.bytes().all(|c| (0x21..0x7f).contains(&c)) {
            return Err(ScramError::Malformed("server-first"));
        }
        Ok(ServerFirst {
            nonce,
            salt,
            iterations,
        })
    }
}

#[cfg(test)]
#[path = "scram_tests.rs"]
mod tests;
