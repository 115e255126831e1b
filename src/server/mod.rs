//! Starting and stopping the whole server: the store, the proxy listeners,
//! the admin listener and the background tasks, tied to one shutdown token.
//!
//! Limits are in plain sight here and in `h1/`: a semaphore caps
//! connections per listener (and the proxy listeners together to what
//! `RLIMIT_NOFILE` allows); the request head is capped exactly at
//! `server.max_header_bytes` (over it: 431), a head that does not arrive
//! within `header_read_timeout` ends its connection (an idle keep-alive one
//! too), a write that makes no progress for `write_timeout` ends it
//! (request bodies that stop arriving end in `proxy::silence`). The proxy
//! listeners are served by credproxy's own HTTP/1.1 server (`h1/`, on the
//! workers), the admin listener by hyper's with the same limits
//! ([`Connections`], [`WriteTimeout`]). Accept errors (out of file
//! descriptors) back off. On shutdown, listeners stop accepting, in-flight
//! requests get `shutdown_grace` to finish, then the rest are dropped.

use std::future::Future as _;
use std::io;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context as TaskContext, Poll};
use std::time::Duration;

use anyhow::Context;
use hyper::server::conn::http1;
use hyper_util::rt::{TokioIo, TokioTimer};
use hyper_util::server::graceful::GracefulShutdown;
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{OwnedSemaphorePermit, Semaphore};
use tokio::task::JoinSet;
use tokio::time::Sleep;
use tokio_util::sync::CancellationToken;

use crate::config::{Config, ServerConfig};
use crate::control::admin;
use crate::metrics::Metrics;
use crate::proxy::{Mount, Proxy};
use crate::tokens::refresh::Refresher;
use crate::tokens::sessions::Sessions;

mod h1;
mod workers;

use workers::{Handoff, Workers};

/// A started server. Dropping it stops it at once (its tasks end, its
/// workers close their connections); [`Running::shutdown`] drains first.
pub struct Running {
    pub proxy_addr: SocketAddr,
    pub admin_addr: SocketAddr,
    /// Each provider's dedicated listener, by provider name.
    pub provider_addrs: Vec<(String, SocketAddr)>,
    pub sessions: Arc<Sessions>,
    pub refresher: Arc<Refresher>,
    shutdown: CancellationToken,
    tasks: JoinSet<()>,
    workers: Option<Workers>,
    /// `server.shutdown_grace`: also how long refreshes under way are
    /// waited for.
    grace: std::time::Duration,
}

impl Running {
    /// A token that stops the server when cancelled (e.g. from a signal handler).
    pub fn shutdown_token(&self) -> CancellationToken {
        self.shutdown.clone()
    }

    /// Waits until the server has stopped (after the token is cancelled and
    /// in-flight requests have drained or the grace period ran out), waits
    /// for the refreshes under way (within the same grace: a refresh the
    /// provider has answered must be committed, or its rotated token is
    /// lost) and gives back this process's refresh leases, then writes the
    /// sessions' last uses once more.
    pub async fn wait(mut self) {
        while self.tasks.join_next().await.is_some() {}
        // The acceptors have stopped: the shutdown began about now.
        let deadline = tokio::time::Instant::now() + self.grace;
        if let Some(workers) = self.workers.as_mut() {
            workers.drained().await;
        }
        self.refresher.finish(deadline).await;
        self.sessions.flush_all_uses().await;
        if let Some(workers) = self.workers.take() {
            workers.release();
        }
    }

    /// Stops accepting, drains in-flight requests, and returns when done.
    pub async fn shutdown(self) {
        self.shutdown.cancel();
        self.wait().await;
    }
}

fn notifier(
    notify: &crate::config::NotifyConfig,
    sessions: &Arc<Sessions>,
    metrics: &Arc<Metrics>,
) -> anyhow::Result<crate::notify::Notifier> {
    crate::notify::Notifier::new(
        notify.clone(),
        Arc::clone(sessions.store()),
        Arc::clone(metrics),
    )
    .context("notify: cannot build the HTTP client")
}

async fn bind(addr: SocketAddr, key: &str) -> anyhow::Result<TcpListener> {
    TcpListener::bind(addr)
        .await
        .with_context(|| format!("{key}: cannot listen on {addr}"))
}

