//! The proxy listener's HTTP/1.1 server side against hostile clients
//! (issue 27): whatever bytes a client sends, each request the upstream
//! receives is exactly one request the client sent, under framing every
//! parser agrees on, with that request's own session's credentials; and
//! credproxy never forwards a request hyper's parser would read otherwise.
//!
//! Black-box: the real server (`support::World`), Spark's `api_base`
//! pointed at [`Upstream`], a raw upstream that records each request it
//! receives whole (method, target, headers, body) and answers it with the
//! request's tag (`x-echo-tag`) and a hash of the `Authorization` it
//! carried (`x-echo-auth`), then closes (one request per upstream
//! connection: when no connection is open, every forwarded request is
//! recorded).
//!
//! - a property over generated client byte streams ([`Plan`]): one or two
//!   connections, two sessions (and unknown keys) mixed on each, requests
//!   pipelined in one write or split across writes, clean ones of every
//!   framing and hostile ones (CL.TE, TE.CL, differing lengths, odd
//!   `Transfer-Encoding`s, TE on HTTP/1.0, obs-fold, bare LF, NUL and CR
//!   in values, stray bytes, absolute-form, early closes). A body longer
//!   than its `Content-Length` is, on the wire, its request followed by
//!   the next one: consecutive requests of the two sessions are that case,
//!   and since every parser agrees where the length ends, the extra bytes
//!   are a request of the other session, served with that session's
//!   credentials. Requests hidden where no parser may find one (inside a
//!   body, behind hostile framing) carry their own tags, which must never
//!   reach the upstream;
//! - a differential test: the same streams fed to a plain hyper HTTP/1.1
//!   server; what credproxy forwards is a subsequence of what hyper parsed;
//! - plain cases: pipelined sessions answered in order, a client gone
//!   mid-body, `Expect: 100-continue` with an unknown key. (A head over
//!   `max_header_bytes` is tests/limits.rs's `max_header_bytes_is_exact`.)
//!
//! The streams are the same on every run (a fixed seed); set
//! `PROPTEST_RNG_SEED` and `PROPTEST_CASES` to explore others.

mod support;

use std::collections::{HashMap, HashSet};
use std::convert::Infallible;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use bytes::Bytes;
use http_body_util::{BodyExt, Full};
use proptest::prelude::*;
use proptest::sample::Index;
use proptest::test_runner::{Config as RunnerConfig, RngSeed, TestCaseError, TestRunner};
use support::{add_session, Extra, World};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::Notify;

/// How long one read may wait for the server before the case fails.
const READ_LIMIT: Duration = Duration::from_secs(10);

// ---------------------------------------------------------------------------
// Wire helpers, for the recording upstream and the client's answers.

fn find(hay: &[u8], needle: &[u8]) -> Option<usize> {
    hay.windows(needle.len()).position(|w| w == needle)
}

/// Decodes a chunked body at the start of `buf`: its data and how many
/// bytes it took, trailers included; `None` while incomplete.
fn dechunk(buf: &[u8]) -> Result<Option<(Vec<u8>, usize)>, String> {
    let mut at = 0;
    let mut data = Vec::new();
    loop {
        let Some(eol) = find(&buf[at..], b"\r\n") else {
            return Ok(None);
        };
        let line = &buf[at..at + eol];
        let size = line.split(|&b| b == b';').next().unwrap_or(line);
        let size = std::str::from_utf8(size)
            .ok()
            .and_then(|s| usize::from_str_radix(s.trim(), 16).ok())
            .ok_or_else(|| format!("bad chunk size line {:?}", String::from_utf8_lossy(line)))?;
        at += eol + 2;
        if size == 0 {
            loop {
                let Some(eol) = find(&buf[at..], b"\r\n") else {
                    return Ok(None);
                };
                at += eol + 2;
                if eol == 0 {
                    return Ok(Some((data, at)));
                }
            }
        }
        if buf.len() < at + size + 2 {
            return Ok(None);
        }
        data.extend_from_slice(&buf[at..at + size]);
        if &buf[at + size..at + size + 2] != b"\r\n" {
            return Err("a chunk not followed by CRLF".into());
        }
        at += size + 2;
    }
}

type Headers = Vec<(String, Vec<u8>)>;

fn header<'a>(headers: &'a Headers, name: &str) -> Option<&'a [u8]> {
    headers
        .iter()
        .find(|(n, _)| n.eq_ignore_ascii_case(name))
        .map(|(_, v)| v.as_slice())
}

fn is_chunked(headers: &Headers) -> bool {
    headers
        .iter()
        .rfind(|(n, _)| n.eq_ignore_ascii_case("transfer-encoding"))
        .and_then(|(_, v)| std::str::from_utf8(v).ok())
        .and_then(|v| v.rsplit(',').next())
        .is_some_and(|last| last.trim().eq_ignore_ascii_case("chunked"))
}

fn content_length(headers: &Headers) -> Result<Option<usize>, String> {
    header(headers, "content-length")
        .map(|v| {
            std::str::from_utf8(v)
                .ok()
                .and_then(|v| v.trim().parse().ok())
                .ok_or_else(|| format!("bad content-length {:?}", String::from_utf8_lossy(v)))
        })
        .transpose()
}

/// FNV-1a of a header value: names a session's token without showing it.
fn fnv(value: &[u8]) -> String {
    let hash = value.iter().fold(0xcbf2_9ce4_8422_2325u64, |h, &b| {
        (h ^ u64::from(b)).wrapping_mul(0x0100_0000_01b3)
    });
    format!("{hash:016x}")
}

/// The tag a request target carries: its last path segment.
fn tag_of(target: &str) -> &str {
    let path = target.split('?').next().unwrap_or(target);
    path.rsplit('/').next().unwrap_or(path)
}

// ---------------------------------------------------------------------------
// The recording upstream.

/// One request as the upstream received it, whole.
#[derive(Clone)]
struct Forwarded {
    method: String,
    target: String,
    headers: Headers,
    body: Vec<u8>,
}

impl Forwarded {
    fn tag(&self) -> &str {
        tag_of(&self.target)
    }
}

/// As text; `Authorization` as the hash the answers carry (it names the
/// session without showing its token).
impl std::fmt::Debug for Forwarded {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let headers: Vec<String> = self
            .headers
            .iter()
            .map(|(n, v)| match n.as_str() {
                "authorization" => format!("{n}: #{}", fnv(v)),
                _ => format!("{n}: {}", String::from_utf8_lossy(v)),
            })
            .collect();
        f.debug_struct("Forwarded")
            .field("method", &self.method)
            .field("target", &self.target)
            .field("headers", &headers)
            .field("body", &String::from_utf8_lossy(&self.body))
            .finish()
    }
}

#[derive(Default)]
struct Log {
    requests: Vec<Forwarded>,
    /// Upstream connections accepted and not yet finished.
    open: usize,
    /// Connections that ended before a whole request arrived.
    broken: usize,
}

#[derive(Clone)]
struct Upstream {
    addr: SocketAddr,
    log: Arc<Mutex<Log>>,
    changed: Arc<Notify>,
}

/// Counts a connection as open until its task ends.
struct OpenConn {
    log: Arc<Mutex<Log>>,
    changed: Arc<Notify>,
}

impl Drop for OpenConn {
    fn drop(&mut self) {
        if let Ok(mut log) = self.log.lock() {
            log.open -= 1;
        }
        self.changed.notify_waiters();
    }
}

impl Upstream {
    async fn start() -> Upstream {
        let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
        let addr = listener.local_addr().expect("addr");
        let up = Upstream {
            addr,
            log: Arc::default(),
            changed: Arc::default(),
        };
        let shared = up.clone();
        tokio::spawn(async move {
            while let Ok((sock, _)) = listener.accept().await {
                shared.log.lock().expect("log").open += 1;
                let guard = OpenConn {
                    log: Arc::clone(&shared.log),
                    changed: Arc::clone(&shared.changed),
                };
                let up = shared.clone();
                tokio::spawn(async move {
                    let whole = up.serve_one(sock).await;
                    if !whole {
                        up.log.lock().expect("log").broken += 1;
                    }
                    drop(guard);
                });
            }
        });
        up
    }

    fn requests(&self) -> Vec<Forwarded> {
        self.log.lock().expect("log").requests.clone()
    }

    /// The requests recorded from `stream`'s connection, in arrival order.
    fn requests_of(&self, stream: &Stream) -> Vec<Forwarded> {
        let log = self.log.lock().expect("log");
        log.requests
            .iter()
            .filter(|r| stream.owns(r.tag()))
            .cloned()
            .collect()
    }

