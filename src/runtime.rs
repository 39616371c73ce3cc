//! Where sessions run: thread per core. [`ShardPool::start`] starts one thread per session
//! shard, each driving its own current-thread Tokio runtime (its own I/O driver and timers);
//! [`Shards::spawn_tcp`] moves an accepted socket to the least-loaded shard, where the
//! session task, its two relay pumps and its lease watcher then live and are woken for good.
//! A session never wakes another thread on the byte path: its socket readiness, its timers
//! and its tasks all belong to the one thread. The control plane (accept loop, Vault HTTP,
//! revoker, audit writer, prefetch, admin server, signals, reload) runs on the runtime `main`
//! builds for it.
//!
//! One acceptor distributing to shards, rather than one `SO_REUSEPORT` listener per shard:
//! the kernel's reuseport hash spreads connections by address and port, blind to how many
//! sessions each shard already holds, so a few long-lived sessions (a pool of 8) can land 6
//! on one core and 2 on the other; the acceptor counts the open sessions per shard and picks
//! the emptiest. And a reuseport listener that closes (a drain, a restart) resets the
//! connections still waiting in its own accept queue, where one listener simply stops
//! accepting and the rest wait for the next process. The cost: one cross-thread wake-up per
//! new session (the hand-over), none per message.

use std::future::Future;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};

use tokio::net::TcpStream;
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

/// Work handed to a shard: runs on the shard's thread, inside its runtime, so that what it
/// spawns and registers (sockets, timers, tasks) belongs to that shard.
type Job = Box<dyn FnOnce() + Send>;

/// One shard as the acceptor sees it.
struct Shard {
    /// Where jobs go; the shard's thread runs them in order.
    jobs: mpsc::UnboundedSender<Job>,
    /// Sessions handed to this shard and not yet ended: what "least loaded" compares.
    load: Arc<AtomicUsize>,
}

/// A connection that can leave one runtime's I/O driver for another's.
pub(crate) trait Rehome: Sized + Send + 'static {
    /// The connection outside any runtime.
    type Std: Send + 'static;
    /// Out of this runtime's driver.
    fn into_std(self) -> std::io::Result<Self::Std>;
    /// Into the current runtime's driver.
    fn from_std(std: Self::Std) -> std::io::Result<Self>;
}

impl Rehome for TcpStream {
    type Std = std::net::TcpStream;
    fn into_std(self) -> std::io::Result<Self::Std> {
        TcpStream::into_std(self)
    }
    fn from_std(std: Self::Std) -> std::io::Result<Self> {
        TcpStream::from_std(std)
    }
}

impl Rehome for tokio::net::UnixStream {
    type Std = std::os::unix::net::UnixStream;
    fn into_std(self) -> std::io::Result<Self::Std> {
        tokio::net::UnixStream::into_std(self)
    }
    fn from_std(std: Self::Std) -> std::io::Result<Self> {
        tokio::net::UnixStream::from_std(std)
    }
}

/// The handle the acceptor uses: cheap to clone. Without shards (unit tests, tools), sessions
/// run on the runtime that spawns them.
#[derive(Clone, Default)]
pub struct Shards {
    /// Empty: no shard threads.
    shards: Arc<Vec<Shard>>,
    /// Rotates where the search for the least-loaded shard starts, so ties spread evenly.
    next: Arc<AtomicUsize>,
}

/// Counts one session against its shard until dropped.
struct Load(Arc<AtomicUsize>);

impl Drop for Load {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::Relaxed);
    }
}

impl Shards {
    /// How many session threads there are (0: sessions run where they are spawned).
    pub fn len(&self) -> usize {
        self.shards.len()
    }

    /// Whether there are no shard threads.
    pub fn is_empty(&self) -> bool {
        self.shards.is_empty()
    }

    /// The shard with the fewest open sessions, the search starting one further each time.
    fn pick(&self) -> Option<&Shard> {
        let n = self.shards.len();
        let start = self.next.fetch_add(1, Ordering::Relaxed) % n.max(1);
        (0..n)
            .map(|i| &self.shards[(start + i) % n])
            .min_by_key(|s| s.load.load(Ordering::Relaxed))
    }

    /// Runs the task `start` makes from the connection `tcp` (TCP or Unix socket) on the
    /// least-loaded shard, tracked by
    /// `tracker`: the socket is re-registered with that shard's I/O driver, so everything the
    /// session does afterwards stays on its thread. Without shards, spawns here.
    pub(crate) fn spawn<S, F, Fut>(&self, tracker: &TaskTracker, tcp: S, start: F)
    where
        S: Rehome,
        F: FnOnce(S) -> Fut + Send + 'static,
        Fut: Future<Output = ()> + Send + 'static,
    {
        let Some(shard) = self.pick() else {
            tracker.spawn(start(tcp));
            return;
        };
        // Out of this runtime's reactor, into the shard's (`from_std` there).
        let std = match tcp.into_std() {
            Ok(s) => s,
            Err(e) => {
                tracing::warn!(error = %e, "cannot hand the connection to a session thread");
                return;
            }
        };
        shard.load.fetch_add(1, Ordering::Relaxed);
        let load = Load(shard.load.clone());
        // Counts as a task of `tracker` from now, so a drain that waits for the sessions also
        // waits for one still on its way to its thread.
        let on_the_way = tracker.token();
        let tracker = tracker.clone();
        let job: Job = Box::new(move || {
            match S::from_std(std) {
                Ok(tcp) => {
                    tracker.spawn(async move {
                        start(tcp).await;
                        drop(load);
                    });
                }
                Err(e) => tracing::warn!(error = %e, "cannot register the connection"),
            }
            drop(on_the_way);
        });
        // A send fails only once the shard stopped (the process is exiting): the job, and
        // with it the socket, is dropped, which closes the connection.
        let _ = shard.jobs.send(job);
    }
}

