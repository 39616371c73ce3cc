//! Free loopback TCP ports. A port is free when the kernel hands it out for `127.0.0.1:0`;
//! it is not held afterwards, so the same process never hands one out twice.

use std::net::TcpListener;
use std::sync::Mutex;

use crate::{Context, Error, Result};

/// Every port this process has handed out, so two servers started by one process never get
/// the same one.
static HANDED_OUT: Mutex<Vec<u16>> = Mutex::new(Vec::new());

/// A loopback TCP port that was free a moment ago and has not been handed out before by
/// this process.
pub fn free_port() -> Result<u16> {
    for _ in 0..100 {
        let port = ephemeral()?;
        if claim(port) {
            return Ok(port);
        }
    }
    Err(Error::new("no free loopback port found"))
}

/// A free port P whose neighbour P+1 is free too (an OpenBao server binds its cluster
/// listener at P+1); both are claimed.
pub fn free_pair() -> Result<u16> {
    for _ in 0..100 {
        let port = ephemeral()?;
        let Some(next) = port.checked_add(1) else {
            continue;
        };
        if TcpListener::bind(("127.0.0.1", next)).is_err() {
            continue;
        }
        let mut seen = HANDED_OUT.lock().unwrap_or_else(|p| p.into_inner());
        if !seen.contains(&port) && !seen.contains(&next) {
            seen.extend([port, next]);
            return Ok(port);
        }
    }
    Err(Error::new("no pair of adjacent free loopback ports found"))
}

fn ephemeral() -> Result<u16> {
    TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .map(|a| a.port())
        .context(|| "bind an ephemeral loopback port".into())
}

fn claim(port: u16) -> bool {
    let mut seen = HANDED_OUT.lock().unwrap_or_else(|p| p.into_inner());
    if seen.contains(&port) {
        return false;
    }
    seen.push(port);
    true
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ports_are_never_handed_out_twice() {
        let mut ports: Vec<u16> = (0..20).map(|_| free_port().unwrap()).collect();
        ports.push(free_pair().unwrap());
        let pair = *ports.last().unwrap();
        ports.push(pair + 1);
        let mut unique = ports.clone();
        unique.sort_unstable();
        unique.dedup();
        assert_eq!(unique.len(), ports.len(), "{ports:?}");
    }
}
