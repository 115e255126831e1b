//! Links in responses: absolute URLs on a provider's own origin become the
//! same path on credproxy, so a client that follows a link (OData's
//! `@odata.nextLink`, a redirect) stays behind the proxy instead of calling
//! the provider directly with its session key.
//!
//! A [`LinkMap`] is built once per route at start-up: the origins (scheme,
//! host, port, and `api_base`'s path) of the route's provider and of every
//! provider sharing its sessions (`sessions_from`), each in its plain and its
//! JSON-escaped (`https:\/\/`) spelling, in one Aho-Corasick automaton. A
//! [`Rewriter`] applies it to a byte stream chunk by chunk:
//!
//! * only the origin prefix of a matched URL is replaced; every other byte
//!   passes as it came (a chunk without a match is passed on as the same
//!   `Bytes`, no copy);
//! * a match must end at a URL boundary (`https://api.example.com.evil.net`
//!   is another origin and is left alone), and the bytes after a chunk that
//!   could be the start of a match are held back until the next chunk, so a
//!   link split across two frames is still found (memory: at most one
//!   pattern's length, or [`MAX_LINK`] for a link whose query is scrubbed);
//! * for providers whose credentials travel in the query (Zillow), the
//!   credential parameters are removed from every rewritten link.
//!
//! [`LinkBody`] wraps an upstream body with the rewriter, decoding and
//! re-encoding gzip, deflate and brotli bodies on the fly.

use std::borrow::Cow;
use std::collections::VecDeque;
use std::io::Write;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};

use crate::provider::QueryNames;
use crate::proxy::forward::UpBody;
use aho_corasick::{
    AhoCorasick, AhoCorasickBuilder, AhoCorasickKind, Anchored, Input, MatchKind, StartKind,
};
use bytes::{Bytes, BytesMut};
use http::HeaderMap;
use http_body::{Body, Frame, SizeHint};

/// The longest link whose query is scrubbed of credentials; a longer one
/// has its origin rewritten and its first `MAX_LINK` bytes scrubbed.
pub const MAX_LINK: usize = 64 * 1024;

/// One origin a route rewrites, and where its links go.
#[derive(Debug, Clone)]
pub struct Origin {
    /// `scheme://host[:port]` exactly as the provider's `api_base` names it.
    pub scheme: String,
    pub host: String,
    pub port: Option<u16>,
    /// `api_base`'s path without its trailing slash ("" for a bare host).
    pub base_path: String,
    /// Index of the target (in the order given to [`LinkMap::new`]).
    pub target: usize,
}

/// What one matched pattern stands for.
#[derive(Debug, Clone)]
struct Pattern {
    target: usize,
    /// The JSON-escaped spelling (`\/` for `/`).
    escaped: bool,
    /// Length of the scheme and authority; the base path after it is
    /// compared case-sensitively (the automaton ignores ASCII case).
    origin_len: usize,
    bytes: Vec<u8>,
}

/// The origins one route rewrites, compiled once.
#[derive(Debug)]
pub struct LinkMap {
    plain_sep: memchr::memmem::Finder<'static>,
    escaped_sep: memchr::memmem::Finder<'static>,
    ac: AhoCorasick,
    patterns: Vec<Pattern>,
    /// Per target: the injected query parameters its links lose.
    strip: Vec<Option<Arc<QueryNames>>>,
    max_len: usize,
}

impl LinkMap {
    /// `strip[t]`: the credential parameters target `t`'s links lose.
    pub fn new(origins: &[Origin], strip: Vec<Option<Arc<QueryNames>>>) -> Option<LinkMap> {
        let mut patterns = Vec::new();
        for o in origins {
            let default_port = match o.scheme.as_str() {
                "https" => 443,
                _ => 80,
            };
            let mut authorities = vec![match o.port {
                Some(p) => format!("{}:{p}", o.host),
                None => o.host.clone(),
            }];
            // `https://host` and `https://host:443` are one origin.
            match o.port {
                None => authorities.push(format!("{}:{default_port}", o.host)),
                Some(p) if p == default_port => authorities.push(o.host.clone()),
                Some(_) => {}
            }
            for authority in authorities {
                let plain_origin = format!("{}://{authority}", o.scheme);
                let escaped_origin = format!("{}:\\/\\/{authority}", o.scheme);
                patterns.push(Pattern {
                    target: o.target,
                    escaped: false,
                    origin_len: plain_origin.len(),
                    bytes: format!("{plain_origin}{}", o.base_path).into_bytes(),
                });
                patterns.push(Pattern {
                    target: o.target,
                    escaped: true,
                    origin_len: escaped_origin.len(),
                    bytes: format!("{escaped_origin}{}", o.base_path.replace('/', "\\/"))
                        .into_bytes(),
                });
            }
        }
        if patterns.is_empty() {
            return None;
        }
        let ac = AhoCorasickBuilder::new()
            .ascii_case_insensitive(true)
            .match_kind(MatchKind::LeftmostLongest)
            // Only anchored searches, at a scheme before "://" found by
            // memchr: JSON is full of bytes a general prefilter trips on.
            .start_kind(StartKind::Anchored)
            .kind(Some(AhoCorasickKind::DFA))
            .build(patterns.iter().map(|p| &p.bytes))
            .ok()?;
        let max_len = patterns.iter().map(|p| p.bytes.len()).max().unwrap_or(0);
        Some(LinkMap {
            plain_sep: memchr::memmem::Finder::new(b"://").into_owned(),
            escaped_sep: memchr::memmem::Finder::new(b":\\/\\/").into_owned(),
            ac,
            patterns,
            strip,
            max_len,
        })
    }
}

