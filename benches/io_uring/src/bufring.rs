//! A provided-buffer ring (`IORING_REGISTER_PBUF_RING`): NBUF buffers of BUF bytes the
//! kernel picks from when a receive completes, handed back with `put` + `publish`.
use std::sync::atomic::{AtomicU16, Ordering};

use io_uring::types;

/// Bytes per buffer.
pub const BUF: usize = 16 * 1024;
/// Buffers in the ring (a power of two).
pub const NBUF: usize = 256;

pub struct BufRing {
    ring: *mut types::BufRingEntry,
    bufs: *mut u8,
    tail: u16,
}

impl BufRing {
    /// Maps the ring and its buffers (`populate`: fault the buffers in now) and puts every
    /// buffer in it.
    pub fn new(populate: bool) -> BufRing {
        let populate = if populate { libc::MAP_POPULATE } else { 0 };
        unsafe {
            let rsz = NBUF * std::mem::size_of::<types::BufRingEntry>();
            let ring = libc::mmap(
                std::ptr::null_mut(),
                rsz,
                libc::PROT_READ | libc::PROT_WRITE,
                libc::MAP_PRIVATE | libc::MAP_ANONYMOUS,
                -1,
                0,
            );
            assert!(ring != libc::MAP_FAILED);
            let bufs = libc::mmap(
                std::ptr::null_mut(),
                NBUF * BUF,
                libc::PROT_READ | libc::PROT_WRITE,
                libc::MAP_PRIVATE | libc::MAP_ANONYMOUS | populate,
                -1,
                0,
            );
            assert!(bufs != libc::MAP_FAILED);
            let mut br = BufRing {
                ring: ring as *mut _,
                bufs: bufs as *mut u8,
                tail: 0,
            };
            for bid in 0..NBUF as u16 {
                br.put(bid);
            }
            br.publish();
            br
        }
    }

    /// The address to register with the ring.
    pub fn ring_addr(&self) -> u64 {
        self.ring as u64
    }

    /// Queues buffer `bid` back (visible to the kernel at the next `publish`).
    pub fn put(&mut self, bid: u16) {
        unsafe {
            let e = &mut *self.ring.add((self.tail as usize) & (NBUF - 1));
            e.set_addr(self.bufs.add(bid as usize * BUF) as u64);
            e.set_len(BUF as u32);
            e.set_bid(bid);
        }
        self.tail = self.tail.wrapping_add(1);
    }

    /// Makes the buffers put back so far visible to the kernel.
    pub fn publish(&self) {
        unsafe {
            let t = types::BufRingEntry::tail(self.ring) as *const AtomicU16;
            (*t).store(self.tail, Ordering::Release);
        }
    }

    /// The start of buffer `bid`.
    pub fn ptr(&self, bid: u16) -> *const u8 {
        unsafe { self.bufs.add(bid as usize * BUF) }
    }

    /// The first `len` bytes of buffer `bid`.
    pub fn slice(&self, bid: u16, len: usize) -> &[u8] {
        unsafe { std::slice::from_raw_parts(self.ptr(bid), len) }
    }
}
