//! The tokio `current_thread` relay `relay-epoll` and `relay-hybrid` share: one task per
//! connection, `copy_bidirectional_with_sizes` (16 KiB), `TCP_NODELAY` on both sockets; with
//! `uring`, both sockets become `hybrid::UringTcp`.
use tokio::net::{TcpListener, TcpStream};

use crate::hybrid::{UringTcp, install};

const BUF: usize = 16 * 1024;

/// Runs the relay from `127.0.0.1:<args[1]>` to `127.0.0.1:<args[2]>` for ever.
pub fn run(name: &str, uring: bool) {
    let args: Vec<String> = std::env::args().collect();
    let listen = format!("127.0.0.1:{}", args[1]);
    let upstream = format!("127.0.0.1:{}", args[2]);
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_io()
        .build()
        .expect("runtime");
    let serve = async move {
        if uring {
            tokio::task::spawn_local(install());
        }
        let l = TcpListener::bind(&listen).await.expect("bind");
        eprintln!("{name} listening on {listen} -> {upstream}");
        loop {
            let (c, _) = match l.accept().await {
                Ok(x) => x,
                Err(e) => {
                    eprintln!("accept: {e}");
                    continue;
                }
            };
            let upstream = upstream.clone();
            let session = async move {
                let u = match TcpStream::connect(&upstream).await {
                    Ok(u) => u,
                    Err(e) => {
                        eprintln!("connect: {e}");
                        return;
                    }
                };
                let _ = c.set_nodelay(true);
                let _ = u.set_nodelay(true);
                if uring {
                    let mut c = UringTcp::from_std(c.into_std().expect("std"));
                    let mut u = UringTcp::from_std(u.into_std().expect("std"));
                    let _ =
                        tokio::io::copy_bidirectional_with_sizes(&mut c, &mut u, BUF, BUF).await;
                } else {
                    let (mut c, mut u) = (c, u);
                    let _ =
                        tokio::io::copy_bidirectional_with_sizes(&mut c, &mut u, BUF, BUF).await;
                }
            };
            // As measured: the hybrid's sessions are local tasks beside its ring driver,
            // epoll's are plain runtime tasks.
            if uring {
                tokio::task::spawn_local(session);
            } else {
                tokio::spawn(session);
            }
        }
    };
    if uring {
        tokio::task::LocalSet::new().block_on(&rt, serve);
    } else {
        rt.block_on(serve);
    }
}
