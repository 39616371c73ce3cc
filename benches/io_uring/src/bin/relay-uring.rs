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
use io_uring::{IoUring, opcode, squeue, types};
use std::os::fd::{AsRawFd, RawFd};

const BUF: usize = 16 * 1024;

const K_ACCEPT: u64 = 1;
const K_CONNECT: u64 = 2;
const K_RECV: u64 = 3;
const K_SEND: u64 = 4;

fn ud(slot: usize, kind: u64, dir: usize) -> u64 {
    ((slot as u64) << 8) | (kind << 1) | dir as u64
}

struct Dir {
    buf: Box<[u8]>,
    len: usize,
    off: usize,
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

fn push_accept(ring: &mut IoUring, st: &State) {
    let e = opcode::Accept::new(
        types::Fd(st.lfd),
        std::ptr::null_mut(),
        std::ptr::null_mut(),
    )
    .flags(libc::SOCK_CLOEXEC)
    .build()
    .user_data(ud(0, K_ACCEPT, 0));
    push(ring, e);
}

fn push_recv(ring: &mut IoUring, slot: usize, c: &mut Conn, d: usize) {
    let fd = c.src(d);
    let dir = &mut c.dirs[d];
    let e = opcode::Recv::new(types::Fd(fd), dir.buf.as_mut_ptr(), BUF as u32)
        .build()
        .user_data(ud(slot, K_RECV, d));
    push(ring, e);
}

fn push_send(ring: &mut IoUring, slot: usize, c: &mut Conn, d: usize) {
    let fd = c.dst(d);
    let dir = &c.dirs[d];
    let p = unsafe { dir.buf.as_ptr().add(dir.off) };
    let e = opcode::Send::new(types::Fd(fd), p, (dir.len - dir.off) as u32)
        .flags(libc::MSG_NOSIGNAL)
        .build()
        .user_data(ud(slot, K_SEND, d));
    push(ring, e);
}

fn free_slot(st: &mut State, slot: usize) {
    if let Some(c) = st.conns[slot].take() {
        unsafe {
            libc::close(c.cfd);
            libc::close(c.ufd);
        }
    }
    st.free.push(slot);
}

/// Direction `d` is finished (EOF or error). Propagate and free the slot when both are.
fn finish_dir(st: &mut State, slot: usize, d: usize, err: bool) {
    let c = st.conns[slot].as_mut().unwrap();
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
        free_slot(st, slot);
    }
}

fn new_dir() -> Dir {
    Dir {
        buf: vec![0u8; BUF].into_boxed_slice(),
        len: 0,
        off: 0,
        done: false,
    }
}

fn handle(ring: &mut IoUring, st: &mut State, user_data: u64, res: i32) {
    let kind = (user_data >> 1) & 0x7f;
    let d = (user_data & 1) as usize;
    let slot = (user_data >> 8) as usize;
    match kind {
        K_ACCEPT => {
            push_accept(ring, st);
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
                dirs: [new_dir(), new_dir()],
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
                free_slot(st, slot);
                return;
            }
            let c = st.conns[slot].as_mut().unwrap();
            set_nodelay(c.cfd);
            set_nodelay(c.ufd);
            push_recv(ring, slot, c, 0);
            push_recv(ring, slot, c, 1);
        }
        K_RECV => {
            if res == -libc::EINTR || res == -libc::EAGAIN {
                let c = st.conns[slot].as_mut().unwrap();
                push_recv(ring, slot, c, d);
            } else if res <= 0 {
                finish_dir(st, slot, d, res < 0);
            } else {
                let c = st.conns[slot].as_mut().unwrap();
                c.dirs[d].len = res as usize;
                c.dirs[d].off = 0;
                push_send(ring, slot, c, d);
            }
        }
        K_SEND => {
            if res == -libc::EINTR || res == -libc::EAGAIN {
                let c = st.conns[slot].as_mut().unwrap();
                push_send(ring, slot, c, d);
            } else if res < 0 {
                finish_dir(st, slot, d, true);
            } else {
                let c = st.conns[slot].as_mut().unwrap();
                c.dirs[d].off += res as usize;
                if c.dirs[d].off < c.dirs[d].len {
                    push_send(ring, slot, c, d); // short send: send the rest
                } else {
                    push_recv(ring, slot, c, d);
                }
            }
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
    let mut ring: IoUring = b.setup_cqsize(1024).build(256).expect("io_uring setup");

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
    };
    eprintln!("relay-uring ({setup}) listening on 127.0.0.1:{lport} -> 127.0.0.1:{uport}");

    push_accept(&mut ring, &st);
    let mut cqes: Vec<(u64, i32)> = Vec::with_capacity(1024);
    loop {
        match ring.submit_and_wait(1) {
            Ok(_) => {}
            Err(e) if e.raw_os_error() == Some(libc::EINTR) => continue,
            Err(e) if e.raw_os_error() == Some(libc::EBUSY) => {}
            Err(e) => panic!("submit_and_wait: {e}"),
        }
        // Drain every completion available (possibly of many sessions) before submitting.
        loop {
            cqes.clear();
            cqes.extend(ring.completion().map(|c| (c.user_data(), c.result())));
            if cqes.is_empty() {
                break;
            }
            for &(u, r) in cqes.iter() {
                handle(&mut ring, &mut st, u, r);
            }
        }
    }
}
