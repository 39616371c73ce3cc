//! An io_uring-backed TCP stream that implements tokio's `AsyncRead`/`AsyncWrite`, for a
//! current-thread tokio runtime: the shape leasegate's session threads would take (tokio
//! timers, tasks and the rest stay; only the relay's socket I/O goes through a ring).
//!
//! - One ring per thread (thread-local). Its fd is registered with tokio's reactor
//!   (`AsyncFd`), so tokio's `epoll_wait` sleeps for ring completions too.
//! - Receives are single-shot `Recv` with buffer selection from a provided-buffer ring:
//!   the kernel picks a buffer when data arrives, so an idle stream holds no buffer. A
//!   received buffer is copied into the caller's `ReadBuf` and goes back to the ring.
//! - Sends copy the caller's bytes into a pooled buffer and return at once; the next
//!   write or flush waits for the send's completion (short sends are resubmitted).
//! - Submission is batched: queuing an op wakes the driver task, which runs after the
//!   tasks already woken in this tick and submits everything queued with one
//!   `io_uring_enter`, then reaps completions without a syscall.
use std::cell::RefCell;
use std::collections::VecDeque;
use std::future::poll_fn;
use std::io;
use std::os::fd::{AsRawFd, OwnedFd, RawFd};
use std::pin::Pin;
use std::rc::Rc;
use std::task::{Context, Poll, Waker};

use io_uring::{IoUring, cqueue, opcode, squeue, types};

use crate::bufring::{BUF, BufRing, NBUF};
use slab::Slab;
use tokio::io::unix::AsyncFd;
use tokio::io::{AsyncRead, AsyncWrite, Interest, ReadBuf};

const BGID: u16 = 7;
const CANCEL_UD: u64 = u64::MAX;

struct Op {
    waker: Option<Waker>,
    /// (result, cqe flags) once completed.
    done: Option<(i32, u32)>,
    /// The send buffer the kernel reads from; kept until completion.
    buf: Option<Vec<u8>>,
    /// The stream went away: free on completion.
    orphan: bool,
}

struct Inner {
    ring: IoUring,
    ops: Slab<Op>,
    queued: usize,
    driver: Option<Waker>,
    br: BufRing,
    spare: Vec<Vec<u8>>,
    cqes: VecDeque<(u64, i32, u32)>,
}

impl Inner {
    fn push(&mut self, e: squeue::Entry) {
        unsafe {
            while self.ring.submission().push(&e).is_err() {
                let _ = self.ring.submit();
                self.queued = 0;
            }
        }
        self.queued += 1;
        if let Some(w) = self.driver.take() {
            w.wake();
        }
    }

    fn reap(&mut self) {
        self.cqes.extend(
            self.ring
                .completion()
                .map(|c| (c.user_data(), c.result(), c.flags())),
        );
        while let Some((ud, res, flags)) = self.cqes.pop_front() {
            if ud == CANCEL_UD {
                continue;
            }
            let k = ud as usize;
            let Some(op) = self.ops.get_mut(k) else {
                continue;
            };
            if op.orphan {
                let op = self.ops.remove(k);
                if let Some(bid) = cqueue::buffer_select(flags) {
                    self.br.put(bid);
                    self.br.publish();
                }
                if let Some(b) = op.buf {
                    self.spare.push(b);
                }
                continue;
            }
            op.done = Some((res, flags));
            if let Some(w) = op.waker.take() {
                w.wake();
            }
        }
    }
}

thread_local! {
    static RING: RefCell<Option<Rc<RefCell<Inner>>>> = const { RefCell::new(None) };
}

fn with<R>(f: impl FnOnce(&mut Inner) -> R) -> R {
    RING.with(|r| {
        let r = r.borrow();
        let inner = r.as_ref().expect("no ring on this thread");
        let mut i = inner.borrow_mut();
        f(&mut i)
    })
}

struct RingFd(RawFd);
impl AsRawFd for RingFd {
    fn as_raw_fd(&self) -> RawFd {
        self.0
    }
}

