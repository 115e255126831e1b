//! Writing an answer: the head from the response's parts into the
//! connection's out buffer, the body after it in the same buffer while its
//! frames come at once (a small answer leaves in one write), and straight
//! from the frame when it is large. The buffer is written whenever the
//! body has nothing ready, so a slow stream is never held back.
//!
//! Framing: none for HEAD, 1xx, 204 and 304; the body's exact length when
//! it has one, else the `Content-Length` it came with, else chunked
//! (HTTP/1.1) or until the close (HTTP/1.0). An answer whose body ends
//! short of its length or breaks off (the upstream went away) ends the
//! connection, with no last chunk, so the client sees it cut short.

use std::io::{IoSlice, Write as _};
use std::pin::pin;
use std::task::Poll;
use std::time::Duration;

use bytes::Bytes;
use http::header::{CONNECTION, CONTENT_LENGTH, DATE, TRANSFER_ENCODING};
use http::{Response, StatusCode, Version};
use http_body::Body;

use super::wire::Wire;
use crate::http1;

/// Body bytes gathered in the out buffer before it is written; a frame
/// larger than what is left goes out on its own (vectored with the buffer).
const GATHER: usize = 64 * 1024;

/// What the request said that shapes its answer.
#[derive(Debug, Clone, Copy)]
pub struct Asked {
    pub head: bool,
    pub version: Version,
    /// The connection may stay open after this answer.
    pub keep_alive: bool,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Framing {
    None,
    Length(u64),
    Chunked,
    UntilClose,
}

/// Writes `resp`; `Ok(true)` if the connection can carry another request.
pub async fn respond<B>(
    wire: &Wire,
    resp: Response<B>,
    asked: Asked,
    out: &mut Vec<u8>,
    write_timeout: Duration,
) -> std::io::Result<bool>
where
    B: Body<Data = Bytes>,
{
    let (parts, body) = resp.into_parts();
    let mut body = pin!(body);
    let status = parts.status;
    let bodiless = asked.head
        || status.is_informational()
        || status == StatusCode::NO_CONTENT
        || status == StatusCode::NOT_MODIFIED;
    let exact = body.size_hint().exact();
    let declared = parts
        .headers
        .get(CONTENT_LENGTH)
        .and_then(|v| http1::content_length(v.as_bytes()).ok());
    let framing = match (bodiless, exact, declared) {
        (true, _, _) => Framing::None,
        (false, Some(n), _) | (false, None, Some(n)) => Framing::Length(n),
        (false, None, None) if asked.version == Version::HTTP_11 => Framing::Chunked,
        (false, None, None) => Framing::UntilClose,
    };
    let mut keep = asked.keep_alive && framing != Framing::UntilClose;

    out.clear();
    out.extend_from_slice(b"HTTP/1.1 ");
    out.extend_from_slice(status.as_str().as_bytes());
    out.push(b' ');
    out.extend_from_slice(status.canonical_reason().unwrap_or("").as_bytes());
    out.extend_from_slice(b"\r\n");
    let mut dated = false;
    for (name, value) in &parts.headers {
        if name == CONNECTION || name == TRANSFER_ENCODING || name == "keep-alive" {
            continue;
        }
        // Our own length below, except that a bodiless answer (HEAD,
        // 304) keeps the one it came with.
        if name == CONTENT_LENGTH && !bodiless {
            continue;
        }
        dated |= name == DATE;
        out.extend_from_slice(name.as_str().as_bytes());
        out.extend_from_slice(b": ");
        out.extend_from_slice(value.as_bytes());
        out.extend_from_slice(b"\r\n");
    }
    if !dated {
        out.extend_from_slice(b"date: ");
        out.extend_from_slice(&http1::date());
        out.extend_from_slice(b"\r\n");
    }
    match framing {
        Framing::Length(n) => {
            out.extend_from_slice(b"content-length: ");
            out.extend_from_slice(itoa::Buffer::new().format(n).as_bytes());
            out.extend_from_slice(b"\r\n");
        }
        Framing::Chunked => out.extend_from_slice(b"transfer-encoding: chunked\r\n"),
        Framing::None if asked.head && declared.is_none() => {
            if let Some(n) = exact.filter(|&n| n > 0) {
                out.extend_from_slice(b"content-length: ");
                out.extend_from_slice(itoa::Buffer::new().format(n).as_bytes());
                out.extend_from_slice(b"\r\n");
            }
        }
        Framing::None | Framing::UntilClose => {}
    }
    if !keep {
        out.extend_from_slice(b"connection: close\r\n");
    } else if asked.version == Version::HTTP_10 {
        out.extend_from_slice(b"connection: keep-alive\r\n");
    }
    out.extend_from_slice(b"\r\n");

    if framing == Framing::None {
        // Nothing of it is sent; a body that is ready at once is read to
        // its end so that it counts as complete (its access-log line).
        {
            let mut cx = std::task::Context::from_waker(std::task::Waker::noop());
            for _ in 0..4 {
                match body.as_mut().poll_frame(&mut cx) {
                    Poll::Ready(Some(Ok(_))) => continue,
                    _ => break,
                }
            }
        }
        wire.write_all(&mut [IoSlice::new(out)], write_timeout)
            .await?;
        return Ok(keep);
    }

    let mut sent: u64 = 0;
    loop {
        let polled =
            match std::future::poll_fn(|cx| Poll::Ready(body.as_mut().poll_frame(cx))).await {
                Poll::Ready(frame) => frame,
                Poll::Pending => {
                    if !out.is_empty() {
                        wire.write_all(&mut [IoSlice::new(out)], write_timeout)
                            .await?;
                        out.clear();
                    }
                    std::future::poll_fn(|cx| body.as_mut().poll_frame(cx)).await
                }
            };
        let data = match polled {
            Some(Ok(frame)) => match frame.into_data() {
                Ok(data) if !data.is_empty() => data,
                // Trailers are not sent; empty frames carry nothing.
                _ => continue,
            },
            Some(Err(_)) => {
                // The upstream broke off: what came goes out, the end
                // does not.
                keep = false;
                break;
            }
            None => {
                match framing {
                    Framing::Chunked => out.extend_from_slice(b"0\r\n\r\n"),
                    Framing::Length(n) if sent < n => keep = false,
                    _ => {}
                }
                break;
            }
        };
        let data = match framing {
            Framing::Length(n) => {
                let room = n - sent;
                if room == 0 {
                    keep = false;
                    break;
                }
                if data.len() as u64 > room {
                    // More than it said: the rest is not sent.
                    keep = false;
                    data.slice(..room as usize)
                } else {
                    data
                }
            }
            _ => data,
        };
        sent += data.len() as u64;
        if framing == Framing::Chunked {
            // Writing to a Vec cannot fail.
            let _ = write!(out, "{:x}\r\n", data.len());
        }
        if out.len() + data.len() <= GATHER {
            out.extend_from_slice(&data);
        } else {
            wire.write_all(&mut [IoSlice::new(out), IoSlice::new(&data)], write_timeout)
                .await?;
            out.clear();
        }
        if framing == Framing::Chunked {
            out.extend_from_slice(b"\r\n");
        }
        if !keep {
            break;
        }
    }
    if !out.is_empty() {
        wire.write_all(&mut [IoSlice::new(out)], write_timeout)
            .await?;
        out.clear();
    }
    Ok(keep)
}

#[cfg(test)]
mod tests {
    use super::*;
    use http_body_util::{BodyExt, Full, StreamBody};
    use tokio::io::AsyncReadExt;

