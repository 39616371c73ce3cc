//! relay-epoll: plaintext TCP relay on a tokio current_thread runtime (epoll).
//! usage: relay-epoll <listen_port> <upstream_port>
fn main() {
    uring_exp::tokio_relay::run("relay-epoll", false);
}