/// The session threads, owned by `main`: [`ShardPool::stop`] ends them once the drain is
/// over.
pub struct ShardPool {
    /// What the acceptor hands sessions to.
    shards: Shards,
    /// Cancelled to end every shard's loop; its runtime then drops what is left.
    stop: CancellationToken,
    /// Joined by [`ShardPool::stop`].
    threads: Vec<std::thread::JoinHandle<()>>,
}

impl ShardPool {
    /// Starts `threads` session threads (`None`: one per available core), each with a
    /// current-thread runtime.
    pub fn start(threads: Option<usize>) -> std::io::Result<ShardPool> {
        let n = threads.unwrap_or_else(default_threads).max(1);
        let stop = CancellationToken::new();
        let mut shards = Vec::with_capacity(n);
        let mut handles = Vec::with_capacity(n);
        for i in 0..n {
            let runtime = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .thread_name(format!("lg-shard-{i}-blocking"))
                .build()?;
            let (tx, rx) = mpsc::unbounded_channel();
            let stop = stop.clone();
            let thread = std::thread::Builder::new()
                .name(format!("lg-shard-{i}"))
                .spawn(move || runtime.block_on(shard_loop(rx, stop)))?;
            shards.push(Shard {
                jobs: tx,
                load: Arc::new(AtomicUsize::new(0)),
            });
            handles.push(thread);
        }
        Ok(ShardPool {
            shards: Shards {
                shards: Arc::new(shards),
                next: Arc::new(AtomicUsize::new(0)),
            },
            stop,
            threads: handles,
        })
    }

    /// The acceptor's handle.
    pub fn shards(&self) -> Shards {
        self.shards.clone()
    }

    /// Ends every shard (the tasks still on them are dropped with their runtime) and waits
    /// for the threads.
    pub fn stop(self) {
        self.stop.cancel();
        drop(self.shards);
        for thread in self.threads {
            let _ = thread.join();
        }
    }
}

/// The default number of session threads: the cores this process may run on.
pub fn default_threads() -> usize {
    std::thread::available_parallelism().map_or(1, |n| n.get())
}

/// A shard's life: run the jobs handed to it until told to stop. The job channel closing
/// (the acceptor gone, at the start of a drain) does not end it: its sessions still run.
async fn shard_loop(mut jobs: mpsc::UnboundedReceiver<Job>, stop: CancellationToken) {
    loop {
        tokio::select! {
            job = jobs.recv() => match job {
                Some(job) => job(),
                None => break,
            },
            () = stop.cancelled() => return,
        }
    }
    stop.cancelled().await;
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A connected pair on loopback: (the accepted side, the client side).
    async fn pair(listener: &tokio::net::TcpListener) -> (TcpStream, TcpStream) {
        let addr = listener.local_addr().expect("addr");
        let client = TcpStream::connect(addr).await.expect("connect");
        let (accepted, _) = listener.accept().await.expect("accept");
        (accepted, client)
    }

    #[tokio::test]
    async fn sessions_run_on_the_shard_threads_and_spread_evenly() {
        let pool = ShardPool::start(Some(2)).expect("start");
        let shards = pool.shards();
        let tracker = TaskTracker::new();
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
            .await
            .expect("bind");
        let (tx, mut rx) = mpsc::unbounded_channel();
        let mut clients = Vec::new();
        for _ in 0..4 {
            let (accepted, client) = pair(&listener).await;
            clients.push(client);
            let tx = tx.clone();
            shards.spawn(&tracker, accepted, move |mut tcp| async move {
                use tokio::io::AsyncWriteExt;
                let name = std::thread::current().name().unwrap_or("").to_owned();
                // The socket works on the shard's own reactor.
                tcp.write_all(b"x").await.expect("write");
                let _ = tx.send(name);
                // Stay open (counted as load) until the client closes.
                let mut buf = [0u8; 1];
                let _ = tokio::io::AsyncReadExt::read(&mut tcp, &mut buf).await;
            });
        }
        let mut names = Vec::new();
        for _ in 0..4 {
            names.push(rx.recv().await.expect("name"));
        }
        names.sort();
        assert_eq!(
            names,
            ["lg-shard-0", "lg-shard-0", "lg-shard-1", "lg-shard-1"]
        );
        for mut c in clients {
            use tokio::io::AsyncReadExt;
            let mut b = [0u8; 1];
            c.read_exact(&mut b).await.expect("byte from the session");
        }
        tracker.close();
        tracker.wait().await;
        assert!(
            shards
                .shards
                .iter()
                .all(|s| s.load.load(Ordering::Relaxed) == 0)
        );
        pool.stop();
    }

    #[tokio::test]
    async fn without_shards_sessions_run_here() {
        let shards = Shards::default();
        let tracker = TaskTracker::new();
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
            .await
            .expect("bind");
        let (accepted, _client) = pair(&listener).await;
        let here = std::thread::current().id();
        let (tx, rx) = tokio::sync::oneshot::channel();
        shards.spawn(&tracker, accepted, move |_tcp| async move {
            let _ = tx.send(std::thread::current().id());
        });
        assert_eq!(rx.await.expect("ran"), here);
    }
}