    type Boxed = http_body_util::combinators::BoxBody<Bytes, std::io::Error>;

    fn stream(parts: Vec<Result<&'static [u8], ()>>) -> Boxed {
        let frames = parts.into_iter().map(|p| match p {
            Ok(b) => Ok(http_body::Frame::data(Bytes::from_static(b))),
            Err(()) => Err(std::io::Error::other("upstream broke off")),
        });
        StreamBody::new(futures_util::stream::iter(frames)).boxed()
    }

    /// What the client reads when `resp` is written for a request `asked`,
    /// and whether the connection could go on.
    async fn written(resp: Response<Boxed>, asked: Asked) -> (String, bool) {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
            .await
            .expect("bind");
        let addr = listener.local_addr().expect("addr");
        let mut client = tokio::net::TcpStream::connect(addr).await.expect("connect");
        let (server, _) = listener.accept().await.expect("accept");
        let wire = Wire::new(server);
        let mut out = Vec::new();
        let keep = respond(&wire, resp, asked, &mut out, Duration::from_secs(5))
            .await
            .expect("written");
        drop(wire);
        let mut text = String::new();
        client.read_to_string(&mut text).await.expect("read");
        (text, keep)
    }

    fn asked(head: bool, version: Version) -> Asked {
        Asked {
            head,
            version,
            keep_alive: true,
        }
    }

