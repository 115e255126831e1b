//! Starting and stopping the whole server: the store, the proxy listeners,
//! the admin listener and the background tasks, tied to one shutdown token.
//!
//! Limits are in plain sight here: a semaphore caps connections per
//! listener, hyper's `max_buf_size` caps the request head (over it: 431),
//! and `header_read_timeout` cuts off clients that send their head too
//! slowly. On shutdown, listeners stop accepting, in-flight requests get
//! `shutdown_grace` to finish, then the rest are dropped.

use std::convert::Infallible;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use anyhow::Context;
use hyper::server::conn::http1;
use hyper::service::service_fn;
use hyper_util::rt::{TokioIo, TokioTimer};
use hyper_util::server::graceful::GracefulShutdown;
use tokio::net::TcpListener;
use tokio::sync::Semaphore;
use tokio::task::JoinSet;
use tokio_util::sync::CancellationToken;

use crate::admin;
use crate::config::{Config, ServerConfig};
use crate::metrics::Metrics;
use crate::proxy::{Mount, Proxy};
use crate::refresh::Refresher;
use crate::sessions::Sessions;

/// A started server. Dropping it does not stop it; call [`Running::shutdown`].
pub struct Running {
    pub proxy_addr: SocketAddr,
    pub admin_addr: SocketAddr,
    /// Each provider's dedicated listener, by provider name.
    pub provider_addrs: Vec<(String, SocketAddr)>,
    pub sessions: Arc<Sessions>,
    pub refresher: Arc<Refresher>,
    shutdown: CancellationToken,
    tasks: JoinSet<()>,
}

impl Running {
    /// A token that stops the server when cancelled (e.g. from a signal handler).
    pub fn shutdown_token(&self) -> CancellationToken {
        self.shutdown.clone()
    }

    /// Waits until the server has stopped (after the token is cancelled and
    /// in-flight requests have drained or the grace period ran out).
    pub async fn wait(mut self) {
        while self.tasks.join_next().await.is_some() {}
    }

    /// Stops accepting, drains in-flight requests, and returns when done.
    pub async fn shutdown(self) {
        self.shutdown.cancel();
        self.wait().await;
    }
}

async fn bind(addr: SocketAddr, key: &str) -> anyhow::Result<TcpListener> {
    TcpListener::bind(addr)
        .await
        .with_context(|| format!("{key}: cannot listen on {addr}"))
}

/// Opens the store, binds every listener and starts serving.
pub async fn start(config: Config) -> anyhow::Result<Running> {
    for w in &config.warnings {
        tracing::warn!("{w}");
    }
    let (sessions, warnings) = Sessions::open(&config).await?;
    for w in &warnings {
        tracing::warn!("{w}");
    }
    let sessions = Arc::new(sessions);
    let metrics = Arc::new(Metrics::default());
    let refresher = Arc::new(Refresher::new(
        &config,
        Arc::clone(&sessions),
        Arc::clone(&metrics),
    )?);
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

    let shutdown = CancellationToken::new();
    let mut tasks = JoinSet::new();
    let proxy_addr = proxy_listener.local_addr()?;
    let admin_addr = admin_listener.local_addr()?;
    tracing::info!(addr = %proxy_addr, "proxy listening");
    tracing::info!(addr = %admin_addr, "admin listening");
    tasks.spawn(serve_proxy(
        proxy_listener,
        Arc::clone(&proxy),
        Mount::Prefixed,
        config.server.clone(),
        shutdown.clone(),
    ));
    let mut provider_addrs = Vec::new();
    for (name, index, listener) in dedicated {
        let addr = listener.local_addr()?;
        tracing::info!(provider = %name, addr = %addr, "provider listening");
        provider_addrs.push((name, addr));
        tasks.spawn(serve_proxy(
            listener,
            Arc::clone(&proxy),
            Mount::Dedicated(index),
            config.server.clone(),
            shutdown.clone(),
        ));
    }
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
        stop,
        move |_, peer| admin::service(&app, peer),
    ));
    tasks.spawn(Arc::clone(&sessions).follow_changes(
        config.store.invalidation_interval,
        shutdown.clone().cancelled_owned(),
    ));
    tasks.spawn(Arc::clone(&refresher).refresh_ahead(shutdown.clone().cancelled_owned()));
    Ok(Running {
        proxy_addr,
        admin_addr,
        provider_addrs,
        sessions,
        refresher,
        shutdown,
        tasks,
    })
}

/// Accepts connections on one proxy listener until shutdown, then drains.
async fn serve_proxy(
    listener: TcpListener,
    proxy: Arc<Proxy>,
    mount: Mount,
    cfg: ServerConfig,
    shutdown: CancellationToken,
) {
    serve(listener, cfg, shutdown, move |local, _peer| {
        let proxy = Arc::clone(&proxy);
        service_fn(move |req| {
            let proxy = Arc::clone(&proxy);
            async move { Ok::<_, Infallible>(proxy.handle(mount, local, req).await) }
        })
    })
    .await;
}

/// Accepts HTTP/1.1 connections on one listener until shutdown, then
/// drains: the proxy listeners and the admin listener alike, so every
/// listener has the connection cap, the head-size limit and the
/// header-read timeout.
async fn serve<S, B>(
    listener: TcpListener,
    cfg: ServerConfig,
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
    let graceful = GracefulShutdown::new();
    let connections = Arc::new(Semaphore::new(cfg.max_connections));
    let mut http = http1::Builder::new();
    http.timer(TokioTimer::new())
        .header_read_timeout(cfg.header_read_timeout)
        .max_buf_size(cfg.max_header_bytes)
        .keep_alive(true);
    loop {
        let permit = tokio::select! {
            () = shutdown.cancelled() => break,
            p = Arc::clone(&connections).acquire_owned() => match p {
                Ok(p) => p,
                Err(_) => break,
            },
        };
        let (stream, peer) = tokio::select! {
            () = shutdown.cancelled() => break,
            accepted = listener.accept() => match accepted {
                Ok(a) => a,
                Err(e) => {
                    // Usually out of file descriptors: back off instead of spinning.
                    tracing::warn!(error = %e, "accept failed");
                    tokio::time::sleep(Duration::from_millis(50)).await;
                    continue;
                }
            },
        };
        let _ = stream.set_nodelay(true);
        let local = stream.local_addr().unwrap_or(cfg.listen);
        let service = make(local, peer);
        let conn = graceful.watch(http.serve_connection(TokioIo::new(stream), service));
        tokio::spawn(async move {
            if let Err(e) = conn.await {
                tracing::debug!(error = %e, "connection ended with an error");
            }
            drop(permit);
        });
    }
    drop(listener);
    tokio::select! {
        () = graceful.shutdown() => tracing::debug!("connections drained"),
        () = tokio::time::sleep(cfg.shutdown_grace) => {
            tracing::warn!(grace_secs = cfg.shutdown_grace.as_secs_f64(), "shutdown grace period over; closing remaining connections");
        }
    }
}
