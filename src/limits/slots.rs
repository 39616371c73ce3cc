//! Room for cancels past `max_connections`. A client whose sessions fill every slot is the one
//! that most needs its cancels served, and PostgreSQL serves them past its own connection
//! limit. So each listener accepts up to [`OVERFLOW`] connections beyond its session permits.
//! Such a connection goes through the pre-authentication phase as any other (PROXY header,
//! TLS, first packet, all under `login_timeout`); a cancel (plaintext, inside TLS, or a peer's)
//! then runs at once on the overflow slot, and a session waits there for a session permit,
//! ahead of the connections still in the kernel's queue, before anything else happens (no
//! Vault call). When the overflow slots are taken too, further connections wait in the accept
//! queue. The accept loop takes its next slot before it accepts, so it may be holding a
//! session permit when a connection starts to wait: it then hands that permit on
//! ([`Admission::hand_on`]) rather than keep it for a connection that has not come yet.

use std::collections::VecDeque;
use std::sync::{Arc, Mutex};

use tokio::sync::{Notify, OwnedSemaphorePermit, Semaphore, oneshot};
use tokio_util::sync::CancellationToken;

/// Connections each listener accepts past its session permits to find cancels among them
/// (each holds a descriptor, and a cancel one more upstream: within
/// [`crate::fd_limit::RESERVE`]).
pub(crate) const OVERFLOW: usize = 16;

/// A listener's permits: one per session (`max_connections`), the overflow slots, and the
/// overflow connections waiting for a session permit, oldest first.
pub(crate) struct Slots {
    sessions: Arc<Semaphore>,
    overflow: Arc<Semaphore>,
    waiting: Mutex<VecDeque<oneshot::Sender<OwnedSemaphorePermit>>>,
    /// A connection started to wait: wakes the accept loop, which may hold a session permit
    /// it took before that connection came.
    waiter: Notify,
}

/// What an accepted connection holds.
pub(crate) enum Slot {
    /// A session permit.
    Session(OwnedSemaphorePermit),
    /// An overflow slot: a session on it waits for a session permit ([`Admission::settle`]).
    Overflow(OwnedSemaphorePermit),
}

/// An accepted connection's slot and the listener it came from.
pub(crate) struct Admission {
    slot: Slot,
    slots: Arc<Slots>,
}

/// What a connection runs on once settled; dropped when it ends.
pub(crate) struct Held {
    _permit: OwnedSemaphorePermit,
}

impl Slots {
    /// Permits for `max_connections` sessions and [`OVERFLOW`] more connections.
    pub(crate) fn new(max_connections: usize) -> Arc<Slots> {
        Arc::new(Slots {
            sessions: Arc::new(Semaphore::new(max_connections)),
            overflow: Arc::new(Semaphore::new(OVERFLOW)),
            waiting: Mutex::new(VecDeque::new()),
            waiter: Notify::new(),
        })
    }

    /// The next slot: a session permit while there is one (handed to the oldest waiting
    /// overflow connection first), else an overflow slot; `None` once `accepting` is cancelled.
    pub(crate) async fn next(self: &Arc<Self>, accepting: &CancellationToken) -> Option<Admission> {
        let slot = self.next_slot(accepting).await?;
        Some(Admission {
            slot,
            slots: self.clone(),
        })
    }

    async fn next_slot(&self, accepting: &CancellationToken) -> Option<Slot> {
        loop {
            let permit = tokio::select! {
                biased;
                _ = accepting.cancelled() => return None,
                p = self.sessions.clone().acquire_owned() => p.ok()?,
                p = self.overflow.clone().acquire_owned() => return Some(Slot::Overflow(p.ok()?)),
            };
            if let Some(permit) = self.hand_to_waiting(permit) {
                return Some(Slot::Session(permit));
            }
        }
    }