impl LinkMap {
    /// Whether `bytes` hold anything that looks like an absolute URL; a
    /// body without one is passed on without a rewriter.
    pub fn may_contain_links(&self, bytes: &[u8]) -> bool {
        self.plain_sep.find(bytes).is_some() || self.escaped_sep.find(bytes).is_some()
    }

    /// The next pattern match in `buf` whose scheme starts at or after
    /// `floor`, looking at colons from `from` on: `(start, end, pattern,
    /// colon)`.
    fn next_match(
        &self,
        buf: &[u8],
        mut from: usize,
        floor: usize,
    ) -> Option<(usize, usize, usize, usize)> {
        loop {
            let colon = from + memchr::memchr(b':', &buf[from..])?;
            let after = &buf[colon + 1..];
            if after.starts_with(b"//") || after.starts_with(b"\\/") || after.len() < 3 {
                for scheme_len in [5, 4] {
                    if colon < floor + scheme_len {
                        continue;
                    }
                    let start = colon - scheme_len;
                    let input = Input::new(buf).range(start..).anchored(Anchored::Yes);
                    if let Some(m) = self.ac.find(input) {
                        return Some((m.start(), m.end(), m.pattern().as_usize(), colon));
                    }
                }
            }
            from = colon + 1;
        }
    }
}

/// Where one response's links go: per target, the base that replaces the
/// origin, e.g. `http://127.0.0.1:8080/spark` (no trailing slash).
#[derive(Debug, Clone)]
pub struct Bases {
    plain: Vec<String>,
    escaped: Vec<String>,
}

impl Bases {
    pub fn new(plain: Vec<String>) -> Bases {
        let escaped = plain.iter().map(|b| b.replace('/', "\\/")).collect();
        Bases { plain, escaped }
    }
}

/// Rewrites one stream of bytes (a body, or one header value).
pub struct Rewriter {
    map: Arc<LinkMap>,
    bases: Bases,
    /// Bytes held back from the previous chunk: a possible start of a link.
    pending: BytesMut,
    /// Whether any link was rewritten so far.
    changed: bool,
}

/// What the byte after a matched origin says.
enum Boundary {
    Yes,
    No,
    NeedMore,
}

impl Rewriter {
    pub fn new(map: Arc<LinkMap>, bases: Bases) -> Rewriter {
        Rewriter {
            map,
            bases,
            pending: BytesMut::new(),
            changed: false,
        }
    }

    pub fn changed(&self) -> bool {
        self.changed
    }

    /// Feeds the next chunk; what can be emitted goes to `out`.
    pub fn feed(&mut self, chunk: Bytes, out: &mut Vec<Bytes>) {
        let buf = if self.pending.is_empty() {
            chunk
        } else {
            self.pending.extend_from_slice(&chunk);
            self.pending.split().freeze()
        };
        self.scan(buf, false, out);
    }

    /// The end of the stream: whatever was held back is emitted.
    pub fn finish(&mut self, out: &mut Vec<Bytes>) {
        if !self.pending.is_empty() {
            let buf = self.pending.split().freeze();
            self.scan(buf, true, out);
        }
    }

    /// Rewrites a whole value at once (a header, a buffered body).
    pub fn rewrite_all(&mut self, input: Bytes) -> Bytes {
        let mut out = Vec::new();
        self.feed(input, &mut out);
        self.finish(&mut out);
        concat(out)
    }

    fn scan(&mut self, buf: Bytes, last: bool, out: &mut Vec<Bytes>) {
        let map = Arc::clone(&self.map);
        let mut emitted = 0;
        let mut from = 0;
        while let Some((s, e, p, colon)) = map.next_match(&buf, from, emitted) {
            let pat = &map.patterns[p];
            // The automaton ignores case; a base path does not.
            if buf[s + pat.origin_len..e] != pat.bytes[pat.origin_len..] {
                from = colon + 1;
                continue;
            }
            match boundary(&buf, e, last) {
                Boundary::No => {
                    from = colon + 1;
                    continue;
                }
                Boundary::NeedMore => {
                    self.hold(&buf, emitted, s, out);
                    return;
                }
                Boundary::Yes => {}
            }
            let names = map.strip[pat.target].as_deref();
            let tail_end = if names.is_some() {
                match link_end(&buf, e, last) {
                    Some(end) => end,
                    None if buf.len() - s < MAX_LINK => {
                        self.hold(&buf, emitted, s, out);
                        return;
                    }
                    None => buf.len(),
                }
            } else {
                e
            };
            if s > emitted {
                out.push(buf.slice(emitted..s));
            }
            let base = if pat.escaped {
                &self.bases.escaped[pat.target]
            } else {
                &self.bases.plain[pat.target]
            };
            out.push(Bytes::copy_from_slice(base.as_bytes()));
            if let Some(names) = names.filter(|_| tail_end > e) {
                match strip_credentials(&buf[e..tail_end], names) {
                    Cow::Borrowed(_) => out.push(buf.slice(e..tail_end)),
                    Cow::Owned(v) => out.push(Bytes::from(v)),
                }
            }
            self.changed = true;
            emitted = tail_end;
            from = tail_end;
        }
        let keep = if last {
            buf.len()
        } else {
            self.partial_start(&buf[emitted..]) + emitted
        };
        if keep > emitted {
            out.push(buf.slice(emitted..keep));
        }
        self.pending.extend_from_slice(&buf[keep..]);
    }

