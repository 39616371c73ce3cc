//! relay-uring-multi: like relay-uring, but each direction has ONE multishot recv
//! (RecvMulti) armed for its whole life, receiving into a shared provided-buffer ring
//! (256 x 16 KiB). Received buffers are queued per direction and sent in order; a
//! buffer goes back to the ring once it has been sent completely.
//!
//! usage: relay-uring-multi <listen_port> <upstream_port>
//! env URING_SETUP = defer (default) | coop | plain
use io_uring::{IoUring, cqueue, opcode, squeue, types};
use std::collections::VecDeque;
use std::os::fd::{AsRawFd, RawFd};
use uring_exp::bufring::{BufRing, NBUF};

const BGID: u16 = 0;

const K_ACCEPT: u64 = 1;
const K_CONNECT: u64 = 2;
const K_RECV: u64 = 3;
const K_SEND: u64 = 4;

fn ud(slot: usize, kind: u64, dir: usize) -> u64 {
    ((slot as u64) << 8) | (kind << 1) | dir as u64
}

#[derive(Default)]
struct Dir {
    q: VecDeque<(u16, u32, u32)>, // (bid, len, off)
    sending: bool,
    recv_armed: bool,
    eof: bool,
    err: bool,
    done: bool,
}

struct Conn {
    cfd: RawFd,
    ufd: RawFd,
    dirs: [Dir; 2],
}

impl Conn {
    fn src(&self, d: usize) -> RawFd {
        if d == 0 { self.cfd } else { self.ufd }
    }
    fn dst(&self, d: usize) -> RawFd {
        if d == 0 { self.ufd } else { self.cfd }
    }
}

struct State {
    conns: Vec<Option<Box<Conn>>>,
    free: Vec<usize>,
    upstream: libc::sockaddr_in,
    lfd: RawFd,
    br: BufRing,
    starved: Vec<(usize, usize)>,
}

fn push(ring: &mut IoUring, e: squeue::Entry) {
    unsafe {
        while ring.submission().push(&e).is_err() {
            ring.submit().expect("submit (sq full)");
        }
    }
}

fn set_nodelay(fd: RawFd) {
    let one: libc::c_int = 1;
    unsafe {
        libc::setsockopt(
            fd,
            libc::IPPROTO_TCP,
            libc::TCP_NODELAY,
            &one as *const _ as *const libc::c_void,
            std::mem::size_of::<libc::c_int>() as libc::socklen_t,
        );
    }
}

fn push_accept(ring: &mut IoUring, lfd: RawFd) {
    let e = opcode::Accept::new(types::Fd(lfd), std::ptr::null_mut(), std::ptr::null_mut())
        .flags(libc::SOCK_CLOEXEC)
        .build()
        .user_data(ud(0, K_ACCEPT, 0));
    push(ring, e);
}

fn arm_recv(ring: &mut IoUring, slot: usize, c: &mut Conn, d: usize) {
    let e = opcode::RecvMulti::new(types::Fd(c.src(d)), BGID)
        .build()
        .user_data(ud(slot, K_RECV, d));
    c.dirs[d].recv_armed = true;
    push(ring, e);
}

fn push_send(ring: &mut IoUring, br: &BufRing, slot: usize, c: &mut Conn, d: usize) {
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
    let c = st.conns[slot].as_mut().unwrap();
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
        unsafe {
            libc::close(c.cfd);
            libc::close(c.ufd);
        }
        st.conns[slot] = None;
        st.free.push(slot);
    }
}

fn set_err(c: &mut Conn, d: usize) {
    c.dirs[d].err = true;
    unsafe {
        libc::shutdown(c.cfd, libc::SHUT_RDWR);
        libc::shutdown(c.ufd, libc::SHUT_RDWR);
    }
}

