//! Where background tasks run: the process's one [`TaskTracker`] and the token a part of the
//! process stops with. `app` builds the shutdown tree (a root token with a named child per
//! part) and hands each part its [`Tasks`]; the part spawns onto it and ends its tasks when its
//! token is cancelled, so the drain can stop the parts in order and then wait for every task.

use std::future::Future;

use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

/// A part's view of the background tasks: the shared tracker and the part's own token.
#[derive(Clone, Debug)]
pub(crate) struct Tasks {
    /// Every background task of the process, so the drain can wait for all of them.
    tracker: TaskTracker,
    /// Cancelled when this part must stop.
    stop: CancellationToken,
}

impl Tasks {
    /// Tasks on `tracker` that stop with `stop`.
    pub(crate) fn new(tracker: TaskTracker, stop: CancellationToken) -> Tasks {
        Tasks { tracker, stop }
    }

    /// A tracker and token of their own, that nothing else waits for or cancels (tests,
    /// one-off tools).
    #[cfg(test)]
    pub(crate) fn detached() -> Tasks {
        Tasks::new(TaskTracker::new(), CancellationToken::new())
    }

    /// The token this part stops with.
    pub(crate) fn stop(&self) -> &CancellationToken {
        &self.stop
    }

    /// The same tracker, with a child token: a piece of this part that may also be stopped
    /// on its own (a cluster's peer resolver, when a reload replaces the cluster).
    pub(crate) fn child(&self) -> Tasks {
        Tasks::new(self.tracker.clone(), self.stop.child_token())
    }

    /// Spawns the task `start` makes from this part's token.
    pub(crate) fn run<F>(&self, start: impl FnOnce(CancellationToken) -> F) -> JoinHandle<F::Output>
    where
        F: Future + Send + 'static,
        F::Output: Send + 'static,
    {
        self.spawn(start(self.stop.clone()))
    }

    /// Spawns `task` on the tracker.
    pub(crate) fn spawn<F>(&self, task: F) -> JoinHandle<F::Output>
    where
        F: Future + Send + 'static,
        F::Output: Send + 'static,
    {
        self.tracker.spawn(task)
    }

    /// Runs `work` on the blocking pool, tracked.
    pub(crate) fn spawn_blocking<F, T>(&self, work: F) -> JoinHandle<T>
    where
        F: FnOnce() -> T + Send + 'static,
        T: Send + 'static,
    {
        self.tracker.spawn_blocking(work)
    }
}