    fn broken(&self) -> usize {
        self.log.lock().expect("log").broken
    }

    /// Waits until no upstream connection is open: every request credproxy
    /// began to send has been recorded or has broken off. `false` if some
    /// are still open at `limit`.
    async fn settle(&self, limit: Duration) -> bool {
        let deadline = tokio::time::Instant::now() + limit;
        loop {
            let notified = self.changed.notified();
            tokio::pin!(notified);
            notified.as_mut().enable();
            if self.log.lock().expect("log").open == 0 {
                return true;
            }
            if tokio::time::timeout_at(deadline, notified).await.is_err() {
                return false;
            }
        }
    }

    /// Reads one request, records it, answers it and closes; `false` if
    /// the connection ended first or the request was malformed.
    async fn serve_one(&self, mut sock: TcpStream) -> bool {
        let mut buf = Vec::new();
        let (method, target, headers, head_len) = loop {
            let mut slots = [httparse::EMPTY_HEADER; 64];
            let mut req = httparse::Request::new(&mut slots);
            match req.parse(&buf) {
                Ok(httparse::Status::Complete(n)) => {
                    let headers: Headers = req
                        .headers
                        .iter()
                        .map(|h| (h.name.to_ascii_lowercase(), h.value.to_vec()))
                        .collect();
                    break (
                        req.method.unwrap_or_default().to_owned(),
                        req.path.unwrap_or_default().to_owned(),
                        headers,
                        n,
                    );
                }
                Ok(httparse::Status::Partial) => {}
                Err(_) => return false,
            }
            if !read_more(&mut sock, &mut buf).await {
                return false;
            }
        };
        buf.drain(..head_len);
        let expects = header(&headers, "expect").is_some();
        let mut told_to_continue = false;
        let body = loop {
            let framed = if is_chunked(&headers) {
                match dechunk(&buf) {
                    Ok(done) => done.map(|(data, _)| data),
                    Err(_) => return false,
                }
            } else {
                match content_length(&headers) {
                    Ok(n) => {
                        let n = n.unwrap_or(0);
                        (buf.len() >= n).then(|| buf[..n].to_vec())
                    }
                    Err(_) => return false,
                }
            };
            if let Some(body) = framed {
                break body;
            }
            if expects && !told_to_continue {
                told_to_continue = true;
                if sock
                    .write_all(b"HTTP/1.1 100 Continue\r\n\r\n")
                    .await
                    .is_err()
                {
                    return false;
                }
            }
            if !read_more(&mut sock, &mut buf).await {
                return false;
            }
        };
        let request = Forwarded {
            method,
            target,
            headers,
            body,
        };
        let tag = request.tag().to_owned();
        let auth = fnv(header(&request.headers, "authorization").unwrap_or(b"none"));
        self.log.lock().expect("log").requests.push(request);
        let answer = format!(
            "HTTP/1.1 200 OK\r\nx-echo-tag: {tag}\r\nx-echo-auth: {auth}\r\ncontent-type: text/plain\r\ncontent-length: {}\r\nconnection: close\r\n\r\n{tag}",
            tag.len()
        );
        let _ = sock.write_all(answer.as_bytes()).await;
        let _ = sock.shutdown().await;
        true
    }
}

/// Reads more bytes into `buf`; `false` at EOF, on an error or after
/// [`READ_LIMIT`] of silence.
async fn read_more(sock: &mut (impl AsyncRead + Unpin), buf: &mut Vec<u8>) -> bool {
    let mut chunk = [0u8; 16384];
    match tokio::time::timeout(READ_LIMIT, sock.read(&mut chunk)).await {
        Ok(Ok(n)) if n > 0 => {
            buf.extend_from_slice(&chunk[..n]);
            true
        }
        _ => false,
    }
}

// ---------------------------------------------------------------------------
// The test bed: credproxy against the recording upstream, two sessions.

struct Session {
    key: String,
    token: String,
}

impl Session {
    /// What the upstream must see in `Authorization` for this session.
    fn authorization(&self) -> String {
        format!("OAuth {}", self.token)
    }
}

struct Bed {
    _world: World,
    srv: credproxy::server::Running,
    up: Upstream,
    sessions: [Session; 2],
}

impl Bed {
    async fn start() -> Bed {
        let up = Upstream::start().await;
        let world = World::new().await;
        let extra = Extra {
            // Two workers: the two connections of a case may be served on
            // different threads. Short timeouts bound a stuck case.
            server: "worker_threads = 2\nheader_read_timeout = \"5s\"\nbody_read_timeout = \"5s\""
                .into(),
            // Unknown keys are part of the streams: no cold-lookup budget.
            store: "cold_lookups_per_client = 0".into(),
            // Bodies over 256 bytes stream (hyper's client); smaller ones
            // are kept (credproxy's own).
            spark: "max_replay_body = 256\nrequest_timeout = \"5s\"".into(),
            ..Extra::default()
        };
        let srv = world.start_against_spark_api(&extra, up.addr).await;
        let mut sessions = Vec::new();
        for _ in 0..2 {
            let (_, key, tokens) = add_session(&srv, "spark", &world.spark).await;
            sessions.push(Session {
                key,
                token: tokens.access_token,
            });
        }
        let sessions: [Session; 2] = sessions.try_into().ok().expect("two sessions");
        Bed {
            _world: world,
            srv,
            up,
            sessions,
        }
    }

    fn session(&self, who: Who) -> Option<&Session> {
        match who {
            Who::A => Some(&self.sessions[0]),
            Who::B => Some(&self.sessions[1]),
            Who::Unknown => None,
        }
    }

    async fn stop(self) {
        self.srv.shutdown().await;
    }
}

fn runtime() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .expect("runtime")
}

// ---------------------------------------------------------------------------
// What a client sends: the generated plan.

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Who {
    A,
    B,
    /// A key no session has: answered 401, never forwarded.
    Unknown,
}

/// Where the request carries its key (the contract's places).
#[derive(Debug, Clone, Copy)]
enum Place {
    SessionHeader,
    ProxyAuthorization,
    Authorization,
}

#[derive(Debug, Clone, Copy)]
enum Framing {
    /// No body and no framing header.
    Empty,
    Length,
    Chunked {
        chunk: usize,
        ext: bool,
        trailer: bool,
    },
}

/// How a request is written. Each form says what may become of it
/// ([`Kind`]); the comments give today's server's (hyper's) reading.
#[derive(Debug, Clone, Copy)]
enum Form {
    /// As the RFC writes it.
    Clean,
    /// Lines ended by a bare LF (hyper: accepted; RFC 9112 §2.2: MAY).
    BareLf,
    /// `GET http://127.0.0.1:PORT/spark/...`: naming this listener, served.
    AbsoluteUs,
    /// Absolute-form naming another host: credproxy refuses it (400).
    AbsoluteOther,
    /// An empty line before the request line (hyper: skipped; RFC 9112
    /// §2.2: SHOULD ignore).
    LeadingCrlf,
    /// `Content-Length` twice, the same value (hyper: accepted).
    DupLength,
    /// `Content-Length: n, n` (hyper: 400; RFC 9110 §8.6 lets a recipient
    /// take it as n).
    ListLength,
    /// `Transfer-Encoding:` chunked with odd spacing or case.
    TeOws(u8),
    /// `identity, chunked`, in one line or two (hyper: chunked).
    TeIdentityChunked(bool),
    /// A folded header line (hyper: 400; RFC 9112 §5.2: reject or unfold);
    /// `true`: the continuation reads `Transfer-Encoding: chunked`.
    ObsFold(bool),
    /// NUL, CR, or a CR before `Transfer-Encoding: chunked` in a value
    /// (hyper: 400; RFC 9110 §5.5: reject or replace with SP).
    CtlInValue(u8),
    /// `Content-Length` over the chunked body and a smuggled request after
    /// it, and `Transfer-Encoding: chunked` (either order).
    ClTe(bool),
    /// `Transfer-Encoding: chunked` and a `Content-Length` that ends the
    /// body after the chunk-size line, where a smuggled request begins.
    TeCl,
    /// `Transfer-Encoding: chunked` on HTTP/1.0 (keep-alive asked), a
    /// smuggled request after the chunked body (hyper: 400).
    TeOnHttp10,
    /// Two differing `Content-Length`s (hyper: 400).
    TwoLengths(bool),
    /// `chunked, identity` (hyper: 400).
    TeNotLast,
    /// `Transfer-Encoding: identity` (hyper: 400).
    TeIdentity,
    /// `Transfer-Encoding: xchunked` (hyper: 400).
    TeUnknown,
    /// `Transfer-Encoding : chunked` (hyper: 400; RFC 9112 §5.1: MUST 400).
    TeSpaceBeforeColon,
}

