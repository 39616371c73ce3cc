//! What `relay-uring` and `relay-uring-multi` share: the operation tags, a connection's two
//! sockets, pushing entries, accepting and connecting, the ring set up from `URING_SETUP`,
//! and the loop (`submit_and_wait(1)`, then every completion of every session before the
//! next submit).
use std::os::fd::{AsRawFd, RawFd};

use io_uring::{IoUring, opcode, squeue, types};

pub const K_ACCEPT: u64 = 1;
pub const K_CONNECT: u64 = 2;
pub const K_RECV: u64 = 3;
pub const K_SEND: u64 = 4;

/// The user data of an operation: its connection slot, kind and direction.
pub fn ud(slot: usize, kind: u64, dir: usize) -> u64 {
    ((slot as u64) << 8) | (kind << 1) | dir as u64
}

/// (kind, direction, slot) of a user data value.
pub fn decode(user_data: u64) -> (u64, usize, usize) {
    (
        (user_data >> 1) & 0x7f,
        (user_data & 1) as usize,
        (user_data >> 8) as usize,
    )
}

/// One relayed connection: the client's socket, the upstream's, and per direction (0: client
/// to upstream, 1: back) the relay's state `D`.
pub struct Conn<D> {
    pub cfd: RawFd,
    pub ufd: RawFd,
    pub dirs: [D; 2],
}

impl<D> Conn<D> {
    /// Where direction `d` reads from.
    pub fn src(&self, d: usize) -> RawFd {
        if d == 0 { self.cfd } else { self.ufd }
    }
    /// Where direction `d` writes to.
    pub fn dst(&self, d: usize) -> RawFd {
        if d == 0 { self.ufd } else { self.cfd }
    }
}

/// Connections by slot, with the free slots.
pub struct Conns<D> {
    pub slots: Vec<Option<Box<Conn<D>>>>,
    pub free: Vec<usize>,
}

impl<D> Conns<D> {
    pub fn new() -> Self {
        Conns {
            slots: Vec::new(),
            free: Vec::new(),
        }
    }

    /// The connection in `slot` (it must be there).
    pub fn get(&mut self, slot: usize) -> &mut Conn<D> {
        self.slots[slot]
            .as_mut()
            .expect("a connection in this slot")
    }

    /// Closes both sockets of `slot` and frees it.
    pub fn close(&mut self, slot: usize) {
        if let Some(c) = self.slots[slot].take() {
            unsafe {
                libc::close(c.cfd);
                libc::close(c.ufd);
            }
        }
        self.free.push(slot);
    }
}

impl<D> Default for Conns<D> {
    fn default() -> Self {
        Self::new()
    }
}

/// Queues `e`, submitting first when the submission queue is full.
pub fn push(ring: &mut IoUring, e: squeue::Entry) {
    unsafe {
        while ring.submission().push(&e).is_err() {
            ring.submit().expect("submit (sq full)");
        }
    }
}

pub fn set_nodelay(fd: RawFd) {
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

/// The relay's listener, upstream address and ring.
pub struct Relay {
    pub ring: IoUring,
    pub listener: std::net::TcpListener,
    pub upstream: libc::sockaddr_in,
}

impl Relay {
    /// From the command line (`<listen port> <upstream port>`) and `URING_SETUP` (`defer`,
    /// the default: SINGLE_ISSUER + DEFER_TASKRUN; `coop`: COOP_TASKRUN; `plain`), a ring
    /// with `cq_entries` completion entries; logs what it listens on as `name`.
    pub fn from_args(name: &str, cq_entries: u32) -> Relay {
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
        let ring = b
            .setup_cqsize(cq_entries)
            .build(256)
            .expect("io_uring setup");
        let listener = std::net::TcpListener::bind(("127.0.0.1", lport)).expect("bind");
        let upstream = libc::sockaddr_in {
            sin_family: libc::AF_INET as libc::sa_family_t,
            sin_port: uport.to_be(),
            sin_addr: libc::in_addr {
                s_addr: u32::from_be_bytes([127, 0, 0, 1]).to_be(),
            },
            sin_zero: [0; 8],
        };
        eprintln!("{name} ({setup}) listening on 127.0.0.1:{lport} -> 127.0.0.1:{uport}");
        Relay {
            ring,
            listener,
            upstream,
        }
    }

    pub fn push_accept(&mut self) {
        let e = opcode::Accept::new(
            types::Fd(self.listener.as_raw_fd()),
            std::ptr::null_mut(),
            std::ptr::null_mut(),
        )
        .flags(libc::SOCK_CLOEXEC)
        .build()
        .user_data(ud(0, K_ACCEPT, 0));
        push(&mut self.ring, e);
    }

    /// An accept completed with `res`: accepts again and gives a new client a slot, an
    /// upstream socket (directions `dirs`) and a Connect.
    pub fn accepted<D>(&mut self, res: i32, conns: &mut Conns<D>, dirs: impl FnOnce() -> [D; 2]) {
        self.push_accept();
        if res < 0 {
            eprintln!("accept: {}", std::io::Error::from_raw_os_error(-res));
            return;
        }
        let cfd = res;
        let ufd = unsafe { libc::socket(libc::AF_INET, libc::SOCK_STREAM | libc::SOCK_CLOEXEC, 0) };
        if ufd < 0 {
            unsafe { libc::close(cfd) };
            return;
        }
        let conn = Box::new(Conn {
            cfd,
            ufd,
            dirs: dirs(),
        });
        let slot = match conns.free.pop() {
            Some(s) => {
                conns.slots[s] = Some(conn);
                s
            }
            None => {
                conns.slots.push(Some(conn));
                conns.slots.len() - 1
            }
        };
        let e = opcode::Connect::new(
            types::Fd(ufd),
            &self.upstream as *const libc::sockaddr_in as *const libc::sockaddr,
            std::mem::size_of::<libc::sockaddr_in>() as libc::socklen_t,
        )
        .build()
        .user_data(ud(slot, K_CONNECT, 0));
        push(&mut self.ring, e);
    }

    /// A connect completed with `res`: `false` (slot closed) if it failed; else both sockets
    /// get `TCP_NODELAY`.
    pub fn connected<D>(res: i32, conns: &mut Conns<D>, slot: usize) -> bool {
        if res < 0 {
            eprintln!("connect: {}", std::io::Error::from_raw_os_error(-res));
            conns.close(slot);
            return false;
        }
        let c = conns.get(slot);
        set_nodelay(c.cfd);
        set_nodelay(c.ufd);
        true
    }

    /// Accepts and relays for ever: `handle(ring-owner, user_data, result, flags)` for every
    /// completion.
    pub fn run(mut self, mut handle: impl FnMut(&mut Relay, u64, i32, u32)) -> ! {
        self.push_accept();
        let mut cqes: Vec<(u64, i32, u32)> = Vec::with_capacity(4096);
        loop {
            match self.ring.submit_and_wait(1) {
                Ok(_) => {}
                Err(e) if e.raw_os_error() == Some(libc::EINTR) => continue,
                Err(e) if e.raw_os_error() == Some(libc::EBUSY) => {}
                Err(e) => panic!("submit_and_wait: {e}"),
            }
            // Every completion available (possibly of many sessions) before submitting.
            loop {
                cqes.clear();
                cqes.extend(
                    self.ring
                        .completion()
                        .map(|c| (c.user_data(), c.result(), c.flags())),
                );
                if cqes.is_empty() {
                    break;
                }
                for &(u, r, f) in cqes.iter() {
                    handle(&mut self, u, r, f);
                }
            }
        }
    }
}
