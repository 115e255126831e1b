//! A body that fails when nothing of it comes for a while: the caller's
//! request body (`server.body_read_timeout`, [`BodyReadTimeout`]) and the
//! upstream's answer (the provider's `request_timeout`, [`BodyStalled`]).
//!
//! A no-progress limit, not a total one: a slow body that keeps coming is
//! never cut off, and time its reader spends not asking (the upstream slow
//! to take a request body, the client slow to read an answer) does not
//! count. The timer is made the first time a poll finds nothing to read and
//! reset after that, so a body read whole at once costs none.

use std::future::Future as _;
use std::pin::Pin;
use std::task::{Context, Poll};
use std::time::Duration;

use http_body::{Body, Frame, SizeHint};
use tokio::time::{Instant, Sleep};

type BoxError = Box<dyn std::error::Error + Send + Sync>;

/// A request body that made no progress for `server.body_read_timeout`.
#[derive(Debug, thiserror::Error)]
#[error("the request body made no progress for server.body_read_timeout")]
pub struct BodyReadTimeout;

/// The upstream sent nothing of a body for the provider's `request_timeout`.
#[derive(Debug, thiserror::Error)]
#[error("the upstream sent nothing of the body for {0:?}")]
pub struct BodyStalled(pub Duration);

pin_project_lite::pin_project! {
    /// `inner`, failing with `silent(timeout)` when no frame has come for
    /// `timeout` while its reader waits.
    pub struct Silence<B> {
        #[pin]
        inner: B,
        timeout: Duration,
        silent: fn(Duration) -> BoxError,
        // Made at the first wait; armed while the reader waits.
        timer: Option<Pin<Box<Sleep>>>,
        armed: bool,
    }
}

impl<B> Silence<B> {
    pub fn new(inner: B, timeout: Duration, silent: fn(Duration) -> BoxError) -> Silence<B> {
        Silence {
            inner,
            timeout,
            silent,
            timer: None,
            armed: false,
        }
    }

    /// A request body, failing with [`BodyReadTimeout`].
    pub fn request(inner: B, timeout: Duration) -> Silence<B> {
        Silence::new(inner, timeout, |_| Box::new(BodyReadTimeout))
    }

    /// An upstream's answer, failing with [`BodyStalled`].
    pub fn answer(inner: B, timeout: Duration) -> Silence<B> {
        Silence::new(inner, timeout, |t| Box::new(BodyStalled(t)))
    }
}

impl<B> Body for Silence<B>
where
    B: Body,
    B::Error: Into<BoxError>,
{
    type Data = B::Data;
    type Error = BoxError;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Self::Data>, Self::Error>>> {
        let this = self.project();
        if let Poll::Ready(frame) = this.inner.poll_frame(cx) {
            *this.armed = false;
            return Poll::Ready(frame.map(|f| f.map_err(Into::into)));
        }
        let deadline = Instant::now() + *this.timeout;
        let timer = match this.timer {
            Some(timer) => {
                if !*this.armed {
                    timer.as_mut().reset(deadline);
                }
                timer
            }
            None => this
                .timer
                .insert(Box::pin(tokio::time::sleep_until(deadline))),
        };
        *this.armed = true;
        match timer.as_mut().poll(cx) {
            Poll::Ready(()) => Poll::Ready(Some(Err((this.silent)(*this.timeout)))),
            Poll::Pending => Poll::Pending,
        }
    }

    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        self.inner.size_hint()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use bytes::Bytes;
    use http_body_util::BodyExt;

    /// A body that yields one frame, then waits forever.
    struct OneThenSilence(Option<Bytes>);

    impl Body for OneThenSilence {
        type Data = Bytes;
        type Error = std::convert::Infallible;
        fn poll_frame(
            mut self: Pin<&mut Self>,
            _: &mut Context<'_>,
        ) -> Poll<Option<Result<Frame<Bytes>, Self::Error>>> {
            match self.0.take() {
                Some(b) => Poll::Ready(Some(Ok(Frame::data(b)))),
                None => Poll::Pending,
            }
        }
    }

    #[tokio::test(start_paused = true)]
    async fn silence_after_progress_fails_with_the_bodys_own_error() {
        let mut body = Silence::answer(
            OneThenSilence(Some(Bytes::from_static(b"abc"))),
            Duration::from_secs(5),
        );
        let first = body.frame().await.expect("a frame").expect("data");
        assert_eq!(first.into_data().expect("data"), "abc");
        let started = Instant::now();
        let err = body.frame().await.expect("an end").expect_err("silence");
        assert!(err.is::<BodyStalled>(), "{err}");
        assert_eq!(started.elapsed(), Duration::from_secs(5));

        let mut body = Silence::request(OneThenSilence(None), Duration::from_secs(2));
        let err = body.frame().await.expect("an end").expect_err("silence");
        assert!(err.is::<BodyReadTimeout>(), "{err}");
    }
}