#[derive(Debug, Clone)]
struct Request {
    who: Who,
    place: Place,
    method: &'static str,
    http10: bool,
    close: bool,
    expect: bool,
    framing: Framing,
    body_len: usize,
    /// A complete request of the other session inside the body.
    smuggle_in_body: bool,
    form: Form,
}

#[derive(Debug, Clone)]
enum Item {
    Request(Request),
    /// Bytes between requests that start no valid request line.
    Junk(u8),
}

#[derive(Debug, Clone)]
struct Connection {
    items: Vec<Item>,
    /// Where the byte stream is split into writes.
    splits: Vec<Index>,
    /// Cut the last request here (when it is a clean one) and close.
    cut: Option<Index>,
}

#[derive(Debug, Clone)]
struct Plan {
    connections: Vec<Connection>,
}

fn form() -> impl Strategy<Value = Form> {
    prop_oneof![
        48 => Just(Form::Clean),
        1 => Just(Form::BareLf),
        1 => Just(Form::AbsoluteUs),
        1 => Just(Form::AbsoluteOther),
        1 => Just(Form::LeadingCrlf),
        1 => Just(Form::DupLength),
        1 => Just(Form::ListLength),
        1 => (0u8..5).prop_map(Form::TeOws),
        1 => any::<bool>().prop_map(Form::TeIdentityChunked),
        1 => any::<bool>().prop_map(Form::ObsFold),
        1 => (0u8..3).prop_map(Form::CtlInValue),
        2 => any::<bool>().prop_map(Form::ClTe),
        2 => Just(Form::TeCl),
        1 => Just(Form::TeOnHttp10),
        1 => any::<bool>().prop_map(Form::TwoLengths),
        1 => Just(Form::TeNotLast),
        1 => Just(Form::TeIdentity),
        1 => Just(Form::TeUnknown),
        1 => Just(Form::TeSpaceBeforeColon),
    ]
}

fn framing() -> impl Strategy<Value = Framing> {
    prop_oneof![
        2 => Just(Framing::Empty),
        3 => Just(Framing::Length),
        2 => (1usize..40, any::<bool>(), any::<bool>())
            .prop_map(|(chunk, ext, trailer)| Framing::Chunked { chunk, ext, trailer }),
    ]
}

fn request() -> impl Strategy<Value = Request> {
    (
        prop_oneof![9 => Just(Who::A), 9 => Just(Who::B), 2 => Just(Who::Unknown)],
        prop_oneof![
            Just(Place::SessionHeader),
            Just(Place::ProxyAuthorization),
            Just(Place::Authorization)
        ],
        prop_oneof![Just("GET"), Just("POST"), Just("PUT"), Just("DELETE")],
        (
            prop::bool::weighted(0.05),
            prop::bool::weighted(0.05),
            prop::bool::weighted(0.15),
        ),
        framing(),
        prop_oneof![6 => 0usize..48, 1 => 200usize..700],
        prop::bool::weighted(0.3),
        form(),
    )
        .prop_map(
            |(who, place, method, (http10, close, expect), framing, body_len, smuggle, form)| {
                Request {
                    who,
                    place,
                    method,
                    http10,
                    close,
                    expect,
                    framing,
                    body_len,
                    smuggle_in_body: smuggle,
                    form,
                }
            },
        )
}

fn item() -> impl Strategy<Value = Item> {
    prop_oneof![
        24 => request().prop_map(Item::Request),
        1 => (0u8..4).prop_map(Item::Junk),
    ]
}

fn connection() -> impl Strategy<Value = Connection> {
    (
        prop::collection::vec(item(), 1..9),
        prop::collection::vec(any::<Index>(), 0..4),
        prop::option::weighted(0.15, any::<Index>()),
    )
        .prop_map(|(items, splits, cut)| Connection { items, splits, cut })
}

fn plan() -> impl Strategy<Value = Plan> {
    prop::collection::vec(connection(), 1..3).prop_map(|connections| Plan { connections })
}

// ---------------------------------------------------------------------------
// From a plan to bytes and what may become of each request.

/// What may become of one item.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Kind {
    /// A clean request of a known session: forwarded, answered 200.
    Serve,
    /// Framed cleanly but not to be forwarded (unknown key, another
    /// host): a 4xx answer, and the connection goes on or closes.
    Deny,
    /// A form some parsers accept and others refuse: forwarded as written,
    /// or refused (a 4xx, or the connection closes).
    Lenient,
    /// Framing two readings disagree on: refused, or forwarded as the
    /// chunked reading says (RFC 9112 §6.3) and then the connection closed.
    Ambiguous,
    /// Must be refused: never forwarded, nothing after it on the connection.
    Refuse,
    /// Cut short by the client's close: never forwarded whole.
    Truncated,
}

impl Kind {
    fn may_pass(self) -> bool {
        matches!(self, Kind::Serve | Kind::Lenient | Kind::Ambiguous)
    }

    /// Whether the server may close the connection instead of answering.
    fn may_close(self) -> bool {
        !matches!(self, Kind::Serve | Kind::Deny)
    }

    /// Whether nothing may follow it on its connection once refused.
    fn ends_when_refused(self) -> bool {
        matches!(self, Kind::Ambiguous | Kind::Refuse | Kind::Truncated)
    }
}

/// One item as sent.
#[derive(Debug, Clone)]
struct Sent {
    tag: String,
    bytes: Vec<u8>,
    who: Who,
    method: String,
    /// The body the upstream must receive if the request goes through.
    body: Vec<u8>,
    kind: Kind,
    /// Nothing may follow it on its connection once it is answered
    /// (`Connection: close`, HTTP/1.0, ambiguous framing).
    last: bool,
}

/// One connection as sent.
#[derive(Debug, Clone)]
struct Stream {
    /// Every tag of this connection starts with it.
    prefix: String,
    items: Vec<Sent>,
    /// Byte offsets where a new write begins.
    splits: Vec<usize>,
    /// The client closes its side after the last byte (an early close).
    truncated: bool,
    /// Tags of requests hidden in bodies or behind hostile framing.
    smuggled: Vec<String>,
}

impl Stream {
    fn bytes(&self) -> Vec<u8> {
        self.items.iter().flat_map(|s| s.bytes.clone()).collect()
    }

    /// Whether `tag` is one of this connection's (`k1c0` is not `k11c0`'s:
    /// the prefix ends right before `r` or `s`).
    fn owns(&self, tag: &str) -> bool {
        tag.strip_prefix(&self.prefix)
            .is_some_and(|rest| rest.starts_with(['r', 's']))
    }
}

fn chunked(body: &[u8], chunk: usize, ext: bool, trailer: bool) -> Vec<u8> {
    let mut out = Vec::new();
    for (i, piece) in body.chunks(chunk.max(1)).enumerate() {
        out.extend_from_slice(format!("{:x}", piece.len()).as_bytes());
        if ext {
            let ext = if i % 2 == 0 {
                ";ext=1"
            } else {
                ";name=\"q v\""
            };
            out.extend_from_slice(ext.as_bytes());
        }
        out.extend_from_slice(b"\r\n");
        out.extend_from_slice(piece);
        out.extend_from_slice(b"\r\n");
    }
    out.extend_from_slice(b"0\r\n");
    if trailer {
        out.extend_from_slice(b"X-Trailer: t\r\n");
    }
    out.extend_from_slice(b"\r\n");
    out
}

struct Render<'a> {
    bed: &'a Bed,
    proxy: SocketAddr,
    prefix: String,
    smuggled: Vec<String>,
}

