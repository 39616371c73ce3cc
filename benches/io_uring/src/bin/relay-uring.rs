//! relay-uring: plaintext TCP relay on one thread and one io_uring ring.
//!
//! usage: relay-uring <listen_port> <upstream_port>
//! env URING_SETUP = defer (default: SINGLE_ISSUER|DEFER_TASKRUN) | coop (COOP_TASKRUN) | plain
//!
//! Per connection: one Accept -> socket() + Connect -> per direction a loop of
//! Recv(into the direction's 16 KiB buffer) then Send(what was received, resubmitting
//! on short sends). Exactly one op is in flight per direction at any time.
//! The loop is submit_and_wait(1), then drain every completion (of all sessions)
//! before the next submit.
use io_uring::{IoUring, opcode, types};
use uring_exp::ring_loop::{
    Conn, Conns, K_ACCEPT, K_CONNECT, K_RECV, K_SEND, Relay, decode, push, ud,
};

const BUF: usize = 16 * 1024;

struct Dir {
    buf: Box<[u8]>,
    len: usize,
    off: usize,
    done: bool,
}

fn new_dir() -> Dir {
    Dir {
        buf: vec![0u8; BUF].into_boxed_slice(),
        len: 0,
        off: 0,
        done: false,
    }
}

fn push_recv(ring: &mut IoUring, slot: usize, c: &mut Conn<Dir>, d: usize) {
    let fd = c.src(d);
    let dir = &mut c.dirs[d];
    let e = opcode::Recv::new(types::Fd(fd), dir.buf.as_mut_ptr(), BUF as u32)
        .build()
        .user_data(ud(slot, K_RECV, d));
    push(ring, e);
}

fn push_send(ring: &mut IoUring, slot: usize, c: &mut Conn<Dir>, d: usize) {
    let fd = c.dst(d);
    let dir = &c.dirs[d];
    let p = unsafe { dir.buf.as_ptr().add(dir.off) };
    let e = opcode::Send::new(types::Fd(fd), p, (dir.len - dir.off) as u32)
        .flags(libc::MSG_NOSIGNAL)
        .build()
        .user_data(ud(slot, K_SEND, d));
    push(ring, e);
}

/// Direction `d` is finished (EOF or error). Propagate and free the slot when both are.
fn finish_dir(conns: &mut Conns<Dir>, slot: usize, d: usize, err: bool) {
    let c = conns.get(slot);
    c.dirs[d].done = true;
    unsafe {
        if err {
            libc::shutdown(c.cfd, libc::SHUT_RDWR);
            libc::shutdown(c.ufd, libc::SHUT_RDWR);
        } else {
            libc::shutdown(c.dst(d), libc::SHUT_WR);
        }
    }
    if c.dirs[0].done && c.dirs[1].done {
        conns.close(slot);
    }
}

fn handle(relay: &mut Relay, conns: &mut Conns<Dir>, user_data: u64, res: i32) {
    let (kind, d, slot) = decode(user_data);
    let ring = &mut relay.ring;
    match kind {
        K_CONNECT => {
            if Relay::connected(res, conns, slot) {
                let c = conns.get(slot);
                push_recv(ring, slot, c, 0);
                push_recv(ring, slot, c, 1);
            }
        }
        K_RECV => {
            if res == -libc::EINTR || res == -libc::EAGAIN {
                push_recv(ring, slot, conns.get(slot), d);
            } else if res <= 0 {
                finish_dir(conns, slot, d, res < 0);
            } else {
                let c = conns.get(slot);
                c.dirs[d].len = res as usize;
                c.dirs[d].off = 0;
                push_send(ring, slot, c, d);
            }
        }
        K_SEND => {
            if res == -libc::EINTR || res == -libc::EAGAIN {
                push_send(ring, slot, conns.get(slot), d);
            } else if res < 0 {
                finish_dir(conns, slot, d, true);
            } else {
                let c = conns.get(slot);
                c.dirs[d].off += res as usize;
                if c.dirs[d].off < c.dirs[d].len {
                    push_send(ring, slot, c, d); // short send: send the rest
                } else {
                    push_recv(ring, slot, c, d);
                }
            }
        }
        K_ACCEPT => relay.accepted(res, conns, || [new_dir(), new_dir()]),
        _ => unreachable!("bad user_data {user_data:#x}"),
    }
}

fn main() {
    let relay = Relay::from_args("relay-uring", 1024);
    let mut conns = Conns::new();
    relay.run(|relay, u, r, _| handle(relay, &mut conns, u, r));
}