/// Opens the store, binds every listener and starts serving.
pub async fn start(config: Config) -> anyhow::Result<Running> {
    // A config loaded for the store alone carries placeholder secrets.
    config.require_everything()?;
    for w in &config.warnings {
        tracing::warn!("{w}");
    }
    let (sessions, warnings) = Sessions::open(&config).await?;
    for w in &warnings {
        tracing::warn!("{w}");
    }
    let sessions = Arc::new(sessions);
    // Where the change follower starts, read before any request can put a
    // key in the negative cache (on an error the follower reads it itself).
    let change_cursor = sessions.store().change_cursor().await.ok();
    let metrics = Arc::new(Metrics::default());
    let refresher = Arc::new(Refresher::new(
        &config,
        Arc::clone(&sessions),
        Arc::clone(&metrics),
    )?);
    // Rotations a process that died received but did not store.
    refresher.recover_rotations().await;
    let proxy = Arc::new(Proxy::new(
        &config,
        Arc::clone(&sessions),
        Arc::clone(&refresher),
        Arc::clone(&metrics),
    )?);

    let proxy_listener = bind(config.server.listen, "server.listen").await?;
    let admin_listener = bind(config.server.admin_listen, "server.admin_listen").await?;
    let mut dedicated = Vec::new();
    for p in &config.providers {
        if let Some(addr) = p.listen {
            let index = proxy.route_index(&p.name).context("provider route")?;
            let listener = bind(addr, &format!("providers.{}.listen", p.name)).await?;
            dedicated.push((p.name.clone(), index, listener));
        }
    }

    let (proxy_limits, admin_limits) =
        connection_limits(config.server.max_connections, 1 + dedicated.len());

    let shutdown = CancellationToken::new();
    let mut tasks = JoinSet::new();
    let proxy_addr = proxy_listener.local_addr()?;
    let admin_addr = admin_listener.local_addr()?;
    tracing::info!(addr = %proxy_addr, "proxy listening");
    tracing::info!(addr = %admin_addr, "admin listening");
    let (handoff, workers) =
        Workers::start(config.server.workers(), &proxy, &config.server, &metrics)?;
    tasks.spawn(serve_proxy(
        proxy_listener,
        handoff.clone(),
        Mount::Prefixed,
        proxy_limits.clone(),
        shutdown.clone(),
    ));
    let mut provider_addrs = Vec::new();
    for (name, index, listener) in dedicated {
        let addr = listener.local_addr()?;
        tracing::info!(provider = %name, addr = %addr, "provider listening");
        provider_addrs.push((name, addr));
        tasks.spawn(serve_proxy(
            listener,
            handoff.clone(),
            Mount::Dedicated(index),
            proxy_limits.clone(),
            shutdown.clone(),
        ));
    }
    // The workers stop taking connections once the acceptors are done.
    drop(handoff);
    let admin_state = admin::AdminState::new(
        &config,
        Arc::clone(&refresher),
        Arc::clone(&metrics),
        proxy_addr,
    );
    let stop = shutdown.clone();
    tasks.spawn(admin_state.connect_pruning(shutdown.clone().cancelled_owned()));
    let app = admin::router(admin_state);
    tasks.spawn(serve(
        admin_listener,
        config.server.clone(),
        admin_limits,
        stop,
        move |_, peer| admin::service(&app, peer),
    ));
    tasks.spawn(Arc::clone(&sessions).follow_changes_from(
        change_cursor,
        config.store.invalidation_interval,
        shutdown.clone().cancelled_owned(),
    ));
    tasks.spawn(
        Arc::clone(sessions.vault().ring())
            .watch(config.store.key_reload_interval, shutdown.clone()),
    );
    tasks.spawn(Arc::clone(&refresher).refresh_ahead(shutdown.clone().cancelled_owned()));
    tasks.spawn(Arc::clone(&refresher).refresh_idle(shutdown.clone().cancelled_owned()));
    if let Some(notify) = &config.notify {
        let notifier = notifier(notify, &sessions, &metrics)?;
        tasks.spawn(notifier.run(shutdown.clone()));
    }
    tasks.spawn(Arc::clone(&sessions).write_last_uses(
        config.store.use_flush_interval,
        shutdown.clone().cancelled_owned(),
    ));
    Ok(Running {
        proxy_addr,
        admin_addr,
        provider_addrs,
        sessions,
        refresher,
        shutdown,
        tasks,
        workers: Some(workers),
        grace: config.server.shutdown_grace,
    })
}