impl Render<'_> {
    /// A complete request of `who`'s session, to hide in a body or behind
    /// hostile framing; its tag is recorded as smuggled.
    fn smuggle(&mut self, who: Who) -> Vec<u8> {
        let tag = format!("{}s{}", self.prefix, self.smuggled.len());
        let key = match who {
            Who::A => &self.bed.sessions[0].key,
            Who::B | Who::Unknown => &self.bed.sessions[1].key,
        };
        let bytes = format!(
            "GET /spark/v1/t/{tag} HTTP/1.1\r\nHost: x\r\nX-Credproxy-Session: {key}\r\n\r\n"
        );
        self.smuggled.push(tag);
        bytes.into_bytes()
    }

    /// `len` bytes starting with the tag (at least the tag), with a
    /// smuggled request of the other session inside when asked.
    fn payload(&mut self, tag: &str, len: usize, smuggle: bool, who: Who) -> Vec<u8> {
        let mut body = format!("<{tag}>").into_bytes();
        if smuggle {
            let other = if who == Who::A { Who::B } else { Who::A };
            body.extend(self.smuggle(other));
        }
        while body.len() < len {
            body.push(b'.');
        }
        body
    }

    fn item(&mut self, index: usize, item: &Item) -> Sent {
        let tag = format!("{}r{index}", self.prefix);
        match item {
            Item::Junk(n) => {
                let bytes: &[u8] = match n {
                    0 => b"@@\r\n",
                    1 => b"0\r\n\r\n",
                    2 => b"\x00\x01\x02",
                    // With its blank line: hyper re-parses a head that
                    // came in pieces only once one has arrived.
                    _ => b"GET\r\n\r\n",
                };
                Sent {
                    tag,
                    bytes: bytes.to_vec(),
                    who: Who::Unknown,
                    method: String::new(),
                    body: Vec::new(),
                    kind: Kind::Refuse,
                    last: true,
                }
            }
            Item::Request(r) => self.request(tag, r),
        }
    }

    fn request(&mut self, tag: String, r: &Request) -> Sent {
        let eol: &[u8] = if matches!(r.form, Form::BareLf) {
            b"\n"
        } else {
            b"\r\n"
        };
        let http10 = r.http10 || matches!(r.form, Form::TeOnHttp10);
        let body_len = r.body_len;
        let target = match r.form {
            Form::AbsoluteUs => format!("http://{}/spark/v1/t/{tag}", self.proxy),
            Form::AbsoluteOther => format!("http://example.com/spark/v1/t/{tag}"),
            _ => format!("/spark/v1/t/{tag}"),
        };
        let mut lines: Vec<Vec<u8>> = vec![
            format!(
                "{} {target} HTTP/1.{}",
                r.method,
                if http10 { 0 } else { 1 }
            )
            .into_bytes(),
            b"Host: x".to_vec(),
        ];
        let key = match self.bed.session(r.who) {
            Some(s) => s.key.clone(),
            None => format!("unknown-key-{tag}"),
        };
        lines.push(
            match r.place {
                Place::SessionHeader => format!("X-Credproxy-Session: {key}"),
                Place::ProxyAuthorization => format!("Proxy-Authorization: Bearer {key}"),
                Place::Authorization => format!("Authorization: OAuth {key}"),
            }
            .into_bytes(),
        );
        if r.close {
            lines.push(b"Connection: close".to_vec());
        }
        if r.expect {
            lines.push(b"Expect: 100-continue".to_vec());
        }
        let mut prefix = Vec::new();
        // The body the upstream must get if the request goes through, and
        // the bytes after the head.
        let (kind, body, rest) = match r.form {
            Form::Clean
            | Form::BareLf
            | Form::AbsoluteUs
            | Form::AbsoluteOther
            | Form::LeadingCrlf
            | Form::DupLength
            | Form::ListLength => {
                // HTTP/1.0 has no chunked framing: a length instead.
                let framing = match (r.framing, http10) {
                    (Framing::Chunked { .. }, true) => Framing::Length,
                    (f, _) => f,
                };
                let body = match framing {
                    Framing::Empty => Vec::new(),
                    _ => self.payload(&tag, body_len, r.smuggle_in_body, r.who),
                };
                let rest = match framing {
                    Framing::Empty => Vec::new(),
                    Framing::Length => {
                        let n = body.len();
                        match r.form {
                            Form::DupLength => {
                                lines.push(format!("Content-Length: {n}").into_bytes());
                                lines.push(format!("Content-Length: {n}").into_bytes());
                            }
                            Form::ListLength => {
                                lines.push(format!("Content-Length: {n}, {n}").into_bytes())
                            }
                            _ => lines.push(format!("Content-Length: {n}").into_bytes()),
                        }
                        body.clone()
                    }
                    Framing::Chunked {
                        chunk,
                        ext,
                        trailer,
                    } => {
                        lines.push(b"Transfer-Encoding: chunked".to_vec());
                        chunked(&body, chunk, ext, trailer)
                    }
                };
                if matches!(r.form, Form::LeadingCrlf) {
                    prefix.extend_from_slice(b"\r\n");
                }
                let kind = match r.form {
                    Form::AbsoluteOther => Kind::Deny,
                    Form::Clean | Form::AbsoluteUs => Kind::Serve,
                    _ => Kind::Lenient,
                };
                (kind, body, rest)
            }
            Form::TeOws(v) => {
                let value = [
                    " chunked ",
                    "\tchunked",
                    "   chunked",
                    " Chunked",
                    " CHUNKED\t",
                ][usize::from(v) % 5];
                lines.push(format!("Transfer-Encoding:{value}").into_bytes());
                let body = self.payload(&tag, body_len, r.smuggle_in_body, r.who);
                let rest = chunked(&body, 7, false, false);
                (Kind::Lenient, body, rest)
            }
            Form::TeIdentityChunked(two_lines) => {
                if two_lines {
                    lines.push(b"Transfer-Encoding: identity".to_vec());
                    lines.push(b"Transfer-Encoding: chunked".to_vec());
                } else {
                    lines.push(b"Transfer-Encoding: identity, chunked".to_vec());
                }
                let body = self.payload(&tag, body_len, r.smuggle_in_body, r.who);
                let rest = chunked(&body, 5, false, false);
                (Kind::Lenient, body, rest)
            }
            Form::ObsFold(_) | Form::CtlInValue(_) => {
                // Framed by its length; its body reads as an empty chunked
                // body and a smuggled request to a parser that takes the
                // odd line for `Transfer-Encoding: chunked`.
                let (name, tail): (&[u8], &[u8]) = match r.form {
                    Form::ObsFold(false) => (b"X-Fold: a", b"\tb"),
                    Form::ObsFold(true) => (b"X-Fold: a", b" Transfer-Encoding: chunked"),
                    Form::CtlInValue(0) => (b"X-Odd: a\x00b", b""),
                    Form::CtlInValue(1) => (b"X-Odd: a\rb", b""),
                    _ => (b"X-Odd: a\rTransfer-Encoding: chunked", b""),
                };
                if tail.is_empty() {
                    lines.push(name.to_vec());
                } else {
                    let mut folded = name.to_vec();
                    folded.extend_from_slice(eol);
                    folded.extend_from_slice(tail);
                    lines.push(folded);
                }
                let mut body = b"0\r\n\r\n".to_vec();
                body.extend(self.smuggle(r.who));
                body.extend(self.payload(&tag, body_len, false, r.who));
                lines.push(format!("Content-Length: {}", body.len()).into_bytes());
                (Kind::Lenient, body.clone(), body)
            }
            Form::ClTe(te_first) => {
                let body = self.payload(&tag, body_len, r.smuggle_in_body, r.who);
                let mut rest = chunked(&body, 9, false, false);
                rest.extend(self.smuggle(r.who));
                let te = b"Transfer-Encoding: chunked".to_vec();
                let cl = format!("Content-Length: {}", rest.len()).into_bytes();
                if te_first {
                    lines.extend([te, cl]);
                } else {
                    lines.extend([cl, te]);
                }
                (Kind::Ambiguous, body, rest)
            }
            Form::TeCl => {
                let mut data = self.smuggle(r.who);
                data.extend(self.payload(&tag, body_len, false, r.who));
                let size_line = format!("{:x}\r\n", data.len()).into_bytes();
                lines.push(b"Transfer-Encoding: chunked".to_vec());
                lines.push(format!("Content-Length: {}", size_line.len()).into_bytes());
                let mut rest = size_line;
                rest.extend_from_slice(&data);
                rest.extend_from_slice(b"\r\n0\r\n\r\n");
                (Kind::Ambiguous, data, rest)
            }
            Form::TeOnHttp10 => {
                lines.push(b"Connection: keep-alive".to_vec());
                lines.push(b"Transfer-Encoding: chunked".to_vec());
                let body = self.payload(&tag, body_len, r.smuggle_in_body, r.who);
                let mut rest = chunked(&body, 11, false, false);
                rest.extend(self.smuggle(r.who));
                (Kind::Ambiguous, body, rest)
            }
            Form::TwoLengths(short_first) => {
                let body = self.payload(&tag, body_len, false, r.who);
                let mut rest = body.clone();
                rest.extend(self.smuggle(r.who));
                let short = format!("Content-Length: {}", body.len()).into_bytes();
                let long = format!("Content-Length: {}", rest.len()).into_bytes();
                if short_first {
                    lines.extend([short, long]);
                } else {
                    lines.extend([long, short]);
                }
                (Kind::Refuse, Vec::new(), rest)
            }
            Form::TeNotLast | Form::TeUnknown | Form::TeSpaceBeforeColon | Form::TeIdentity => {
                let body = self.payload(&tag, body_len, false, r.who);
                let mut rest = chunked(&body, 6, false, false);
                rest.extend(self.smuggle(r.who));
                let line: &[u8] = match r.form {
                    Form::TeNotLast => b"Transfer-Encoding: chunked, identity",
                    Form::TeUnknown => b"Transfer-Encoding: xchunked",
                    Form::TeIdentity => b"Transfer-Encoding: identity",
                    _ => b"Transfer-Encoding : chunked",
                };
                lines.push(line.to_vec());
                // A length over the whole of it, for a parser that falls
                // back on it.
                lines.push(format!("Content-Length: {}", rest.len()).into_bytes());
                (Kind::Refuse, Vec::new(), rest)
            }
        };
        let kind = match (kind, r.who) {
            (Kind::Serve, Who::Unknown) => Kind::Deny,
            (kind, _) => kind,
        };
        let mut bytes = prefix;
        for line in &lines {
            bytes.extend_from_slice(line);
            bytes.extend_from_slice(eol);
        }
        bytes.extend_from_slice(eol);
        bytes.extend_from_slice(&rest);
        Sent {
            tag,
            bytes,
            who: r.who,
            method: r.method.to_owned(),
            body,
            kind,
            last: r.close || http10 || kind == Kind::Ambiguous,
        }
    }
}

