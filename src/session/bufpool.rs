//! Relay buffers lent per thread: a pump holds one only while bytes are in flight (from the
//! read that returned them until their write completed), so an idle session holds none. Each
//! session thread runs its sessions one poll at a time, so its pool needs no lock; a buffer
//! returns to the pool of the thread that drops it, and a thread keeps at most [`KEEP`] spare
//! ones. In steady state a message costs no allocation: a pop and a push.

use std::cell::RefCell;
use std::io;
use std::pin::Pin;
use std::task::{Context, Poll};

use tokio::io::{AsyncRead, ReadBuf};

/// Size of every relay buffer: one full TLS record's plaintext.
pub(crate) const SIZE: usize = 16 * 1024;
/// Spare buffers a thread keeps for the next read (the most sessions of one thread with
/// bytes in flight at the same moment, in practice); more are freed.
pub(crate) const KEEP: usize = 32;

thread_local! {
    static SPARE: RefCell<Vec<Box<[u8]>>> = RefCell::new(Vec::with_capacity(KEEP));
}

/// A relay buffer, back to its thread's pool when dropped.
pub(crate) struct Buf(Option<Box<[u8]>>);

impl Buf {
    /// A spare buffer of this thread, or a new one.
    pub(crate) fn take() -> Buf {
        let spare = SPARE.with(|s| s.borrow_mut().pop());
        Buf(Some(
            spare.unwrap_or_else(|| vec![0u8; SIZE].into_boxed_slice()),
        ))
    }

    /// The whole buffer.
    pub(crate) fn bytes_mut(&mut self) -> &mut [u8] {
        self.0.as_deref_mut().unwrap_or_default()
    }

    /// The first `n` bytes.
    #[cfg(test)]
    pub(crate) fn get(&self, n: usize) -> &[u8] {
        self.0.as_deref().map_or(&[][..], |b| &b[..n.min(b.len())])
    }

    /// The first `n` bytes, to change in place.
    pub(crate) fn get_mut(&mut self, n: usize) -> &mut [u8] {
        match self.0.as_deref_mut() {
            Some(b) => {
                let n = n.min(b.len());
                &mut b[..n]
            }
            None => &mut [],
        }
    }
}

impl Drop for Buf {
    fn drop(&mut self) {
        if let Some(buf) = self.0.take() {
            // A thread being torn down has no pool any more: the buffer is simply freed.
            let _ = SPARE.try_with(|s| {
                let mut spare = s.borrow_mut();
                if spare.len() < KEEP {
                    spare.push(buf);
                }
            });
        }
    }
}

/// Polls one read into a lent buffer: the buffer is taken for the poll and given back at
/// once unless bytes arrived. `Ok(None)`: the reader is at its end.
pub(crate) fn poll_read_lent<R: AsyncRead + Unpin>(
    reader: &mut R,
    cx: &mut Context<'_>,
) -> Poll<io::Result<Option<(Buf, usize)>>> {
    let mut buf = Buf::take();
    let mut read = ReadBuf::new(buf.bytes_mut());
    match Pin::new(reader).poll_read(cx, &mut read) {
        Poll::Pending => Poll::Pending,
        Poll::Ready(Err(e)) => Poll::Ready(Err(e)),
        Poll::Ready(Ok(())) => {
            let n = read.filled().len();
            Poll::Ready(Ok((n > 0).then_some((buf, n))))
        }
    }
}

/// [`poll_read_lent`] as a future (tests).
#[cfg(test)]
pub(crate) async fn read_lent<R: AsyncRead + Unpin>(
    reader: &mut R,
) -> io::Result<Option<(Buf, usize)>> {
    std::future::poll_fn(|cx| poll_read_lent(reader, cx)).await
}

/// Spare buffers this thread holds (tests).
#[cfg(test)]
pub(crate) fn spare() -> usize {
    SPARE.with(|s| s.borrow().len())
}

#[cfg(test)]
mod tests {
    use std::future::Future;

    use tokio::io::AsyncWriteExt;

    use super::*;

    #[tokio::test]
    async fn a_waiting_read_holds_no_buffer_and_a_dropped_one_is_reused() {
        let (mut near, mut far) = tokio::io::duplex(64);
        let before = spare();
        {
            let reading = read_lent(&mut far);
            tokio::pin!(reading);
            // Nothing to read yet: pending, and the buffer it tried with is back in the pool.
            let polled = std::future::poll_fn(|cx| Poll::Ready(reading.as_mut().poll(cx))).await;
            assert!(polled.is_pending());
            assert_eq!(spare(), before.max(1));
        }
        near.write_all(b"abc").await.expect("write");
        let (buf, n) = read_lent(&mut far).await.expect("read").expect("bytes");
        assert_eq!(buf.get(n), b"abc");
        assert_eq!(spare(), before.max(1) - 1);
        drop(buf);
        assert_eq!(spare(), before.max(1));
        drop(near);
        assert!(read_lent(&mut far).await.expect("eof").is_none());
    }

    #[tokio::test]
    async fn a_reused_buffer_yields_only_the_bytes_of_its_own_read() {
        let (mut near, mut far) = tokio::io::duplex(64);
        // One session's bytes, then its buffer goes back to the pool...
        near.write_all(b"secret-of-session-one")
            .await
            .expect("write");
        let (buf, n) = read_lent(&mut far).await.expect("read").expect("bytes");
        assert_eq!(buf.get(n), b"secret-of-session-one");
        drop(buf);
        // ...and the next read through it, shorter, shows nothing of them.
        near.write_all(b"Q").await.expect("write");
        let (buf, n) = read_lent(&mut far).await.expect("read").expect("bytes");
        assert_eq!(buf.get(n), b"Q");
    }
}