/// Accepts connections on one proxy listener until shutdown and hands
/// each to a worker (see [`workers`]), which serves and drains it.
async fn serve_proxy(
    listener: TcpListener,
    workers: Handoff,
    mount: Mount,
    limits: Limits,
    shutdown: CancellationToken,
) {
    let fallback = listener.local_addr().ok();
    accept(listener, &limits, &shutdown, |stream, peer, permits| {
        let local = stream.local_addr().ok().or(fallback);
        if let Some(local) = local {
            workers.hand_off(stream, peer, local, mount, permits);
        }
    })
    .await;
}

/// Accepts HTTP/1.1 connections on one listener until shutdown and serves
/// them on this runtime, then drains (the admin listener).
async fn serve<S, B>(
    listener: TcpListener,
    cfg: ServerConfig,
    limits: Limits,
    shutdown: CancellationToken,
    make: impl Fn(SocketAddr, SocketAddr) -> S,
) where
    S: hyper::service::Service<
            hyper::Request<hyper::body::Incoming>,
            Response = hyper::Response<B>,
        > + Send
        + 'static,
    S::Future: Send + 'static,
    S::Error: Into<Box<dyn std::error::Error + Send + Sync>>,
    B: hyper::body::Body + Send + 'static,
    B::Data: Send,
    B::Error: Into<Box<dyn std::error::Error + Send + Sync>>,
{
    let connections = Connections::new(&cfg);
    accept(listener, &limits, &shutdown, |stream, peer, permits| {
        let local = stream.local_addr().unwrap_or(cfg.listen);
        connections.serve(stream, make(local, peer), permits);
    })
    .await;
    connections.drain().await;
}

/// Accepts on `listener` until shutdown, each connection under the
/// listener's caps (its permits go with it), backing off when accepting
/// fails, and gives each to `take`.
async fn accept(
    listener: TcpListener,
    limits: &Limits,
    shutdown: &CancellationToken,
    mut take: impl FnMut(TcpStream, SocketAddr, Permits),
) {
    let own = Arc::new(Semaphore::new(limits.per_listener));
    let mut backoff = AcceptBackoff::default();
    loop {
        let permit = tokio::select! {
            () = shutdown.cancelled() => break,
            p = limits.acquire(&own) => match p {
                Some(p) => p,
                None => break,
            },
        };
        let (stream, peer) = tokio::select! {
            () = shutdown.cancelled() => break,
            accepted = listener.accept() => match accepted {
                Ok(a) => {
                    backoff.succeeded(&listener);
                    a
                }
                Err(e) => {
                    // Usually out of file descriptors (EMFILE, ENFILE): wait
                    // for some to be freed instead of spinning and logging.
                    let delay = backoff.failed(&listener, &e);
                    drop(permit);
                    tokio::select! {
                        () = shutdown.cancelled() => break,
                        () = tokio::time::sleep(delay) => continue,
                    }
                }
            },
        };
        take(stream, peer, permit);
    }
}

/// The admin listener's HTTP/1.1 side: hyper's settings (the limits of
/// the proxy listeners' own server, `h1`), and the connections served, so
/// they can be drained.
struct Connections {
    http: http1::Builder,
    graceful: GracefulShutdown,
    write_timeout: Duration,
    shutdown_grace: Duration,
}

impl Connections {
    fn new(cfg: &ServerConfig) -> Connections {
        let mut http = http1::Builder::new();
        http.timer(TokioTimer::new())
            .header_read_timeout(cfg.header_read_timeout)
            // The head limit, exact: request line, headers and the blank line,
            // as sent. `max_buf_size` alone is a buffer size that reads may
            // overshoot; it stays as the cap on what a connection buffers in
            // each direction (hyper answers one request at a time, so a peer
            // that pipelines without reading holds at most this much here,
            // besides the kernel's socket buffers, until `write_timeout`).
            .max_header_size(cfg.max_header_bytes)
            .max_buf_size(cfg.max_header_bytes)
            .keep_alive(true);
        Connections {
            http,
            graceful: GracefulShutdown::new(),
            write_timeout: cfg.write_timeout,
            shutdown_grace: cfg.shutdown_grace,
        }
    }

