//! The HTTP server for `/metrics`, `/healthz` and `/readyz`, with bounded connections.

use super::registry::Metrics;
use axum::Router;
use axum::http::StatusCode;
use axum::response::IntoResponse;
use axum::routing::get;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll};
use std::time::Duration;
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::{TcpListener, TcpStream};
use tokio::time::{Instant, Sleep};

/// The log target from before the module layout of issue 10, kept so users' log filters still
/// match.
const LOG_TARGET: &str = "kube_netpol_iptables::metrics";

/// The default for `--metrics-bind-address`. Clear of kube-proxy (10249, 10256), kubelet
/// (10248, 10250, 10255), node-exporter (9100) and kube-network-policies (9080).
pub const DEFAULT_BIND: &str = "0.0.0.0:9847";

pub fn router(metrics: Arc<Metrics>) -> Router {
    let (m1, m2, m3) = (metrics.clone(), metrics.clone(), metrics);
    Router::new()
        .route(
            "/metrics",
            get(move || async move {
                (
                    [(
                        axum::http::header::CONTENT_TYPE,
                        "application/openmetrics-text; version=1.0.0; charset=utf-8",
                    )],
                    m1.render(),
                )
            }),
        )
        .route(
            "/healthz",
            get(move || async move {
                status(
                    m2.healthy()
                        .then_some(())
                        .ok_or_else(|| "sync loop stalled".into()),
                )
            }),
        )
        .route(
            "/readyz",
            get(move || async move {
                match m3.readiness() {
                    Ok(()) => (StatusCode::OK, format!("ok{}", m3.readiness_detail())),
                    Err(why_not) => (StatusCode::SERVICE_UNAVAILABLE, why_not),
                }
            }),
        )
}

fn status(result: Result<(), String>) -> impl IntoResponse {
    match result {
        Ok(()) => (StatusCode::OK, "ok".to_string()),
        Err(why_not) => (StatusCode::SERVICE_UNAVAILABLE, why_not),
    }
}

/// Most connections kept open at once. A new connection beyond it closes the one that has been
/// quiet longest, so idle or trickling clients can neither take the file descriptors a sync needs
/// nor keep the kubelet's probes out.
pub const MAX_CONNECTIONS: usize = 64;
/// A connection that moves no byte for this long (an idle keep-alive, a stalled request or a
/// client not reading its response) is closed.
pub const IDLE_TIMEOUT: Duration = Duration::from_secs(10);
/// No connection lives longer than this, however slowly it trickles bytes.
pub const MAX_CONNECTION_AGE: Duration = Duration::from_secs(60);

/// Serves the endpoints until the process ends. Binding fails loudly (a port clash is a
/// deployment error the operator must see).
pub async fn serve(bind: SocketAddr, metrics: Arc<Metrics>) -> anyhow::Result<()> {
    let listener = TcpListener::bind(bind)
        .await
        .map_err(|e| anyhow::anyhow!("cannot listen on --metrics-bind-address {bind}: {e}"))?;
    tracing::info!(target: LOG_TARGET, %bind, "serving /metrics, /healthz and /readyz");
    let listener = LimitedListener {
        inner: listener,
        open: Arc::new(OpenConnections {
            since: Instant::now(),
            slots: Mutex::new(Vec::new()),
            closed: tokio::sync::Notify::new(),
        }),
    };
    axum::serve(listener, router(metrics)).await?;
    Ok(())
}

/// Keeps at most `MAX_CONNECTIONS` connections open and times them out.
struct LimitedListener {
    inner: TcpListener,
    open: Arc<OpenConnections>,
}

struct OpenConnections {
    since: Instant,
    /// Every connection not yet dropped, evicted ones included (they still hold a descriptor).
    slots: Mutex<Vec<Arc<Slot>>>,
    /// Signalled when a connection is dropped.
    closed: tokio::sync::Notify,
}

/// Evicted connections still closing: the listener waits for them rather than exceed
/// `MAX_CONNECTIONS` by more than this.
const CLOSING_AT_MOST: usize = 16;

/// One open connection, as the listener sees it.
struct Slot {
    /// When it last moved a byte, in milliseconds after `OpenConnections::since`.
    last_active: AtomicU64,
    /// Closed to make room for a newer connection.
    evicted: AtomicBool,
    waker: futures::task::AtomicWaker,
}

impl OpenConnections {
    fn now(&self) -> u64 {
        self.since.elapsed().as_millis() as u64
    }

