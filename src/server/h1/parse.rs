//! A request head, parsed in the connection's read buffer (httparse), its
//! header values sliced out of that buffer; and what the head says about
//! the message: how its body is framed, whether the connection stays open,
//! whether the client waits for `100 Continue`.
//!
//! Strict where two parsers could disagree on where a request ends (the
//! smuggling family, RFC 9112 §6.1, §6.3, §11.2): a `Transfer-Encoding`
//! other than exactly `chunked` is refused, as are one beside a
//! `Content-Length`, one on HTTP/1.0, differing lengths, a length list and more than one
//! `Host`. httparse refuses obs-fold and CR or NUL in values; like hyper,
//! it takes a bare LF as the end of a head line.

use bytes::BytesMut;
use http::header::{CONNECTION, CONTENT_LENGTH, EXPECT, HOST, TRANSFER_ENCODING};
use http::{HeaderMap, HeaderName, HeaderValue, Method, Request, Uri, Version};

use crate::http1;

/// Headers over this many are refused with 431 (hyper's default).
pub const MAX_HEADERS: usize = 100;

/// How a request's body is framed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Framing {
    /// This many bytes (0: no body).
    Length(u64),
    Chunked,
}

/// A request head and what it says about its message. Its `Debug` shows
/// the method, the path and the header names, never a header's value or
/// the query (either may carry a session key).
pub struct Parsed {
    pub request: Request<()>,
    pub framing: Framing,
    /// The client asked to keep the connection open (HTTP/1.1 without
    /// `Connection: close`, or HTTP/1.0 with `Connection: keep-alive`).
    pub keep_alive: bool,
    /// `Expect: 100-continue` on a request with a body.
    pub expect_continue: bool,
}

impl std::fmt::Debug for Parsed {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Parsed")
            .field("method", self.request.method())
            .field("path", &self.request.uri().path())
            .field(
                "headers",
                &self.request.headers().keys().collect::<Vec<_>>(),
            )
            .field("framing", &self.framing)
            .field("keep_alive", &self.keep_alive)
            .field("expect_continue", &self.expect_continue)
            .finish()
    }
}

/// Why a head is refused: the answer, then the connection closes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Refusal {
    BadRequest(&'static str),
    /// 431: over `server.max_header_bytes` or [`MAX_HEADERS`].
    HeadTooLarge,
    /// 414: longer than a URI can be.
    UriTooLong,
    /// 505: the HTTP/2 preface (HTTP/2 needs TLS and ALPN, or the admin
    /// listener is not it either).
    Version,
}