/// Case numbers: every tag of a run is unique, across cases and shrinking.
static CASES: AtomicUsize = AtomicUsize::new(0);

fn render(bed: &Bed, plan: &Plan) -> Vec<Stream> {
    let case = CASES.fetch_add(1, Ordering::Relaxed);
    plan.connections
        .iter()
        .enumerate()
        .map(|(c, conn)| {
            let prefix = format!("k{case}c{c}");
            let mut render = Render {
                bed,
                proxy: bed.srv.proxy_addr,
                prefix: prefix.clone(),
                smuggled: Vec::new(),
            };
            let mut items: Vec<Sent> = conn
                .items
                .iter()
                .enumerate()
                .map(|(i, item)| render.item(i, item))
                .collect();
            let mut truncated = false;
            if let (Some(cut), Some(last)) = (conn.cut, items.last_mut()) {
                if last.kind == Kind::Serve || last.kind == Kind::Deny {
                    let at = 1 + cut.index(last.bytes.len() - 1);
                    last.bytes.truncate(at);
                    last.kind = Kind::Truncated;
                    truncated = true;
                }
            }
            let total: usize = items.iter().map(|s| s.bytes.len()).sum();
            let mut splits: Vec<usize> = conn.splits.iter().map(|i| i.index(total)).collect();
            splits.sort_unstable();
            splits.dedup();
            Stream {
                prefix,
                items,
                splits,
                truncated,
                smuggled: render.smuggled,
            }
        })
        .collect()
}

// ---------------------------------------------------------------------------
// The client: writes a stream, reads the answers.

/// One final answer as the client read it.
#[derive(Debug, Clone)]
struct Answer {
    status: u16,
    tag: Option<String>,
    auth: Option<String>,
    error: Option<String>,
}

/// Parses one answer at the start of `buf`: `Some((answer, used))`, or
/// `None` while incomplete. Interim answers come back with status 1xx.
fn parse_answer(buf: &[u8], eof: bool) -> Result<Option<(Answer, usize)>, String> {
    let mut slots = [httparse::EMPTY_HEADER; 64];
    let mut resp = httparse::Response::new(&mut slots);
    let head = match resp.parse(buf) {
        Ok(httparse::Status::Complete(n)) => n,
        Ok(httparse::Status::Partial) => return Ok(None),
        Err(e) => {
            return Err(format!(
                "unreadable answer ({e}): {:?}",
                String::from_utf8_lossy(&buf[..buf.len().min(300)])
            ))
        }
    };
    let status = resp.code.unwrap_or_default();
    let headers: Headers = resp
        .headers
        .iter()
        .map(|h| (h.name.to_ascii_lowercase(), h.value.to_vec()))
        .collect();
    let text = |name| header(&headers, name).map(|v| String::from_utf8_lossy(v).into_owned());
    let answer = Answer {
        status,
        tag: text("x-echo-tag"),
        auth: text("x-echo-auth"),
        error: text("x-credproxy-error"),
    };
    let rest = &buf[head..];
    let used = if (100..200).contains(&status) || status == 204 || status == 304 {
        0
    } else if is_chunked(&headers) {
        match dechunk(rest)? {
            Some((_, n)) => n,
            None => return Ok(None),
        }
    } else if let Some(n) = content_length(&headers)? {
        if rest.len() < n {
            return Ok(None);
        }
        n
    } else if eof {
        rest.len()
    } else {
        return Ok(None);
    };
    Ok(Some((answer, head + used)))
}

/// What one connection got back.
#[derive(Debug, Default)]
struct Outcome {
    answers: Vec<Answer>,
    /// The server neither answered nor closed within [`READ_LIMIT`].
    stalled: bool,
    unreadable: Option<String>,
}

/// Sends `stream` on a new connection to `addr` (in its writes, all at
/// once, without waiting for answers) and reads the answers: until the
/// server closes, or until each item has had one; then closes its side and
/// reads on until the server closes (for answers nobody asked for).
async fn drive(addr: SocketAddr, stream: &Stream) -> Outcome {
    let sock = TcpStream::connect(addr).await.expect("connect");
    let _ = sock.set_nodelay(true);
    let (mut rd, mut wr) = sock.into_split();
    let bytes = stream.bytes();
    let mut bounds = stream.splits.clone();
    bounds.push(bytes.len());
    let truncated = stream.truncated;
    let (wrote_tx, wrote_rx) = tokio::sync::oneshot::channel::<()>();
    let writer = tokio::spawn(async move {
        let mut from = 0;
        for to in bounds {
            if to > from {
                if wr.write_all(&bytes[from..to]).await.is_err() {
                    break;
                }
                tokio::task::yield_now().await;
                from = to;
            }
        }
        if truncated {
            let _ = wr.shutdown().await;
        }
        let _ = wrote_tx.send(());
        wr
    });
    let mut outcome = Outcome::default();
    let mut buf = Vec::new();
    let mut eof = false;
    let mut wrote_rx = Some(wrote_rx);
    let mut writer = Some(writer);
    let mut half_closed = truncated;
    loop {
        loop {
            match parse_answer(&buf, eof) {
                Ok(Some((answer, used))) => {
                    buf.drain(..used);
                    if !(100..200).contains(&answer.status) {
                        outcome.answers.push(answer);
                    }
                }
                Ok(None) => break,
                Err(e) => {
                    outcome.unreadable = Some(e);
                    return outcome;
                }
            }
        }
        if eof {
            if !buf.is_empty() {
                outcome.unreadable = Some(format!(
                    "a partial answer before the close: {:?}",
                    String::from_utf8_lossy(&buf)
                ));
            }
            break;
        }
        if !half_closed && outcome.answers.len() >= stream.items.len() {
            // Every item has had its answer: close our side once every
            // byte is written, and read on for answers nobody asked for.
            if let Some(rx) = wrote_rx.take() {
                let _ = rx.await;
            }
            if let Some(writer) = writer.take() {
                if let Ok(mut wr) = writer.await {
                    let _ = wr.shutdown().await;
                }
            }
            half_closed = true;
        }
        let mut chunk = [0u8; 16384];
        match tokio::time::timeout(READ_LIMIT, rd.read(&mut chunk)).await {
            Ok(Ok(0)) | Ok(Err(_)) => eof = true,
            Ok(Ok(n)) => buf.extend_from_slice(&chunk[..n]),
            Err(_) => {
                outcome.stalled = true;
                break;
            }
        }
    }
    if let Some(writer) = writer.take() {
        writer.abort();
    }
    outcome
}

// ---------------------------------------------------------------------------
// The checks.