    /// Gives `permit` to the oldest overflow connection still waiting; returns it when none is.
    fn hand_to_waiting(&self, mut permit: OwnedSemaphorePermit) -> Option<OwnedSemaphorePermit> {
        let mut waiting = self.waiting.lock().unwrap_or_else(|e| e.into_inner());
        while let Some(tx) = waiting.pop_front() {
            match tx.send(permit) {
                Ok(()) => return None,
                Err(p) => permit = p,
            }
        }
        Some(permit)
    }
}

impl Admission {
    /// Resolves when an overflow connection started to wait for a session permit while this
    /// admission (the accept loop's next one) holds one; never while it holds an overflow slot.
    pub(crate) async fn waiter_came(&self) {
        match self.slot {
            Slot::Session(_) => self.slots.waiter.notified().await,
            Slot::Overflow(_) => std::future::pending().await,
        }
    }

    /// The accept loop's next admission after a connection started to wait: its session
    /// permit goes to the oldest connection still waiting (if none is, it is kept), and the
    /// loop takes its next slot anew. `None` once `accepting` is cancelled.
    pub(crate) async fn hand_on(self, accepting: &CancellationToken) -> Option<Admission> {
        let Admission { slot, slots } = self;
        let permit = match slot {
            Slot::Session(p) => p,
            overflow @ Slot::Overflow(_) => {
                return Some(Admission {
                    slot: overflow,
                    slots,
                });
            }
        };
        if let Some(kept) = slots.hand_to_waiting(permit) {
            return Some(Admission {
                slot: Slot::Session(kept),
                slots,
            });
        }
        slots.next(accepting).await
    }

    /// What the connection runs on once its first packet is known: its session permit; for
    /// an overflow slot, the slot itself unless it is a `session` (a cancel, or a refusal on
    /// its way out), which waits for a session permit. `None`: `stop` was cancelled first, or
    /// `gone` (the client closed while it waited) resolved: it then costs no Vault call.
    pub(crate) async fn settle(
        self,
        session: bool,
        gone: impl Future<Output = ()>,
        stop: &CancellationToken,
    ) -> Option<Held> {
        let overflow = match self.slot {
            Slot::Session(p) => return Some(Held { _permit: p }),
            Slot::Overflow(p) if !session => return Some(Held { _permit: p }),
            Slot::Overflow(p) => p,
        };
        let slots = &self.slots;
        let (tx, rx) = oneshot::channel();
        {
            let mut waiting = slots.waiting.lock().unwrap_or_else(|e| e.into_inner());
            waiting.retain(|tx| !tx.is_closed());
            waiting.push_back(tx);
        }
        slots.waiter.notify_one();
        // Straight from the semaphore too: the accept loop may be waiting in `accept` (on an
        // overflow slot) when a session ends.
        let permit = tokio::select! {
            Ok(p) = rx => p,
            Ok(p) = slots.sessions.clone().acquire_owned() => p,
            _ = stop.cancelled() => return None,
            _ = gone => return None,
        };
        drop(overflow);
        Some(Held { _permit: permit })
    }
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use super::*;

    #[tokio::test]
    async fn a_freed_permit_goes_to_the_oldest_waiting_connection() {
        let slots = Slots::new(1);
        let accepting = CancellationToken::new();
        let Some(Slot::Session(first)) = slots.next_slot(&accepting).await else {
            panic!("a session permit first");
        };
        let Some(Slot::Overflow(_o)) = slots.next_slot(&accepting).await else {
            panic!("then an overflow slot");
        };
        let (tx, rx) = oneshot::channel();
        slots.waiting.lock().expect("lock").push_back(tx);
        drop(first);
        // The accept loop takes the freed permit and hands it on instead of using it.
        let next = tokio::time::timeout(Duration::from_millis(100), slots.next_slot(&accepting));
        assert!(
            matches!(next.await, Ok(Some(Slot::Overflow(_)))),
            "kept none for itself"
        );
        assert!(rx.await.is_ok(), "the waiting connection got it");
        accepting.cancel();
        assert!(slots.next_slot(&accepting).await.is_none());
    }