/// Parses a complete head at the start of `buf` and takes it off the
/// buffer (what follows, a body or the next request, stays); `None` while
/// more bytes are needed.
pub fn parse(buf: &mut BytesMut, max_head: usize) -> Result<Option<Parsed>, Refusal> {
    let mut slots = [httparse::EMPTY_HEADER; MAX_HEADERS];
    let mut req = httparse::Request::new(&mut slots);
    let len = match req.parse(buf) {
        Ok(httparse::Status::Complete(len)) => len,
        Ok(httparse::Status::Partial) => {
            return if buf.len() > max_head {
                Err(Refusal::HeadTooLarge)
            } else {
                Ok(None)
            }
        }
        Err(httparse::Error::TooManyHeaders) => return Err(Refusal::HeadTooLarge),
        Err(httparse::Error::Version) if buf.starts_with(b"PRI * HTTP/2.0") => {
            return Err(Refusal::Version)
        }
        Err(_) => return Err(Refusal::BadRequest("a malformed request head")),
    };
    if len > max_head {
        return Err(Refusal::HeadTooLarge);
    }
    let method = req
        .method
        .and_then(|m| Method::from_bytes(m.as_bytes()).ok())
        .ok_or(Refusal::BadRequest("a malformed method"))?;
    let version = match req.version {
        Some(1) => Version::HTTP_11,
        _ => Version::HTTP_10,
    };
    // Where the target, each name and each value sit in the buffer, to
    // slice them out of it once it is frozen (nothing is copied).
    let base = buf.as_ptr() as usize;
    let at = |s: &[u8]| (s.as_ptr() as usize - base, s.len());
    let target = at(req.path.unwrap_or_default().as_bytes());
    let mut spans = Vec::with_capacity(req.headers.len());
    for h in req.headers.iter() {
        spans.push((at(h.name.as_bytes()), at(h.value)));
    }
    let head = buf.split_to(len).freeze();
    let (t_at, t_len) = target;
    if t_len >= usize::from(u16::MAX) {
        return Err(Refusal::UriTooLong);
    }
    let uri = Uri::from_maybe_shared(head.slice(t_at..t_at + t_len))
        .map_err(|_| Refusal::BadRequest("a malformed request target"))?;

    let mut headers = HeaderMap::with_capacity(spans.len());
    let mut length: Option<u64> = None;
    let mut chunked = None;
    let mut close = version == Version::HTTP_10;
    let mut expect_continue = false;
    let mut hosts = 0;
    for ((n_at, n_len), (v_at, v_len)) in spans {
        let name = HeaderName::from_bytes(&head[n_at..n_at + n_len])
            .map_err(|_| Refusal::BadRequest("a malformed header name"))?;
        let value = HeaderValue::from_maybe_shared(head.slice(v_at..v_at + v_len))
            .map_err(|_| Refusal::BadRequest("a malformed header value"))?;
        let bytes = value.as_bytes();
        if name == CONTENT_LENGTH {
            // One number per header: a list (`10, 10`), which an
            // intermediary may have folded from two, is refused, as hyper does.
            if bytes.contains(&b',') {
                return Err(Refusal::BadRequest("a Content-Length list"));
            }
            let n = http1::content_length(bytes).map_err(|e| Refusal::BadRequest(e.0))?;
            if length.is_some_and(|l| l != n) {
                return Err(Refusal::BadRequest("differing Content-Length values"));
            }
            length = Some(n);
        } else if name == TRANSFER_ENCODING {
            // Exactly one `chunked`: any other coding, or a list, is one
            // that some parser on the way may read differently.
            if chunked.is_some() || !bytes.trim_ascii().eq_ignore_ascii_case(b"chunked") {
                return Err(Refusal::BadRequest(
                    "a Transfer-Encoding other than chunked",
                ));
            }
            chunked = Some(());
        } else if name == CONNECTION {
            if http1::lists(bytes, "close") {
                close = true;
            } else if version == Version::HTTP_10 && http1::lists(bytes, "keep-alive") {
                close = false;
            }
        } else if name == EXPECT {
            expect_continue = bytes.eq_ignore_ascii_case(b"100-continue");
        } else if name == HOST {
            hosts += 1;
        }
        headers.append(name, value);
    }
    if hosts > 1 {
        return Err(Refusal::BadRequest("more than one Host"));
    }
    let framing = match (chunked, length) {
        (Some(()), Some(_)) => {
            return Err(Refusal::BadRequest(
                "both Transfer-Encoding and Content-Length",
            ))
        }
        (Some(()), None) if version == Version::HTTP_10 => {
            return Err(Refusal::BadRequest("Transfer-Encoding on HTTP/1.0"))
        }
        (Some(()), None) => Framing::Chunked,
        (None, n) => Framing::Length(n.unwrap_or(0)),
    };
    let mut request = Request::new(());
    *request.method_mut() = method;
    *request.uri_mut() = uri;
    *request.version_mut() = version;
    *request.headers_mut() = headers;
    Ok(Some(Parsed {
        request,
        framing,
        keep_alive: !close,
        expect_continue: expect_continue
            && version == Version::HTTP_11
            && framing != Framing::Length(0),
    }))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn one(wire: &str) -> Result<Option<Parsed>, Refusal> {
        parse(&mut BytesMut::from(wire.as_bytes()), 65536)
    }

    #[test]
    fn heads_parse_and_leave_what_follows() {
        let mut buf = BytesMut::from(
            &b"POST /spark/v1/x?a=1 HTTP/1.1\r\nHost: h\r\nContent-Length: 3\r\nX-A: 1\r\nx-a: 2\r\n\r\nabcGET"[..],
        );
        let p = parse(&mut buf, 65536).expect("valid").expect("complete");
        assert_eq!(p.request.method(), Method::POST);
        assert_eq!(p.request.uri().path(), "/spark/v1/x");
        assert_eq!(p.request.uri().query(), Some("a=1"));
        assert_eq!(p.request.headers().get_all("x-a").iter().count(), 2);
        assert_eq!(p.framing, Framing::Length(3));
        assert!(p.keep_alive && !p.expect_continue);
        assert_eq!(&buf[..], b"abcGET");
        let mut partial = BytesMut::from(&b"GET / HTTP/1.1\r\nHost: h\r\n"[..]);
        assert!(parse(&mut partial, 65536).expect("so far").is_none());
        assert_eq!(partial.len(), 25, "a partial head stays");
    }

    #[test]
    fn what_the_head_says_about_the_message() {
        let p = one("GET / HTTP/1.0\r\n\r\n").expect("ok").expect("all");
        assert!(!p.keep_alive);
        let p = one("GET / HTTP/1.0\r\nConnection: Keep-Alive\r\n\r\n")
            .expect("ok")
            .expect("all");
        assert!(p.keep_alive);
        let p = one("GET / HTTP/1.1\r\nConnection: keep-alive, close\r\n\r\n")
            .expect("ok")
            .expect("all");
        assert!(!p.keep_alive);
        let p = one("PUT / HTTP/1.1\r\nTransfer-Encoding: Chunked\r\nExpect: 100-Continue\r\n\r\n")
            .expect("ok")
            .expect("all");
        assert_eq!(p.framing, Framing::Chunked);
        assert!(p.expect_continue);
        let p = one("GET / HTTP/1.1\r\nExpect: 100-continue\r\n\r\n")
            .expect("ok")
            .expect("all");
        assert!(!p.expect_continue, "no body, nothing to wait for");
        let p = one("GET / HTTP/1.1\nHost: h\n\n")
            .expect("bare LF heads")
            .expect("all");
        assert_eq!(p.framing, Framing::Length(0));
    }

    #[test]
    fn ambiguous_heads_are_refused() {
        for bad in [
            "POST / HTTP/1.1\r\nContent-Length: 3\r\nTransfer-Encoding: chunked\r\n\r\n",
            "POST / HTTP/1.1\r\nTransfer-Encoding: chunked\r\nContent-Length: 3\r\n\r\n",
            "POST / HTTP/1.1\r\nContent-Length: 3\r\nContent-Length: 4\r\n\r\n",
            "POST / HTTP/1.1\r\nContent-Length: 3, 4\r\n\r\n",
            "POST / HTTP/1.1\r\nContent-Length: 3, 3\r\n\r\n",
            "POST / HTTP/1.1\r\nContent-Length: +3\r\n\r\n",
            "POST / HTTP/1.1\r\nTransfer-Encoding: chunked, identity\r\n\r\n",
            "POST / HTTP/1.1\r\nTransfer-Encoding: identity\r\n\r\n",
            "POST / HTTP/1.1\r\nTransfer-Encoding: xchunked\r\n\r\n",
            "POST / HTTP/1.1\r\nTransfer-Encoding: chunked\r\nTransfer-Encoding: chunked\r\n\r\n",
            "POST / HTTP/1.0\r\nTransfer-Encoding: chunked\r\n\r\n",
            "GET / HTTP/1.1\r\nHost: a\r\nHost: b\r\n\r\n",
            "GET / HTTP/1.1\r\nX: a\r\n b\r\n\r\n",
            "GET / HTTP/1.1\r\nX: a\0b\r\n\r\n",
            "GET / HTTP/1.1\r\nX : a\r\n\r\n",
            "GET / HTTP/9.9\r\n\r\n",
            "GARBAGE\r\n\r\n",
        ] {
            assert!(
                matches!(one(bad), Err(Refusal::BadRequest(_))),
                "{bad:?}: {:?}",
                one(bad)
            );
        }
        assert_eq!(
            one("PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n").err(),
            Some(Refusal::Version)
        );
    }

    #[test]
    fn debug_shows_no_header_value_or_query() {
        let p = one("GET /spark/v1/x?key=SECRET1 HTTP/1.1\r\nX-Credproxy-Session: SECRET2\r\n\r\n")
            .expect("ok")
            .expect("all");
        let shown = format!("{p:?}");
        assert!(
            shown.contains("x-credproxy-session") && shown.contains("/spark/v1/x"),
            "{shown}"
        );
        assert!(!shown.contains("SECRET"), "{shown}");
    }

    #[test]
    fn the_head_limit_is_exact() {
        let head = |size: usize| {
            let start = "GET / HTTP/1.1\r\nX-Pad: ";
            format!("{start}{}\r\n\r\n", "a".repeat(size - start.len() - 4))
        };
        let exact = head(1000);
        assert_eq!(exact.len(), 1000);
        assert!(parse(&mut BytesMut::from(exact.as_bytes()), 1000).is_ok());
        let over = head(1001);
        assert_eq!(
            parse(&mut BytesMut::from(over.as_bytes()), 1000).err(),
            Some(Refusal::HeadTooLarge)
        );
        // Incomplete and already over.
        assert_eq!(
            parse(&mut BytesMut::from(&over.as_bytes()[..1001 - 2]), 990).err(),
            Some(Refusal::HeadTooLarge)
        );
        let many: String = (0..=MAX_HEADERS).map(|i| format!("X-{i}: 1\r\n")).collect();
        assert_eq!(
            one(&format!("GET / HTTP/1.1\r\n{many}\r\n")).err(),
            Some(Refusal::HeadTooLarge)
        );
    }
}
