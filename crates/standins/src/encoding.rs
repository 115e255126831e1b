//! How the API's answers are written on the wire: JSON with or without
//! escaped slashes, and gzip or deflate compression when the client asks.

use std::io::Write;

use axum::body::Body;
use bytes::Bytes;
use flate2::write::{GzEncoder, ZlibEncoder};
use flate2::Compression;
use futures_util::StreamExt;
use hyper::header::{
    HeaderMap, HeaderValue, ACCEPT_ENCODING, CONTENT_ENCODING, CONTENT_LENGTH, CONTENT_TYPE, VARY,
};
use hyper::{Response, StatusCode};

/// `value` as compact JSON; with `escape_slashes`, every `/` is written `\/`.
///
/// In compact JSON a `/` can only stand inside a string, so replacing every
/// one keeps the document valid and equal.
pub(crate) fn to_json(value: &serde_json::Value, escape_slashes: bool) -> String {
    let text = value.to_string();
    if escape_slashes {
        escape(&text)
    } else {
        text
    }
}

/// Every `/` of a piece of JSON text written `\/`.
pub(crate) fn escape(json: &str) -> String {
    json.replace('/', "\\/")
}

/// A JSON answer with `content_type`.
pub(crate) fn json_as(
    status: StatusCode,
    value: &serde_json::Value,
    escape_slashes: bool,
    content_type: &'static str,
) -> Response<Body> {
    let mut resp = Response::new(Body::from(to_json(value, escape_slashes)));
    *resp.status_mut() = status;
    resp.headers_mut()
        .insert(CONTENT_TYPE, HeaderValue::from_static(content_type));
    resp
}

/// A content coding the stand-in can apply.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Coding {
    Gzip,
    /// zlib format (RFC 1950), as RFC 9110 defines `deflate`.
    Deflate,
}

impl Coding {
    fn name(self) -> &'static str {
        match self {
            Coding::Gzip => "gzip",
            Coding::Deflate => "deflate",
        }
    }
}

/// The coding to answer with under these request headers: gzip when it is
/// acceptable (`q` > 0, by name or by `*`), else deflate, else none.
pub(crate) fn negotiate(headers: &HeaderMap) -> Option<Coding> {
    let mut gzip = None;
    let mut deflate = None;
    let mut star = None;
    for value in headers.get_all(ACCEPT_ENCODING) {
        let Ok(value) = value.to_str() else { continue };
        for item in value.split(',') {
            let mut params = item.split(';');
            let name = params.next().unwrap_or("").trim().to_ascii_lowercase();
            let mut q = 1.0f32;
            for param in params {
                if let Some((k, v)) = param.split_once('=') {
                    if k.trim().eq_ignore_ascii_case("q") {
                        q = v.trim().parse().unwrap_or(0.0);
                    }
                }
            }
            match name.as_str() {
                "gzip" | "x-gzip" => gzip = Some(q),
                "deflate" => deflate = Some(q),
                "*" => star = Some(q),
                _ => {}
            }
        }
    }
    let gzip = gzip.or(star).unwrap_or(0.0);
    let deflate = deflate.or(star).unwrap_or(0.0);
    if gzip > 0.0 && gzip >= deflate {
        Some(Coding::Gzip)
    } else if deflate > 0.0 {
        Some(Coding::Deflate)
    } else {
        None
    }
}

/// Whether an answer of this type is one the stand-in compresses: JSON or XML.
fn compressible(headers: &HeaderMap) -> bool {
    let Some(ct) = headers.get(CONTENT_TYPE).and_then(|v| v.to_str().ok()) else {
        return false;
    };
    let essence = ct
        .split(';')
        .next()
        .unwrap_or("")
        .trim()
        .to_ascii_lowercase();
    matches!(
        essence.as_str(),
        "application/json" | "application/xml" | "text/xml"
    ) || essence.ends_with("+json")
        || essence.ends_with("+xml")
}

