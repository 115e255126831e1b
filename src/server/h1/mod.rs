//! credproxy's own HTTP/1.1 server side, for the proxy listeners (the
//! admin listener stays on hyper's). A connection is one task on its
//! worker: it reads a head into the connection's buffer and parses it
//! there (httparse, `parse`), hands the request to the proxy with a body
//! that reads from the same buffer (`body`), writes the answer (`respond`),
//! and goes on with the next head, which may already be in the buffer
//! (pipelining). No dispatcher, no channel between a connection and its
//! request body, and one timer per connection.
//!
//! Bounds, the same as hyper's settings were: the head is at most
//! `server.max_header_bytes` (431 above, exactly), and [`parse::MAX_HEADERS`]
//! headers; a head must arrive within `server.header_read_timeout` of the
//! connection starting to wait for it (an idle keep-alive connection too),
//! or the connection closes; a write that makes no progress for
//! `server.write_timeout` closes it. Requests are answered one at a time:
//! while one is served nothing more is read from the connection except its
//! body, so a client that pipelines without reading holds at most one head
//! and one read of bytes here, besides the kernel's buffers.
//!
//! **Isolation on the client side.** A connection carries one client, one
//! request at a time, answered in order; after an answer, the connection
//! goes on only when the request's body was read to the end of its framing
//! (else what is left of it could be read as the next request), the
//! framing of both was unambiguous (`parse` refuses the rest) and the
//! answer was framed whole. Otherwise it closes.

mod body;
mod parse;
mod respond;
mod wire;

use std::future::Future;
use std::net::SocketAddr;
use std::pin::{pin, Pin};
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use http::{Method, Response, StatusCode};
use http_body_util::Full;
use tokio::net::TcpStream;
use tokio::time::{Instant, Sleep};
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

pub use body::ClientBody;
use parse::{Framing, Refusal};
use respond::{respond, Asked};
use wire::{BodyState, Wire};

use crate::config::ServerConfig;
use crate::error::ProxyError;
use crate::http1::Chunked;
use crate::proxy::{ClientAddr, Mount, Proxy};

/// The proxy listeners' connections on one worker: how they are served,
/// and a way to drain them.
pub struct Connections {
    settings: Settings,
    draining: CancellationToken,
    tracker: TaskTracker,
}

#[derive(Debug, Clone, Copy)]
struct Settings {
    header_read_timeout: Duration,
    write_timeout: Duration,
    max_head: usize,
    shutdown_grace: Duration,
}

/// Where a connection came in and who it is.
pub struct Accepted {
    pub proxy: Arc<Proxy>,
    pub mount: Mount,
    pub local: SocketAddr,
    pub client: ClientAddr,
}

impl Connections {
    pub fn new(cfg: &ServerConfig) -> Connections {
        Connections {
            settings: Settings {
                header_read_timeout: cfg.header_read_timeout,
                write_timeout: cfg.write_timeout,
                max_head: cfg.max_header_bytes,
                shutdown_grace: cfg.shutdown_grace,
            },
            draining: CancellationToken::new(),
            tracker: TaskTracker::new(),
        }
    }

    /// Serves one connection on the current runtime; `hold` (its permits)
    /// is dropped when it ends.
    pub fn serve(&self, stream: TcpStream, at: Accepted, hold: impl Send + 'static) {
        let _ = stream.set_nodelay(true);
        let settings = self.settings;
        let stop = self.draining.clone().cancelled_owned();
        self.tracker.spawn(async move {
            serve(Arc::new(Wire::new(stream)), at, settings, stop).await;
            drop(hold);
        });
    }

    /// Stops reading new requests (a connection waiting for one closes, one
    /// serving one closes after its answer) and waits for the connections
    /// to end, for `shutdown_grace` at most.
    pub async fn drain(self) {
        self.draining.cancel();
        self.tracker.close();
        tokio::select! {
            () = self.tracker.wait() => tracing::debug!("connections drained"),
            () = tokio::time::sleep(self.settings.shutdown_grace) => {
                tracing::warn!(grace_secs = self.settings.shutdown_grace.as_secs_f64(), "shutdown grace period over; closing remaining connections");
            }
        }
    }
}

/// One connection, request after request.
async fn serve(wire: Arc<Wire>, at: Accepted, settings: Settings, stop: impl Future<Output = ()>) {
    let mut stop = pin!(stop);
    let mut draining = false;
    // The head's deadline, checked when this timer fires: made once and
    // moved on only when it fires early, not once per request.
    let mut timer: Option<Pin<Box<Sleep>>> = None;
    let mut out = Vec::with_capacity(4096);
    loop {
        let parsed = match read_head(&wire, &settings, &mut timer, &mut stop, &mut draining).await {
            Ok(Some(parsed)) => parsed,
            Ok(None) => return,
            Err(refusal) => {
                refuse(&wire, refusal, &mut out, &settings).await;
                return;
            }
        };
        let asked_head = parsed.request.method() == Method::HEAD;
        let version = parsed.request.version();
        let request = {
            let mut inbound = wire.inbound();
            inbound.request += 1;
            inbound.body = match parsed.framing {
                Framing::Length(n) => BodyState::Length(n),
                Framing::Chunked => BodyState::Chunked(Chunked::new()),
            };
            inbound.continue_left = if parsed.expect_continue {
                wire::CONTINUE.len()
            } else {
                0
            };
            inbound.responded = false;
            inbound.request
        };
        let mut req = parsed
            .request
            .map(|()| ClientBody::new(Arc::clone(&wire), request));
        req.extensions_mut().insert(at.client);
        let resp = tokio::select! {
            biased;
            resp = at.proxy.handle(at.mount, at.local, req) => resp,
            () = hung_up(&wire, settings.max_head) => {
                // The request is dropped where it waits (a queue for the
                // provider's budget, the upstream): it frees its place.
                tracing::debug!("the client closed its connection before the answer");
                return;
            }
        };
        let body_done = finish_body(&wire);
        draining = draining || stop_now(&mut stop);
        let asked = Asked {
            head: asked_head,
            version,
            keep_alive: parsed.keep_alive && body_done && !draining,
        };
        match respond(&wire, resp, asked, &mut out, settings.write_timeout).await {
            Ok(true) => {}
            Ok(false) => {
                if !body_done {
                    wire.linger().await;
                }
                return;
            }
            Err(e) => {
                tracing::debug!(error = %e, "connection ended while answering");
                return;
            }
        }
    }
}

