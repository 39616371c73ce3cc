//! The watcher → relay channel for [`Control`] messages: a few per session at most (an expiry
//! warning, the closing error), so a small shared queue with one wake-up instead of a tokio
//! `mpsc` channel, whose first block (32 slots) every idle session would hold.

use std::collections::VecDeque;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, PoisonError};

use bytes::BytesMut;
use tokio::sync::Notify;

/// Messages leasegate injects into the upstream → client stream, between two messages.
#[derive(Debug)]
pub(crate) enum Control {
    /// A NoticeResponse (or other message) to deliver; the session continues.
    Notice(BytesMut),
    /// A final ErrorResponse to deliver; the session ends.
    End(BytesMut),
}

/// What both ends share.
#[derive(Default)]
struct Shared {
    /// Messages sent and not yet received, in order.
    queue: Mutex<VecDeque<Control>>,
    /// Wakes the receiver (a permit is kept when it is not waiting, so none is lost).
    notify: Notify,
    /// Wakes the sender waiting in [`ControlSender::closed`].
    closed: Notify,
    /// The sender is gone: once the queue is empty, `recv` answers `None`.
    sender_gone: AtomicBool,
    /// The receiver is gone: `send` hands the message back.
    receiver_gone: AtomicBool,
}

/// The watcher's end.
pub(crate) struct ControlSender(Arc<Shared>);

/// The relay's end.
pub(crate) struct ControlReceiver(Arc<Shared>);

/// A new channel.
pub(crate) fn channel() -> (ControlSender, ControlReceiver) {
    let shared = Arc::new(Shared::default());
    (ControlSender(shared.clone()), ControlReceiver(shared))
}

impl ControlSender {
    /// Queues `msg` for the relay; `Err(msg)` when the relay is gone.
    pub(crate) async fn send(&self, msg: Control) -> Result<(), Control> {
        if self.0.receiver_gone.load(Ordering::Acquire) {
            return Err(msg);
        }
        let mut queue = self.0.queue.lock().unwrap_or_else(PoisonError::into_inner);
        queue.push_back(msg);
        drop(queue);
        self.0.notify.notify_one();
        Ok(())
    }
}

impl ControlSender {
    /// Resolves once the relay is gone.
    pub(crate) async fn closed(&self) {
        while !self.0.receiver_gone.load(Ordering::Acquire) {
            self.0.closed.notified().await;
        }
    }
}

impl Drop for ControlSender {
    fn drop(&mut self) {
        self.0.sender_gone.store(true, Ordering::Release);
        self.0.notify.notify_one();
    }
}

impl ControlReceiver {
    /// The next message; `None` once the sender is gone and everything sent was received.
    pub(crate) async fn recv(&mut self) -> Option<Control> {
        loop {
            let next = self
                .0
                .queue
                .lock()
                .unwrap_or_else(PoisonError::into_inner)
                .pop_front();
            if next.is_some() {
                return next;
            }
            if self.0.sender_gone.load(Ordering::Acquire) {
                return None;
            }
            self.0.notify.notified().await;
        }
    }
}

impl Drop for ControlReceiver {
    fn drop(&mut self) {
        self.0.receiver_gone.store(true, Ordering::Release);
        self.0.closed.notify_one();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn messages_arrive_in_order_then_none_once_the_sender_is_gone() {
        let (tx, mut rx) = channel();
        let waiting = tokio::spawn(async move {
            let mut got = Vec::new();
            while let Some(m) = rx.recv().await {
                got.push(matches!(m, Control::End(_)));
            }
            got
        });
        tokio::task::yield_now().await;
        tx.send(Control::Notice(BytesMut::new()))
            .await
            .expect("sent");
        tx.send(Control::End(BytesMut::new())).await.expect("sent");
        drop(tx);
        assert_eq!(waiting.await.expect("task"), [false, true]);
    }

    #[tokio::test]
    async fn a_send_after_the_relay_is_gone_comes_back_and_closed_resolves() {
        let (tx, rx) = channel();
        let waiting = tokio::spawn(async move {
            tx.closed().await;
            tx
        });
        tokio::task::yield_now().await;
        drop(rx);
        let tx = waiting.await.expect("closed resolved");
        assert!(tx.send(Control::End(BytesMut::new())).await.is_err());
    }
}