/// Sets up this thread's ring and returns the task that drives it (spawn it on this
/// thread's current-thread runtime).
pub fn install() -> impl std::future::Future<Output = ()> {
    let mut b = IoUring::builder();
    let defer = std::env::var("URING_SETUP").as_deref() == Ok("defer");
    if defer {
        b.setup_single_issuer().setup_defer_taskrun();
    }
    let ring: IoUring = b.setup_cqsize(4096).build(256).expect("io_uring");
    let br = BufRing::new(false);
    unsafe {
        ring.submitter()
            .register_buf_ring_with_flags(br.ring_addr(), NBUF as u16, BGID, 0)
            .expect("register_buf_ring");
    }
    let fd = ring.as_raw_fd();
    let inner = Rc::new(RefCell::new(Inner {
        ring,
        ops: Slab::with_capacity(256),
        queued: 0,
        driver: None,
        br,
        spare: Vec::new(),
        cqes: VecDeque::new(),
    }));
    RING.with(|r| *r.borrow_mut() = Some(inner.clone()));
    async move {
        // SAFETY: the ring (and so its fd) lives in `inner`, which this task holds until it ends.
        let afd = unsafe { AsyncFd::register_with_interest(RingFd(fd), Interest::READABLE) }
            .map_err(|e| e.into_parts().1)
            .expect("asyncfd");
        poll_fn(|cx| {
            loop {
                {
                    let mut i = inner.borrow_mut();
                    i.driver = Some(cx.waker().clone());
                    if defer {
                        let n = i.queued as u32;
                        i.queued = 0;
                        let _ = unsafe {
                            i.ring
                                .submitter()
                                .enter::<libc::sigset_t>(n, 0, 1 /* GETEVENTS */, None)
                        };
                    } else if i.queued > 0 {
                        i.queued = 0;
                        let _ = i.ring.submit();
                    }
                    i.reap();
                }
                match afd.poll_read_ready(cx) {
                    Poll::Ready(Ok(mut g)) => {
                        g.clear_ready();
                        if !defer {
                            inner.borrow_mut().reap();
                        }
                    }
                    Poll::Ready(Err(_)) => return Poll::Ready(()),
                    Poll::Pending => return Poll::Pending,
                }
            }
        })
        .await
    }
}

#[derive(Default)]
struct ReadSide {
    op: Option<usize>,
    /// A received provided buffer not yet consumed: (bid, len, pos).
    held: Option<(u16, usize, usize)>,
}

#[derive(Default)]
struct WriteSide {
    op: Option<usize>,
    /// Bytes of the in-flight buffer already sent, and its length.
    off: usize,
    len: usize,
}

pub struct UringTcp {
    fd: OwnedFd,
    rd: ReadSide,
    wr: WriteSide,
}

impl UringTcp {
    pub fn from_std(s: std::net::TcpStream) -> UringTcp {
        s.set_nodelay(true).ok();
        UringTcp {
            fd: s.into(),
            rd: ReadSide::default(),
            wr: WriteSide::default(),
        }
    }

    fn submit_recv(&mut self, i: &mut Inner, w: &Waker) {
        let k = i.ops.insert(Op {
            waker: Some(w.clone()),
            done: None,
            buf: None,
            orphan: false,
        });
        let e = opcode::Recv::new(
            types::Fd(self.fd.as_raw_fd()),
            std::ptr::null_mut(),
            BUF as u32,
        )
        .buf_group(BGID)
        .build()
        .flags(squeue::Flags::BUFFER_SELECT)
        .user_data(k as u64);
        i.push(e);
        self.rd.op = Some(k);
    }

    fn submit_send(&mut self, i: &mut Inner, k: usize) {
        let op = &i.ops[k];
        let b = op.buf.as_ref().expect("send buffer");
        let p = unsafe { b.as_ptr().add(self.wr.off) };
        let e = opcode::Send::new(
            types::Fd(self.fd.as_raw_fd()),
            p,
            (self.wr.len - self.wr.off) as u32,
        )
        .flags(libc::MSG_NOSIGNAL)
        .build()
        .user_data(k as u64);
        i.push(e);
    }

    /// Waits for the in-flight send, if any, to have sent everything.
    fn poll_send_done(&mut self, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        let Some(k) = self.wr.op else {
            return Poll::Ready(Ok(()));
        };
        with(|i| {
            let op = &mut i.ops[k];
            match op.done.take() {
                None => {
                    op.waker = Some(cx.waker().clone());
                    Poll::Pending
                }
                Some((res, _)) if res < 0 => {
                    let op = i.ops.remove(k);
                    if let Some(b) = op.buf {
                        i.spare.push(b);
                    }
                    self.wr.op = None;
                    Poll::Ready(Err(io::Error::from_raw_os_error(-res)))
                }
                Some((res, _)) => {
                    self.wr.off += res as usize;
                    if self.wr.off < self.wr.len {
                        op.waker = Some(cx.waker().clone());
                        self.submit_send(i, k);
                        return Poll::Pending;
                    }
                    let op = i.ops.remove(k);
                    if let Some(b) = op.buf {
                        i.spare.push(b);
                    }
                    self.wr.op = None;
                    Poll::Ready(Ok(()))
                }
            }
        })
    }
}