    /// Emits `buf[emitted..at]` and keeps the rest for the next chunk.
    fn hold(&mut self, buf: &Bytes, emitted: usize, at: usize, out: &mut Vec<Bytes>) {
        if at > emitted {
            out.push(buf.slice(emitted..at));
        }
        self.pending.extend_from_slice(&buf[at..]);
    }

    /// Where the longest suffix of `tail` that could begin a pattern starts
    /// (`tail.len()` when none could).
    fn partial_start(&self, tail: &[u8]) -> usize {
        let window = self.map.max_len.saturating_sub(1).min(tail.len());
        let start = tail.len() - window;
        for i in start..tail.len() {
            if !tail[i].eq_ignore_ascii_case(&b'h') {
                continue;
            }
            let rest = &tail[i..];
            if self.map.patterns.iter().any(|p| {
                p.bytes.len() > rest.len() && p.bytes[..rest.len()].eq_ignore_ascii_case(rest)
            }) {
                return i;
            }
        }
        tail.len()
    }
}

/// Whether the byte at `at` ends an origin: a path, query or fragment
/// starts there, or the URL ends. A letter, digit, `.`, `-`, `:` or `@`
/// means a longer host, a port or userinfo: another origin.
fn boundary(buf: &[u8], at: usize, last: bool) -> Boundary {
    match buf.get(at) {
        None if last => Boundary::Yes,
        None => Boundary::NeedMore,
        Some(b) if b.is_ascii_alphanumeric() => Boundary::No,
        Some(b'.' | b'-' | b'_' | b':' | b'@' | b'%' | b'~' | b'+' | b'!' | b'$' | b'*') => {
            Boundary::No
        }
        Some(_) => Boundary::Yes,
    }
}

/// Where the link starting before `from` ends: at a quote, angle bracket,
/// whitespace or control byte, or a JSON escape other than `\/` and `\u`.
/// `None`: not within the buffer (and more may come).
fn link_end(buf: &[u8], from: usize, last: bool) -> Option<usize> {
    let limit = buf.len().min(from + MAX_LINK);
    let mut i = from;
    while i < limit {
        match buf[i] {
            b'"' | b'\'' | b'<' | b'>' | b'`' => return Some(i),
            b if b <= b' ' || b == 0x7f => return Some(i),
            b'\\' => match buf.get(i + 1) {
                Some(b'/' | b'u') => i += 2,
                Some(_) => return Some(i),
                None if last => return Some(i),
                None => return None,
            },
            _ => i += 1,
        }
    }
    if last || limit < buf.len() {
        Some(limit)
    } else {
        None
    }
}

/// Separators between query parameters, as they appear in JSON and XML
/// text as well as in a plain URL; the longest first.
const SEPARATORS: [&[u8]; 6] = [b"&amp;", b"\\u0026", b"&#x26;", b"&#38;", b"&", b";"];

/// Spellings of `?` that start a link's query in JSON or XML text.
const QUERY_STARTS: [&[u8]; 4] = [b"?", b"\\u003f", b"&#63;", b"&#x3f;"];

/// Removes credential parameters (any case, percent-encoded, JSON- or
/// XML-escaped) from a link's path-and-query; every other byte is kept in order.
pub fn strip_credentials<'l>(link: &'l [u8], names: &QueryNames) -> Cow<'l, [u8]> {
    let Some((q, q_len)) = (0..link.len()).find_map(|i| {
        QUERY_STARTS
            .iter()
            .find(|s| starts_with_ignore_case(&link[i..], s))
            .map(|s| (i, s.len()))
    }) else {
        return Cow::Borrowed(link);
    };
    // The fragment: a `#` that does not begin a character reference (`&#38;`).
    let end = (q + q_len..link.len())
        .find(|&i| link[i] == b'#' && link[i - 1] != b'&')
        .unwrap_or(link.len());
    let query = &link[q + q_len..end];
    // (separator before, segment) pairs.
    let mut parts: Vec<(&[u8], &[u8])> = Vec::new();
    let mut sep: &[u8] = b"";
    let mut start = 0;
    let mut i = 0;
    while i < query.len() {
        let entity = query[i] == b'&'
            && query[i + 1..]
                .iter()
                .take(7)
                .position(|&b| b == b';')
                .is_some_and(|semi| {
                    query[i + 1..i + 1 + semi]
                        .iter()
                        .all(|b| b.is_ascii_alphanumeric() || *b == b'#')
                });
        if let Some(s) = SEPARATORS
            .iter()
            .filter(|s| !(entity && **s == b"&"))
            .find(|s| starts_with_ignore_case(&query[i..], s))
        {
            parts.push((sep, &query[start..i]));
            sep = &query[i..i + s.len()];
            i += s.len();
            start = i;
        } else if query[i] == b'&' {
            // Another character reference (`&#61;`): its `;` separates nothing.
            i += query[i..]
                .iter()
                .take(8)
                .position(|&b| b == b';')
                .map_or(1, |semi| semi + 1);
        } else {
            i += 1;
        }
    }
    parts.push((sep, &query[start..]));
    if !parts.iter().any(|(_, seg)| is_credential(seg, names)) {
        return Cow::Borrowed(link);
    }
    let mut out = Vec::with_capacity(link.len());
    out.extend_from_slice(&link[..q]);
    let mut first = true;
    for (sep, seg) in parts {
        if is_credential(seg, names) {
            continue;
        }
        out.extend_from_slice(if first { &link[q..q + q_len] } else { sep });
        out.extend_from_slice(seg);
        first = false;
    }
    out.extend_from_slice(&link[end..]);
    Cow::Owned(out)
}

