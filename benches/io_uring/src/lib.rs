//! Shared code of the experiment's binaries.
pub mod bufring;
pub mod hybrid;
pub mod ring_loop;
pub mod tokio_relay;
