//! One client connection as both sides of it see it: the socket, and what
//! has been read from it but not yet used (a head, a body's bytes, the
//! next pipelined request), shared by the connection's task and the
//! request body that the proxy reads (see [`super::body`]).

use std::io::{self, IoSlice};
use std::sync::{Mutex, MutexGuard, PoisonError};
use std::task::{Context, Poll};
use std::time::Duration;

use bytes::BytesMut;
use tokio::io::Interest;
use tokio::net::TcpStream;

use crate::http1::{Chunked, Step};

/// How much room a read asks for.
pub const READ_CHUNK: usize = 16 * 1024;

/// Where the current request's body is.
#[derive(Debug)]
pub enum BodyState {
    /// This many bytes are left.
    Length(u64),
    Chunked(Chunked),
    /// Read to its end.
    Done,
    /// Its framing broke or the client went away within it: the
    /// connection cannot carry another request.
    Broken,
}

impl BodyState {
    pub fn is_done(&self) -> bool {
        matches!(self, BodyState::Done | BodyState::Length(0))
    }
}

/// What has been read and where the current request stands.
pub struct Inbound {
    pub buf: BytesMut,
    /// Which request of the connection `body` is: a body handed out for
    /// an earlier one (held somewhere past its answer) reads nothing of a
    /// later one's.
    pub request: u64,
    pub body: BodyState,
    /// Bytes of `100 Continue` still to write before reading the body.
    pub continue_left: usize,
    /// The answer's head has started: no `100 Continue` any more.
    pub responded: bool,
}

/// What the buffer holds of the current request's body.
pub enum Buffered {
    /// Some of it (never empty).
    Data(bytes::Bytes),
    /// Its end: the body has been read whole.
    End,
    /// Nothing more yet: read from the socket, then look again.
    Empty,
}

impl Inbound {
    /// Takes the next piece of the current body off the buffer, by its
    /// framing; the one reading of a body's bytes, for the body as the
    /// proxy polls it and for what is left of it once the answer is ready.
    /// A framing error marks the body broken.
    pub fn take_buffered(&mut self) -> Result<Buffered, crate::http1::FramingError> {
        let taken = match &mut self.body {
            BodyState::Done | BodyState::Length(0) => None,
            BodyState::Broken => {
                return Err(crate::http1::FramingError(
                    "the request body was broken off",
                ))
            }
            BodyState::Length(_) if self.buf.is_empty() => return Ok(Buffered::Empty),
            BodyState::Length(left) => {
                let take = (*left).min(self.buf.len() as u64);
                *left -= take;
                Some(self.buf.split_to(take as usize).freeze())
            }
            BodyState::Chunked(chunked) => match chunked.step(&mut self.buf) {
                Ok(Step::Data(data)) => Some(data),
                Ok(Step::End) => None,
                Ok(Step::More) => return Ok(Buffered::Empty),
                Err(e) => {
                    self.body = BodyState::Broken;
                    return Err(e);
                }
            },
        };
        match taken {
            Some(data) => {
                if matches!(self.body, BodyState::Length(0)) {
                    self.body = BodyState::Done;
                }
                Ok(Buffered::Data(data))
            }
            None => {
                self.body = BodyState::Done;
                Ok(Buffered::End)
            }
        }
    }
}

pub struct Wire {
    pub stream: TcpStream,
    inbound: Mutex<Inbound>,
}

pub const CONTINUE: &[u8] = b"HTTP/1.1 100 Continue\r\n\r\n";

impl Wire {
    pub fn new(stream: TcpStream) -> Wire {
        Wire {
            stream,
            inbound: Mutex::new(Inbound {
                buf: BytesMut::with_capacity(READ_CHUNK),
                request: 0,
                body: BodyState::Done,
                continue_left: 0,
                responded: false,
            }),
        }
    }