impl AsyncRead for UringTcp {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        out: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let this = &mut *self;
        with(|i| {
            loop {
                if let Some((bid, len, pos)) = this.rd.held {
                    let n = (len - pos).min(out.remaining());
                    out.put_slice(&i.br.slice(bid, len)[pos..pos + n]);
                    if pos + n == len {
                        this.rd.held = None;
                        i.br.put(bid);
                        i.br.publish();
                    } else {
                        this.rd.held = Some((bid, len, pos + n));
                    }
                    return Poll::Ready(Ok(()));
                }
                let Some(k) = this.rd.op else {
                    this.submit_recv(i, cx.waker());
                    return Poll::Pending;
                };
                let op = &mut i.ops[k];
                let Some((res, flags)) = op.done.take() else {
                    op.waker = Some(cx.waker().clone());
                    return Poll::Pending;
                };
                i.ops.remove(k);
                this.rd.op = None;
                if res == -libc::ENOBUFS || res == -libc::EAGAIN || res == -libc::EINTR {
                    // No provided buffer free: read directly, or wait for readiness again.
                    let dst = out.initialize_unfilled();
                    let n = unsafe {
                        libc::recv(
                            this.fd.as_raw_fd(),
                            dst.as_mut_ptr() as *mut _,
                            dst.len(),
                            libc::MSG_DONTWAIT,
                        )
                    };
                    if n >= 0 {
                        out.advance(n as usize);
                        return Poll::Ready(Ok(()));
                    }
                    continue;
                }
                if res < 0 {
                    return Poll::Ready(Err(io::Error::from_raw_os_error(-res)));
                }
                if res == 0 {
                    if let Some(bid) = cqueue::buffer_select(flags) {
                        i.br.put(bid);
                        i.br.publish();
                    }
                    return Poll::Ready(Ok(()));
                }
                let bid = cqueue::buffer_select(flags).expect("recv without a buffer");
                this.rd.held = Some((bid, res as usize, 0));
            }
        })
    }
}

impl AsyncWrite for UringTcp {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        data: &[u8],
    ) -> Poll<io::Result<usize>> {
        let this = &mut *self;
        match this.poll_send_done(cx) {
            Poll::Ready(Ok(())) => {}
            other => return other.map(|r| r.map(|()| 0)),
        }
        let n = data.len().min(BUF);
        with(|i| {
            let mut b = i.spare.pop().unwrap_or_else(|| Vec::with_capacity(BUF));
            b.clear();
            b.extend_from_slice(&data[..n]);
            let k = i.ops.insert(Op {
                waker: None,
                done: None,
                buf: Some(b),
                orphan: false,
            });
            this.wr = WriteSide {
                op: Some(k),
                off: 0,
                len: n,
            };
            this.submit_send(i, k);
        });
        Poll::Ready(Ok(n))
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        self.poll_send_done(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        match self.poll_send_done(cx) {
            Poll::Ready(Ok(())) => {}
            other => return other,
        }
        unsafe { libc::shutdown(self.fd.as_raw_fd(), libc::SHUT_WR) };
        Poll::Ready(Ok(()))
    }
}

impl Drop for UringTcp {
    fn drop(&mut self) {
        let rd = self.rd.op.take();
        let wr = self.wr.op.take();
        let held = self.rd.held.take();
        let _ = RING.try_with(|r| {
            let r = r.borrow();
            let Some(inner) = r.as_ref() else { return };
            let mut i = inner.borrow_mut();
            if let Some((bid, _, _)) = held {
                i.br.put(bid);
                i.br.publish();
            }
            for k in [rd, wr].into_iter().flatten() {
                let op = &mut i.ops[k];
                if let Some((_, flags)) = op.done {
                    let op = i.ops.remove(k);
                    if let Some(bid) = cqueue::buffer_select(flags) {
                        i.br.put(bid);
                        i.br.publish();
                    }
                    if let Some(b) = op.buf {
                        i.spare.push(b);
                    }
                } else {
                    op.orphan = true;
                    op.waker = None;
                    let e = opcode::AsyncCancel::new(k as u64)
                        .build()
                        .user_data(CANCEL_UD);
                    i.push(e);
                }
            }
        });
    }
}
