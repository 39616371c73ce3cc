//! relay-hybrid: relay-epoll's code (tokio current_thread, copy_bidirectional), but with
//! both sockets as `hybrid::UringTcp`: tokio's reactor still sleeps, the socket I/O goes
//! through one io_uring ring whose fd tokio polls.
//! usage: relay-hybrid <listen_port> <upstream_port>
fn main() {
    uring_exp::tokio_relay::run("relay-hybrid", true);
}
