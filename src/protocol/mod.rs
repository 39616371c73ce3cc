//! PostgreSQL wire protocol pieces leasegate speaks itself: the packets a client sends before
//! authentication (`startup`), startup parameter values as PostgreSQL reads them (`options`),
//! the few messages leasegate writes to clients (`messages`) and their SQLSTATEs (`sqlstate`).
//! Everything after login is relayed as bytes; `framing` only tracks message boundaries.

pub mod framing;
pub(crate) mod messages;
pub mod options;
pub(crate) mod sqlstate;
pub mod startup;