fn starts_with_ignore_case(hay: &[u8], needle: &[u8]) -> bool {
    hay.len() >= needle.len() && hay[..needle.len()].eq_ignore_ascii_case(needle)
}

/// Undoes JSON `\uXXXX` escapes and XML character references (`&#NN;`,
/// `&#xHH;`, `&amp;`...) of ASCII characters, so a name spelt
/// `\u0061ccessToken` or a value separator spelt `\u003d` is recognised.
fn unescape_text(text: &[u8]) -> Cow<'_, [u8]> {
    if !text.iter().any(|&b| b == b'\\' || b == b'&') {
        return Cow::Borrowed(text);
    }
    let mut out = Vec::with_capacity(text.len());
    let mut i = 0;
    while i < text.len() {
        let rest = &text[i..];
        if rest.len() >= 6 && (rest[0] == b'\\') && (rest[1] == b'u' || rest[1] == b'U') {
            if let Some(c) = std::str::from_utf8(&rest[2..6])
                .ok()
                .and_then(|h| {
                    u8::from_str_radix(h, 16).ok().or_else(|| {
                        u16::from_str_radix(h, 16)
                            .ok()
                            .and_then(|v| u8::try_from(v).ok())
                    })
                })
                .filter(u8::is_ascii)
            {
                out.push(c);
                i += 6;
                continue;
            }
        }
        if rest[0] == b'&' {
            if let Some(semi) = rest.iter().take(8).position(|&b| b == b';') {
                let entity = &rest[1..semi];
                let c = match entity {
                    b"amp" => Some(b'&'),
                    b"quot" => Some(b'"'),
                    b"apos" => Some(b'\''),
                    b"lt" => Some(b'<'),
                    b"gt" => Some(b'>'),
                    [b'#', b'x' | b'X', hex @ ..] => std::str::from_utf8(hex)
                        .ok()
                        .and_then(|h| u8::from_str_radix(h, 16).ok()),
                    [b'#', dec @ ..] => std::str::from_utf8(dec).ok().and_then(|d| d.parse().ok()),
                    _ => None,
                };
                if let Some(c) = c.filter(u8::is_ascii) {
                    out.push(c);
                    i += semi + 1;
                    continue;
                }
            }
        }
        out.push(rest[0]);
        i += 1;
    }
    Cow::Owned(out)
}

fn is_credential(segment: &[u8], names: &QueryNames) -> bool {
    let segment = unescape_text(segment);
    let name = memchr::memchr(b'=', &segment).map_or(&segment[..], |i| &segment[..i]);
    names.is_credential_name(name)
}

fn concat(mut parts: Vec<Bytes>) -> Bytes {
    match parts.len() {
        0 => Bytes::new(),
        1 => parts.pop().unwrap_or_default(),
        _ => {
            let mut all = BytesMut::with_capacity(parts.iter().map(Bytes::len).sum());
            for p in parts {
                all.extend_from_slice(&p);
            }
            all.freeze()
        }
    }
}

/// A body's content coding, as far as credproxy can rewrite it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Coding {
    Identity,
    Gzip,
    Deflate,
    Brotli,
}

impl Coding {
    /// The coding named by a `Content-Encoding` header; `None` for one
    /// credproxy cannot decode (or a stack of several).
    pub fn from_header(value: Option<&http::HeaderValue>) -> Option<Coding> {
        let Some(v) = value else {
            return Some(Coding::Identity);
        };
        let v = v.to_str().ok()?.trim();
        if v.eq_ignore_ascii_case("gzip") || v.eq_ignore_ascii_case("x-gzip") {
            Some(Coding::Gzip)
        } else if v.eq_ignore_ascii_case("deflate") {
            Some(Coding::Deflate)
        } else if v.eq_ignore_ascii_case("br") {
            Some(Coding::Brotli)
        } else if v.is_empty() || v.eq_ignore_ascii_case("identity") {
            Some(Coding::Identity)
        } else {
            None
        }
    }

    /// Whether a coding named in `Accept-Encoding` can be rewritten.
    pub fn accepted(token: &str) -> bool {
        ["gzip", "x-gzip", "deflate", "br", "identity"]
            .iter()
            .any(|c| c.eq_ignore_ascii_case(token))
    }
}

/// A streaming decoder; output accumulates in the inner `Vec`.
enum Decoder {
    Gzip(flate2::write::GzDecoder<Vec<u8>>),
    /// `deflate` is zlib-wrapped per RFC 9110, but some servers send a raw
    /// deflate stream: the first bytes decide.
    Deflate(Option<DeflateDecoder>, Vec<u8>),
    Brotli(Box<brotli::DecompressorWriter<Vec<u8>>>),
}

