//! relay-hybrid: relay-epoll's code (tokio current_thread, copy_bidirectional), but with
//! both sockets as `hybrid::UringTcp`: tokio's reactor still sleeps, the socket I/O goes
//! through one io_uring ring whose fd tokio polls.
//! usage: relay-hybrid <listen_port> <upstream_port>
use tokio::net::{TcpListener, TcpStream};
use uring_exp::hybrid::{UringTcp, install};

const BUF: usize = 16 * 1024;

fn main() {
    let args: Vec<String> = std::env::args().collect();
    let listen = format!("127.0.0.1:{}", args[1]);
    let upstream = format!("127.0.0.1:{}", args[2]);
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_io()
        .build()
        .expect("runtime");
    let local = tokio::task::LocalSet::new();
    local.block_on(&rt, async move {
        tokio::task::spawn_local(install());
        let l = TcpListener::bind(&listen).await.expect("bind");
        eprintln!("relay-hybrid listening on {listen} -> {upstream}");
        loop {
            let (c, _) = match l.accept().await {
                Ok(x) => x,
                Err(e) => {
                    eprintln!("accept: {e}");
                    continue;
                }
            };
            let upstream = upstream.clone();
            tokio::task::spawn_local(async move {
                let u = match TcpStream::connect(&upstream).await {
                    Ok(u) => u,
                    Err(e) => {
                        eprintln!("connect: {e}");
                        return;
                    }
                };
                let mut c = UringTcp::from_std(c.into_std().expect("std"));
                let mut u = UringTcp::from_std(u.into_std().expect("std"));
                let _ = tokio::io::copy_bidirectional_with_sizes(&mut c, &mut u, BUF, BUF).await;
            });
        }
    });
}
