//! A client's request body, followed by its framing, capped, and cut off below a minimum
//! rate (after a grace period), so that a slow or endless body cannot hold a connection
//! and its upstream forever.

use bytes::{Bytes, BytesMut};
use tokio::time::{timeout_at, Duration, Instant};

use crate::proxy::{
    context::Refusal,
    h1::{fill, BodyDecoder, Framing, ReadError},
    session::Conn,
};

pub struct BodyIn {
    decoder: BodyDecoder,
    cap: u64,
    min_rate: u64,
    grace: Duration,
    /// When ewsgate first waited for the body. A body that came with its head, as most do,
    /// is read without a wait and without a clock reading.
    started: Option<Instant>,
    /// Body bytes read so far.
    pub bytes: u64,
}

impl BodyIn {
    pub fn new(framing: Framing, cap: u64, min_rate: u64, grace: Duration) -> BodyIn {
        BodyIn {
            decoder: BodyDecoder::new(framing),
            cap,
            min_rate,
            grace,
            started: None,
            bytes: 0,
        }
    }

    pub fn is_done(&self) -> bool {
        self.decoder.is_done()
    }

    /// When the bytes seen so far stop covering the minimum rate.
    fn deadline(&mut self) -> Instant {
        let earned = match self.min_rate {
            0 => Duration::from_secs(86_400 * 365),
            rate => Duration::from_secs_f64(self.bytes as f64 / rate as f64),
        };
        *self.started.get_or_insert_with(Instant::now) + self.grace.max(earned)
    }

    /// The next piece of the body; `None` once it has ended.
    pub async fn next(&mut self, conn: &mut Conn) -> Result<Option<Bytes>, Refusal> {
        loop {
            if let Some(data) = self
                .decoder
                .decode(&mut conn.buf)
                .map_err(|e| Refusal::protocol(400, e.reason()))?
            {
                self.bytes += data.len() as u64;
                if self.bytes > self.cap {
                    return Err(Refusal::protocol(413, "body_too_large"));
                }
                return Ok(Some(data));
            }
            if self.decoder.is_done() {
                return Ok(None);
            }
            let read = timeout_at(self.deadline(), fill(&mut conn.tls, &mut conn.buf)).await;
            match read {
                Err(_) => return Err(Refusal::protocol(408, "body_too_slow")),
                Ok(Err(_)) => return Err(Refusal::protocol(400, "body_unreadable")),
                Ok(Ok(0)) => {
                    return match self.decoder.finish_at_eof() {
                        Ok(()) => Ok(None),
                        Err(ReadError::Truncated) | Err(_) => {
                            Err(Refusal::protocol(400, "body_truncated"))
                        }
                    }
                }
                Ok(Ok(_)) => {}
            }
        }
    }

    /// Reads up to `limit` bytes of the body into one buffer; says whether that was all.
    pub async fn read_upto(
        &mut self,
        conn: &mut Conn,
        limit: usize,
    ) -> Result<(Bytes, bool), Refusal> {
        let mut out = BytesMut::new();
        while out.len() < limit {
            match self.next(conn).await? {
                Some(d) if out.is_empty() && d.len() >= limit => return Ok((d, self.is_done())),
                Some(d) => out.extend_from_slice(&d),
                None => return Ok((out.freeze(), true)),
            }
        }
        Ok((out.freeze(), self.is_done()))
    }

    /// Reads and drops the rest of the body, so the connection can carry the next request.
    pub async fn drain(&mut self, conn: &mut Conn) -> Result<(), Refusal> {
        while self.next(conn).await?.is_some() {}
        Ok(())
    }
}
