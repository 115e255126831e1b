//! credproxy's own HTTP/1.1 client, for every HTTP/1.1 request upstream:
//! bodies in memory (none, or one kept for a replay: nearly every API
//! call) and bodies streamed from the caller. The request head is written
//! straight from the request's parts into one buffer ([`Wire`]): with a
//! body in memory of up to [`COALESCE`]; a larger one is written after it,
//! a streamed one frame by frame (with its `Content-Length` when its size
//! is known, else chunked). The response head is parsed in the
//! connection's read buffer (httparse) with header values sliced out of
//! it, and the body is read by the task that polls it: no connection task,
//! no channel between two tasks, no second copy of the head.
//!
//! The answer is read while the body is written ([`Conn::exchange`]: both
//! in one future, as Pingora's client does). An upstream that answers
//! before it has the whole body (a 413, a 401) has its answer passed on at
//! once; the rest of the body is not sent, and that connection is not
//! reused. A streamed body is written one frame at a time, the next frame
//! polled only once the last is on the wire, so memory does not grow with
//! its size; a body the caller stops sending ends the exchange with its
//! error ([`H1Error::Body`]).
//!
//! Framing follows RFC 9112 §6: no body for HEAD, 1xx, 204 and 304; a
//! chunked transfer coding (`crate::http1::Chunked`, the server side's
//! decoder too: trailers are read and dropped, bare LFs refused); a
//! `Content-Length` (several different ones are refused); else until the
//! upstream closes. At most [`MAX_INTERIM`] 1xx answers are skipped.
//!
//! **Isolation.** A connection belongs to the session it was opened for
//! ([`Conn::owner`]) and is only ever reused by that session, so no byte an
//! upstream sends beyond its framing (extra bytes after a body, a body
//! after a bodiless answer, late ones that no check can see coming) can be
//! read as another session's answer. Within a session, a connection goes
//! back to its pool only once the whole request was sent and its answer
//! read to the end, when the answer keeps it alive (HTTP/1.1, no
//! `Connection: close`, no body delimited by the close), carries a body
//! whose end its framing marks
//! (not HEAD, 204 or 304: a body the upstream sends after those would
//! otherwise be the next answer), and nothing more is in its buffer.

use std::collections::VecDeque;
use std::fmt::Write as _;
use std::io::{self, IoSlice};
use std::pin::Pin;
use std::sync::{Arc, Mutex, PoisonError};
use std::task::{ready, Context, Poll};
use std::time::{Duration, Instant};

use bytes::{Buf, Bytes, BytesMut};
use http::header::{CONNECTION, CONTENT_LENGTH, TRANSFER_ENCODING};
use http::{HeaderMap, HeaderName, HeaderValue, Method, Response, StatusCode, Version};
use http_body::{Body, Frame, SizeHint};
use hyper_rustls::MaybeHttpsStream;
use hyper_util::rt::TokioIo;
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::TcpStream;

use super::UpstreamBody;
use crate::http1::{self, Chunked, Step};

type BoxError = Box<dyn std::error::Error + Send + Sync>;

/// An upstream connection as hyper-rustls's connector makes it, seen
/// through tokio's I/O traits.
pub type Io = TokioIo<MaybeHttpsStream<TokioIo<TcpStream>>>;

/// Response heads over this size are refused (hyper's client's limit too).
const MAX_HEAD: usize = 8192 + 4096 * 100;
/// Response headers over this many are refused (hyper's client: 100).
const MAX_HEADERS: usize = 128;
/// How much room a read asks for.
const READ_CHUNK: usize = 16 * 1024;
/// Interim (1xx) answers skipped before a final one; more are refused, so
/// an upstream cannot hold a request with an endless run of them.
pub const MAX_INTERIM: usize = 32;
/// Bodies in memory up to this size are written with the head, in one
/// write; larger ones after it.
pub const COALESCE: usize = 64 * 1024;

