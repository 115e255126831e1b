//! A chunked body (RFC 9112 §7.1), decoded in place in a connection's
//! read buffer: each step takes what it can from the buffer and says
//! whether it needs more bytes.

use bytes::{Buf, Bytes, BytesMut};

use super::FramingError;

/// A chunk-size line or a trailer line over this is refused.
pub const MAX_LINE: usize = 4096;
/// Trailers over this in total are refused.
pub const MAX_TRAILERS: usize = 16 * 1024;

/// Where the decoder is.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum State {
    Size,
    Data(u64),
    /// The CRLF after a chunk's data.
    DataEnd,
    Trailers(usize),
    Done,
}

/// A chunked body's decoder.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Chunked {
    state: State,
}

/// What one step found.
#[derive(Debug, PartialEq, Eq)]
pub enum Step {
    /// Some of the body (never empty).
    Data(Bytes),
    /// The buffer holds no more of the body: read more, then step again.
    More,
    /// The last chunk and the trailers have been read.
    End,
}

impl Default for Chunked {
    fn default() -> Self {
        Self::new()
    }
}

impl Chunked {
    pub fn new() -> Chunked {
        Chunked { state: State::Size }
    }

    /// Whether the whole body has been read.
    pub fn is_done(&self) -> bool {
        self.state == State::Done
    }

    /// Takes the next piece of the body off the front of `buf`.
    pub fn step(&mut self, buf: &mut BytesMut) -> Result<Step, FramingError> {
        loop {
            match self.state {
                State::Done => return Ok(Step::End),
                State::Data(left) => {
                    if buf.is_empty() {
                        return Ok(Step::More);
                    }
                    let take = left.min(buf.len() as u64);
                    let data = buf.split_to(take as usize).freeze();
                    self.state = if take == left {
                        State::DataEnd
                    } else {
                        State::Data(left - take)
                    };
                    return Ok(Step::Data(data));
                }
                state => {
                    let Some(line) = line(buf)? else {
                        return Ok(Step::More);
                    };
                    self.state = match state {
                        State::DataEnd if line.is_empty() => State::Size,
                        State::DataEnd => {
                            return Err(FramingError("a chunk is longer than its size"))
                        }
                        State::Size => match chunk_size(&line)? {
                            0 => State::Trailers(0),
                            n => State::Data(n),
                        },
                        State::Trailers(_) if line.is_empty() => State::Done,
                        State::Trailers(seen) => {
                            let seen = seen + line.len() + 2;
                            if seen > MAX_TRAILERS {
                                return Err(FramingError("the trailers are too long"));
                            }
                            State::Trailers(seen)
                        }
                        State::Data(_) | State::Done => unreachable!("handled above"),
                    };
                }
            }
        }
    }
}

/// A CRLF-terminated line off the front of `buf`, without its CRLF; `None`
/// if the buffer has no whole line yet. A bare LF, a CR inside, or a line
/// over [`MAX_LINE`] is refused.
fn line(buf: &mut BytesMut) -> Result<Option<BytesMut>, FramingError> {
    let Some(lf) = memchr::memchr(b'\n', buf) else {
        if buf.len() > MAX_LINE {
            return Err(FramingError("a chunk-size or trailer line is too long"));
        }
        return Ok(None);
    };
    if lf == 0 || buf[lf - 1] != b'\r' {
        return Err(FramingError("a chunk line ends in a bare LF"));
    }
    if lf > MAX_LINE {
        return Err(FramingError("a chunk-size or trailer line is too long"));
    }
    let line = buf.split_to(lf - 1);
    buf.advance(2);
    if line.contains(&b'\r') {
        return Err(FramingError("a stray CR in a chunk line"));
    }
    Ok(Some(line))
}

/// A chunk's size from its line: hex digits, then perhaps whitespace and
/// `;` extensions (dropped). Nothing else.
fn chunk_size(line: &[u8]) -> Result<u64, FramingError> {
    let bad = FramingError("a malformed chunk size");
    let end = line
        .iter()
        .position(|b| !b.is_ascii_hexdigit())
        .unwrap_or(line.len());
    let (hex, rest) = line.split_at(end);
    if hex.is_empty() || hex.len() > 15 {
        return Err(bad);
    }
    let rest = rest.trim_ascii_start();
    if !(rest.is_empty() || rest[0] == b';') {
        return Err(bad);
    }
    if rest.iter().any(|&b| (b < 0x20 && b != b'\t') || b == 0x7f) {
        return Err(bad);
    }
    Ok(hex.iter().fold(0u64, |n, &b| {
        n * 16 + u64::from((b as char).to_digit(16).unwrap_or(0))
    }))
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Decodes all of `wire` fed in pieces of `piece` bytes.
    fn decode(wire: &[u8], piece: usize) -> Result<(Vec<u8>, usize), FramingError> {
        let mut d = Chunked::new();
        let mut buf = BytesMut::new();
        let mut out = Vec::new();
        let mut fed = 0;
        loop {
            match d.step(&mut buf)? {
                Step::Data(b) => out.extend_from_slice(&b),
                Step::End => return Ok((out, buf.len())),
                Step::More => {
                    if fed == wire.len() {
                        return Err(FramingError("short"));
                    }
                    let n = piece.min(wire.len() - fed);
                    buf.extend_from_slice(&wire[fed..fed + n]);
                    fed += n;
                }
            }
        }
    }

    #[test]
    fn bodies_decode_in_any_pieces_and_leave_what_follows() {
        let wire =
            b"5\r\nhello\r\n1a;ext=1\r\nabcdefghijklmnopqrstuvwxyz\r\n0\r\nX-T: 1\r\n\r\nGET /next";
        for piece in [1, 2, 3, 7, 100] {
            let (body, left) = decode(wire, piece).expect("valid");
            assert_eq!(body, b"helloabcdefghijklmnopqrstuvwxyz");
            // Fed one piece at a time, only the bytes past the end are left.
            assert!(left <= piece.saturating_sub(1).max(9), "{piece}: {left}");
        }
        assert_eq!(decode(b"0\r\n\r\n", 5).expect("empty").0, b"");
        assert_eq!(
            decode(b"3 ;x\r\nabc\r\n0\r\n\r\n", 64).expect("bws").0,
            b"abc"
        );
    }

    #[test]
    fn ambiguous_framing_is_refused() {
        for bad in [
            &b"5\nhello\r\n0\r\n\r\n"[..],
            b"5\r\nhello\n0\r\n\r\n",
            b"5\r\nhelloX\r\n0\r\n\r\n",
            b"-5\r\nhello\r\n0\r\n\r\n",
            b"0x5\r\nhello\r\n0\r\n\r\n",
            b"+5\r\nhello\r\n0\r\n\r\n",
            b"5 5\r\nhello\r\n0\r\n\r\n",
            b"\r\n",
            b"1234567890abcdef0\r\n",
            b"5\r\r\nhello\r\n0\r\n\r\n",
            b"0\r\nX: 1\n\r\n",
        ] {
            assert!(
                decode(bad, 64).is_err(),
                "{:?}",
                String::from_utf8_lossy(bad)
            );
        }
        let long = format!("1;{}\r\nx\r\n0\r\n\r\n", "e".repeat(MAX_LINE));
        assert!(decode(long.as_bytes(), 64).is_err());
    }
}
