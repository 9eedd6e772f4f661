//! Worker threads, one per core as nginx runs its worker processes: each thread runs its own
//! single-threaded tokio runtime and serves the client connections handed to it, whole. A
//! connection's requests, their upstream connections and their timers stay on one thread: no
//! work-stealing queues, no wake-ups across cores, no cache lines moving between them per
//! request.
//!
//! The accept loops run on the main thread's runtime, which is worker 0: they deal accepted
//! connections out in turn, one to each worker.

use std::cell::Cell;
use std::future::Future;
use std::io;
use std::sync::Mutex;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::thread::JoinHandle;
use std::time::Duration;

use tokio::net::TcpStream;
use tokio::runtime::Handle;
use tokio::sync::watch;

/// Workers in this process; what per-worker tables are sized by. 1 until [`Workers::start`].
static COUNT: AtomicUsize = AtomicUsize::new(1);

thread_local! {
    /// This thread's worker number: 0 on the main thread (and any thread not a worker).
    static INDEX: Cell<usize> = const { Cell::new(0) };
}

/// The number of the worker this thread is, below [`count`].
pub fn current() -> usize {
    INDEX.with(Cell::get)
}

/// How many workers serve connections (at least 1).
pub fn count() -> usize {
    COUNT.load(Ordering::Relaxed).max(1)
}

/// The worker threads beyond the main one, each with its runtime.
pub struct Workers {
    handles: Vec<Handle>,
    threads: Mutex<Vec<JoinHandle<()>>>,
    /// Turns true to stop them.
    stop: watch::Sender<bool>,
    /// The next connection's worker.
    next: AtomicUsize,
}

impl Workers {
    /// Starts `total - 1` worker threads (the main thread being the first worker), each
    /// running a current-thread runtime until [`Workers::shutdown`].
    pub fn start(total: usize) -> io::Result<Self> {
        let total = total.max(1);
        let (stop, stopped) = watch::channel(false);
        let mut handles = Vec::with_capacity(total - 1);
        let mut threads = Vec::with_capacity(total - 1);
        for index in 1..total {
            let runtime = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()?;
            handles.push(runtime.handle().clone());
            let mut stopped = stopped.clone();
            let thread = std::thread::Builder::new()
                .name(format!("tollgate-worker-{index}"))
                .spawn(move || {
                    INDEX.with(|i| i.set(index));
                    runtime.block_on(async {
                        while !*stopped.borrow_and_update() {
                            if stopped.changed().await.is_err() {
                                break;
                            }
                        }
                    });
                    // What is still running past the shutdown grace is dropped.
                    runtime.shutdown_timeout(Duration::from_millis(100));
                })?;
            threads.push(thread);
        }
        COUNT.store(total, Ordering::Relaxed);
        Ok(Self {
            handles,
            threads: Mutex::new(threads),
            stop,
            next: AtomicUsize::new(0),
        })
    }

    /// How many workers there are, the main thread's included.
    pub fn total(&self) -> usize {
        self.handles.len() + 1
    }

    /// Runs the connection `serve` makes of `stream` on the next worker in turn. On another
    /// worker, the socket moves to that worker's runtime first, so its readiness events are
    /// that thread's own.
    pub fn spawn<F, Fut>(&self, stream: TcpStream, serve: F)
    where
        F: FnOnce(TcpStream) -> Fut + Send + 'static,
        Fut: Future<Output = ()> + Send + 'static,
    {
        let turn = self.next.fetch_add(1, Ordering::Relaxed) % self.total();
        let Some(handle) = turn.checked_sub(1).map(|i| &self.handles[i]) else {
            tokio::spawn(serve(stream));
            return;
        };
        let stream = match stream.into_std() {
            Ok(stream) => stream,
            Err(e) => {
                tracing::debug!(error = %e, "cannot hand a connection to a worker");
                return;
            }
        };
        handle.spawn(async move {
            match TcpStream::from_std(stream) {
                Ok(stream) => serve(stream).await,
                Err(e) => tracing::debug!(error = %e, "a worker cannot take a connection"),
            }
        });
    }

    /// Stops the worker threads (what they still run is dropped) and waits for them.
    pub fn shutdown(&self) {
        let _ = self.stop.send(true);
        let threads = std::mem::take(&mut *self.threads.lock().unwrap_or_else(|e| e.into_inner()));
        for thread in threads {
            let _ = thread.join();
        }
        COUNT.store(1, Ordering::Relaxed);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn connections_are_dealt_to_every_worker_in_turn_each_on_its_own_thread() {
        let main = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .unwrap();
        let workers = Workers::start(3).unwrap();
        assert_eq!(workers.total(), 3);
        let seen = main.block_on(async {
            let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
            let addr = listener.local_addr().unwrap();
            let (tx, mut rx) = tokio::sync::mpsc::unbounded_channel();
            let mut clients = Vec::new();
            for _ in 0..6 {
                clients.push(TcpStream::connect(addr).await.unwrap());
                let (stream, _) = listener.accept().await.unwrap();
                let tx = tx.clone();
                workers.spawn(stream, move |stream| async move {
                    // The socket works on the worker's runtime: read what the client wrote.
                    let mut byte = [0u8; 1];
                    let n = loop {
                        stream.readable().await.unwrap();
                        match stream.try_read(&mut byte) {
                            Err(e) if e.kind() == io::ErrorKind::WouldBlock => continue,
                            read => break read.unwrap(),
                        }
                    };
                    let _ = tx.send((
                        current(),
                        std::thread::current().name().map(str::to_owned),
                        n,
                    ));
                });
            }
            for client in &clients {
                client.writable().await.unwrap();
                client.try_write(b"x").unwrap();
            }
            let mut seen = Vec::new();
            for _ in 0..6 {
                let next = tokio::time::timeout(Duration::from_secs(10), rx.recv());
                seen.push(next.await.expect("every connection served").unwrap());
            }
            seen
        });
        let mut by_worker = [0usize; 3];
        for (index, name, n) in &seen {
            assert_eq!(*n, 1, "the connection's byte arrived on its worker");
            by_worker[*index] += 1;
            match index {
                0 => assert_eq!(name.as_deref(), std::thread::current().name()),
                i => assert_eq!(name.as_deref(), Some(&*format!("tollgate-worker-{i}"))),
            }
        }
        assert_eq!(by_worker, [2, 2, 2], "dealt in turn: {seen:?}");
        assert_eq!(count(), 3);
        workers.shutdown();
        assert_eq!(count(), 1);
    }
}
