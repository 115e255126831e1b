//! The proxy's workers: one thread per core (`server.worker_threads`), each
//! a current-thread tokio runtime that serves the connections handed to it,
//! start to end, with its own upstream connection pools.
//!
//! Why not one multi-thread runtime: with it, every request crossed the
//! work-stealing scheduler (shared run queues, atomics, wake-ups of parked
//! workers) and the upstream pool was one mutex-guarded set of connections
//! that any worker could take, so a request's upstream socket was often
//! registered with another worker's reactor. Here a client connection, its
//! requests, the upstream connections that serve them and their tasks all
//! stay on one thread, the way nginx's and HAProxy's workers do.
//!
//! Why an acceptor hands connections over instead of `SO_REUSEPORT`
//! listeners per worker: a second credproxy started on the same port would
//! then share it silently instead of failing with "address in use", and a
//! connection is accepted once for many keep-alive requests, so the hand-off
//! (one channel send, one re-registration) is off the per-request path.
//! The acceptor (on the control runtime) keeps the listener's caps and
//! accept back-off, and gives each connection to the worker with the fewest
//! open connections.
//!
//! Shutdown: the acceptors stop, each worker drains its connections (as
//! one listener did before), says so, then keeps its runtime running until
//! [`Workers::release`]: store and token-endpoint connections opened from a
//! worker are registered with its reactor and must keep working until the
//! last use flush is written.

use std::net::SocketAddr;
use std::sync::Arc;

use anyhow::Context as _;
use prometheus_client::metrics::gauge::Gauge;
use tokio::net::TcpStream;
use tokio::sync::{mpsc, oneshot};
use tokio_util::sync::{CancellationToken, DropGuard};

use super::h1::{Accepted, Connections};
use super::Permits;
use crate::config::ServerConfig;
use crate::metrics::Metrics;
use crate::proxy::{self, ClientAddr, Mount, Proxy};

/// An accepted connection on its way to a worker.
struct Conn {
    stream: std::net::TcpStream,
    /// The client's address: its budget of cold lookups is keyed by it.
    client: ClientAddr,
    local: SocketAddr,
    mount: Mount,
    permits: Permits,
}

/// One worker's queue, and how many connections it has open (the
/// `credproxy_worker_connections` gauge).
struct Queue {
    tx: mpsc::UnboundedSender<Conn>,
    open: Gauge,
}

/// What the acceptors hold: a way to each worker. A worker stops taking
/// connections once every clone of this is gone.
#[derive(Clone)]
pub(super) struct Handoff {
    queues: Arc<[Queue]>,
}

impl Handoff {
    /// Gives `stream` to the worker with the fewest open connections; if
    /// that worker is gone (shutting down), the connection is closed.
    pub(super) fn hand_off(
        &self,
        stream: TcpStream,
        peer: SocketAddr,
        local: SocketAddr,
        mount: Mount,
        permits: Permits,
    ) {
        let Some(queue) = self.queues.iter().min_by_key(|q| q.open.get()) else {
            return;
        };
        let stream = match stream.into_std() {
            Ok(s) => s,
            Err(e) => {
                tracing::debug!(error = %e, "cannot hand a connection to a worker");
                return;
            }
        };
        queue.open.inc();
        let conn = Conn {
            stream,
            client: ClientAddr(peer.ip()),
            local,
            mount,
            permits,
        };
        if queue.tx.send(conn).is_err() {
            queue.open.dec();
        }
    }
}

/// The running workers, for [`super::Running`]: dropped, they stop.
pub(super) struct Workers {
    drained: Vec<oneshot::Receiver<()>>,
    release: DropGuard,
}

impl Workers {
    /// Starts `count` worker threads serving through `proxy`.
    pub(super) fn start(
        count: usize,
        proxy: &Arc<Proxy>,
        cfg: &ServerConfig,
        metrics: &Metrics,
    ) -> anyhow::Result<(Handoff, Workers)> {
        let release = CancellationToken::new();
        let mut queues = Vec::with_capacity(count);
        let mut drained = Vec::with_capacity(count);
        let mut started = Vec::with_capacity(count);
        for index in 0..count {
            let (tx, rx) = mpsc::unbounded_channel();
            let open = metrics.worker_connections(index);
            let (done_tx, done_rx) = oneshot::channel();
            let (up_tx, up_rx) = std::sync::mpsc::channel();
            let worker = Worker {
                index,
                rx,
                open: open.clone(),
                proxy: Arc::clone(proxy),
                cfg: cfg.clone(),
                drained: done_tx,
                release: release.clone(),
            };
            std::thread::Builder::new()
                .name(format!("credproxy-w{index}"))
                .spawn(move || worker.run(up_tx))
                .context("starting a proxy worker thread")?;
            started.push(up_rx);
            queues.push(Queue { tx, open });
            drained.push(done_rx);
        }
        for up in started {
            match up.recv() {
                Ok(Ok(())) => {}
                Ok(Err(e)) => return Err(e).context("starting a proxy worker's runtime"),
                Err(_) => anyhow::bail!("a proxy worker thread ended as it started"),
            }
        }
        let handoff = Handoff {
            queues: queues.into(),
        };
        let workers = Workers {
            drained,
            release: release.drop_guard(),
        };
        Ok((handoff, workers))
    }

    /// Waits until every worker has drained its connections (the acceptors
    /// must have stopped first).
    pub(super) async fn drained(&mut self) {
        for done in self.drained.drain(..) {
            let _ = done.await;
        }
    }

    /// Lets the workers' runtimes end.
    pub(super) fn release(self) {
        drop(self.release);
    }
}

struct Worker {
    index: usize,
    rx: mpsc::UnboundedReceiver<Conn>,
    open: Gauge,
    proxy: Arc<Proxy>,
    cfg: ServerConfig,
    drained: oneshot::Sender<()>,
    release: CancellationToken,
}

impl Worker {
    fn run(self, up: std::sync::mpsc::Sender<std::io::Result<()>>) {
        let runtime = match tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
        {
            Ok(rt) => rt,
            Err(e) => {
                let _ = up.send(Err(e));
                return;
            }
        };
        let _ = up.send(Ok(()));
        proxy::enter_worker(self.index);
        runtime.block_on(self.serve());
    }

    async fn serve(mut self) {
        let connections = Connections::new(&self.cfg);
        // This worker's idle upstream connections that their upstream
        // closed are closed here, not left in CLOSE_WAIT until a checkout.
        let reaper = {
            let proxy = Arc::clone(&self.proxy);
            tokio::spawn(async move {
                let mut tick = tokio::time::interval(crate::proxy::forward::REAP_INTERVAL);
                tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
                loop {
                    tick.tick().await;
                    proxy.reap_idle();
                }
            })
        };
        while let Some(conn) = self.rx.recv().await {
            let open = OpenGuard(self.open.clone());
            // `into_std` left the socket non-blocking, as `from_std` needs.
            let stream = match TcpStream::from_std(conn.stream) {
                Ok(s) => s,
                Err(e) => {
                    tracing::debug!(error = %e, "a worker cannot take a connection");
                    continue;
                }
            };
            let at = Accepted {
                proxy: Arc::clone(&self.proxy),
                mount: conn.mount,
                local: conn.local,
                client: conn.client,
            };
            connections.serve(stream, at, (conn.permits, open));
        }
        connections.drain().await;
        reaper.abort();
        let _ = self.drained.send(());
        self.release.cancelled().await;
    }
}

/// Counts a connection as open on its worker until it ends.
struct OpenGuard(Gauge);

impl Drop for OpenGuard {
    fn drop(&mut self) {
        self.0.dec();
    }
}
