//! The request body the proxy reads: framed by its head (a length or
//! chunked), read from the connection's buffer and socket by whoever polls
//! it. `100 Continue` goes out the first time it is polled, so a request
//! refused before its body is read (an unknown key, a scope) never asks
//! the client for it.

use std::io;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};

use bytes::Bytes;
use http_body::{Body, Frame, SizeHint};

use super::wire::{BodyState, Buffered, Wire};

/// A request's body on its connection.
pub struct ClientBody {
    wire: Arc<Wire>,
    /// The request it is the body of (see [`super::wire::Inbound::request`]).
    request: u64,
}

impl ClientBody {
    pub(super) fn new(wire: Arc<Wire>, request: u64) -> ClientBody {
        ClientBody { wire, request }
    }
}

fn broken(kind: io::ErrorKind, why: &'static str) -> io::Error {
    io::Error::new(kind, why)
}

impl Body for ClientBody {
    type Data = Bytes;
    type Error = io::Error;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, io::Error>>> {
        let wire = &*self.wire;
        let mut guard = wire.inbound();
        let inbound = &mut *guard;
        if inbound.request != self.request {
            return Poll::Ready(None);
        }
        if inbound.body.is_done() {
            inbound.body = BodyState::Done;
            return Poll::Ready(None);
        }
        if inbound.continue_left > 0 {
            if inbound.responded {
                inbound.continue_left = 0;
            } else if let Err(e) = std::task::ready!(wire.poll_continue(inbound, cx)) {
                inbound.body = BodyState::Broken;
                return Poll::Ready(Some(Err(e)));
            }
        }
        loop {
            match inbound.take_buffered() {
                Ok(Buffered::Data(data)) => return Poll::Ready(Some(Ok(Frame::data(data)))),
                Ok(Buffered::End) => return Poll::Ready(None),
                Ok(Buffered::Empty) => {}
                Err(e) => return Poll::Ready(Some(Err(broken(io::ErrorKind::InvalidData, e.0)))),
            }
            match std::task::ready!(wire.poll_fill(&mut inbound.buf, cx)) {
                Ok(0) => {
                    inbound.body = BodyState::Broken;
                    return Poll::Ready(Some(Err(broken(
                        io::ErrorKind::UnexpectedEof,
                        "the client closed the connection within the request body",
                    ))));
                }
                Ok(_) => {}
                Err(e) => {
                    inbound.body = BodyState::Broken;
                    return Poll::Ready(Some(Err(e)));
                }
            }
        }
    }

    fn is_end_stream(&self) -> bool {
        let inbound = self.wire.inbound();
        inbound.request != self.request || inbound.body.is_done()
    }

    fn size_hint(&self) -> SizeHint {
        let inbound = self.wire.inbound();
        if inbound.request != self.request {
            return SizeHint::with_exact(0);
        }
        match inbound.body {
            BodyState::Length(n) => SizeHint::with_exact(n),
            BodyState::Done => SizeHint::with_exact(0),
            _ => SizeHint::default(),
        }
    }
}