    /// The read side. Never held across an await: the connection's task
    /// and the request body take turns, on one thread.
    pub fn inbound(&self) -> MutexGuard<'_, Inbound> {
        self.inbound.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// Reads what the socket has into `buf` without waiting: `Ok(0)` at
    /// EOF, `WouldBlock` when nothing is there.
    ///
    /// A read that does not fill the room it was given drained the socket
    /// (edge-triggered epoll): its readiness is dropped then, so the next
    /// read waits for the reactor instead of asking the kernel for nothing
    /// (one `EAGAIN` `recvfrom` per request otherwise). tokio's own
    /// `poll_read` does the same; its `try_read_buf` does not. A close
    /// stays seen: tokio keeps the closed state when readiness is dropped.
    pub fn try_fill(&self, buf: &mut BytesMut) -> io::Result<usize> {
        if buf.capacity() - buf.len() < 1024 {
            buf.reserve(READ_CHUNK);
        }
        let room = buf.capacity() - buf.len();
        let n = self.stream.try_read_buf(buf)?;
        if n > 0 && n < room {
            let _ = self.stream.try_io(Interest::READABLE, || {
                Err::<(), _>(io::ErrorKind::WouldBlock.into())
            });
        }
        Ok(n)
    }

    /// Reads into `buf`, waiting for the socket in `cx`.
    pub fn poll_fill(&self, buf: &mut BytesMut, cx: &mut Context<'_>) -> Poll<io::Result<usize>> {
        loop {
            match self.try_fill(buf) {
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => {}
                done => return Poll::Ready(done),
            }
            std::task::ready!(self.stream.poll_read_ready(cx))?;
        }
    }

    /// Writes `bufs` whole. A write that makes no progress for `timeout`
    /// (a peer that stopped reading, its window and our send buffer full)
    /// fails, and the socket is set to close with a reset, so the kernel
    /// drops what it still holds for the peer at once.
    pub async fn write_all(
        &self,
        mut bufs: &mut [IoSlice<'_>],
        timeout: Duration,
    ) -> io::Result<()> {
        while !bufs.is_empty() {
            let wrote = if bufs.len() == 1 {
                self.stream.try_write(&bufs[0])
            } else {
                self.stream.try_write_vectored(bufs)
            };
            match wrote {
                Ok(0) => return Err(io::ErrorKind::WriteZero.into()),
                Ok(n) => IoSlice::advance_slices(&mut bufs, n),
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => {
                    if tokio::time::timeout(timeout, self.stream.writable())
                        .await
                        .is_err()
                    {
                        let _ = self.stream.set_zero_linger();
                        tracing::debug!(
                            peer = ?self.stream.peer_addr().ok(),
                            "closing a connection: its peer read nothing for write_timeout"
                        );
                        return Err(io::Error::new(
                            io::ErrorKind::TimedOut,
                            "the peer read nothing for write_timeout",
                        ));
                    }
                }
                Err(e) => return Err(e),
            }
        }
        Ok(())
    }

    /// Writes what is left of `100 Continue`, waiting for the socket in `cx`.
    pub fn poll_continue(
        &self,
        inbound: &mut Inbound,
        cx: &mut Context<'_>,
    ) -> Poll<io::Result<()>> {
        while inbound.continue_left > 0 {
            let from = CONTINUE.len() - inbound.continue_left;
            match self.stream.try_write(&CONTINUE[from..]) {
                Ok(0) => return Poll::Ready(Err(io::ErrorKind::WriteZero.into())),
                Ok(n) => inbound.continue_left -= n,
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => {
                    std::task::ready!(self.stream.poll_write_ready(cx))?;
                }
                Err(e) => return Poll::Ready(Err(e)),
            }
        }
        Poll::Ready(Ok(()))
    }

    /// Closes the connection after an answer that left the client's bytes
    /// unread (a request body, a refused head): the write side first, then
    /// what still arrives is read and dropped for a short while, so that
    /// closing on unread bytes (a reset) does not destroy the answer
    /// before the client has read it.
    pub async fn linger(&self) {
        let _ = socket2::SockRef::from(&self.stream).shutdown(std::net::Shutdown::Write);
        let mut sink = BytesMut::with_capacity(READ_CHUNK);
        let mut left = LINGER_BYTES;
        let _ = tokio::time::timeout(LINGER, async {
            while left > 0 {
                sink.clear();
                match std::future::poll_fn(|cx| self.poll_fill(&mut sink, cx)).await {
                    Ok(0) | Err(_) => return,
                    Ok(n) => left = left.saturating_sub(n),
                }
            }
        })
        .await;
    }
}

/// How long, and for how many bytes, [`Wire::linger`] reads.
const LINGER: Duration = Duration::from_secs(2);
const LINGER_BYTES: usize = 1 << 20;
