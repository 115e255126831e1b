//! Request bodies for tests that send them upstream: generated frame by
//! frame (never held whole), their size known or not, each byte a function
//! of its offset so that what arrives can be checked.
#![allow(dead_code)]

use std::pin::Pin;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::task::{Context, Poll};

use bytes::Bytes;
use credproxy::proxy::forward::UpstreamBody;
use http_body::{Body, Frame, SizeHint};
use http_body_util::BodyExt;

/// Frame sizes, in turn: large and small ones, and empty ones (which a
/// chunked encoding must skip: an empty chunk ends the body).
const SIZES: [usize; 6] = [16 * 1024, 0, 1, 7000, 64 * 1024, 3];

/// The byte at `offset` of every generated body: letters only, so a body
/// never looks like a chunked encoding's last chunk.
pub fn byte_at(offset: usize) -> u8 {
    b'a' + ((offset + offset / 26 + offset / 677) % 26) as u8
}

/// The first `len` bytes of every generated body.
pub fn expected(len: usize) -> Vec<u8> {
    (0..len).map(byte_at).collect()
}

/// A generated body of `len` bytes.
pub struct Frames {
    at: usize,
    len: usize,
    turn: usize,
    sized: bool,
    /// Stop after this many bytes and wait forever: a caller that stalls.
    stall_at: Option<usize>,
    pulled: Arc<AtomicUsize>,
}

impl Frames {
    /// `sized`: whether it says its length (as a body read by its
    /// `Content-Length` does), or not (a chunked one).
    pub fn new(len: usize, sized: bool) -> Frames {
        Frames {
            at: 0,
            len,
            turn: 0,
            sized,
            stall_at: None,
            pulled: Arc::default(),
        }
    }

    /// The same, stalling for good after `at` bytes.
    pub fn stalling(len: usize, at: usize) -> Frames {
        Frames {
            stall_at: Some(at),
            ..Frames::new(len, true)
        }
    }

    /// How many bytes were taken from it so far.
    pub fn pulled(&self) -> Arc<AtomicUsize> {
        Arc::clone(&self.pulled)
    }

    pub fn boxed(self) -> UpstreamBody {
        BodyExt::boxed(self)
    }
}

impl Body for Frames {
    type Data = Bytes;
    type Error = Box<dyn std::error::Error + Send + Sync>;

    fn poll_frame(
        self: Pin<&mut Self>,
        _cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, Self::Error>>> {
        let this = self.get_mut();
        if this.at == this.len {
            return Poll::Ready(None);
        }
        if this.stall_at.is_some_and(|s| this.at >= s) {
            return Poll::Pending;
        }
        let size = SIZES[this.turn % SIZES.len()].min(this.len - this.at);
        this.turn += 1;
        let data: Vec<u8> = (this.at..this.at + size).map(byte_at).collect();
        this.at += size;
        this.pulled.store(this.at, Ordering::SeqCst);
        Poll::Ready(Some(Ok(Frame::data(Bytes::from(data)))))
    }

    fn is_end_stream(&self) -> bool {
        self.at == self.len
    }

    fn size_hint(&self) -> SizeHint {
        if self.sized {
            SizeHint::with_exact((self.len - self.at) as u64)
        } else {
            SizeHint::default()
        }
    }
}