/// Checks what the upstream received from one connection (`records`, in
/// arrival order) and what the client read back against what it sent.
fn check_stream(
    bed: &Bed,
    stream: &Stream,
    outcome: &Outcome,
    records: &[&Forwarded],
) -> Result<Vec<(Kind, Fate)>, String> {
    if let Some(e) = &outcome.unreadable {
        return Err(e.clone());
    }
    if outcome.stalled {
        return Err(format!(
            "{}: the server neither answered nor closed within {READ_LIMIT:?} (answers so far: {:?})",
            stream.prefix, outcome.answers
        ));
    }
    let index: HashMap<&str, usize> = stream
        .items
        .iter()
        .enumerate()
        .map(|(i, s)| (s.tag.as_str(), i))
        .collect();
    // Each request the upstream received is one the client sent, once, in
    // order, as sent, with its own session's credentials and no key.
    let mut forwarded = HashSet::new();
    let mut previous: Option<usize> = None;
    for rec in records {
        let tag = rec.tag();
        let Some(&i) = index.get(tag) else {
            let what = if stream.smuggled.iter().any(|s| s == tag) {
                "a request smuggled inside another's bytes"
            } else {
                "a request the client never sent"
            };
            return Err(format!("{what} reached the upstream: {rec:?}"));
        };
        let sent = &stream.items[i];
        if !forwarded.insert(i) {
            return Err(format!("{tag} reached the upstream twice"));
        }
        if previous.is_some_and(|p| p >= i) {
            return Err(format!("{tag} reached the upstream out of order"));
        }
        previous = Some(i);
        if !sent.kind.may_pass() {
            return Err(format!(
                "{tag} ({:?}) must never be forwarded, but was: {rec:?}",
                sent.kind
            ));
        }
        let Some(session) = bed.session(sent.who) else {
            return Err(format!("{tag} with an unknown key was forwarded"));
        };
        if rec.method != sent.method || rec.body != sent.body {
            return Err(format!(
                "{tag} arrived as {} with body {:?}; sent as {} with body {:?}",
                rec.method,
                String::from_utf8_lossy(&rec.body),
                sent.method,
                String::from_utf8_lossy(&sent.body)
            ));
        }
        let auths: Vec<&[u8]> = rec
            .headers
            .iter()
            .filter(|(n, _)| n == "authorization")
            .map(|(_, v)| v.as_slice())
            .collect();
        if auths != [session.authorization().as_bytes()] {
            return Err(format!(
                "{tag} of session {:?} arrived without exactly its own credentials",
                sent.who
            ));
        }
        for (name, value) in &rec.headers {
            if name == "x-credproxy-session" || name == "proxy-authorization" {
                return Err(format!("{tag}: {name} reached the upstream"));
            }
            for s in &bed.sessions {
                if find(value, s.key.as_bytes()).is_some() {
                    return Err(format!(
                        "{tag}: a session key reached the upstream in {name}"
                    ));
                }
            }
        }
    }
    // The answers, in order: each item its own, or a refusal where one
    // is allowed; after a close or a refusal that ends the connection,
    // nothing more is forwarded or answered.
    let mut fates = Vec::new();
    let mut answers = outcome.answers.iter().peekable();
    let mut may_end = false;
    let mut ended: Option<&str> = None;
    for (i, sent) in stream.items.iter().enumerate() {
        let tag = sent.tag.as_str();
        if let Some(after) = ended {
            if forwarded.contains(&i) && !(stream.truncated && sent.kind.may_pass()) {
                return Err(format!(
                    "{tag} was forwarded after the connection ended at {after}"
                ));
            }
            fates.push((sent.kind, Fate::NotReached));
            continue;
        }
        match answers.peek() {
            Some(a) if a.tag.as_deref() == Some(tag) => {
                if !sent.kind.may_pass() || a.status != 200 || !forwarded.contains(&i) {
                    return Err(format!(
                        "{tag} ({:?}) was answered {a:?}, forwarded: {}",
                        sent.kind,
                        forwarded.contains(&i)
                    ));
                }
                let own = bed
                    .session(sent.who)
                    .map(|s| fnv(s.authorization().as_bytes()));
                if a.auth != own {
                    return Err(format!(
                        "{tag}'s answer came from another session's request"
                    ));
                }
                answers.next();
                fates.push((sent.kind, Fate::Forwarded));
                if sent.last {
                    ended = Some(tag);
                }
            }
            Some(a) if a.tag.is_some() => {
                return Err(format!(
                    "{tag} ({:?}) had no answer of its own; the next answer is {a:?}",
                    sent.kind
                ));
            }
            Some(a) => {
                // A request cut short may also be answered as a broken
                // upstream request (502: streamed, its body broke off on
                // the way).
                let refusal = (400..500).contains(&a.status)
                    || a.status == 501
                    || (sent.kind == Kind::Truncated && a.status >= 500);
                if !refusal || sent.kind == Kind::Serve || forwarded.contains(&i) {
                    return Err(format!(
                        "{tag} ({:?}) was answered {a:?}, forwarded: {}",
                        sent.kind,
                        forwarded.contains(&i)
                    ));
                }
                answers.next();
                fates.push((sent.kind, Fate::Refused));
                may_end = true;
                if sent.last || sent.kind.ends_when_refused() {
                    ended = Some(tag);
                }
            }
            None => {
                if !(stream.truncated || may_end || sent.kind.may_close()) {
                    return Err(format!(
                        "{tag} ({:?}) had no answer: the connection closed",
                        sent.kind
                    ));
                }
                if forwarded.contains(&i) && !stream.truncated {
                    return Err(format!("{tag} was forwarded but never answered"));
                }
                fates.push((sent.kind, Fate::Closed));
                ended = Some(tag);
            }
        }
    }
    if let Some(a) = answers.next() {
        return Err(format!("an answer to no request the client sent: {a:?}"));
    }
    Ok(fates)
}

/// What became of an item, for a run's summary.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
enum Fate {
    Forwarded,
    /// Answered with a refusal.
    Refused,
    /// The connection closed without an answer.
    Closed,
    /// After the end of its connection.
    NotReached,
}

/// How many items of each kind met each fate.
#[derive(Default)]
struct Tally(std::collections::BTreeMap<String, usize>);

impl Tally {
    fn add(&mut self, fates: &[(Kind, impl std::fmt::Debug)]) {
        for (kind, fate) in fates {
            *self.0.entry(format!("{kind:?} {fate:?}")).or_default() += 1;
        }
    }

    fn print(&self) {
        for (what, n) in &self.0 {
            println!("  {what}: {n}");
        }
    }
}

/// Sends every stream of a plan at once and checks what came of it: what
/// each connection got back, and each item's fate.
async fn check_plan(
    bed: &Bed,
    streams: &[Stream],
) -> Result<(Vec<Outcome>, Vec<(Kind, Fate)>), String> {
    let outcomes =
        futures_util::future::join_all(streams.iter().map(|s| drive(bed.srv.proxy_addr, s))).await;
    if !bed.up.settle(READ_LIMIT).await {
        return Err("an upstream connection stayed open".into());
    }
    let mut fates = Vec::new();
    for (stream, outcome) in streams.iter().zip(&outcomes) {
        let requests = bed.up.requests_of(stream);
        let records: Vec<&Forwarded> = requests.iter().collect();
        let checked = check_stream(bed, stream, outcome, &records).map_err(|e| {
            format!(
                "{e}\n  stream {}: {:?}\n  answers: {:?}",
                stream.prefix,
                String::from_utf8_lossy(&stream.bytes()),
                outcome.answers
            )
        })?;
        fates.extend(checked);
    }
    Ok((outcomes, fates))
}

fn runner(cases: u32) -> TestRunner {
    let mut config = RunnerConfig {
        cases,
        failure_persistence: None,
        max_shrink_iters: 256,
        ..RunnerConfig::default()
    };
    // The same streams on every run (CI), unless PROPTEST_RNG_SEED says
    // otherwise; PROPTEST_CASES overrides the count.
    if std::env::var_os("PROPTEST_RNG_SEED").is_none() {
        config.rng_seed = RngSeed::Fixed(0x27_5e4e_7e55);
    }
    if let Some(n) = std::env::var("PROPTEST_CASES")
        .ok()
        .and_then(|n| n.parse().ok())
    {
        config.cases = n;
    }
    TestRunner::new(config)
}