    /// Serves one connection on the current runtime; `hold` (its permits)
    /// is dropped when it ends.
    fn serve<S, B>(&self, stream: TcpStream, service: S, hold: impl Send + 'static)
    where
        S: hyper::service::Service<
                hyper::Request<hyper::body::Incoming>,
                Response = hyper::Response<B>,
            > + Send
            + 'static,
        S::Future: Send + 'static,
        S::Error: Into<Box<dyn std::error::Error + Send + Sync>>,
        B: hyper::body::Body + Send + 'static,
        B::Data: Send,
        B::Error: Into<Box<dyn std::error::Error + Send + Sync>>,
    {
        let _ = stream.set_nodelay(true);
        let io = TokioIo::new(WriteTimeout::new(stream, self.write_timeout));
        let conn = self.graceful.watch(self.http.serve_connection(io, service));
        tokio::spawn(async move {
            if let Err(e) = conn.await {
                tracing::debug!(error = %e, "connection ended with an error");
            }
            drop(hold);
        });
    }

    /// Lets in-flight requests finish, for `shutdown_grace` at most.
    async fn drain(self) {
        tokio::select! {
            () = self.graceful.shutdown() => tracing::debug!("connections drained"),
            () = tokio::time::sleep(self.shutdown_grace) => {
                tracing::warn!(grace_secs = self.shutdown_grace.as_secs_f64(), "shutdown grace period over; closing remaining connections");
            }
        }
    }
}

/// File descriptors kept back from client connections: the listeners,
/// stdio, the store's pool, the token endpoint's and notify's clients, and
/// the admin listener's connections.
const FD_RESERVE: u64 = 128;
/// The admin listener's connections at once when descriptors are short.
const ADMIN_CONNECTIONS_WHEN_SHORT: usize = 64;

/// Connection caps that fit the open-file limit: each proxied connection
/// may hold an upstream socket too, so the proxy listeners together get
/// `(RLIMIT_NOFILE - FD_RESERVE) / 2` connections at most.
#[derive(Debug, PartialEq, Eq)]
struct Budget {
    /// Connections at once on each proxy listener.
    per_listener: usize,
    /// Connections at once on all proxy listeners together.
    proxy_total: usize,
    /// Connections at once on the admin listener.
    admin: usize,
    /// Descriptors the configuration would need at most.
    wanted_files: u64,
    /// Whether the limit cut the configuration down.
    clamped: bool,
}

impl Budget {
    fn new(max_connections: usize, proxy_listeners: usize, nofile: Option<u64>) -> Budget {
        let max = max_connections.min(Semaphore::MAX_PERMITS);
        let wanted = max
            .saturating_mul(proxy_listeners)
            .min(Semaphore::MAX_PERMITS);
        let wanted_files = (wanted as u64).saturating_mul(2).saturating_add(FD_RESERVE);
        let fit =
            nofile.map(|n| usize::try_from(n.saturating_sub(FD_RESERVE) / 2).unwrap_or(usize::MAX));
        match fit {
            Some(fit) if fit < wanted => {
                let total = fit.max(1);
                Budget {
                    per_listener: max.min(total),
                    proxy_total: total,
                    admin: max.min(ADMIN_CONNECTIONS_WHEN_SHORT),
                    wanted_files,
                    clamped: true,
                }
            }
            _ => Budget {
                per_listener: max,
                proxy_total: wanted,
                admin: max,
                wanted_files,
                clamped: false,
            },
        }
    }
}

/// A listener's connection caps: its own, and one shared by the proxy
/// listeners.
#[derive(Clone)]
struct Limits {
    per_listener: usize,
    shared: Option<Arc<Semaphore>>,
}

/// What one connection holds for its life.
struct Permits {
    _own: OwnedSemaphorePermit,
    _shared: Option<OwnedSemaphorePermit>,
}

impl Limits {
    async fn acquire(&self, own: &Arc<Semaphore>) -> Option<Permits> {
        let mine = Arc::clone(own).acquire_owned().await.ok()?;
        let shared = match &self.shared {
            Some(s) => Some(Arc::clone(s).acquire_owned().await.ok()?),
            None => None,
        };
        Some(Permits {
            _own: mine,
            _shared: shared,
        })
    }
}

/// The caps of the proxy listeners and of the admin listener, cut down
/// (with a warning) to what `RLIMIT_NOFILE` allows.
fn connection_limits(max_connections: usize, proxy_listeners: usize) -> (Limits, Limits) {
    let nofile = nofile_limit();
    let b = Budget::new(max_connections, proxy_listeners, nofile);
    if b.clamped {
        tracing::warn!(
            "server.max_connections = {max_connections} on {proxy_listeners} proxy listener(s) \
             needs up to {} open files (its connections, an upstream connection each, \
             {FD_RESERVE} in reserve) but RLIMIT_NOFILE is {}: serving at most {} proxied \
             connections at once and {} on the admin listener; raise the limit (systemd \
             LimitNOFILE=, docker run --ulimit nofile=)",
            b.wanted_files,
            nofile.unwrap_or_default(),
            b.proxy_total,
            b.admin,
        );
    }
    (
        Limits {
            per_listener: b.per_listener,
            shared: Some(Arc::new(Semaphore::new(b.proxy_total))),
        },
        Limits {
            per_listener: b.admin,
            shared: None,
        },
    )
}

/// The soft `RLIMIT_NOFILE`, if there is a finite one.
fn nofile_limit() -> Option<u64> {
    #[cfg(unix)]
    {
        rlimit::Resource::NOFILE
            .get()
            .ok()
            .map(|(soft, _)| soft)
            .filter(|&soft| soft != rlimit::INFINITY)
    }
    #[cfg(not(unix))]
    {
        None
    }
}

/// Raises the soft `RLIMIT_NOFILE` to the hard limit, so that a default
/// soft limit (often 1024) does not cut `max_connections` short. `serve`
/// calls it once at start-up; [`start`] then fits the connection caps to
/// the limit.
pub fn raise_nofile_limit() {
    #[cfg(unix)]
    {
        let before = rlimit::Resource::NOFILE.get().map(|(soft, _)| soft);
        match (before, rlimit::increase_nofile_limit(u64::MAX)) {
            (Ok(before), Ok(now)) if now > before => {
                tracing::info!(
                    from = before,
                    to = now,
                    "raised the open-file limit (RLIMIT_NOFILE)"
                );
            }
            (_, Err(e)) => {
                tracing::warn!(error = %e, "cannot raise the open-file limit (RLIMIT_NOFILE)");
            }
            _ => {}
        }
    }
}

const ACCEPT_BACKOFF_FIRST: Duration = Duration::from_millis(10);
const ACCEPT_BACKOFF_MAX: Duration = Duration::from_secs(1);

/// Failed accepts (out of descriptors) are retried after 10 ms, doubling up
/// to 1 s, with one warning per episode.
#[derive(Default)]
struct AcceptBackoff {
    delay: Option<Duration>,
    failures: u64,
}

impl AcceptBackoff {
    fn next(delay: Option<Duration>) -> Duration {
        delay.map_or(ACCEPT_BACKOFF_FIRST, |d| (d * 2).min(ACCEPT_BACKOFF_MAX))
    }

