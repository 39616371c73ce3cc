//! The upstream side of a session: the database entry to connect to, with its TLS connector
//! (`database`, which owns connecting), the client startup parameters allowed through
//! (`params`), logging in with the issued credential (`login`), the stream (`stream`) and the
//! errors (`error`).

pub mod database;
pub mod error;
pub mod login;
pub mod params;
pub mod stream;

pub use database::Database;
pub use error::UpstreamError;
pub use login::{LoggedIn, login};
pub use stream::UpstreamStream;