enum DeflateDecoder {
    Zlib(flate2::write::ZlibDecoder<Vec<u8>>),
    Raw(flate2::write::DeflateDecoder<Vec<u8>>),
}

impl DeflateDecoder {
    fn write(&mut self, data: &[u8]) -> std::io::Result<Vec<u8>> {
        match self {
            DeflateDecoder::Zlib(d) => {
                d.write_all(data)?;
                d.flush()?;
                Ok(std::mem::take(d.get_mut()))
            }
            DeflateDecoder::Raw(d) => {
                d.write_all(data)?;
                d.flush()?;
                Ok(std::mem::take(d.get_mut()))
            }
        }
    }

    fn finish(self) -> std::io::Result<Vec<u8>> {
        match self {
            DeflateDecoder::Zlib(d) => d.finish(),
            DeflateDecoder::Raw(d) => d.finish(),
        }
    }
}

/// The most a decoded body may grow beyond the bytes given so far; guards
/// against a decompression bomb filling memory within one frame.
const MAX_INFLATE_RATIO: usize = 1024;

impl Decoder {
    fn new(coding: Coding) -> Option<Decoder> {
        match coding {
            Coding::Identity => None,
            Coding::Gzip => Some(Decoder::Gzip(flate2::write::GzDecoder::new(Vec::new()))),
            Coding::Deflate => Some(Decoder::Deflate(None, Vec::new())),
            Coding::Brotli => Some(Decoder::Brotli(Box::new(brotli::DecompressorWriter::new(
                Vec::new(),
                16 * 1024,
            )))),
        }
    }

    fn write(&mut self, data: &[u8]) -> std::io::Result<Vec<u8>> {
        let out = match self {
            Decoder::Gzip(d) => {
                d.write_all(data)?;
                d.flush()?;
                std::mem::take(d.get_mut())
            }
            Decoder::Deflate(inner, head) => {
                if inner.is_none() {
                    head.extend_from_slice(data);
                    if head.len() < 2 {
                        return Ok(Vec::new());
                    }
                    let zlib = head[0] & 0x0f == 8
                        && (u16::from(head[0]) << 8 | u16::from(head[1])) % 31 == 0;
                    let mut d = if zlib {
                        DeflateDecoder::Zlib(flate2::write::ZlibDecoder::new(Vec::new()))
                    } else {
                        DeflateDecoder::Raw(flate2::write::DeflateDecoder::new(Vec::new()))
                    };
                    let first = std::mem::take(head);
                    let out = d.write(&first)?;
                    *inner = Some(d);
                    out
                } else if let Some(d) = inner {
                    d.write(data)?
                } else {
                    Vec::new()
                }
            }
            Decoder::Brotli(d) => {
                d.write_all(data)?;
                d.flush()?;
                std::mem::take(d.get_mut())
            }
        };
        if out.len() > data.len().max(4096) * MAX_INFLATE_RATIO {
            return Err(std::io::Error::other(
                "the body inflates beyond any plausible ratio",
            ));
        }
        Ok(out)
    }

    fn finish(self) -> std::io::Result<Vec<u8>> {
        match self {
            Decoder::Gzip(d) => d.finish(),
            Decoder::Deflate(Some(d), _) => d.finish(),
            Decoder::Deflate(None, head) if head.is_empty() => Ok(Vec::new()),
            Decoder::Deflate(None, head) => {
                let mut d = flate2::write::DeflateDecoder::new(Vec::new());
                d.write_all(&head)?;
                d.finish()
            }
            Decoder::Brotli(mut d) => {
                d.flush()?;
                let out = std::mem::take(d.get_mut());
                d.into_inner()
                    .map_err(|_| std::io::Error::other("the brotli stream is truncated"))?;
                Ok(out)
            }
        }
    }
}

/// A streaming encoder in the body's original coding; each chunk is
/// flushed (sync flush) so the client gets it without waiting for more.
enum Encoder {
    Gzip(flate2::write::GzEncoder<Vec<u8>>),
    Deflate(flate2::write::ZlibEncoder<Vec<u8>>),
    Brotli(Box<brotli::CompressorWriter<Vec<u8>>>),
}

/// Compression levels for re-encoding: fast ones, because the upstream
/// already chose its own size/CPU trade-off and this is our CPU per byte.
const FLATE_LEVEL: u32 = 4;
const BROTLI_QUALITY: u32 = 4;
const BROTLI_LGWIN: u32 = 20;

impl Encoder {
    fn new(coding: Coding) -> Option<Encoder> {
        let level = flate2::Compression::new(FLATE_LEVEL);
        match coding {
            Coding::Identity => None,
            Coding::Gzip => Some(Encoder::Gzip(flate2::write::GzEncoder::new(
                Vec::new(),
                level,
            ))),
            Coding::Deflate => Some(Encoder::Deflate(flate2::write::ZlibEncoder::new(
                Vec::new(),
                level,
            ))),
            Coding::Brotli => Some(Encoder::Brotli(Box::new(brotli::CompressorWriter::new(
                Vec::new(),
                16 * 1024,
                BROTLI_QUALITY,
                BROTLI_LGWIN,
            )))),
        }
    }

