//! The access log: one line per request, written when its answer has been
//! sent to the end or broken off (not when the head leaves), by
//! [`Logged`], the body wrapper every answer goes out in.
//!
//! The line (target `credproxy::access`): `provider`, `method`, `path` (no
//! query: it may carry credentials), `status`, `upstream_ms`, `head_ms`
//! (time to the answer's head), `total_ms` (to the body's last byte, or the
//! break), `bytes_in` (the request body as read), `bytes_out` (the answer's
//! body as sent), `session`, `key_id` (the key presented: its id, never
//! the key), `replayed`, `refreshed`, `queued_ms`,
//! `upstream_refusals`, `error` (credproxy's own code), `cause` and `detail`
//! (why the upstream failed), `broke_off` (`client` or `upstream`, when the
//! body did not reach its end).
//!
//! The request's server span (`Span::none()` without traces) lives here
//! too, so it ends with the body, and the line is written within it (a
//! JSON line carries its trace and span ids).

use std::pin::Pin;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::{Duration, Instant};

use bytes::Bytes;
use http::{HeaderValue, Method, Uri};
use http_body::{Body, Frame, SizeHint};
use pin_project_lite::pin_project;
use tracing::Span;

use crate::tokens::sessions::{ActiveSession, Grant};

/// The fields of the access log line, filled in as the phases learn them.
pub(super) struct AccessLog {
    pub provider: &'static str,
    /// The route's index, once routing found one (its metrics).
    pub route: Option<usize>,
    pub session: Option<Arc<ActiveSession>>,
    /// The key the request presented (its id is logged, never the key).
    pub key: Option<Arc<Grant>>,
    pub upstream_ms: Option<u128>,
    pub replayed: bool,
    /// A refresh ran (or was waited for) on this request's behalf.
    pub refreshed: bool,
    /// How long the request waited for the provider's budget, if it did.
    pub queued_ms: Option<u128>,
    /// Refusals for the rate limit the provider answered this request with.
    pub upstream_refusals: u32,
    /// Requests sent upstream so far (resends and a replay included).
    pub attempts: u32,
    /// The request body's bytes: known once kept, or counted as it streams.
    pub bytes_in: BytesIn,
    /// The request's server span (`Span::none()` without traces).
    pub span: Span,
}

/// How many bytes of the request body were read.
pub(super) enum BytesIn {
    Known(u64),
    /// Streamed upstream: counted frame by frame.
    Counted(Arc<AtomicU64>),
}

impl BytesIn {
    fn get(&self) -> u64 {
        match self {
            BytesIn::Known(n) => *n,
            BytesIn::Counted(c) => c.load(Ordering::Relaxed),
        }
    }
}

impl AccessLog {
    pub fn new(span: Span) -> AccessLog {
        AccessLog {
            provider: "-",
            route: None,
            session: None,
            key: None,
            upstream_ms: None,
            replayed: false,
            refreshed: false,
            queued_ms: None,
            upstream_refusals: 0,
            attempts: 0,
            bytes_in: BytesIn::Known(0),
            span,
        }
    }

    /// Counts a streamed request body's bytes as they go upstream.
    pub fn count_in(&mut self, body: super::UpstreamBody) -> super::UpstreamBody {
        use http_body_util::BodyExt;
        let counter = Arc::new(AtomicU64::new(0));
        self.bytes_in = BytesIn::Counted(Arc::clone(&counter));
        body.map_frame(move |frame| {
            if let Some(data) = frame.data_ref() {
                counter.fetch_add(data.len() as u64, Ordering::Relaxed);
            }
            frame
        })
        .boxed()
    }
}

/// What the line says once the head has left: the request's fields and
/// the answer's.
pub(super) struct Line {
    pub log: AccessLog,
    pub method: Method,
    pub uri: Uri,
    pub status: u16,
    pub started: Instant,
    pub head: Duration,
    /// credproxy's own error code (`X-Credproxy-Error`), if it answered.
    pub error: Option<HeaderValue>,
    pub cause: Option<&'static str>,
    pub detail: Option<String>,
}

/// How the body ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum End {
    /// Not yet (dropped so: the client went away, or hyper gave up on it).
    Open,
    Complete,
    /// Reading the body failed: the upstream broke off (or stalled).
    Upstream,
}

pin_project! {
    /// An answer's body that writes the access log line when it ends, fails
    /// or is dropped, counting what it sent.
    pub struct Logged<B> {
        #[pin]
        inner: B,
        line: Option<Box<Line>>,
        bytes_out: u64,
        end: End,
    }

    impl<B> PinnedDrop for Logged<B> {
        fn drop(this: Pin<&mut Self>) {
            let this = this.project();
            if let Some(line) = this.line.take() {
                write(*line, *this.bytes_out, *this.end);
            }
        }
    }
}

impl<B> Logged<B> {
    pub(super) fn new(inner: B, line: Line) -> Logged<B> {
        Logged {
            inner,
            line: Some(Box::new(line)),
            bytes_out: 0,
            end: End::Open,
        }
    }
}

impl<B> Body for Logged<B>
where
    B: Body<Data = Bytes>,
{
    type Data = Bytes;
    type Error = B::Error;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, B::Error>>> {
        let mut this = self.project();
        let polled = this.inner.as_mut().poll_frame(cx);
        match &polled {
            Poll::Ready(Some(Ok(frame))) => {
                if let Some(data) = frame.data_ref() {
                    *this.bytes_out += data.len() as u64;
                }
                if this.inner.is_end_stream() {
                    *this.end = End::Complete;
                }
            }
            Poll::Ready(Some(Err(_))) => *this.end = End::Upstream,
            Poll::Ready(None) => *this.end = End::Complete,
            Poll::Pending => {}
        }
        if *this.end != End::Open {
            if let Some(line) = this.line.take() {
                write(*line, *this.bytes_out, *this.end);
            }
        }
        polled
    }

    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        self.inner.size_hint()
    }
}

/// Writes the line (within the request's span, which then ends).
fn write(line: Line, bytes_out: u64, end: End) {
    let Line {
        log,
        method,
        uri,
        status,
        started,
        head,
        error,
        cause,
        detail,
    } = line;
    let broke_off = match end {
        End::Complete => None,
        End::Open => Some("client"),
        End::Upstream => Some("upstream"),
    };
    let total = started.elapsed();
    let span = log.span;
    if !span.is_none() {
        span.record("http.response.body.size", bytes_out as i64);
        if let Some(b) = broke_off {
            span.record("credproxy.broke_off", b);
        }
    }
    let _in = span.enter();
    tracing::info!(
        target: "credproxy::access",
        provider = log.provider,
        method = %method,
        path = uri.path(),
        status,
        upstream_ms = log.upstream_ms.map(|m| m as u64),
        head_ms = head.as_millis() as u64,
        total_ms = total.as_millis() as u64,
        bytes_in = log.bytes_in.get(),
        bytes_out,
        session = log.session.as_ref().map(|s| s.id.as_str()),
        key_id = log.key.as_ref().map(|k| k.key_id.as_str()),
        replayed = log.replayed,
        refreshed = log.refreshed,
        queued_ms = log.queued_ms.map(|m| m as u64),
        upstream_refusals = (log.upstream_refusals > 0).then_some(log.upstream_refusals),
        error = error.as_ref().and_then(|v| v.to_str().ok()),
        cause,
        detail = detail.as_deref(),
        broke_off,
        "request"
    );
}