/// For each request the upstream receives, exactly one request the client
/// sent, with its own session's credentials and no key; never a request
/// hidden in another's bytes; answers in order, each its own request's;
/// hostile framing refused, and nothing after it forwarded.
#[test]
fn every_request_the_upstream_receives_is_one_the_client_sent() {
    let rt = runtime();
    let bed = rt.block_on(Bed::start());
    let started = std::time::Instant::now();
    let tally = std::cell::RefCell::new(Tally::default());
    let cases = std::cell::Cell::new(0);
    let mut runner = runner(256);
    let result = runner.run(&plan(), |plan| {
        cases.set(cases.get() + 1);
        let streams = render(&bed, &plan);
        let (_, fates) = rt
            .block_on(check_plan(&bed, &streams))
            .map_err(TestCaseError::fail)?;
        tally.borrow_mut().add(&fates);
        Ok(())
    });
    println!(
        "{} cases in {:?}; items by kind and fate:",
        cases.get(),
        started.elapsed()
    );
    tally.borrow().print();
    rt.block_on(bed.stop());
    if let Err(e) = result {
        panic!("{e}");
    }
}

// ---------------------------------------------------------------------------
// The differential test: the same streams through a plain hyper server.

/// A request as plain hyper parsed it.
#[derive(Clone)]
struct Parsed {
    method: String,
    target: String,
    body: Vec<u8>,
}

impl std::fmt::Debug for Parsed {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Parsed")
            .field("method", &self.method)
            .field("target", &self.target)
            .field("body", &String::from_utf8_lossy(&self.body))
            .finish()
    }
}

/// hyper's HTTP/1.1 server with its defaults (half-closes allowed, so an
/// early close does not cut off a request hyper has parsed): records each
/// request it parsed whole and answers it with its tag.
async fn plain_hyper() -> (SocketAddr, Arc<Mutex<Vec<Parsed>>>) {
    use hyper::server::conn::http1;
    use hyper::service::service_fn;
    use hyper_util::rt::TokioIo;
    let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
    let addr = listener.local_addr().expect("addr");
    let log: Arc<Mutex<Vec<Parsed>>> = Arc::default();
    let shared = Arc::clone(&log);
    tokio::spawn(async move {
        while let Ok((sock, _)) = listener.accept().await {
            let log = Arc::clone(&shared);
            let service = service_fn(move |req: hyper::Request<hyper::body::Incoming>| {
                let log = Arc::clone(&log);
                async move {
                    let method = req.method().as_str().to_owned();
                    let target = req.uri().to_string();
                    let tag = tag_of(&target).to_owned();
                    let body = tokio::time::timeout(READ_LIMIT, req.into_body().collect()).await;
                    if let Ok(Ok(body)) = body {
                        log.lock().expect("log").push(Parsed {
                            method,
                            target,
                            body: body.to_bytes().to_vec(),
                        });
                    }
                    let answer = hyper::Response::builder()
                        .header("x-echo-tag", tag.clone())
                        .body(Full::new(Bytes::from(tag)))
                        .expect("answer");
                    Ok::<_, Infallible>(answer)
                }
            });
            tokio::spawn(async move {
                let _ = http1::Builder::new()
                    .half_close(true)
                    .serve_connection(TokioIo::new(sock), service)
                    .await;
            });
        }
    });
    (addr, log)
}

/// credproxy never forwards a request hyper would parse otherwise: what
/// credproxy forwarded from a connection is, in order, a subsequence of
/// what hyper parsed from the same bytes, each with the same method, tag
/// and body. credproxy may refuse where hyper accepts: unknown keys (401),
/// absolute-form naming another host (400), and any of the lenient forms
/// hyper takes (bare LF, a leading empty line, repeated equal lengths,
/// odd spacing in `Transfer-Encoding`, `identity, chunked`): stricter is
/// allowed, never the other way round (say, `Content-Length: n, n`,
/// obs-fold or a NUL, which hyper refuses, must be refused).
#[test]
fn credproxy_never_forwards_what_hyper_would_parse_otherwise() {
    let rt = runtime();
    let bed = rt.block_on(Bed::start());
    let (hyper_addr, hyper_log) = rt.block_on(plain_hyper());
    let started = std::time::Instant::now();
    let tally = std::cell::RefCell::new(Tally::default());
    let cases = std::cell::Cell::new(0);
    let mut runner = runner(256);
    let result = runner.run(&plan(), |plan| {
        cases.set(cases.get() + 1);
        let streams = render(&bed, &plan);
        let compared = rt
            .block_on(differ(&bed, hyper_addr, &hyper_log, &streams))
            .map_err(TestCaseError::fail)?;
        tally.borrow_mut().add(&compared);
        Ok(())
    });
    println!(
        "{} cases in {:?}; items by kind, as hyper parsed them and credproxy forwarded them:",
        cases.get(),
        started.elapsed()
    );
    tally.borrow().print();
    rt.block_on(bed.stop());
    if let Err(e) = result {
        panic!("{e}");
    }
}

/// How hyper and credproxy read one item, for the summary.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
enum Reading {
    /// Parsed by hyper and forwarded by credproxy, the same.
    Both,
    /// Parsed by hyper, not forwarded by credproxy (stricter, or refused
    /// for its own reasons: unknown key, another host).
    HyperOnly,
    Neither,
}

/// Sends the streams to credproxy and to plain hyper at once and compares
/// what each connection's requests became.
async fn differ(
    bed: &Bed,
    hyper_addr: SocketAddr,
    hyper_log: &Mutex<Vec<Parsed>>,
    streams: &[Stream],
) -> Result<Vec<(Kind, Reading)>, String> {
    let (ours, theirs) = tokio::join!(
        futures_util::future::join_all(streams.iter().map(|s| drive(bed.srv.proxy_addr, s))),
        futures_util::future::join_all(streams.iter().map(|s| drive(hyper_addr, s))),
    );
    if !bed.up.settle(READ_LIMIT).await {
        return Err("an upstream connection stayed open".to_owned());
    }
    for outcome in ours.iter().chain(&theirs) {
        if outcome.stalled {
            return Err(format!("a connection stalled: {outcome:?}"));
        }
    }
    let mut readings = Vec::new();
    for stream in streams {
        let hyper_saw: Vec<Parsed> = hyper_log
            .lock()
            .expect("log")
            .iter()
            .filter(|p| stream.owns(tag_of(&p.target)))
            .cloned()
            .collect();
        let ours = bed.up.requests_of(stream);
        let dump = || String::from_utf8_lossy(&stream.bytes()).into_owned();
        let mut from = 0;
        for rec in &ours {
            let found = hyper_saw[from..]
                .iter()
                .position(|p| tag_of(&p.target) == rec.tag());
            let Some(at) = found else {
                return Err(format!(
                    "credproxy forwarded {rec:?}, which hyper did not parse there\n  stream: {:?}\n  hyper parsed: {hyper_saw:?}",
                    dump()
                ));
            };
            let p = &hyper_saw[from + at];
            if p.method != rec.method || p.body != rec.body {
                return Err(format!(
                    "credproxy forwarded {rec:?}; hyper parsed {p:?}\n  stream: {:?}",
                    dump()
                ));
            }
            from += at + 1;
        }
        for sent in &stream.items {
            let by_hyper = hyper_saw.iter().any(|p| tag_of(&p.target) == sent.tag);
            let by_us = ours.iter().any(|r| r.tag() == sent.tag);
            let reading = match (by_hyper, by_us) {
                (true, true) => Reading::Both,
                (true, false) => Reading::HyperOnly,
                _ => Reading::Neither,
            };
            readings.push((sent.kind, reading));
        }
    }
    Ok(readings)
}

// ---------------------------------------------------------------------------
// Plain cases.

/// A plain request of `who` as a plan item.
fn clean(who: Who, method: &'static str, framing: Framing, body_len: usize) -> Item {
    Item::Request(Request {
        who,
        place: Place::SessionHeader,
        method,
        http10: false,
        close: false,
        expect: false,
        framing,
        body_len,
        smuggle_in_body: true,
        form: Form::Clean,
    })
}