    /// How long to wait before the next attempt.
    fn failed(&mut self, listener: &TcpListener, e: &io::Error) -> Duration {
        if self.delay.is_none() {
            tracing::warn!(
                addr = ?listener.local_addr().ok(),
                error = %e,
                "accept failed; retrying with a back-off of up to 1 s until it works again"
            );
        }
        self.failures += 1;
        let delay = Self::next(self.delay);
        self.delay = Some(delay);
        delay
    }

    fn succeeded(&mut self, listener: &TcpListener) {
        if self.delay.take().is_some() {
            tracing::info!(
                addr = ?listener.local_addr().ok(),
                failures = self.failures,
                "accepting connections again"
            );
            self.failures = 0;
        }
    }
}

/// A client connection whose writes fail once one has made no progress
/// for `timeout`: a peer that stops reading (its receive window and our
/// send buffer full) is cut off instead of holding the connection, and
/// what is buffered for it, for ever. On that failure the socket is set
/// to close with a reset, so the kernel drops what it still holds for
/// the peer at once instead of trying to deliver it for minutes.
struct WriteTimeout {
    stream: TcpStream,
    timeout: Duration,
    /// Set while a write is pending: when it fails.
    deadline: Option<Pin<Box<Sleep>>>,
}

impl WriteTimeout {
    fn new(stream: TcpStream, timeout: Duration) -> WriteTimeout {
        WriteTimeout {
            stream,
            timeout,
            deadline: None,
        }
    }