    fn write(&mut self, parts: &[Bytes]) -> std::io::Result<Vec<u8>> {
        match self {
            Encoder::Gzip(e) => {
                for p in parts {
                    e.write_all(p)?;
                }
                e.flush()?;
                Ok(std::mem::take(e.get_mut()))
            }
            Encoder::Deflate(e) => {
                for p in parts {
                    e.write_all(p)?;
                }
                e.flush()?;
                Ok(std::mem::take(e.get_mut()))
            }
            Encoder::Brotli(e) => {
                for p in parts {
                    e.write_all(p)?;
                }
                e.flush()?;
                Ok(std::mem::take(e.get_mut()))
            }
        }
    }

    fn finish(self) -> std::io::Result<Vec<u8>> {
        match self {
            Encoder::Gzip(e) => e.finish(),
            Encoder::Deflate(e) => e.finish(),
            Encoder::Brotli(e) => Ok(e.into_inner()),
        }
    }
}

/// Decodes (if needed), rewrites and re-encodes a whole body at once.
/// `Ok(None)`: no link was rewritten, so the original bytes stand.
pub fn rewrite_whole(
    rewriter: &mut Rewriter,
    coding: Coding,
    body: Bytes,
) -> std::io::Result<Option<Bytes>> {
    let plain = match Decoder::new(coding) {
        None => body,
        Some(mut d) => {
            let mut plain = d.write(&body)?;
            plain.extend(d.finish()?);
            Bytes::from(plain)
        }
    };
    let out = rewriter.rewrite_all(plain);
    if !rewriter.changed() {
        return Ok(None);
    }
    match Encoder::new(coding) {
        None => Ok(Some(out)),
        Some(mut e) => {
            let mut encoded = e.write(std::slice::from_ref(&out))?;
            encoded.extend(e.finish()?);
            Ok(Some(Bytes::from(encoded)))
        }
    }
}

/// An upstream body with its links rewritten as it streams.
pub struct LinkBody {
    inner: UpBody,
    rewriter: Rewriter,
    decoder: Option<Decoder>,
    encoder: Option<Encoder>,
    queue: VecDeque<Bytes>,
    trailers: Option<HeaderMap>,
    done: bool,
}

/// A body that cannot be decoded or re-encoded; the client sees a broken-off
/// response, as from an upstream that broke off.
#[derive(Debug, thiserror::Error)]
#[error("the upstream's body could not be rewritten: {0}")]
pub struct RewriteError(std::io::Error);

impl LinkBody {
    pub fn new(inner: UpBody, rewriter: Rewriter, coding: Coding) -> LinkBody {
        LinkBody {
            inner,
            rewriter,
            decoder: Decoder::new(coding),
            encoder: Encoder::new(coding),
            queue: VecDeque::new(),
            trailers: None,
            done: false,
        }
    }

    fn process(&mut self, data: Bytes) -> std::io::Result<()> {
        let plain = match &mut self.decoder {
            Some(d) => Bytes::from(d.write(&data)?),
            None => data,
        };
        let mut out = Vec::new();
        if !plain.is_empty() {
            self.rewriter.feed(plain, &mut out);
        }
        self.emit(out)
    }

    fn end(&mut self) -> std::io::Result<()> {
        let mut out = Vec::new();
        if let Some(d) = self.decoder.take() {
            let rest = d.finish()?;
            if !rest.is_empty() {
                self.rewriter.feed(Bytes::from(rest), &mut out);
            }
        }
        self.rewriter.finish(&mut out);
        self.emit(out)?;
        if let Some(e) = self.encoder.take() {
            let rest = e.finish()?;
            if !rest.is_empty() {
                self.queue.push_back(Bytes::from(rest));
            }
        }
        Ok(())
    }

    fn emit(&mut self, out: Vec<Bytes>) -> std::io::Result<()> {
        match &mut self.encoder {
            Some(e) if !out.is_empty() => {
                let encoded = e.write(&out)?;
                if !encoded.is_empty() {
                    self.queue.push_back(Bytes::from(encoded));
                }
            }
            Some(_) => {}
            None => self.queue.extend(out.into_iter().filter(|b| !b.is_empty())),
        }
        Ok(())
    }
}

impl Body for LinkBody {
    type Data = Bytes;
    type Error = Box<dyn std::error::Error + Send + Sync>;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, Self::Error>>> {
        let this = &mut *self;
        loop {
            if let Some(data) = this.queue.pop_front() {
                return Poll::Ready(Some(Ok(Frame::data(data))));
            }
            if this.done {
                return Poll::Ready(this.trailers.take().map(|t| Ok(Frame::trailers(t))));
            }
            match Pin::new(&mut this.inner).poll_frame(cx) {
                Poll::Pending => return Poll::Pending,
                Poll::Ready(Some(Err(e))) => return Poll::Ready(Some(Err(e))),
                Poll::Ready(Some(Ok(frame))) => match frame.into_data() {
                    Ok(data) => {
                        if let Err(e) = this.process(data) {
                            this.done = true;
                            return Poll::Ready(Some(Err(Box::new(RewriteError(e)))));
                        }
                    }
                    Err(frame) => {
                        if let Ok(t) = frame.into_trailers() {
                            this.trailers = Some(t);
                        }
                    }
                },
                Poll::Ready(None) => {
                    this.done = true;
                    if let Err(e) = this.end() {
                        return Poll::Ready(Some(Err(Box::new(RewriteError(e)))));
                    }
                }
            }
        }
    }