/// Compresses a JSON or XML answer with `coding` (if any), as it streams.
/// Answers without a body (HEAD, 204, 304) are left alone.
pub(crate) fn compress(
    mut resp: Response<Body>,
    coding: Option<Coding>,
    head: bool,
) -> Response<Body> {
    let status = resp.status();
    if !compressible(resp.headers())
        || resp.headers().contains_key(CONTENT_ENCODING)
        || status == StatusCode::NO_CONTENT
        || status == StatusCode::NOT_MODIFIED
        || status.is_informational()
    {
        return resp;
    }
    resp.headers_mut()
        .append(VARY, HeaderValue::from_static("Accept-Encoding"));
    let Some(coding) = coding else {
        return resp;
    };
    if head {
        // No body goes out; say what a GET would get.
        resp.headers_mut().remove(CONTENT_LENGTH);
        resp.headers_mut()
            .insert(CONTENT_ENCODING, HeaderValue::from_static(coding.name()));
        return resp;
    }
    let (mut parts, body) = resp.into_parts();
    parts.headers.remove(CONTENT_LENGTH);
    parts
        .headers
        .insert(CONTENT_ENCODING, HeaderValue::from_static(coding.name()));
    let encoder = match coding {
        Coding::Gzip => Encoder::Gzip(GzEncoder::new(Vec::new(), Compression::default())),
        Coding::Deflate => Encoder::Zlib(ZlibEncoder::new(Vec::new(), Compression::default())),
    };
    let stream = futures_util::stream::unfold(
        (body.into_data_stream(), Some(encoder)),
        |(mut data, mut encoder)| async move {
            loop {
                let enc = encoder.as_mut()?;
                match data.next().await {
                    Some(Ok(chunk)) => match enc.write(&chunk) {
                        Ok(out) if out.is_empty() => continue,
                        Ok(out) => return Some((Ok(Bytes::from(out)), (data, encoder))),
                        Err(e) => return Some((Err(e), (data, None))),
                    },
                    Some(Err(e)) => return Some((Err(std::io::Error::other(e)), (data, None))),
                    None => {
                        let enc = encoder.take()?;
                        return Some((enc.finish().map(Bytes::from), (data, None)));
                    }
                }
            }
        },
    );
    Response::from_parts(parts, Body::from_stream(stream))
}

enum Encoder {
    Gzip(GzEncoder<Vec<u8>>),
    Zlib(ZlibEncoder<Vec<u8>>),
}

impl Encoder {
    /// Feeds `data` in and takes what has come out so far.
    fn write(&mut self, data: &[u8]) -> std::io::Result<Vec<u8>> {
        match self {
            Encoder::Gzip(e) => {
                e.write_all(data)?;
                Ok(std::mem::take(e.get_mut()))
            }
            Encoder::Zlib(e) => {
                e.write_all(data)?;
                Ok(std::mem::take(e.get_mut()))
            }
        }
    }

    /// The rest of the compressed stream, trailer included.
    fn finish(self) -> std::io::Result<Vec<u8>> {
        match self {
            Encoder::Gzip(e) => e.finish(),
            Encoder::Zlib(e) => e.finish(),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn headers(accept: &str) -> HeaderMap {
        let mut h = HeaderMap::new();
        h.insert(
            ACCEPT_ENCODING,
            HeaderValue::from_str(accept).expect("value"),
        );
        h
    }

    #[test]
    fn negotiation_honours_q() {
        assert_eq!(negotiate(&HeaderMap::new()), None);
        assert_eq!(negotiate(&headers("gzip, deflate")), Some(Coding::Gzip));
        assert_eq!(negotiate(&headers("deflate")), Some(Coding::Deflate));
        assert_eq!(
            negotiate(&headers("gzip;q=0, deflate")),
            Some(Coding::Deflate)
        );
        assert_eq!(negotiate(&headers("gzip;q=0")), None);
        assert_eq!(negotiate(&headers("br, identity")), None);
        assert_eq!(negotiate(&headers("*")), Some(Coding::Gzip));
        assert_eq!(
            negotiate(&headers("*;q=0.5, gzip;q=0")),
            Some(Coding::Deflate)
        );
        assert_eq!(
            negotiate(&headers("gzip;q=0.2, deflate;q=0.8")),
            Some(Coding::Deflate)
        );
        assert_eq!(negotiate(&headers("GZIP; Q=0.001")), Some(Coding::Gzip));
    }

    #[test]
    fn escaping_keeps_json_valid() {
        let v = serde_json::json!({"u": "http://a/b", "n": 1, "s": "x\"/\\y"});
        let text = to_json(&v, true);
        assert!(!text.contains("http://"));
        assert!(text.contains(r"http:\/\/a\/b"));
        let back: serde_json::Value = serde_json::from_str(&text).expect("valid");
        assert_eq!(back, v);
    }
}
