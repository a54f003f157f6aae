//! Bodies streamed through the proxy, never held whole: the request body is capped and
//! must keep a minimum rate; the response body is counted, and its end writes the audit
//! line for the exchange.

use std::{
    future::Future,
    pin::Pin,
    sync::{
        atomic::{AtomicU64, AtomicU8, Ordering},
        Arc,
    },
    task::{Context, Poll},
    time::Duration,
};

use bytes::Bytes;
use http_body::{Body, Frame, SizeHint};
use tokio::time::{sleep_until, Instant, Sleep};

use crate::ops::audit::{Audit, Record};

pub type BoxError = Box<dyn std::error::Error + Send + Sync>;

/// Why a request body was cut off (0: it was not).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[repr(u8)]
pub enum Cut {
    None = 0,
    TooLarge = 1,
    TooSlow = 2,
    /// What followed the classified part of a SOAP request was not bulk content.
    BulkContent = 3,
}

/// Shared between the body in flight and the request handler.
#[derive(Default)]
pub struct BodyStats {
    pub bytes: AtomicU64,
    cut: AtomicU8,
}

impl BodyStats {
    pub fn mark(&self, why: Cut) {
        self.cut.store(why as u8, Ordering::Relaxed);
    }

    pub fn cut(&self) -> Cut {
        match self.cut.load(Ordering::Relaxed) {
            1 => Cut::TooLarge,
            2 => Cut::TooSlow,
            3 => Cut::BulkContent,
            _ => Cut::None,
        }
    }
}

pub struct GuardedBody<B> {
    inner: B,
    cap: u64,
    min_rate: u64,
    grace: Duration,
    started: Instant,
    timer: Pin<Box<Sleep>>,
    stats: Arc<BodyStats>,
}

impl<B> GuardedBody<B> {
    pub fn new(inner: B, cap: u64, min_rate: u64, grace: Duration, stats: Arc<BodyStats>) -> Self {
        let started = Instant::now();
        GuardedBody {
            inner,
            cap,
            min_rate,
            grace,
            started,
            timer: Box::pin(sleep_until(started + grace)),
            stats,
        }
    }

    /// When the bytes seen so far stop covering the minimum rate.
    fn deadline(&self) -> Instant {
        let bytes = self.stats.bytes.load(Ordering::Relaxed);
        let earned = match self.min_rate {
            0 => Duration::from_secs(86_400 * 365),
            rate => Duration::from_secs_f64(bytes as f64 / rate as f64),
        };
        self.started + self.grace.max(earned)
    }

    fn cut(&self, why: Cut, message: &'static str) -> Poll<Option<Result<Frame<Bytes>, BoxError>>> {
        self.stats.cut.store(why as u8, Ordering::Relaxed);
        Poll::Ready(Some(Err(message.into())))
    }
}

impl<B> Body for GuardedBody<B>
where
    B: Body<Data = Bytes> + Unpin,
    B::Error: Into<BoxError>,
{
    type Data = Bytes;
    type Error = BoxError;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, BoxError>>> {
        match Pin::new(&mut self.inner).poll_frame(cx) {
            Poll::Ready(Some(Ok(frame))) => {
                if let Some(data) = frame.data_ref() {
                    let total = self
                        .stats
                        .bytes
                        .fetch_add(data.len() as u64, Ordering::Relaxed)
                        + data.len() as u64;
                    if total > self.cap {
                        return self.cut(Cut::TooLarge, "request body over its cap");
                    }
                }
                Poll::Ready(Some(Ok(frame)))
            }
            Poll::Ready(Some(Err(e))) => Poll::Ready(Some(Err(e.into()))),
            Poll::Ready(None) => Poll::Ready(None),
            Poll::Pending => loop {
                if self.timer.as_mut().poll(cx).is_pending() {
                    return Poll::Pending;
                }
                let due = self.deadline();
                if due <= Instant::now() {
                    return self.cut(Cut::TooSlow, "request body below the minimum rate");
                }
                self.timer.as_mut().reset(due);
            },
        }
    }

    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        self.inner.size_hint()
    }
}

/// The response body: counts bytes and writes the audit record when it ends or is dropped.
pub struct AuditedBody<B> {
    inner: B,
    record: Option<Record>,
    audit: Audit,
    started: std::time::Instant,
    bytes_in: Arc<BodyStats>,
}

impl<B> AuditedBody<B> {
    pub fn new(
        inner: B,
        record: Record,
        audit: Audit,
        started: std::time::Instant,
        bytes_in: Arc<BodyStats>,
    ) -> Self {
        AuditedBody {
            inner,
            record: Some(record),
            audit,
            started,
            bytes_in,
        }
    }

    fn finish(&mut self, complete: bool) {
        if let Some(mut r) = self.record.take() {
            r.duration_ms = self.started.elapsed().as_secs_f64() * 1000.0;
            r.bytes_in = self.bytes_in.bytes.load(Ordering::Relaxed);
            if !complete && r.reason == "forwarded" {
                r.reason = "response_cut_short".into();
            }
            self.audit.log(r);
        }
    }
}

impl<B> Drop for AuditedBody<B> {
    fn drop(&mut self) {
        self.finish(false);
    }
}

impl<B> Body for AuditedBody<B>
where
    B: Body<Data = Bytes> + Unpin,
{
    type Data = Bytes;
    type Error = B::Error;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, B::Error>>> {
        let r = Pin::new(&mut self.inner).poll_frame(cx);
        match &r {
            Poll::Ready(Some(Ok(frame))) => {
                if let (Some(data), Some(rec)) = (frame.data_ref(), self.record.as_mut()) {
                    rec.bytes_out += data.len() as u64;
                }
                if self.inner.is_end_stream() {
                    self.finish(true);
                }
            }
            Poll::Ready(None) => self.finish(true),
            _ => {}
        }
        r
    }

    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        self.inner.size_hint()
    }
}