    fn is_end_stream(&self) -> bool {
        self.done && self.queue.is_empty() && self.trailers.is_none()
    }

    fn size_hint(&self) -> SizeHint {
        SizeHint::default()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn map(strip: bool) -> Arc<LinkMap> {
        let origins = [
            Origin {
                scheme: "https".into(),
                host: "sparkapi.com".into(),
                port: None,
                base_path: String::new(),
                target: 0,
            },
            Origin {
                scheme: "https".into(),
                host: "replication.sparkapi.com".into(),
                port: None,
                base_path: "/v2".into(),
                target: 1,
            },
        ];
        let names = strip.then(|| {
            Arc::new(QueryNames::new([
                ("accessToken", true),
                ("clientId", false),
                ("apiKey", false),
            ]))
        });
        Arc::new(LinkMap::new(&origins, vec![names.clone(), names]).expect("map"))
    }

    fn rewriter(strip: bool) -> Rewriter {
        Rewriter::new(
            map(strip),
            Bases::new(vec![
                "http://127.0.0.1:8080/spark".into(),
                "http://127.0.0.1:8080/replication".into(),
            ]),
        )
    }

    fn all(input: &str) -> String {
        let mut r = rewriter(true);
        String::from_utf8(
            r.rewrite_all(Bytes::from(input.to_owned()).clone())
                .to_vec(),
        )
        .expect("utf8")
    }

    /// Feeds `input` in chunks of every size from 1 up, checking the result
    /// does not depend on where the frames break.
    fn chunked(input: &str, strip: bool) -> String {
        let whole = {
            let mut r = rewriter(strip);
            r.rewrite_all(Bytes::from(input.to_owned()))
        };
        for size in 1..=input.len().min(80) {
            let mut r = rewriter(strip);
            let mut out = Vec::new();
            for c in input.as_bytes().chunks(size) {
                r.feed(Bytes::copy_from_slice(c), &mut out);
            }
            r.finish(&mut out);
            assert_eq!(concat(out), whole, "chunk size {size}");
        }
        String::from_utf8(whole.to_vec()).expect("utf8")
    }

    #[test]
    fn own_origin_links_move_behind_the_proxy() {
        assert_eq!(
            all(r#"{"@odata.nextLink":"https://sparkapi.com/Reso/OData/Property?$skiptoken=abc"}"#),
            r#"{"@odata.nextLink":"http://127.0.0.1:8080/spark/Reso/OData/Property?$skiptoken=abc"}"#
        );
        assert_eq!(
            all("HTTPS://SparkAPI.com/x"),
            "http://127.0.0.1:8080/spark/x"
        );
        assert_eq!(
            all("https://sparkapi.com:443/x"),
            "http://127.0.0.1:8080/spark/x"
        );
        assert_eq!(all("https://sparkapi.com"), "http://127.0.0.1:8080/spark");
        assert_eq!(
            all("<a href='https://replication.sparkapi.com/v2/Member'/>"),
            "<a href='http://127.0.0.1:8080/replication/Member'/>"
        );
    }

    #[test]
    fn other_origins_are_left_alone() {
        for s in [
            "https://sparkapi.com.evil.example/x",
            "https://sparkapi.community/x",
            "https://sparkapi.com:8443/x",
            "https://sparkapi.com@evil.example/x",
            "http://sparkapi.com/x",
            "https://evil.example/https:/sparkapi.com",
            "https://replication.sparkapi.com/v20/x",
            "https://replication.sparkapi.com/V2/x",
            "https://replication.sparkapi.com/other",
        ] {
            assert_eq!(chunked(s, true), s);
        }
    }

    #[test]
    fn json_escaped_slashes() {
        assert_eq!(
            chunked(
                r#"{"next":"https:\/\/sparkapi.com\/v1\/listings?_page=2"}"#,
                false
            ),
            r#"{"next":"http:\/\/127.0.0.1:8080\/spark\/v1\/listings?_page=2"}"#
        );
        assert_eq!(
            chunked(r#"["https:\/\/replication.sparkapi.com\/v2\/x"]"#, false),
            r#"["http:\/\/127.0.0.1:8080\/replication\/x"]"#
        );
    }

    #[test]
    fn links_split_across_frames_are_found() {
        let input = r#"{"a":"https://sparkapi.com/1","b":"https://sparkapi.com.evil/2","c":"https://sparkapi.com"}"#;
        assert_eq!(
            chunked(input, false),
            r#"{"a":"http://127.0.0.1:8080/spark/1","b":"https://sparkapi.com.evil/2","c":"http://127.0.0.1:8080/spark"}"#
        );
    }

    #[test]
    fn credentials_are_stripped_from_rewritten_links() {
        assert_eq!(
            chunked(
                r#"{"next":"https://sparkapi.com/l?a=1&accessToken=T&clientId=C&apiKey=K&b=2","x":"https://other.example/?accessToken=T"}"#,
                true
            ),
            r#"{"next":"http://127.0.0.1:8080/spark/l?a=1&b=2","x":"https://other.example/?accessToken=T"}"#
        );
        assert_eq!(
            chunked(
                "<link href=\"https://sparkapi.com/l?accessToken=T&amp;page=2\"/>",
                true
            ),
            "<link href=\"http://127.0.0.1:8080/spark/l?page=2\"/>"
        );
        assert_eq!(
            chunked(
                r#"["https:\/\/sparkapi.com\/l?ACCESS%54OKEN=T\u0026p=1#f"]"#,
                true
            ),
            r#"["http:\/\/127.0.0.1:8080\/spark\/l?p=1#f"]"#
        );
        assert_eq!(
            chunked("https://sparkapi.com/l?apiKey=K", true),
            "http://127.0.0.1:8080/spark/l"
        );
    }

    #[test]
    fn escaped_separators_and_names_do_not_keep_credentials() {
        // Gson escapes & and = by default; XML may use character references.
        assert_eq!(
            chunked(
                r#"["https:\/\/sparkapi.com\/l?x\u003d1\u0026accessToken\u003dT\u0026clientId\u003dC\u0026apiKey\u003dK"]"#,
                true
            ),
            r#"["http:\/\/127.0.0.1:8080\/spark\/l?x\u003d1"]"#
        );
        assert_eq!(
            chunked(
                r#"["https://sparkapi.com/l\u003f\u0061ccessToken=T&p=1"]"#,
                true
            ),
            r#"["http://127.0.0.1:8080/spark/l\u003fp=1"]"#
        );
        assert_eq!(
            chunked(
                "<a href=\"https://sparkapi.com/l?p=1&#38;apiKey&#61;K&#x26;q=2\"/>",
                true
            ),
            "<a href=\"http://127.0.0.1:8080/spark/l?p=1&#x26;q=2\"/>"
        );
        assert_eq!(
            chunked(r#"["https://sparkapi.com/l?a=%26&b=\u0026"]"#, true),
            r#"["http://127.0.0.1:8080/spark/l?a=%26&b=\u0026"]"#,
            "no credential: the same bytes"
        );
    }

    #[test]
    fn untouched_chunks_are_the_same_bytes() {
        let mut r = rewriter(true);
        let chunk = Bytes::from_static(br#"{"D":{"Success":true,"Results":[]}}"#);
        let mut out = Vec::new();
        r.feed(chunk.clone(), &mut out);
        assert_eq!(out.len(), 1);
        assert_eq!(out[0].as_ptr(), chunk.as_ptr(), "no copy");
        assert!(!r.changed());
    }

    #[test]
    fn holds_back_only_a_possible_prefix() {
        let mut r = rewriter(false);
        let mut out = Vec::new();
        r.feed(Bytes::from_static(b"see https://spark"), &mut out);
        assert_eq!(concat(std::mem::take(&mut out)), "see ");
        r.feed(Bytes::from_static(b"lines are "), &mut out);
        assert_eq!(concat(std::mem::take(&mut out)), "https://sparklines are ");
        r.feed(Bytes::from_static(b"what they are: h"), &mut out);
        r.feed(Bytes::from_static(b"ello"), &mut out);
        r.finish(&mut out);
        assert_eq!(concat(out), "what they are: hello");
    }

    #[test]
    fn compressed_bodies_round_trip() {
        let input = br#"{"next":"https://sparkapi.com/x?p=2"}"#;
        for coding in [Coding::Gzip, Coding::Deflate, Coding::Brotli] {
            let mut e = Encoder::new(coding).expect("encoder");
            let mut enc = e.write(&[Bytes::from_static(input)]).expect("write");
            enc.extend(e.finish().expect("finish"));
            let mut r = rewriter(false);
            let out = rewrite_whole(&mut r, coding, Bytes::from(enc))
                .expect("rewrite")
                .expect("changed");
            let mut d = Decoder::new(coding).expect("decoder");
            let mut plain = d.write(&out).expect("decode");
            plain.extend(d.finish().expect("finish"));
            assert_eq!(
                String::from_utf8(plain).expect("utf8"),
                r#"{"next":"http://127.0.0.1:8080/spark/x?p=2"}"#,
                "{coding:?}"
            );
        }
    }

    #[test]
    fn raw_deflate_is_decoded_too() {
        let mut e = flate2::write::DeflateEncoder::new(Vec::new(), flate2::Compression::default());
        e.write_all(b"https://sparkapi.com/a").expect("write");
        let raw = e.finish().expect("finish");
        let mut r = rewriter(false);
        let out = rewrite_whole(&mut r, Coding::Deflate, Bytes::from(raw))
            .expect("rewrite")
            .expect("changed");
        let mut d = Decoder::new(Coding::Deflate).expect("decoder");
        let mut plain = d.write(&out).expect("decode");
        plain.extend(d.finish().expect("finish"));
        assert_eq!(plain, b"http://127.0.0.1:8080/spark/a");
    }

    #[test]
    fn codings_from_headers() {
        let h = |s: &'static str| http::HeaderValue::from_static(s);
        assert_eq!(Coding::from_header(None), Some(Coding::Identity));
        assert_eq!(Coding::from_header(Some(&h("GZIP"))), Some(Coding::Gzip));
        assert_eq!(Coding::from_header(Some(&h("br"))), Some(Coding::Brotli));
        assert_eq!(Coding::from_header(Some(&h("zstd"))), None);
        assert_eq!(Coding::from_header(Some(&h("gzip, br"))), None);
    }
}