    #[tokio::test]
    async fn a_cancel_runs_on_its_overflow_slot_and_a_session_waits_for_a_permit() {
        let slots = Slots::new(1);
        let (accepting, stop) = (CancellationToken::new(), CancellationToken::new());
        let first = slots.next(&accepting).await.expect("permit");
        let held = first
            .settle(true, std::future::pending(), &stop)
            .await
            .expect("a session permit");
        let cancel = slots.next(&accepting).await.expect("overflow");
        assert!(matches!(cancel.slot, Slot::Overflow(_)));
        let cancel = cancel
            .settle(false, std::future::pending(), &stop)
            .await
            .expect("runs at once");
        let session = slots.next(&accepting).await.expect("overflow");
        let waiting = tokio::spawn(async move {
            session
                .settle(true, std::future::pending(), &stop)
                .await
                .is_some()
        });
        tokio::time::sleep(Duration::from_millis(50)).await;
        assert!(!waiting.is_finished(), "waits while every permit is taken");
        drop(held);
        assert!(waiting.await.expect("task"), "gets the freed permit");
        drop(cancel);
        assert_eq!(slots.overflow.available_permits(), OVERFLOW);
        assert_eq!(slots.sessions.available_permits(), 1);
    }

    /// A session settled on the first slot of a listener with one permit.
    async fn the_only_permit(
        slots: &Arc<Slots>,
        accepting: &CancellationToken,
        stop: &CancellationToken,
    ) -> Held {
        slots
            .next(accepting)
            .await
            .expect("permit")
            .settle(true, std::future::pending(), stop)
            .await
            .expect("a session permit")
    }

    #[tokio::test]
    async fn a_session_permit_the_accept_loop_holds_goes_to_a_connection_that_starts_waiting() {
        let slots = Slots::new(1);
        let (accepting, stop) = (CancellationToken::new(), CancellationToken::new());
        let held = the_only_permit(&slots, &accepting, &stop).await;
        let session = slots.next(&accepting).await.expect("overflow");
        drop(held);
        // The accept loop takes the freed permit before the overflow connection waits for one,
        // then waits in `accept` for a connection that does not come.
        let (loop_slots, loop_accepting) = (slots.clone(), accepting.clone());
        let accept_loop = tokio::spawn(async move {
            let accept = || std::future::pending::<std::io::Result<()>>();
            crate::listener::next_connection(&loop_slots, &loop_accepting, accept).await;
        });
        while slots.sessions.available_permits() > 0 {
            tokio::task::yield_now().await;
        }
        let settled = tokio::time::timeout(
            Duration::from_secs(5),
            session.settle(true, std::future::pending(), &stop),
        )
        .await;
        assert!(
            matches!(settled, Ok(Some(_))),
            "the waiting connection gets the permit the accept loop held"
        );
        accepting.cancel();
        accept_loop.await.expect("accept loop");
    }

    #[tokio::test]
    async fn a_waiting_session_whose_client_left_gives_up() {
        let slots = Slots::new(1);
        let (accepting, stop) = (CancellationToken::new(), CancellationToken::new());
        let _held = slots.next(&accepting).await.expect("permit");
        let session = slots.next(&accepting).await.expect("overflow");
        assert!(session.settle(true, async {}, &stop).await.is_none());
        assert_eq!(slots.overflow.available_permits(), OVERFLOW);
    }

    #[tokio::test]
    async fn a_waiting_session_gives_up_at_stop() {
        let slots = Slots::new(1);
        let (accepting, stop) = (CancellationToken::new(), CancellationToken::new());
        let _held = the_only_permit(&slots, &accepting, &stop).await;
        let session = slots.next(&accepting).await.expect("overflow");
        stop.cancel();
        assert!(
            session
                .settle(true, std::future::pending(), &stop)
                .await
                .is_none()
        );
        assert_eq!(slots.overflow.available_permits(), OVERFLOW);
    }
}
