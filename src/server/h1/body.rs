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

use super::wire::{BodyState, Wire};
use crate::http1::Step;

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
            let data = match &mut inbound.body {
                BodyState::Done => return Poll::Ready(None),
                BodyState::Broken => {
                    return Poll::Ready(Some(Err(broken(
                        io::ErrorKind::InvalidData,
                        "the request body was broken off",
                    ))))
                }
                BodyState::Length(0) => {
                    inbound.body = BodyState::Done;
                    return Poll::Ready(None);
                }
                BodyState::Length(left) if !inbound.buf.is_empty() => {
                    let take = (*left).min(inbound.buf.len() as u64);
                    *left -= take;
                    Some(inbound.buf.split_to(take as usize).freeze())
                }
                BodyState::Length(_) => None,
                BodyState::Chunked(chunked) => match chunked.step(&mut inbound.buf) {
                    Ok(Step::Data(data)) => Some(data),
                    Ok(Step::End) => {
                        inbound.body = BodyState::Done;
                        return Poll::Ready(None);
                    }
                    Ok(Step::More) => None,
                    Err(e) => {
                        inbound.body = BodyState::Broken;
                        return Poll::Ready(Some(Err(broken(io::ErrorKind::InvalidData, e.0))));
                    }
                },
            };
            if let Some(data) = data {
                if matches!(inbound.body, BodyState::Length(0)) {
                    inbound.body = BodyState::Done;
                }
                return Poll::Ready(Some(Ok(Frame::data(data))));
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