    /// Passes a write's result on; a write still pending after `timeout`
    /// of no progress becomes an error.
    fn guard<T>(
        &mut self,
        cx: &mut TaskContext<'_>,
        r: Poll<io::Result<T>>,
    ) -> Poll<io::Result<T>> {
        if r.is_ready() {
            self.deadline = None;
            return r;
        }
        let timeout = self.timeout;
        let deadline = self
            .deadline
            .get_or_insert_with(|| Box::pin(tokio::time::sleep(timeout)));
        if deadline.as_mut().poll(cx).is_pending() {
            return Poll::Pending;
        }
        let _ = self.stream.set_zero_linger();
        tracing::debug!(
            peer = ?self.stream.peer_addr().ok(),
            "closing a connection: its peer read nothing for write_timeout"
        );
        Poll::Ready(Err(io::Error::new(
            io::ErrorKind::TimedOut,
            "the peer read nothing for write_timeout",
        )))
    }
}

impl AsyncRead for WriteTimeout {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut TaskContext<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().stream).poll_read(cx, buf)
    }
}

impl AsyncWrite for WriteTimeout {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut TaskContext<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        let this = self.get_mut();
        let r = Pin::new(&mut this.stream).poll_write(cx, buf);
        this.guard(cx, r)
    }

    fn poll_write_vectored(
        self: Pin<&mut Self>,
        cx: &mut TaskContext<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        let this = self.get_mut();
        let r = Pin::new(&mut this.stream).poll_write_vectored(cx, bufs);
        this.guard(cx, r)
    }

    fn is_write_vectored(&self) -> bool {
        self.stream.is_write_vectored()
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut TaskContext<'_>) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        let r = Pin::new(&mut this.stream).poll_flush(cx);
        this.guard(cx, r)
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut TaskContext<'_>) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        let r = Pin::new(&mut this.stream).poll_shutdown(cx);
        this.guard(cx, r)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn connection_caps_fit_the_open_file_limit() {
        // Ample: as configured.
        let b = Budget::new(10_000, 1, Some(1 << 20));
        assert!(!b.clamped);
        assert_eq!(
            (b.per_listener, b.proxy_total, b.admin),
            (10_000, 10_000, 10_000)
        );
        assert_eq!(
            Budget::new(10_000, 1, None),
            Budget::new(10_000, 1, Some(u64::MAX))
        );
        // 1024: (1024 - 128) / 2 proxied connections, over every proxy listener.
        let b = Budget::new(10_000, 2, Some(1024));
        assert!(b.clamped);
        assert_eq!((b.per_listener, b.proxy_total, b.admin), (448, 448, 64));
        assert_eq!(b.wanted_files, 40_128);
        // A small max_connections stays as it is.
        let b = Budget::new(100, 1, Some(1024));
        assert_eq!((b.per_listener, b.admin, b.clamped), (100, 100, false));
        // Hopelessly low: still one at a time, never zero.
        let b = Budget::new(10_000, 1, Some(50));
        assert_eq!((b.per_listener, b.proxy_total), (1, 1));
        // Absurd settings cannot overflow a semaphore.
        let b = Budget::new(usize::MAX, 3, None);
        assert_eq!(b.proxy_total, Semaphore::MAX_PERMITS);
    }

    #[test]
    fn accept_back_off_doubles_up_to_a_second() {
        let mut d = None;
        let mut seen = Vec::new();
        for _ in 0..9 {
            let next = AcceptBackoff::next(d);
            seen.push(next.as_millis());
            d = Some(next);
        }
        assert_eq!(seen, [10, 20, 40, 80, 160, 320, 640, 1000, 1000]);
    }
}
