//! `GET /big-json?bytes=N`: a large JSON document, made as it is sent.
//!
//! The document is `{"value":[R0,R1,...]}` where every record has the same
//! length (its number is zero-padded), so the record count and the size are
//! arithmetic: as many records as fit in N bytes, then spaces before the
//! closing `]}` so the document is exactly N bytes (at least the 12 bytes of
//! `{"value":[]}`). Each record holds an absolute URL on the stand-in's own
//! origin (`@odata.id`), one on another origin and some text with escapes and
//! non-ASCII characters.

use axum::body::Body;
use bytes::Bytes;
use hyper::header::{HeaderValue, CONTENT_LENGTH, CONTENT_TYPE};
use hyper::Response;

use crate::encoding;

/// Chunks are at most about this size.
const CHUNK: usize = 64 * 1024;
const HEAD: &str = "{\"value\":[";
const TAIL: &str = "]}";

/// Record `i` as JSON text (always the same length for a given origin).
fn record(origin: &str, i: u64, escape_slashes: bool) -> String {
    let text = format!(
        "{{\"@odata.id\":\"{origin}/Reso/OData/Property('K{i:010}')\",\
         \"ListingKey\":\"K{i:010}\",\
         \"MediaURL\":\"https://cdn.example.com/photos/K{i:010}.jpg\",\
         \"PublicRemarks\":\"Bright \\\"corner\\\" unit; caf\u{e9} & park nearby.\\nTabs\\there, a backslash \\\\ and \\u00e9.\"}}"
    );
    if escape_slashes {
        encoding::escape(&text)
    } else {
        text
    }
}

/// The shape of one document: record length, record count, total size.
struct Layout {
    record_len: u64,
    count: u64,
    total: u64,
}

impl Layout {
    fn new(bytes: u64, origin: &str, escape_slashes: bool) -> Layout {
        let record_len = record(origin, 0, escape_slashes).len() as u64;
        let frame = (HEAD.len() + TAIL.len()) as u64;
        // c records take c * len + (c - 1) commas: c * (len + 1) <= bytes - frame + 1.
        let count = (bytes.saturating_sub(frame) + 1) / (record_len + 1);
        let count = if bytes < frame + record_len { 0 } else { count };
        Layout {
            record_len,
            count,
            total: bytes.max(frame),
        }
    }

    fn padding(&self) -> u64 {
        let used = (HEAD.len() + TAIL.len()) as u64
            + self.count * self.record_len
            + self.count.saturating_sub(1);
        self.total - used
    }
}

/// How many records `GET /big-json?bytes=n` sends from a listener at
/// `origin` (`http://127.0.0.1:PORT`), with or without
/// [`crate::Options::json_escape_slashes`].
pub fn big_json_records(bytes: u64, origin: &str, escape_slashes: bool) -> u64 {
    Layout::new(bytes, origin, escape_slashes).count
}

/// The streamed answer; with `content_length`, its exact `Content-Length`.
pub(crate) fn response(
    bytes: u64,
    origin: &str,
    escape_slashes: bool,
    content_length: bool,
) -> Response<Body> {
    let layout = Layout::new(bytes, origin, escape_slashes);
    let total = layout.total;
    let origin = origin.to_owned();
    // State: the next record to write, or `None` once everything is out.
    let chunks = futures_util::stream::unfold(Some(0u64), move |next| {
        let origin = origin.clone();
        let count = layout.count;
        let padding = layout.padding();
        let record_len = layout.record_len as usize;
        async move {
            let mut i = next?;
            let mut buf = String::with_capacity(CHUNK + record_len + 2);
            if i == 0 {
                buf.push_str(HEAD);
            }
            while i < count && buf.len() + record_len < CHUNK {
                if i > 0 {
                    buf.push(',');
                }
                buf.push_str(&record(&origin, i, escape_slashes));
                i += 1;
            }
            let next = if i == count {
                // Padding is shorter than one record: it fits in this chunk.
                buf.extend(std::iter::repeat_n(' ', padding as usize));
                buf.push_str(TAIL);
                None
            } else {
                Some(i)
            };
            Some((Ok::<_, std::io::Error>(Bytes::from(buf)), next))
        }
    });
    let mut resp = Response::new(Body::from_stream(chunks));
    let headers = resp.headers_mut();
    headers.insert(
        CONTENT_TYPE,
        HeaderValue::from_static("application/json; charset=utf-8"),
    );
    if content_length {
        headers.insert(CONTENT_LENGTH, HeaderValue::from(total));
    }
    resp
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn records_have_one_length_and_are_json() {
        let origin = "http://127.0.0.1:12345";
        for escape in [false, true] {
            let a = record(origin, 0, escape);
            let b = record(origin, 9_999_999_999, escape);
            assert_eq!(a.len(), b.len());
            let v: serde_json::Value = serde_json::from_str(&a).expect("valid JSON");
            assert_eq!(
                v["@odata.id"],
                "http://127.0.0.1:12345/Reso/OData/Property('K0000000000')"
            );
            assert_eq!(escape, a.contains(r"http:\/\/127.0.0.1:12345\/Reso"));
        }
    }

    #[test]
    fn layout_fits_the_size() {
        let origin = "http://127.0.0.1:1";
        let len = record(origin, 0, false).len() as u64;
        assert_eq!(big_json_records(0, origin, false), 0);
        assert_eq!(big_json_records(12, origin, false), 0);
        assert_eq!(big_json_records(11 + len, origin, false), 0);
        assert_eq!(big_json_records(12 + len, origin, false), 1);
        assert_eq!(big_json_records(12 + 2 * len, origin, false), 1);
        assert_eq!(big_json_records(13 + 2 * len, origin, false), 2);
        for n in [0, 12, 100, 12 + len, 13 + 2 * len, 1_000_000] {
            let l = Layout::new(n, origin, false);
            assert!(l.padding() <= len, "{n}");
            assert_eq!(l.total, n.max(12));
        }
    }
}
