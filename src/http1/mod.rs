//! HTTP/1.1 framing shared by credproxy's own server side (`server::h1`)
//! and its own client (`proxy::forward::h1`): one reading of
//! `Content-Length`, one chunked decoder, one `Date`.
//!
//! The rules lean strict where a lenient reading could let two parsers
//! disagree on where a message ends (RFC 9112 §6, §7.1; the request
//! smuggling family): a `Content-Length` is ASCII digits only, several of
//! them must agree, chunk lines end in CRLF (a bare LF is refused), chunk
//! sizes are hex digits only, and chunk extensions and trailers are read
//! within limits and dropped.

mod chunked;
mod date;

pub use chunked::{Chunked, Step};
pub use date::{date, DATE_LEN};

/// A message whose framing cannot be trusted: the connection that carried
/// it is closed.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
#[error("{0}")]
pub struct FramingError(pub &'static str);

/// One `Content-Length` value, or a comma-separated list of equal ones (a
/// header repeated by an intermediary): ASCII digits only, no sign, no
/// spaces inside a number, at most 19 digits.
pub fn content_length(value: &[u8]) -> Result<u64, FramingError> {
    let mut found = None;
    for part in value.split(|&b| b == b',') {
        let n = digits(part)?;
        if found.is_some_and(|f| f != n) {
            return Err(FramingError("differing Content-Length values"));
        }
        found = Some(n);
    }
    found.ok_or(FramingError("a malformed Content-Length"))
}

fn digits(part: &[u8]) -> Result<u64, FramingError> {
    let d = part.trim_ascii();
    if d.is_empty() || d.len() > 19 || !d.iter().all(u8::is_ascii_digit) {
        return Err(FramingError("a malformed Content-Length"));
    }
    Ok(d.iter().fold(0u64, |n, &b| n * 10 + u64::from(b - b'0')))
}

/// Whether a comma-separated header value (`Connection`, say) lists
/// `token`, case-insensitively.
pub fn lists(value: &[u8], token: &str) -> bool {
    value
        .split(|&b| b == b',')
        .any(|t| t.trim_ascii().eq_ignore_ascii_case(token.as_bytes()))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn content_lengths_are_digits_only_and_agree() {
        assert_eq!(content_length(b"70"), Ok(70));
        assert_eq!(content_length(b" 5 "), Ok(5));
        assert_eq!(content_length(b"5, 5"), Ok(5));
        for bad in [
            &b""[..],
            b"+5",
            b"-1",
            b"5 5",
            b"0x10",
            b"5,6",
            b"5,",
            b"99999999999999999999",
        ] {
            assert!(content_length(bad).is_err(), "{bad:?}");
        }
    }

    #[test]
    fn tokens_are_found_in_lists() {
        assert!(lists(b"keep-alive, Close", "close"));
        assert!(lists(b"close", "close"));
        assert!(!lists(b"closed", "close"));
        assert!(!lists(b"", "close"));
    }
}