/// How often [`hung_up`] looks again while it cannot read.
const RECHECK: Duration = Duration::from_millis(100);

/// Returns when the client closes its connection while its request is
/// served (as hyper's server, without half-close support, did). Bytes that
/// come meanwhile (the next pipelined request) are kept, up to a head's
/// limit; while the request's body is still being read, the body sees the
/// close itself.
async fn hung_up(wire: &Wire, max_head: usize) {
    loop {
        if wire.stream.readable().await.is_err() {
            return;
        }
        {
            let mut inbound = wire.inbound();
            if inbound.body.is_done() && inbound.buf.len() <= max_head {
                match wire.try_fill(&mut inbound.buf) {
                    Ok(0) => return,
                    Ok(_) => continue,
                    Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => continue,
                    Err(_) => return,
                }
            }
        }
        // Not ours to read now: the body's (look again a little later,
        // once it may have been read), or over the limit (a client that
        // pipelines without reading is cut off by `write_timeout`).
        tokio::time::sleep(RECHECK).await;
    }
}

/// Whether the shutdown has begun, without waiting for it.
fn stop_now(stop: &mut Pin<&mut impl Future<Output = ()>>) -> bool {
    let mut cx = std::task::Context::from_waker(std::task::Waker::noop());
    stop.as_mut().poll(&mut cx).is_ready()
}

/// Once the answer is ready: no `100 Continue` any more, and whether the
/// request's body has been read to its end, reading what is left of it
/// from the buffer if that is all there is.
fn finish_body(wire: &Wire) -> bool {
    let mut guard = wire.inbound();
    let inbound = &mut *guard;
    inbound.responded = true;
    inbound.continue_left = 0;
    loop {
        match inbound.take_buffered() {
            Ok(wire::Buffered::Data(_)) => {}
            Ok(wire::Buffered::End) => return true,
            Ok(wire::Buffered::Empty) | Err(_) => return false,
        }
    }
}

/// Reads until a whole head is in the buffer and parses it. `None`: the
/// connection ends quietly (the client closed it, stayed silent past the
/// deadline, or the shutdown began while it was idle).
async fn read_head(
    wire: &Wire,
    settings: &Settings,
    timer: &mut Option<Pin<Box<Sleep>>>,
    stop: &mut Pin<&mut impl Future<Output = ()>>,
    draining: &mut bool,
) -> Result<Option<parse::Parsed>, Refusal> {
    let deadline = Instant::now() + settings.header_read_timeout;
    loop {
        let idle = {
            let mut inbound = wire.inbound();
            if !inbound.buf.is_empty() {
                if let Some(parsed) = parse::parse(&mut inbound.buf, settings.max_head)? {
                    return Ok(Some(parsed));
                }
            }
            match wire.try_fill(&mut inbound.buf) {
                Ok(0) => return Ok(None),
                Ok(_) => continue,
                Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {}
                Err(e) => {
                    tracing::debug!(error = %e, "connection ended while reading a head");
                    return Ok(None);
                }
            }
            inbound.buf.is_empty()
        };
        if idle && *draining {
            return Ok(None);
        }
        let timer = timer.get_or_insert_with(|| Box::pin(tokio::time::sleep_until(deadline)));
        tokio::select! {
            ready = wire.stream.readable() => {
                if ready.is_err() {
                    return Ok(None);
                }
            }
            () = timer.as_mut() => {
                if Instant::now() >= deadline {
                    tracing::debug!(idle, "closing a connection: no whole head within header_read_timeout");
                    return Ok(None);
                }
                timer.as_mut().reset(deadline);
            }
            () = stop.as_mut(), if !*draining => {
                *draining = true;
            }
        }
    }
}

/// Answers a head that cannot be served, then closes.
async fn refuse(wire: &Wire, refusal: Refusal, out: &mut Vec<u8>, settings: &Settings) {
    let resp = match refusal {
        Refusal::BadRequest(why) => {
            tracing::debug!(why, "refused a malformed request head");
            ProxyError::BadRequest(why).to_response()
        }
        Refusal::HeadTooLarge => empty(StatusCode::REQUEST_HEADER_FIELDS_TOO_LARGE),
        Refusal::UriTooLong => empty(StatusCode::URI_TOO_LONG),
        Refusal::Version => empty(StatusCode::HTTP_VERSION_NOT_SUPPORTED),
    };
    let asked = Asked {
        head: false,
        version: http::Version::HTTP_11,
        keep_alive: false,
    };
    if respond(wire, resp, asked, out, settings.write_timeout)
        .await
        .is_ok()
    {
        wire.linger().await;
    }
}

fn empty(status: StatusCode) -> Response<Full<Bytes>> {
    let mut resp = Response::new(Full::new(Bytes::new()));
    *resp.status_mut() = status;
    resp
}
