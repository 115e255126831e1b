//! A stand-in of an operator's webhook receiver for credproxy's `[notify]`
//! events: it checks each `X-Credproxy-Signature` as a receiver should
//! (HMAC-SHA256 of `t.body`, constant-time compare, `t` within 5 minutes),
//! can refuse its first deliveries with 503 (or be unreachable until it is
//! started), and records what it accepted for the tests to read.

use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use axum::body::Bytes;
use axum::extract::State;
use axum::http::{HeaderMap, StatusCode};
use axum::routing::post;
use axum::Router;
use hmac::{Hmac, Mac};
use sha2::Sha256;
use tokio::sync::Notify;

/// An event the receiver accepted, with what came with it.
#[derive(Debug, Clone)]
pub struct Delivery {
    pub event: serde_json::Value,
    pub body: String,
    pub signature: String,
}

#[derive(Default)]
struct Inner {
    accepted: Vec<Delivery>,
    refused: u64,
    bad_signatures: u64,
    fail_next: u64,
}

struct Shared {
    secret: Vec<u8>,
    inner: Mutex<Inner>,
    changed: Notify,
}

/// The receiver; it stops when dropped.
pub struct Receiver {
    addr: SocketAddr,
    shared: Arc<Shared>,
    task: tokio::task::JoinHandle<()>,
}

impl Drop for Receiver {
    fn drop(&mut self) {
        self.task.abort();
    }
}

/// Checks `header` over `body` as a receiver must. Written apart from
/// credproxy's signer, so the tests check one against the other.
pub fn signature_is_valid(secret: &[u8], header: &str, body: &[u8], now: i64) -> bool {
    let mut t = None;
    let mut v1 = None;
    for part in header.split(',') {
        if let Some(v) = part.strip_prefix("t=") {
            t = v.parse::<i64>().ok();
        } else if let Some(v) = part.strip_prefix("v1=") {
            v1 = Some(v);
        }
    }
    let (Some(t), Some(v1)) = (t, v1) else {
        return false;
    };
    if (now - t).abs() > 300 || v1.len() != 64 {
        return false;
    }
    let Ok(mut mac) = Hmac::<Sha256>::new_from_slice(secret) else {
        return false;
    };
    mac.update(format!("{t}.").as_bytes());
    mac.update(body);
    let mut expected = [0u8; 32];
    for (i, byte) in expected.iter_mut().enumerate() {
        match u8::from_str_radix(&v1[2 * i..2 * i + 2], 16) {
            Ok(b) => *byte = b,
            Err(_) => return false,
        }
    }
    mac.verify_slice(&expected).is_ok()
}

fn unix_now() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_secs() as i64)
        .unwrap_or(0)
}

async fn receive(State(shared): State<Arc<Shared>>, headers: HeaderMap, body: Bytes) -> StatusCode {
    let signature = headers
        .get("x-credproxy-signature")
        .and_then(|v| v.to_str().ok())
        .unwrap_or_default()
        .to_owned();
    let status = {
        let mut inner = shared.inner.lock().unwrap_or_else(|e| e.into_inner());
        if !signature_is_valid(&shared.secret, &signature, &body, unix_now()) {
            inner.bad_signatures += 1;
            StatusCode::UNAUTHORIZED
        } else if inner.fail_next > 0 {
            inner.fail_next -= 1;
            inner.refused += 1;
            StatusCode::SERVICE_UNAVAILABLE
        } else {
            match serde_json::from_slice::<serde_json::Value>(&body) {
                Ok(event) => {
                    inner.accepted.push(Delivery {
                        event,
                        body: String::from_utf8_lossy(&body).into_owned(),
                        signature,
                    });
                    StatusCode::NO_CONTENT
                }
                Err(_) => StatusCode::BAD_REQUEST,
            }
        }
    };
    shared.changed.notify_waiters();
    status
}

impl Receiver {
    /// Listens on `addr` (port 0: any free port) and refuses the first
    /// `fail_first` correctly signed deliveries with 503.
    pub async fn start(
        addr: SocketAddr,
        secret: &str,
        fail_first: u64,
    ) -> std::io::Result<Receiver> {
        let listener = tokio::net::TcpListener::bind(addr).await?;
        let addr = listener.local_addr()?;
        let shared = Arc::new(Shared {
            secret: secret.as_bytes().to_vec(),
            inner: Mutex::new(Inner {
                fail_next: fail_first,
                ..Inner::default()
            }),
            changed: Notify::new(),
        });
        let app = Router::new()
            .route("/events", post(receive))
            .with_state(Arc::clone(&shared));
        let task = tokio::spawn(async move {
            let _ = axum::serve(listener, app).await;
        });
        Ok(Receiver { addr, shared, task })
    }

    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    pub fn url(&self) -> String {
        format!("http://{}/events", self.addr)
    }

    fn inner(&self) -> std::sync::MutexGuard<'_, Inner> {
        self.shared.inner.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Refuse the next `n` deliveries with 503.
    pub fn fail_next(&self, n: u64) {
        self.inner().fail_next = n;
    }

    pub fn accepted(&self) -> Vec<Delivery> {
        self.inner().accepted.clone()
    }

    pub fn refused(&self) -> u64 {
        self.inner().refused
    }

    pub fn bad_signatures(&self) -> u64 {
        self.inner().bad_signatures
    }

    /// Waits until at least `n` deliveries were refused, at most `timeout`.
    pub async fn wait_for_refusals(&self, n: u64, timeout: Duration) -> bool {
        let deadline = tokio::time::Instant::now() + timeout;
        loop {
            let changed = self.shared.changed.notified();
            tokio::pin!(changed);
            changed.as_mut().enable();
            if self.inner().refused >= n {
                return true;
            }
            if tokio::time::timeout_at(deadline, changed).await.is_err() {
                return false;
            }
        }
    }

    /// Waits until an accepted event satisfies `f`, at most `timeout`.
    pub async fn wait_for(
        &self,
        timeout: Duration,
        f: impl Fn(&serde_json::Value) -> bool,
    ) -> Option<Delivery> {
        let deadline = tokio::time::Instant::now() + timeout;
        loop {
            let changed = self.shared.changed.notified();
            tokio::pin!(changed);
            changed.as_mut().enable();
            if let Some(d) = self.inner().accepted.iter().find(|d| f(&d.event)) {
                return Some(d.clone());
            }
            if tokio::time::timeout_at(deadline, changed).await.is_err() {
                return None;
            }
        }
    }
}