/// Why an exchange on a connection failed.
#[derive(Debug, thiserror::Error)]
pub enum H1Error {
    #[error("upstream connection: {0}")]
    Io(#[from] io::Error),
    /// The connection closed before any byte of an answer: on a reused
    /// connection, the upstream had closed it while it was idle.
    #[error("the upstream closed the connection before answering")]
    Closed,
    #[error("the upstream's answer is not valid HTTP/1.1: {0}")]
    Invalid(&'static str),
    /// The request body broke off on the caller's side (it stalled, went
    /// over the provider's limit, or did not match its length): its error
    /// is the source, for [`super::classify`].
    #[error("the request body broke off")]
    Body(#[source] BoxError),
}

impl H1Error {
    /// Whether the upstream cannot have acted on the request: the
    /// connection was closed or reset before any byte of an answer.
    pub fn unanswered(&self) -> bool {
        match self {
            H1Error::Closed => true,
            H1Error::Io(e) => matches!(
                e.kind(),
                io::ErrorKind::BrokenPipe
                    | io::ErrorKind::ConnectionReset
                    | io::ErrorKind::ConnectionAborted
            ),
            H1Error::Invalid(_) | H1Error::Body(_) => false,
        }
    }
}

/// One HTTP/1.1 connection and what has been read from it but not used.
/// Boxed where it is held ([`Idle`], [`H1Body`]): a TLS connection's state
/// is over a kilobyte, not to be moved with every request.
pub struct Conn {
    io: Io,
    buf: BytesMut,
    since: Instant,
    /// The session it was opened for, and the only one that reuses it.
    owner: Box<str>,
}

/// Idle connections, the most recently used last (so ordered by `since`).
pub type Idle = Arc<Mutex<VecDeque<Box<Conn>>>>;

/// A connection unused for this long is closed instead of reused.
pub const IDLE_TIMEOUT: Duration = Duration::from_secs(90);

impl Conn {
    pub fn new(io: Io, owner: &str) -> Box<Conn> {
        Box::new(Conn {
            io,
            buf: BytesMut::new(),
            since: Instant::now(),
            owner: owner.into(),
        })
    }

    /// When it was last put back.
    pub fn since(&self) -> Instant {
        self.since
    }

    /// The session it was opened for.
    pub fn owner(&self) -> &str {
        &self.owner
    }

    /// Whether an idle connection can take a request: nothing to read on
    /// it (no EOF, no stray bytes). Tokio answers from its readiness state,
    /// with a read (that would block) only when the reactor saw an event.
    pub fn still_open(&mut self) -> bool {
        if !self.buf.is_empty() {
            return false;
        }
        let mut probe = [0u8; 1];
        let mut rb = ReadBuf::new(&mut probe);
        let mut cx = Context::from_waker(std::task::Waker::noop());
        matches!(
            Pin::new(&mut self.io).poll_read(&mut cx, &mut rb),
            Poll::Pending
        )
    }

    /// Reads more into the buffer; `Ok(0)` at EOF.
    fn poll_fill(&mut self, cx: &mut Context<'_>) -> Poll<io::Result<usize>> {
        if self.buf.capacity() - self.buf.len() < 1024 {
            self.buf.reserve(READ_CHUNK);
        }
        tokio_util::io::poll_read_buf(Pin::new(&mut self.io), cx, &mut self.buf)
    }

    /// Sends the request and reads the answer's head at the same time
    /// (skipping interim 1xx answers), then frames its body.
    /// `head_request`: the request was HEAD (no body follows).
    ///
    /// A final answer that comes before the whole request was sent is
    /// returned at once, the rest of the request left unsent, and the
    /// connection is not reused. A write that fails does not end the
    /// exchange: what the upstream answered before the connection broke is
    /// read (an upstream that answers a 413 and closes is seen to answer),
    /// else its end.
    ///
    /// `body`: the streamed body that goes with `wire` (none for a body in
    /// memory, which is in `wire`).
    pub async fn exchange(
        mut self: Box<Self>,
        wire: &Wire,
        body: Option<UpstreamBody>,
        head_request: bool,
        idle: &Idle,
    ) -> Result<Response<H1Body>, H1Error> {
        let mut sending = Sending::new(wire, body);
        let mut reading = Reading {
            read_any: false,
            interim: 0,
            unparsed: !self.buf.is_empty(),
        };
        let parsed =
            std::future::poll_fn(|cx| self.poll_exchange(&mut sending, &mut reading, cx)).await?;
        let sent = matches!(sending.state, State::Sent);
        build(self, parsed, head_request, sent, idle)
    }

    /// One turn of [`Conn::exchange`]: the answer's head if it is there,
    /// else the request a step further, then whatever the upstream sent.
    /// Pending only once neither side can go on.
    fn poll_exchange(
        &mut self,
        sending: &mut Sending<'_>,
        reading: &mut Reading,
        cx: &mut Context<'_>,
    ) -> Poll<Result<Parsed, H1Error>> {
        loop {
            if reading.unparsed {
                reading.unparsed = false;
                while let Some(parsed) = parse_head(&mut self.buf)? {
                    if !parsed.status.is_informational() {
                        return Poll::Ready(Ok(parsed));
                    }
                    if parsed.status == StatusCode::SWITCHING_PROTOCOLS {
                        return Poll::Ready(Err(H1Error::Invalid(
                            "a protocol switch was not asked for",
                        )));
                    }
                    reading.interim += 1;
                    if reading.interim > MAX_INTERIM {
                        return Poll::Ready(Err(H1Error::Invalid(
                            "more than 32 interim (1xx) answers",
                        )));
                    }
                }
                if self.buf.len() > MAX_HEAD {
                    return Poll::Ready(Err(H1Error::Invalid("the response head is over 408 KiB")));
                }
            }
            let wrote = match sending.poll_send(&mut self.io, cx) {
                Poll::Ready(Ok(wrote)) => wrote,
                Poll::Ready(Err(e)) => return Poll::Ready(Err(H1Error::Body(e))),
                Poll::Pending => false,
            };
            let broke = !self.buf.is_empty() || reading.read_any;
            match self.poll_fill(cx) {
                Poll::Ready(Ok(0)) => {
                    return Poll::Ready(Err(if broke {
                        H1Error::Invalid("the connection closed within the response head")
                    } else {
                        H1Error::Closed
                    }));
                }
                Poll::Ready(Ok(_)) => {
                    reading.read_any = true;
                    reading.unparsed = true;
                }
                Poll::Ready(Err(e)) if broke => {
                    tracing::debug!(error = %e, "upstream connection broke off");
                    return Poll::Ready(Err(H1Error::Invalid(
                        "the connection broke off within the response head",
                    )));
                }
                // rustls reports a peer that closed without close_notify so.
                Poll::Ready(Err(e)) if e.kind() == io::ErrorKind::UnexpectedEof => {
                    return Poll::Ready(Err(H1Error::Closed))
                }
                Poll::Ready(Err(e)) => return Poll::Ready(Err(H1Error::Io(e))),
                Poll::Pending if !wrote => return Poll::Pending,
                Poll::Pending => {}
            }
        }
    }
}

/// Where the reading half of an exchange is.
struct Reading {
    /// Whether any byte of an answer has come.
    read_any: bool,
    /// Interim answers skipped so far.
    interim: usize,
    /// Bytes came in since the head was last looked for.
    unparsed: bool,
}

/// A request as it goes on the wire: its head, written from the request's
/// parts (request line in origin form, `Host`, the headers as they are,
/// hop-by-hop ones having been removed by the proxy, and the body's
/// framing), with a body in memory in the same buffer when it is small;
/// then a large body in memory. A streamed body is not in it: it goes
/// along with it to [`Conn::exchange`], once. A request whose body is in
/// memory can be sent again as it is.
pub struct Wire {
    head: Vec<u8>,
    /// The body in memory (empty for a streamed one): in `head` too when
    /// it is small, else written after it.
    kept: Bytes,
    /// A streamed body's framing: its length, or chunked (`None`).
    length: Option<u64>,
}

impl Wire {
    /// A request whose body is in memory.
    pub fn kept(
        method: &Method,
        path_and_query: &str,
        host: &HeaderValue,
        headers: &HeaderMap,
        body: Bytes,
    ) -> Wire {
        let small = body.len() <= COALESCE;
        let length = Some(body.len() as u64);
        let room = if small { body.len() } else { 0 };
        let mut head = encode_head(method, path_and_query, host, headers, length, room);
        if small {
            head.extend_from_slice(&body);
        }
        Wire {
            head,
            kept: body,
            length,
        }
    }

    /// A request whose body streams: `body`, framed by its length when it
    /// is known, else chunked.
    pub fn streamed(
        method: &Method,
        path_and_query: &str,
        host: &HeaderValue,
        headers: &HeaderMap,
        body: &UpstreamBody,
    ) -> Wire {
        let length = stream_length(body, headers);
        Wire {
            head: encode_head(method, path_and_query, host, headers, length, 0),
            kept: Bytes::new(),
            length,
        }
    }

    /// The body in memory, for another client (HTTP/2).
    pub fn into_kept(self) -> Bytes {
        self.kept
    }

    /// A large body in memory, written after the head; else nothing.
    fn after_head(&self) -> &[u8] {
        if self.kept.len() > COALESCE {
            &self.kept
        } else {
            &[]
        }
    }
}

/// A streamed body's length, if it is known: its exact size (a caller's
/// body read by its `Content-Length`), else the caller's `Content-Length`
/// (a body that was partly read before it was streamed); else it goes
/// chunked. Either way the body must match it, or the exchange ends
/// ([`Sending`]).
fn stream_length(body: &UpstreamBody, headers: &HeaderMap) -> Option<u64> {
    if let Some(exact) = body.size_hint().exact() {
        return Some(exact);
    }
    let mut values = headers.get_all(CONTENT_LENGTH).iter();
    let declared = content_length(values.next()?.as_bytes()).ok()?;
    values.next().is_none().then_some(declared)
}

/// Encodes a request head; `length`: the body's, or `None` for chunked;
/// `room`: how much more the buffer will take (a small body).
fn encode_head(
    method: &Method,
    path_and_query: &str,
    host: &HeaderValue,
    headers: &HeaderMap,
    length: Option<u64>,
    room: usize,
) -> Vec<u8> {
    let mut size = method.as_str().len() + path_and_query.len() + host.len() + 48;
    for (name, value) in headers {
        size += name.as_str().len() + value.len() + 4;
    }
    let mut head = Vec::with_capacity(size + room);
    head.extend_from_slice(method.as_str().as_bytes());
    head.push(b' ');
    head.extend_from_slice(path_and_query.as_bytes());
    head.extend_from_slice(b" HTTP/1.1\r\nhost: ");
    head.extend_from_slice(host.as_bytes());
    head.extend_from_slice(b"\r\n");
    for (name, value) in headers {
        if name == CONTENT_LENGTH || name == TRANSFER_ENCODING || name == http::header::HOST {
            continue;
        }
        head.extend_from_slice(name.as_str().as_bytes());
        head.extend_from_slice(b": ");
        head.extend_from_slice(value.as_bytes());
        head.extend_from_slice(b"\r\n");
    }
    // No length for an empty body of a method that defines none (RFC 9110 §8.6).
    let bodiless = matches!(
        *method,
        Method::GET | Method::HEAD | Method::DELETE | Method::OPTIONS | Method::TRACE
    );
    match length {
        None => head.extend_from_slice(b"transfer-encoding: chunked\r\n"),
        Some(n) if n > 0 || !bodiless => {
            head.extend_from_slice(b"content-length: ");
            head.extend_from_slice(itoa::Buffer::new().format(n).as_bytes());
            head.extend_from_slice(b"\r\n");
        }
        Some(_) => {}
    }
    head.extend_from_slice(b"\r\n");
    head
}

/// The sending half of an exchange: what is left to write of the head and
/// of a body in memory, and of a streamed body the pieces queued and the
/// stream they come from.
struct Sending<'w> {
    head: &'w [u8],
    kept: &'w [u8],
    /// A streamed body's pieces for the wire, in order, `queue[at..end]`
    /// still to write: a frame (under a length), or a chunk's size line,
    /// its data and its CRLF; the last chunk.
    queue: [Bytes; 3],
    at: usize,
    end: usize,
    body: Option<UpstreamBody>,
    /// What the streamed body still owes its `Content-Length`; `None`:
    /// chunked.
    owed: Option<u64>,
    state: State,
}

enum State {
    Writing,
    Flushing,
    /// The whole request is on the wire.
    Sent,
    /// A write failed: nothing more is sent, and the connection's end (or
    /// what the upstream answered before it) is read.
    Failed,
}

impl<'w> Sending<'w> {
    fn new(wire: &'w Wire, body: Option<UpstreamBody>) -> Sending<'w> {
        Sending {
            head: &wire.head,
            kept: wire.after_head(),
            queue: Default::default(),
            at: 0,
            end: 0,
            owed: body.as_ref().and(wire.length),
            body,
            state: State::Writing,
        }
    }

    /// A write failed: the upstream closed or reset the connection (it
    /// may have answered first, which reading will tell).
    fn failed(e: io::Error) -> State {
        tracing::debug!(error = %e, "writing to the upstream failed");
        State::Failed
    }

    fn push(&mut self, piece: Bytes) {
        self.queue[self.end] = piece;
        self.end += 1;
    }

    /// Takes `n` written bytes off what was to write.
    fn advance(&mut self, mut n: usize) {
        for part in [&mut self.head, &mut self.kept] {
            let take = n.min(part.len());
            *part = &part[take..];
            n -= take;
        }
        while n > 0 && self.at < self.end {
            let piece = &mut self.queue[self.at];
            let take = n.min(piece.len());
            piece.advance(take);
            n -= take;
            if piece.is_empty() {
                // Let go of the frame it was a part of.
                *piece = Bytes::new();
                self.at += 1;
            }
        }
        if self.at == self.end {
            self.at = 0;
            self.end = 0;
        }
    }

    /// Queues a frame of the streamed body: as it is under a length, as a
    /// chunk otherwise (an empty one is skipped: it would end the body).
    fn queue_data(&mut self, data: Bytes) -> Result<(), BoxError> {
        if data.is_empty() {
            return Ok(());
        }
        match &mut self.owed {
            Some(owed) => {
                *owed = owed
                    .checked_sub(data.len() as u64)
                    .ok_or("the request body is longer than its length")?;
                self.push(data);
            }
            None => {
                let mut size = BytesMut::with_capacity(18);
                // Cannot fail: BytesMut grows.
                let _ = write!(size, "{:x}\r\n", data.len());
                self.push(size.freeze());
                self.push(data);
                self.push(Bytes::from_static(b"\r\n"));
            }
        }
        Ok(())
    }

    /// Sends the request a step further: `Ok(true)` if it moved (a write,
    /// or the request now sent or failed), `Ok(false)` if there is nothing
    /// left to do; an error only from the caller's body. Writes a frame
    /// before polling the next, and returns after each write of a streamed
    /// body so that the answer is looked at.
    fn poll_send(&mut self, io: &mut Io, cx: &mut Context<'_>) -> Poll<Result<bool, BoxError>> {
        loop {
            match self.state {
                State::Sent | State::Failed => return Poll::Ready(Ok(false)),
                State::Flushing => {
                    self.state = match ready!(Pin::new(&mut *io).poll_flush(cx)) {
                        Ok(()) => State::Sent,
                        Err(e) => Self::failed(e),
                    };
                    return Poll::Ready(Ok(true));
                }
                State::Writing => {}
            }
            // The head (and a large body in memory) first; a streamed
            // body's frame is queued only once they are written.
            let unwritten: [&[u8]; 3] = if !self.head.is_empty() || !self.kept.is_empty() {
                [self.head, self.kept, &[]]
            } else {
                let piece = |i: usize| {
                    if i < self.end {
                        &self.queue[i][..]
                    } else {
                        &[][..]
                    }
                };
                [piece(self.at), piece(self.at + 1), piece(self.at + 2)]
            };
            if unwritten.iter().any(|p| !p.is_empty()) {
                let slices = unwritten.map(IoSlice::new);
                match ready!(Pin::new(&mut *io).poll_write_vectored(cx, &slices)) {
                    Ok(0) => self.state = Self::failed(io::ErrorKind::WriteZero.into()),
                    Ok(n) => self.advance(n),
                    Err(e) => self.state = Self::failed(e),
                }
                if !self.head.is_empty()
                    || !self.kept.is_empty()
                    || self.at < self.end
                    || self.body.is_some()
                    || matches!(self.state, State::Failed)
                {
                    return Poll::Ready(Ok(true));
                }
                continue;
            }
            let Some(body) = self.body.as_mut() else {
                self.state = State::Flushing;
                continue;
            };
            match ready!(Pin::new(body).poll_frame(cx)) {
                // Request trailers are not forwarded (`Trailer` is hop-by-hop).
                Some(Ok(frame)) => {
                    if let Ok(data) = frame.into_data() {
                        self.queue_data(data)?;
                    }
                }
                Some(Err(e)) => return Poll::Ready(Err(e)),
                None => {
                    self.body = None;
                    match self.owed {
                        None => self.push(Bytes::from_static(b"0\r\n\r\n")),
                        Some(0) => {}
                        Some(_) => {
                            return Poll::Ready(Err(
                                "the request body is shorter than its length".into()
                            ))
                        }
                    }
                }
            }
        }
    }
}

/// A parsed response head, its header values still in the buffer it was
/// read into.
struct Parsed {
    status: StatusCode,
    version: Version,
    headers: HeaderMap,
}

/// Parses a complete response head at the start of `buf` and takes it off
/// the buffer; `None` if more bytes are needed.
fn parse_head(buf: &mut BytesMut) -> Result<Option<Parsed>, H1Error> {
    let mut slots = [httparse::EMPTY_HEADER; MAX_HEADERS];
    let mut res = httparse::Response::new(&mut slots);
    let len = match res.parse(buf) {
        Ok(httparse::Status::Complete(len)) => len,
        Ok(httparse::Status::Partial) => return Ok(None),
        Err(httparse::Error::TooManyHeaders) => {
            return Err(H1Error::Invalid("more than 128 response headers"))
        }
        Err(_) => return Err(H1Error::Invalid("a malformed response head")),
    };
    let status = res
        .code
        .and_then(|c| StatusCode::from_u16(c).ok())
        .ok_or(H1Error::Invalid("a malformed status code"))?;
    let version = match res.version {
        Some(1) => Version::HTTP_11,
        _ => Version::HTTP_10,
    };
    // Where each name and value sits in the buffer, to slice them out of
    // it once it is frozen (the values are not copied).
    let base = buf.as_ptr() as usize;
    let mut spans = Vec::with_capacity(res.headers.len());
    for h in res.headers.iter() {
        let name = h.name.as_ptr() as usize - base;
        let value = h.value.as_ptr() as usize - base;
        spans.push((name, h.name.len(), value, h.value.len()));
    }
    let head = buf.split_to(len).freeze();
    let mut headers = HeaderMap::with_capacity(spans.len());
    for (name_at, name_len, value_at, value_len) in spans {
        let name = HeaderName::from_bytes(&head[name_at..name_at + name_len])
            .map_err(|_| H1Error::Invalid("a malformed header name"))?;
        let value = HeaderValue::from_maybe_shared(head.slice(value_at..value_at + value_len))
            .map_err(|_| H1Error::Invalid("a malformed header value"))?;
        headers.append(name, value);
    }
    Ok(Some(Parsed {
        status,
        version,
        headers,
    }))
}

/// How the body of an answer ends.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Framing {
    /// This many bytes are left.
    Length(u64),
    Chunked(Chunked),
    /// Until the upstream closes the connection.
    UntilClose,
}

/// Frames the answer's body. `sent`: the whole request went out before
/// the answer came (else the connection is not reused).
fn build(
    conn: Box<Conn>,
    parsed: Parsed,
    head_request: bool,
    sent: bool,
    idle: &Idle,
) -> Result<Response<H1Body>, H1Error> {
    let Parsed {
        status,
        version,
        mut headers,
    } = parsed;
    let chunked = headers
        .get_all(TRANSFER_ENCODING)
        .iter()
        .next_back()
        .map(|v| {
            v.to_str()
                .ok()
                .and_then(|v| v.rsplit(',').next())
                .is_some_and(|last| last.trim().eq_ignore_ascii_case("chunked"))
        });
    let mut lengths = headers
        .get_all(CONTENT_LENGTH)
        .iter()
        .map(|v| content_length(v.as_bytes()));
    let length = match lengths.next() {
        None => None,
        Some(first) => {
            let first = first?;
            for other in lengths {
                if other? != first {
                    return Err(H1Error::Invalid("differing Content-Length values"));
                }
            }
            Some(first)
        }
    };
    let close = version != Version::HTTP_11
        || headers
            .get_all(CONNECTION)
            .iter()
            .filter_map(|v| v.to_str().ok())
            .flat_map(|v| v.split(','))
            .any(|t| t.trim().eq_ignore_ascii_case("close"));
    let no_body =
        head_request || status == StatusCode::NO_CONTENT || status == StatusCode::NOT_MODIFIED;
    let framing = if no_body {
        Framing::Length(0)
    } else {
        match (chunked, length) {
            (Some(true), _) => Framing::Chunked(Chunked::new()),
            (Some(false), _) => Framing::UntilClose,
            (None, Some(n)) => Framing::Length(n),
            (None, None) => Framing::UntilClose,
        }
    };
    // A length beside a transfer coding: the coding wins, the length is not
    // passed on, and the connection is not trusted again (RFC 9112 §6.3).
    let both = chunked.is_some() && length.is_some();
    if both {
        headers.remove(CONTENT_LENGTH);
    }
    // A bodiless answer's end is only where the upstream should stop: a
    // body it sends anyway (HEAD taken for GET, a 204 with content) would
    // be read as the next answer, so such a connection is not reused.
    let reusable = sent && !close && framing != Framing::UntilClose && !both && !no_body;
    let mut body = H1Body {
        conn: Some(conn),
        framing,
        reusable,
        idle: Arc::clone(idle),
    };
    if body.framing == Framing::Length(0) {
        body.finish();
    }
    let mut resp = Response::new(body);
    *resp.status_mut() = status;
    *resp.version_mut() = version;
    *resp.headers_mut() = headers;
    Ok(resp)
}

/// A response body read from its connection by whoever polls it; the
/// connection goes back to its pool when the body has been read to its end
/// and is closed if the body is dropped before.
pub struct H1Body {
    conn: Option<Box<Conn>>,
    framing: Framing,
    reusable: bool,
    idle: Idle,
}

/// At most this many idle connections are kept per provider and worker.
pub const MAX_IDLE: usize = 256;

impl H1Body {
    /// The end of the body: the connection goes back, or is closed.
    fn finish(&mut self) {
        self.framing = Framing::Length(0);
        let Some(mut conn) = self.conn.take() else {
            return;
        };
        if !self.reusable || !conn.buf.is_empty() {
            return;
        }
        let now = Instant::now();
        conn.since = now;
        let mut idle = self.idle.lock().unwrap_or_else(PoisonError::into_inner);
        // The oldest first: past the idle timeout (the upstream has likely
        // closed them; each holds a descriptor), or over the cap.
        while idle
            .front()
            .is_some_and(|c| now.duration_since(c.since) >= IDLE_TIMEOUT)
            || idle.len() >= MAX_IDLE
        {
            idle.pop_front();
        }
        idle.push_back(conn);
    }

    /// The next frame, or the end; errors are the connection's.
    fn poll_next(&mut self, cx: &mut Context<'_>) -> Poll<Option<Result<Bytes, H1Error>>> {
        loop {
            if self.framing == Framing::Length(0) {
                return Poll::Ready(None);
            }
            let Some(conn) = self.conn.as_mut() else {
                return Poll::Ready(None);
            };
            match self.framing {
                Framing::Length(left) => {
                    if conn.buf.is_empty() {
                        if ready!(conn.poll_fill(cx))? == 0 {
                            self.conn = None;
                            return Poll::Ready(Some(Err(H1Error::Io(
                                io::ErrorKind::UnexpectedEof.into(),
                            ))));
                        }
                        continue;
                    }
                    let take = left.min(conn.buf.len() as u64);
                    let data = conn.buf.split_to(take as usize).freeze();
                    self.framing = Framing::Length(left - take);
                    if left == take {
                        self.finish();
                    }
                    return Poll::Ready(Some(Ok(data)));
                }
                Framing::UntilClose => {
                    if conn.buf.is_empty() {
                        if ready!(conn.poll_fill(cx))? == 0 {
                            self.reusable = false;
                            self.finish();
                            return Poll::Ready(None);
                        }
                        continue;
                    }
                    return Poll::Ready(Some(Ok(conn.buf.split().freeze())));
                }
                Framing::Chunked(mut chunked) => {
                    let step = chunked
                        .step(&mut conn.buf)
                        .map_err(|e| H1Error::Invalid(e.0))?;
                    self.framing = Framing::Chunked(chunked);
                    match step {
                        Step::Data(data) => return Poll::Ready(Some(Ok(data))),
                        Step::End => {
                            self.finish();
                            return Poll::Ready(None);
                        }
                        Step::More => {
                            if ready!(conn.poll_fill(cx))? == 0 {
                                self.conn = None;
                                return Poll::Ready(Some(Err(H1Error::Io(
                                    io::ErrorKind::UnexpectedEof.into(),
                                ))));
                            }
                        }
                    }
                }
            }
        }
    }
}

/// A `Content-Length` value, by the rules both of credproxy's sides read
/// it with ([`crate::http1::content_length`]).
fn content_length(value: &[u8]) -> Result<u64, H1Error> {
    http1::content_length(value).map_err(|e| H1Error::Invalid(e.0))
}

impl Body for H1Body {
    type Data = Bytes;
    type Error = H1Error;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, H1Error>>> {
        let this = self.get_mut();
        match this.poll_next(cx) {
            Poll::Ready(Some(Err(e))) => {
                // Whatever broke, the connection's framing is lost: close
                // it, and end the body here.
                this.conn = None;
                this.framing = Framing::Length(0);
                Poll::Ready(Some(Err(e)))
            }
            other => other.map(|o| o.map(|r| r.map(Frame::data))),
        }
    }

    fn is_end_stream(&self) -> bool {
        self.framing == Framing::Length(0)
    }

    fn size_hint(&self) -> SizeHint {
        match self.framing {
            Framing::Length(n) => SizeHint::with_exact(n),
            _ => SizeHint::default(),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn heads_parse_with_values_sliced_from_the_buffer() {
        let mut buf = BytesMut::from(
            &b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nX-A: 1\r\nx-a: 2\r\n\r\n{}"[..],
        );
        let p = parse_head(&mut buf).expect("valid").expect("complete");
        assert_eq!(p.status, StatusCode::OK);
        assert_eq!(p.version, Version::HTTP_11);
        assert_eq!(p.headers["content-type"], "application/json");
        assert_eq!(p.headers.get_all("x-a").iter().count(), 2);
        assert_eq!(&buf[..], b"{}");
        let mut partial = BytesMut::from(&b"HTTP/1.1 200 OK\r\nContent-Ty"[..]);
        assert!(parse_head(&mut partial).expect("valid so far").is_none());
        assert_eq!(partial.len(), 27, "a partial head stays in the buffer");
        for bad in [
            &b"HTTP/1.1 2x0 OK\r\n\r\n"[..],
            b"HTTP/1.1 200 OK\r\nBad Header\r\n\r\n",
        ] {
            assert!(parse_head(&mut BytesMut::from(bad)).is_err(), "{bad:?}");
        }
    }

    #[test]
    fn content_lengths_are_digits_only() {
        assert_eq!(content_length(b"70").expect("digits"), 70);
        assert_eq!(content_length(b" 5 ").expect("spaces around"), 5);
        for bad in [
            &b""[..],
            b"+5",
            b"-1",
            b"5 5",
            b"0x10",
            b"99999999999999999999",
        ] {
            assert!(content_length(bad).is_err(), "{bad:?}");
        }
    }

    #[test]
    fn request_heads_carry_host_and_a_length_where_one_is_due() {
        let host = HeaderValue::from_static("api.example:8443");
        let mut h = HeaderMap::new();
        h.insert("accept", HeaderValue::from_static("application/json"));
        h.insert(CONTENT_LENGTH, HeaderValue::from_static("999"));
        let get = encode_head(&Method::GET, "/v1/x?a=1", &host, &h, Some(0), 0);
        assert_eq!(
            String::from_utf8(get).expect("ascii"),
            "GET /v1/x?a=1 HTTP/1.1\r\nhost: api.example:8443\r\naccept: application/json\r\n\r\n"
        );
        let post = encode_head(&Method::POST, "/v1/x", &host, &h, Some(0), 0);
        assert!(String::from_utf8(post)
            .expect("ascii")
            .ends_with("content-length: 0\r\n\r\n"));
        let put = encode_head(&Method::PUT, "/v1/x", &host, &h, Some(12), 0);
        let put = String::from_utf8(put).expect("ascii");
        assert!(put.ends_with("content-length: 12\r\n\r\n"), "{put}");
        assert_eq!(
            put.matches("content-length").count(),
            1,
            "the caller's length is replaced"
        );
        let chunked = encode_head(&Method::PUT, "/v1/x", &host, &h, None, 0);
        let chunked = String::from_utf8(chunked).expect("ascii");
        assert!(
            chunked.ends_with("\r\ntransfer-encoding: chunked\r\n\r\n"),
            "{chunked}"
        );
        assert!(!chunked.contains("content-length"), "{chunked}");
    }
}