fn handle(ring: &mut IoUring, st: &mut State, user_data: u64, res: i32, flags: u32) {
    let kind = (user_data >> 1) & 0x7f;
    let d = (user_data & 1) as usize;
    let slot = (user_data >> 8) as usize;
    match kind {
        K_ACCEPT => {
            push_accept(ring, st.lfd);
            if res < 0 {
                eprintln!("accept: {}", std::io::Error::from_raw_os_error(-res));
                return;
            }
            let cfd = res;
            let ufd =
                unsafe { libc::socket(libc::AF_INET, libc::SOCK_STREAM | libc::SOCK_CLOEXEC, 0) };
            if ufd < 0 {
                unsafe { libc::close(cfd) };
                return;
            }
            let conn = Box::new(Conn {
                cfd,
                ufd,
                dirs: [Dir::default(), Dir::default()],
            });
            let slot = match st.free.pop() {
                Some(s) => {
                    st.conns[s] = Some(conn);
                    s
                }
                None => {
                    st.conns.push(Some(conn));
                    st.conns.len() - 1
                }
            };
            let e = opcode::Connect::new(
                types::Fd(ufd),
                &st.upstream as *const libc::sockaddr_in as *const libc::sockaddr,
                std::mem::size_of::<libc::sockaddr_in>() as libc::socklen_t,
            )
            .build()
            .user_data(ud(slot, K_CONNECT, 0));
            push(ring, e);
        }
        K_CONNECT => {
            if res < 0 {
                eprintln!("connect: {}", std::io::Error::from_raw_os_error(-res));
                let c = st.conns[slot].take().unwrap();
                unsafe {
                    libc::close(c.cfd);
                    libc::close(c.ufd);
                }
                st.free.push(slot);
                return;
            }
            let c = st.conns[slot].as_mut().unwrap();
            set_nodelay(c.cfd);
            set_nodelay(c.ufd);
            arm_recv(ring, slot, c, 0);
            arm_recv(ring, slot, c, 1);
        }
        K_RECV => {
            let c = st.conns[slot].as_mut().unwrap();
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
            let c = st.conns[slot].as_mut().unwrap();
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
                        if let Some(cc) = st.conns[s].as_mut() {
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
    let args: Vec<String> = std::env::args().collect();
    let lport: u16 = args[1].parse().expect("listen port");
    let uport: u16 = args[2].parse().expect("upstream port");
    let setup = std::env::var("URING_SETUP").unwrap_or_else(|_| "defer".into());

    let mut b = IoUring::builder();
    match setup.as_str() {
        "defer" => {
            b.setup_single_issuer().setup_defer_taskrun();
        }
        "coop" => {
            b.setup_coop_taskrun().setup_taskrun_flag();
        }
        "plain" => {}
        other => panic!("URING_SETUP={other}?"),
    }
    let mut ring: IoUring = b.setup_cqsize(4096).build(256).expect("io_uring setup");

    let br = BufRing::new(true);
    unsafe {
        ring.submitter()
            .register_buf_ring_with_flags(br.ring_addr(), NBUF as u16, BGID, 0)
            .expect("register_buf_ring");
    }

    let listener = std::net::TcpListener::bind(("127.0.0.1", lport)).expect("bind");
    let lfd = listener.as_raw_fd();
    let upstream = libc::sockaddr_in {
        sin_family: libc::AF_INET as libc::sa_family_t,
        sin_port: uport.to_be(),
        sin_addr: libc::in_addr {
            s_addr: u32::from_be_bytes([127, 0, 0, 1]).to_be(),
        },
        sin_zero: [0; 8],
    };
    let mut st = State {
        conns: Vec::new(),
        free: Vec::new(),
        upstream,
        lfd,
        br,
        starved: Vec::new(),
    };
    eprintln!("relay-uring-multi ({setup}) listening on 127.0.0.1:{lport} -> 127.0.0.1:{uport}");

    push_accept(&mut ring, lfd);
    let mut cqes: Vec<(u64, i32, u32)> = Vec::with_capacity(4096);
    loop {
        match ring.submit_and_wait(1) {
            Ok(_) => {}
            Err(e) if e.raw_os_error() == Some(libc::EINTR) => continue,
            Err(e) if e.raw_os_error() == Some(libc::EBUSY) => {}
            Err(e) => panic!("submit_and_wait: {e}"),
        }
        loop {
            cqes.clear();
            cqes.extend(
                ring.completion()
                    .map(|c| (c.user_data(), c.result(), c.flags())),
            );
            if cqes.is_empty() {
                break;
            }
            for &(u, r, f) in cqes.iter() {
                handle(&mut ring, &mut st, u, r, f);
            }
        }
    }
}
