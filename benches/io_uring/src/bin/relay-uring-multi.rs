//! relay-uring-multi: like relay-uring, but each direction has ONE multishot recv
//! (RecvMulti) armed for its whole life, receiving into a shared provided-buffer ring
//! (256 x 16 KiB). Received buffers are queued per direction and sent in order; a
//! buffer goes back to the ring once it has been sent completely.
//!
//! usage: relay-uring-multi <listen_port> <upstream_port>
//! env URING_SETUP = defer (default) | coop | plain
use io_uring::{IoUring, cqueue, opcode, types};
use std::collections::VecDeque;
use uring_exp::bufring::{BufRing, NBUF};
use uring_exp::ring_loop::{
    Conn, Conns, K_ACCEPT, K_CONNECT, K_RECV, K_SEND, Relay, decode, push, ud,
};

const BGID: u16 = 0;

#[derive(Default)]
struct Dir {
    q: VecDeque<(u16, u32, u32)>, // (bid, len, off)
    sending: bool,
    recv_armed: bool,
    eof: bool,
    err: bool,
    done: bool,
}

struct State {
    conns: Conns<Dir>,
    br: BufRing,
    starved: Vec<(usize, usize)>,
}

fn arm_recv(ring: &mut IoUring, slot: usize, c: &mut Conn<Dir>, d: usize) {
    let e = opcode::RecvMulti::new(types::Fd(c.src(d)), BGID)
        .build()
        .user_data(ud(slot, K_RECV, d));
    c.dirs[d].recv_armed = true;
    push(ring, e);
}

fn push_send(ring: &mut IoUring, br: &BufRing, slot: usize, c: &mut Conn<Dir>, d: usize) {
    let fd = c.dst(d);
    let &(bid, len, off) = c.dirs[d].q.front().unwrap();
    let p = unsafe { br.ptr(bid).add(off as usize) };
    let e = opcode::Send::new(types::Fd(fd), p, len - off)
        .flags(libc::MSG_NOSIGNAL)
        .build()
        .user_data(ud(slot, K_SEND, d));
    c.dirs[d].sending = true;
    push(ring, e);
}

/// Called after every event of direction d: finish it when nothing is in flight.
fn maybe_finish(st: &mut State, slot: usize, d: usize) {
    let c = st.conns.get(slot);
    let dir = &mut c.dirs[d];
    if dir.done || dir.sending || dir.recv_armed {
        return;
    }
    if dir.err {
        let mut recycled = false;
        while let Some((bid, _, _)) = dir.q.pop_front() {
            st.br.put(bid);
            recycled = true;
        }
        if recycled {
            st.br.publish();
        }
    } else if !(dir.eof && dir.q.is_empty()) {
        return;
    }
    dir.done = true;
    if !dir.err {
        unsafe { libc::shutdown(c.dst(d), libc::SHUT_WR) };
    }
    if c.dirs[0].done && c.dirs[1].done {
        st.conns.close(slot);
    }
}

fn set_err(c: &mut Conn<Dir>, d: usize) {
    c.dirs[d].err = true;
    unsafe {
        libc::shutdown(c.cfd, libc::SHUT_RDWR);
        libc::shutdown(c.ufd, libc::SHUT_RDWR);
    }
}

fn handle(relay: &mut Relay, st: &mut State, user_data: u64, res: i32, flags: u32) {
    let (kind, d, slot) = decode(user_data);
    let ring = &mut relay.ring;
    match kind {
        K_ACCEPT => relay.accepted(res, &mut st.conns, || [Dir::default(), Dir::default()]),
        K_CONNECT => {
            if Relay::connected(res, &mut st.conns, slot) {
                let c = st.conns.get(slot);
                arm_recv(ring, slot, c, 0);
                arm_recv(ring, slot, c, 1);
            }
        }
        K_RECV => {
            let c = st.conns.get(slot);
            let more = cqueue::more(flags);
            if !more {
                c.dirs[d].recv_armed = false;
            }
            if res > 0 {
                let bid = cqueue::buffer_select(flags).expect("recv without buffer");
                if c.dirs[d].err || c.dirs[d].done {
                    st.br.put(bid);
                    st.br.publish();
                } else {
                    c.dirs[d].q.push_back((bid, res as u32, 0));
                    if !c.dirs[d].sending {
                        push_send(ring, &st.br, slot, c, d);
                    }
                    if !more && !c.dirs[d].eof {
                        arm_recv(ring, slot, c, d); // multishot ended (e.g. CQ pressure): re-arm
                    }
                }
            } else if res == -libc::ENOBUFS {
                st.starved.push((slot, d));
            } else if res == -libc::EINTR || res == -libc::EAGAIN {
                if !more {
                    arm_recv(ring, slot, c, d);
                }
            } else if res == 0 {
                c.dirs[d].eof = true;
            } else {
                set_err(c, d);
            }
            maybe_finish(st, slot, d);
        }
        K_SEND => {
            let c = st.conns.get(slot);
            c.dirs[d].sending = false;
            if res == -libc::EINTR || res == -libc::EAGAIN {
                push_send(ring, &st.br, slot, c, d);
            } else if res < 0 {
                set_err(c, d);
            } else if !c.dirs[d].err {
                let head = c.dirs[d].q.front_mut().unwrap();
                head.2 += res as u32;
                if head.2 < head.1 {
                    push_send(ring, &st.br, slot, c, d); // short send: the rest
                } else {
                    let (bid, _, _) = c.dirs[d].q.pop_front().unwrap();
                    st.br.put(bid);
                    st.br.publish();
                    if !c.dirs[d].q.is_empty() {
                        push_send(ring, &st.br, slot, c, d);
                    }
                    // a buffer came back: re-arm starved directions
                    let starved = std::mem::take(&mut st.starved);
                    for (s, dd) in starved {
                        if let Some(cc) = st.conns.slots[s].as_mut() {
                            let dir = &cc.dirs[dd];
                            if !dir.recv_armed && !dir.eof && !dir.err && !dir.done {
                                arm_recv(ring, s, cc, dd);
                            }
                        }
                    }
                }
            }
            maybe_finish(st, slot, d);
        }
        _ => unreachable!("bad user_data {user_data:#x}"),
    }
}

fn main() {
    let relay = Relay::from_args("relay-uring-multi", 4096);
    let br = BufRing::new(true);
    unsafe {
        relay
            .ring
            .submitter()
            .register_buf_ring_with_flags(br.ring_addr(), NBUF as u16, BGID, 0)
            .expect("register_buf_ring");
    }
    let mut st = State {
        conns: Conns::new(),
        br,
        starved: Vec::new(),
    };
    relay.run(|relay, u, r, f| handle(relay, &mut st, u, r, f));
}
