//! relay-epoll: plaintext TCP relay on a tokio current_thread runtime (epoll).
//! usage: relay-epoll <listen_port> <upstream_port>
use tokio::net::{TcpListener, TcpStream};

const BUF: usize = 16 * 1024;

fn main() {
    let args: Vec<String> = std::env::args().collect();
    let listen = format!("127.0.0.1:{}", args[1]);
    let upstream = format!("127.0.0.1:{}", args[2]);
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_io()
        .build()
        .expect("runtime");
    rt.block_on(async move {
        let l = TcpListener::bind(&listen).await.expect("bind");
        eprintln!("relay-epoll listening on {listen} -> {upstream}");
        loop {
            let (mut c, _) = match l.accept().await {
                Ok(x) => x,
                Err(e) => {
                    eprintln!("accept: {e}");
                    continue;
                }
            };
            let upstream = upstream.clone();
            tokio::spawn(async move {
                let mut u = match TcpStream::connect(&upstream).await {
                    Ok(u) => u,
                    Err(e) => {
                        eprintln!("connect: {e}");
                        return;
                    }
                };
                let _ = c.set_nodelay(true);
                let _ = u.set_nodelay(true);
                let _ = tokio::io::copy_bidirectional_with_sizes(&mut c, &mut u, BUF, BUF).await;
            });
        }
    });
}