/// Two sessions' requests pipelined in one write on one connection (bodies
/// kept and streamed, each holding a request of the other session): all
/// forwarded in order with their own credentials, all answered in order,
/// each answer its own request's.
#[tokio::test]
async fn pipelined_requests_of_two_sessions_are_answered_in_order() {
    let bed = Bed::start().await;
    let chunked = Framing::Chunked {
        chunk: 13,
        ext: true,
        trailer: true,
    };
    let items = vec![
        clean(Who::A, "GET", Framing::Empty, 0),
        clean(Who::B, "POST", Framing::Length, 30),
        clean(Who::A, "PUT", chunked, 40),
        clean(Who::B, "DELETE", Framing::Empty, 0),
        clean(Who::A, "POST", Framing::Length, 600),
        clean(Who::B, "PUT", chunked, 500),
        clean(Who::A, "GET", Framing::Empty, 0),
    ];
    let plan = Plan {
        connections: vec![Connection {
            items,
            splits: Vec::new(),
            cut: None,
        }],
    };
    let streams = render(&bed, &plan);
    let (outcomes, fates) = check_plan(&bed, &streams).await.expect("checked");
    assert_eq!(outcomes[0].answers.len(), 7, "{:?}", outcomes[0]);
    assert!(
        fates.iter().all(|(_, fate)| *fate == Fate::Forwarded),
        "{fates:?}"
    );
    let tags: Vec<String> = bed
        .up
        .requests()
        .iter()
        .map(|r| r.tag().to_owned())
        .collect();
    let sent: Vec<&str> = streams[0].items.iter().map(|s| s.tag.as_str()).collect();
    assert_eq!(tags, sent, "the upstream got exactly these, in this order");
    bed.stop().await;
}

/// A client that closes mid-head or mid-body (kept or streamed, by length
/// or chunked): the upstream never receives that request whole (a streamed
/// one may reach it broken off); the server answers an error or just
/// closes.
#[tokio::test]
async fn a_client_that_closes_mid_request_has_nothing_forwarded_whole() {
    let bed = Bed::start().await;
    let key = &bed.sessions[0].key;
    let head = |tag: &str, framing: &str| {
        format!("POST /spark/v1/t/{tag} HTTP/1.1\r\nHost: x\r\nX-Credproxy-Session: {key}\r\n{framing}\r\n\r\n")
    };
    let dots = |n: usize| ".".repeat(n);
    let cases: Vec<(&str, String)> = vec![
        (
            "mid-head",
            String::from("POST /spark/v1/t/cut0 HTTP/1.1\r\nHost: x\r\nX-Credproxy-Se"),
        ),
        (
            "head without its blank line",
            format!("POST /spark/v1/t/cut1 HTTP/1.1\r\nHost: x\r\nX-Credproxy-Session: {key}\r\n"),
        ),
        (
            "kept, by length",
            head("cut2", "Content-Length: 100") + &dots(40),
        ),
        (
            "kept, no body byte yet",
            head("cut3", "Content-Length: 100"),
        ),
        (
            "streamed, by length",
            head("cut4", "Content-Length: 1000") + &dots(600),
        ),
        (
            "kept, chunked, mid-chunk",
            head("cut5", "Transfer-Encoding: chunked") + "40\r\n" + &dots(10),
        ),
        (
            "streamed, chunked, mid-chunk",
            head("cut6", "Transfer-Encoding: chunked")
                + "190\r\n"
                + &dots(400)
                + "\r\n40\r\n"
                + &dots(10),
        ),
        (
            "chunked, before its last chunk",
            head("cut7", "Transfer-Encoding: chunked") + "a\r\n" + &dots(10) + "\r\n",
        ),
        (
            "chunked, in its trailers",
            head("cut8", "Transfer-Encoding: chunked")
                + "a\r\n"
                + &dots(10)
                + "\r\n0\r\nX-Trailer: t\r\n",
        ),
    ];
    for (what, bytes) in &cases {
        let mut sock = TcpStream::connect(bed.srv.proxy_addr)
            .await
            .expect("connect");
        sock.write_all(bytes.as_bytes()).await.expect("write");
        // The client's close (a FIN, as the server sees it); reading on
        // shows when the server is done with the connection.
        sock.shutdown().await.expect("shutdown");
        let mut answer = Vec::new();
        tokio::time::timeout(READ_LIMIT, sock.read_to_end(&mut answer))
            .await
            .unwrap_or_else(|_| panic!("{what}: the server kept the connection open"))
            .expect("read");
        let answer = String::from_utf8_lossy(&answer);
        assert!(
            answer.is_empty()
                || answer.starts_with("HTTP/1.1 4")
                || answer.starts_with("HTTP/1.1 5"),
            "{what}: {answer:?}"
        );
        assert!(!answer.contains("x-echo-tag"), "{what}: {answer:?}");
    }
    assert!(
        bed.up.settle(READ_LIMIT).await,
        "an upstream connection stayed open"
    );
    let whole: Vec<String> = bed
        .up
        .requests()
        .iter()
        .map(|r| r.tag().to_owned())
        .collect();
    assert!(whole.is_empty(), "forwarded whole: {whole:?}");
    println!(
        "{} request(s) reached the upstream broken off",
        bed.up.broken()
    );
    bed.stop().await;
}

/// `Expect: 100-continue` with an unknown key: 401 without the body being
/// read (it is never sent until then; a server waiting for it would answer
/// 408 after `body_read_timeout`), with or without a `100 Continue` first.
/// The body sent afterwards (a complete request of a real session) is
/// never taken for a request: the server skips it or closes.
#[tokio::test]
async fn expect_100_continue_with_an_unknown_key_is_refused_without_its_body() {
    let bed = Bed::start().await;
    let smuggled = format!(
        "GET /spark/v1/t/hidden HTTP/1.1\r\nHost: x\r\nX-Credproxy-Session: {}\r\n\r\n",
        bed.sessions[0].key
    );
    let head = format!(
        "POST /spark/v1/t/asked HTTP/1.1\r\nHost: x\r\nX-Credproxy-Session: unknown-key\r\nExpect: 100-continue\r\nContent-Length: {}\r\n\r\n",
        smuggled.len()
    );
    let mut sock = TcpStream::connect(bed.srv.proxy_addr)
        .await
        .expect("connect");
    sock.write_all(head.as_bytes()).await.expect("head");
    let mut buf = Vec::new();
    let refusal = loop {
        match parse_answer(&buf, false).expect("an answer") {
            Some((a, used)) if (100..200).contains(&a.status) => {
                buf.drain(..used);
            }
            Some((a, used)) => {
                buf.drain(..used);
                break a;
            }
            None => assert!(
                read_more(&mut sock, &mut buf).await,
                "no answer to the head"
            ),
        }
    };
    assert_eq!(refusal.status, 401, "{refusal:?}");
    assert_eq!(refusal.error.as_deref(), Some("unknown_session"));
    // Now the body anyway, then a real request of session B.
    let after = format!(
        "{smuggled}GET /spark/v1/t/after HTTP/1.1\r\nHost: x\r\nX-Credproxy-Session: {}\r\n\r\n",
        bed.sessions[1].key
    );
    // The server may have closed already: then the write may fail.
    let _ = sock.write_all(after.as_bytes()).await;
    let next = loop {
        match parse_answer(&buf, false).expect("an answer") {
            Some((a, _)) => break Some(a),
            None if read_more(&mut sock, &mut buf).await => {}
            None => break None,
        }
    };
    if let Some(next) = &next {
        assert_eq!(next.tag.as_deref(), Some("after"), "{next:?}");
    }
    assert!(
        bed.up.settle(READ_LIMIT).await,
        "an upstream connection stayed open"
    );
    let tags: Vec<String> = bed
        .up
        .requests()
        .iter()
        .map(|r| r.tag().to_owned())
        .collect();
    assert!(
        !tags.iter().any(|t| t == "hidden" || t == "asked"),
        "{tags:?}"
    );
    println!(
        "after the refusal the server {}",
        if next.is_some() {
            "skipped the body and served the next request"
        } else {
            "closed"
        }
    );
    bed.stop().await;
}

/// A GET's body that streams (chunked, over `max_replay_body`) reaches the
/// upstream whole, as any other method's does.
#[tokio::test]
async fn a_gets_streamed_body_reaches_the_upstream() {
    let bed = Bed::start().await;
    let body = ".".repeat(1000);
    let mut req = format!(
        "GET /spark/v1/t/streamed HTTP/1.1\r\nHost: x\r\nX-Credproxy-Session: {}\r\nTransfer-Encoding: chunked\r\nConnection: close\r\n\r\n",
        bed.sessions[0].key
    )
    .into_bytes();
    req.extend(chunked(body.as_bytes(), 100, false, false));
    let answer = support::raw_request(bed.srv.proxy_addr, &req).await;
    assert!(answer.starts_with("HTTP/1.1 200"), "{answer:?}");
    assert!(bed.up.settle(READ_LIMIT).await);
    let got = bed.up.requests();
    assert_eq!(got.len(), 1);
    assert_eq!(
        got[0].body.len(),
        body.len(),
        "the upstream got {:?}",
        got[0]
    );
    bed.stop().await;
}