    fn response(body: Boxed, status: u16, headers: &[(&str, &str)]) -> Response<Boxed> {
        let mut resp = Response::new(body);
        *resp.status_mut() = StatusCode::from_u16(status).expect("status");
        for (n, v) in headers {
            resp.headers_mut().insert(
                http::HeaderName::from_bytes(n.as_bytes()).expect("name"),
                http::HeaderValue::from_str(v).expect("value"),
            );
        }
        resp
    }

    #[tokio::test]
    async fn answers_are_framed_by_their_body() {
        let full = |b: &'static str| Full::new(Bytes::from(b)).map_err(|n| match n {}).boxed();
        // A known length: one head, the body after it, and a date.
        let (text, keep) = written(
            response(full("{}"), 200, &[("content-type", "application/json")]),
            asked(false, Version::HTTP_11),
        )
        .await;
        assert!(keep);
        assert!(
            text.starts_with("HTTP/1.1 200 OK\r\ncontent-type: application/json\r\ndate: "),
            "{text}"
        );
        assert!(text.ends_with("\r\ncontent-length: 2\r\n\r\n{}"), "{text}");
        // No length: chunked, ended by the last chunk.
        let (text, keep) = written(
            response(stream(vec![Ok(b"ab"), Ok(b""), Ok(b"cde")]), 200, &[]),
            asked(false, Version::HTTP_11),
        )
        .await;
        assert!(keep);
        assert!(text.contains("transfer-encoding: chunked\r\n"), "{text}");
        assert!(
            text.ends_with("\r\n\r\n2\r\nab\r\n3\r\ncde\r\n0\r\n\r\n"),
            "{text}"
        );
        // HTTP/1.0: until the close.
        let (text, keep) = written(
            response(stream(vec![Ok(b"ab")]), 200, &[]),
            asked(false, Version::HTTP_10),
        )
        .await;
        assert!(!keep);
        assert!(text.contains("connection: close\r\n"), "{text}");
        assert!(text.ends_with("\r\n\r\nab"), "{text}");
        // HEAD: the length it came with, no body.
        let (text, keep) = written(
            response(full(""), 200, &[("content-length", "1234")]),
            asked(true, Version::HTTP_11),
        )
        .await;
        assert!(keep);
        assert!(text.contains("content-length: 1234\r\n"), "{text}");
        assert!(text.ends_with("\r\n\r\n"), "{text}");
        // 204 and 304: nothing after the head.
        for status in [204, 304] {
            let (text, keep) = written(
                response(full(""), status, &[]),
                asked(false, Version::HTTP_11),
            )
            .await;
            assert!(keep);
            assert!(
                !text.contains("content-length") && !text.contains("chunked"),
                "{text}"
            );
        }
    }

    #[tokio::test]
    async fn a_body_that_breaks_off_or_runs_short_ends_the_connection() {
        // Chunked: no last chunk, so the client sees it cut short.
        let (text, keep) = written(
            response(stream(vec![Ok(b"ab"), Err(())]), 200, &[]),
            asked(false, Version::HTTP_11),
        )
        .await;
        assert!(!keep);
        assert!(text.ends_with("2\r\nab\r\n"), "{text}");
        // A declared length the body does not fill.
        let (text, keep) = written(
            response(stream(vec![Ok(b"ab")]), 200, &[("content-length", "10")]),
            asked(false, Version::HTTP_11),
        )
        .await;
        assert!(!keep);
        assert!(text.ends_with("content-length: 10\r\n\r\nab"), "{text}");
        // One it overfills: the rest is not sent.
        let (text, keep) = written(
            response(
                stream(vec![Ok(b"abc"), Ok(b"def")]),
                200,
                &[("content-length", "4")],
            ),
            asked(false, Version::HTTP_11),
        )
        .await;
        assert!(!keep);
        assert!(text.ends_with("\r\n\r\nabcd"), "{text}");
    }
}
