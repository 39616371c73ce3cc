//! The upstream side of a session: the database entry to connect to, with its TLS connector
//! (`database`, which owns connecting), the client startup parameters allowed through
//! (`params`), logging in with the issued credential (`login`), the stream (`stream`) and the
//! errors (`error`).

pub(crate) mod database;
pub(crate) mod error;
pub(crate) mod login;
pub mod params;
pub(crate) mod scram;
pub(crate) mod stream;

pub(crate) use database::Database;
pub(crate) use error::UpstreamError;
pub(crate) use login::{LoggedIn, login};
pub(crate) use stream::UpstreamStream;