    /// Registers a new connection, evicting the quietest one when all slots are taken.
    fn admit(&self) -> Arc<Slot> {
        let mut slots = self.slots.lock().unwrap_or_else(|e| e.into_inner());
        let serving = |s: &&Arc<Slot>| !s.evicted.load(Ordering::Relaxed);
        if slots.iter().filter(serving).count() >= MAX_CONNECTIONS
            && let Some(quietest) = slots
                .iter()
                .filter(serving)
                .min_by_key(|s| s.last_active.load(Ordering::Relaxed))
        {
            quietest.evicted.store(true, Ordering::Relaxed);
            quietest.waker.wake();
        }
        let slot = Arc::new(Slot {
            last_active: AtomicU64::new(self.now()),
            evicted: AtomicBool::new(false),
            waker: Default::default(),
        });
        slots.push(slot.clone());
        slot
    }

    fn release(&self, slot: &Arc<Slot>) {
        let mut slots = self.slots.lock().unwrap_or_else(|e| e.into_inner());
        slots.retain(|s| !Arc::ptr_eq(s, slot));
        self.closed.notify_one();
    }

    fn count(&self) -> usize {
        self.slots.lock().unwrap_or_else(|e| e.into_inner()).len()
    }
}

impl axum::serve::Listener for LimitedListener {
    type Io = TimedStream;
    type Addr = SocketAddr;

    async fn accept(&mut self) -> (TimedStream, SocketAddr) {
        loop {
            let closed = self.open.closed.notified();
            if self.open.count() < MAX_CONNECTIONS + CLOSING_AT_MOST {
                break;
            }
            closed.await;
        }
        let (stream, addr) = axum::serve::Listener::accept(&mut self.inner).await;
        let now = Instant::now();
        (
            TimedStream {
                stream,
                slot: self.open.admit(),
                open: self.open.clone(),
                closes_at: now + MAX_CONNECTION_AGE,
                timer: Box::pin(tokio::time::sleep_until(now + IDLE_TIMEOUT)),
            },
            addr,
        )
    }

    fn local_addr(&self) -> std::io::Result<SocketAddr> {
        self.inner.local_addr()
    }
}

/// A connection that fails with `TimedOut` once it has moved no byte for `IDLE_TIMEOUT`, has been
/// open for `MAX_CONNECTION_AGE`, or was evicted, whenever it waits for its peer.
struct TimedStream {
    stream: TcpStream,
    slot: Arc<Slot>,
    open: Arc<OpenConnections>,
    closes_at: Instant,
    timer: Pin<Box<Sleep>>,
}

impl Drop for TimedStream {
    fn drop(&mut self) {
        self.open.release(&self.slot);
    }
}

impl TimedStream {
    fn progressed(&mut self) {
        let deadline = (Instant::now() + IDLE_TIMEOUT).min(self.closes_at);
        self.timer.as_mut().reset(deadline);
        self.slot
            .last_active
            .store(self.open.now(), Ordering::Relaxed);
    }

    /// Called when the peer keeps us waiting: an error once the connection should close.
    fn waiting<T>(&mut self, cx: &mut Context<'_>) -> Poll<std::io::Result<T>> {
        self.slot.waker.register(cx.waker());
        let why = if self.slot.evicted.load(Ordering::Relaxed) {
            "metrics connection closed to make room for a newer one"
        } else if self.timer.as_mut().poll(cx).is_ready() {
            "metrics connection idle or too old"
        } else {
            return Poll::Pending;
        };
        Poll::Ready(Err(std::io::Error::new(std::io::ErrorKind::TimedOut, why)))
    }
}

impl AsyncRead for TimedStream {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<std::io::Result<()>> {
        let before = buf.filled().len();
        match Pin::new(&mut self.stream).poll_read(cx, buf) {
            Poll::Pending => self.waiting(cx),
            Poll::Ready(Ok(())) => {
                if buf.filled().len() > before {
                    self.progressed();
                }
                Poll::Ready(Ok(()))
            }
            ready => ready,
        }
    }
}

impl AsyncWrite for TimedStream {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<std::io::Result<usize>> {
        match Pin::new(&mut self.stream).poll_write(cx, buf) {
            Poll::Pending => self.waiting(cx),
            Poll::Ready(Ok(n)) => {
                self.progressed();
                Poll::Ready(Ok(n))
            }
            ready => ready,
        }
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        match Pin::new(&mut self.stream).poll_flush(cx) {
            Poll::Pending => self.waiting(cx),
            ready => ready,
        }
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        match Pin::new(&mut self.stream).poll_shutdown(cx) {
            Poll::Pending => self.waiting(cx),
            ready => ready,
        }
    }
}
