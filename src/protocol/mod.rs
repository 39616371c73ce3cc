//! PostgreSQL wire protocol pieces leasegate speaks itself: the packets a client sends before
//! authentication (`startup`), startup parameter values as PostgreSQL reads them (`options`),
//! and the few messages leasegate writes to clients (`messages`). Everything after login is
//! relayed as bytes; `framing` only tracks message boundaries.

pub mod framing;
pub mod messages;
pub mod options;
pub mod startup;
