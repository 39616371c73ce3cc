//! Shared code of the experiment's binaries.
pub mod hybrid;
