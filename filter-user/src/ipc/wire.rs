//! Frames on a Unix stream socket: a 4-byte big-endian length, a count of descriptors, then
//! that many bytes of JSON. Descriptors travel with SCM_RIGHTS on the frame's first bytes;
//! the receiver queues every descriptor it is handed and gives a frame exactly the count
//! the frame announces, so a peer cannot make a frame claim descriptors it did not send.

use std::{
    collections::VecDeque,
    io::{self, IoSlice, IoSliceMut},
    mem::MaybeUninit,
    os::fd::{AsFd, BorrowedFd, OwnedFd},
};

use bytes::{Buf, BytesMut};
use rustix::net::{
    recvmsg, sendmsg, RecvAncillaryBuffer, RecvAncillaryMessage, RecvFlags, SendAncillaryBuffer,
    SendAncillaryMessage, SendFlags,
};
use serde::{de::DeserializeOwned, Serialize};
use tokio::{io::Interest, net::UnixStream};

/// Descriptors one frame may carry.
pub const MAX_FDS: usize = 32;
const HEADER: usize = 5;

#[derive(Debug, thiserror::Error)]
pub enum WireError {
    #[error("the peer closed the connection")]
    Closed,
    #[error("frame of {0} bytes is over the limit of {1}")]
    TooLarge(usize, usize),
    #[error("frame announces {0} descriptors, over the limit of {MAX_FDS}")]
    TooManyFds(usize),
    #[error("frame announces {0} descriptors but {1} arrived")]
    MissingFds(usize, usize),
    #[error("bad message: {0}")]
    Json(#[from] serde_json::Error),
    #[error("{0}")]
    Io(#[from] io::Error),
}

/// Serialises `msg` into one frame.
pub fn encode<T: Serialize>(msg: &T, fds: usize) -> Result<Vec<u8>, WireError> {
    if fds > MAX_FDS {
        return Err(WireError::TooManyFds(fds));
    }
    let mut out = vec![0u8; HEADER];
    serde_json::to_writer(&mut out, msg)?;
    let len = (out.len() - HEADER) as u32;
    out[..4].copy_from_slice(&len.to_be_bytes());
    out[4] = fds as u8;
    Ok(out)
}

/// Writes a whole frame; the descriptors go with its first bytes.
pub async fn send_frame(
    stream: &UnixStream,
    frame: &[u8],
    fds: &[BorrowedFd<'_>],
) -> Result<(), WireError> {
    let mut sent = 0;
    while sent < frame.len() {
        stream.writable().await?;
        let with_fds = if sent == 0 { fds } else { &[] };
        match stream.try_io(Interest::WRITABLE, || {
            send_some(stream, &frame[sent..], with_fds)
        }) {
            Ok(n) => sent += n,
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => continue,
            Err(e) => return Err(e.into()),
        }
    }
    Ok(())
}

fn send_some(stream: &UnixStream, bytes: &[u8], fds: &[BorrowedFd<'_>]) -> io::Result<usize> {
    let mut space = [MaybeUninit::uninit(); rustix::cmsg_space!(ScmRights(MAX_FDS))];
    let mut cmsg = SendAncillaryBuffer::new(&mut space);
    if !fds.is_empty() && !cmsg.push(SendAncillaryMessage::ScmRights(fds)) {
        return Err(io::Error::other("too many descriptors for one frame"));
    }
    let n = sendmsg(
        stream.as_fd(),
        &[IoSlice::new(bytes)],
        &mut cmsg,
        SendFlags::NOSIGNAL,
    )?;
    Ok(n)
}

/// The sending side of a link: whole frames, one at a time, from any task.
pub struct Writer {
    stream: std::sync::Arc<UnixStream>,
    lock: tokio::sync::Mutex<()>,
}

impl Writer {
    pub fn new(stream: std::sync::Arc<UnixStream>) -> Writer {
        Writer {
            stream,
            lock: tokio::sync::Mutex::new(()),
        }
    }

    pub async fn send<T: Serialize>(
        &self,
        msg: &T,
        fds: &[BorrowedFd<'_>],
    ) -> Result<(), WireError> {
        let frame = encode(msg, fds.len())?;
        let _one = self.lock.lock().await;
        send_frame(&self.stream, &frame, fds).await
    }
}

/// The receiving side of a link: bytes and descriptors as they arrive, frames out.
pub struct Receiver {
    buf: BytesMut,
    fds: VecDeque<OwnedFd>,
    max_frame: usize,
}

impl Receiver {
    pub fn new(max_frame: usize) -> Receiver {
        Receiver {
            buf: BytesMut::new(),
            fds: VecDeque::new(),
            max_frame,
        }
    }

    /// The next message and the descriptors that came with it.
    pub async fn recv<T: DeserializeOwned>(
        &mut self,
        stream: &UnixStream,
    ) -> Result<(T, Vec<OwnedFd>), WireError> {
        loop {
            if let Some(frame) = self.frame()? {
                return Ok(frame);
            }
            stream.readable().await?;
            match stream.try_io(Interest::READABLE, || self.read_some(stream)) {
                Ok(0) => return Err(WireError::Closed),
                Ok(_) => {}
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => {}
                Err(e) => return Err(e.into()),
            }
        }
    }

    fn read_some(&mut self, stream: &UnixStream) -> io::Result<usize> {
        let mut chunk = [0u8; 64 * 1024];
        let mut space = [MaybeUninit::uninit(); rustix::cmsg_space!(ScmRights(MAX_FDS))];
        let mut cmsg = RecvAncillaryBuffer::new(&mut space);
        let got = recvmsg(
            stream.as_fd(),
            &mut [IoSliceMut::new(&mut chunk)],
            &mut cmsg,
            RecvFlags::CMSG_CLOEXEC,
        )?;
        for msg in cmsg.drain() {
            if let RecvAncillaryMessage::ScmRights(fds) = msg {
                self.fds.extend(fds);
            }
        }
        self.buf.extend_from_slice(&chunk[..got.bytes]);
        Ok(got.bytes)
    }

    /// A complete frame from what has arrived, if there is one.
    fn frame<T: DeserializeOwned>(&mut self) -> Result<Option<(T, Vec<OwnedFd>)>, WireError> {
        if self.buf.len() < HEADER {
            return Ok(None);
        }
        let len = u32::from_be_bytes([self.buf[0], self.buf[1], self.buf[2], self.buf[3]]) as usize;
        let nfds = self.buf[4] as usize;
        if len > self.max_frame {
            return Err(WireError::TooLarge(len, self.max_frame));
        }
        if nfds > MAX_FDS {
            return Err(WireError::TooManyFds(nfds));
        }
        if self.buf.len() < HEADER + len {
            return Ok(None);
        }
        if self.fds.len() < nfds {
            return Err(WireError::MissingFds(nfds, self.fds.len()));
        }
        self.buf.advance(HEADER);
        let body = self.buf.split_to(len);
        let fds = self.fds.drain(..nfds).collect();
        let msg = serde_json::from_slice(&body)?;
        Ok(Some((msg, fds)))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::fd::AsRawFd;

    #[tokio::test]
    async fn frames_carry_messages_and_descriptors() {
        let (a, b) = UnixStream::pair().unwrap();
        let file = std::fs::File::open("/dev/null").unwrap();
        let frame = encode(&serde_json::json!({"hello": 1}), 1).unwrap();
        send_frame(&a, &frame, &[file.as_fd()]).await.unwrap();
        let frame = encode(&serde_json::json!({"second": [1, 2, 3]}), 0).unwrap();
        send_frame(&a, &frame, &[]).await.unwrap();
        let mut rx = Receiver::new(1 << 20);
        let (m, fds): (serde_json::Value, _) = rx.recv(&b).await.unwrap();
        assert_eq!(m["hello"], 1);
        assert_eq!(fds.len(), 1);
        assert!(fds[0].as_raw_fd() >= 0);
        let (m, fds): (serde_json::Value, _) = rx.recv(&b).await.unwrap();
        assert_eq!(m["second"][2], 3);
        assert!(fds.is_empty());
        drop(a);
        assert!(matches!(
            rx.recv::<serde_json::Value>(&b).await,
            Err(WireError::Closed)
        ));
    }

    #[tokio::test]
    async fn lies_and_oversized_frames_are_refused() {
        let (a, b) = UnixStream::pair().unwrap();
        // Announces two descriptors and sends none.
        let frame = encode(&1, 2).unwrap();
        send_frame(&a, &frame, &[]).await.unwrap();
        let mut rx = Receiver::new(1 << 20);
        assert!(matches!(
            rx.recv::<u32>(&b).await,
            Err(WireError::MissingFds(2, 0))
        ));
        let (a, b) = UnixStream::pair().unwrap();
        send_frame(&a, &[0xff, 0xff, 0xff, 0xff, 0], &[])
            .await
            .unwrap();
        let mut rx = Receiver::new(1 << 20);
        assert!(matches!(
            rx.recv::<u32>(&b).await,
            Err(WireError::TooLarge(_, _))
        ));
        let (a, b) = UnixStream::pair().unwrap();
        send_frame(&a, b"\0\0\0\x03\0{{{", &[]).await.unwrap();
        let mut rx = Receiver::new(1 << 20);
        assert!(matches!(rx.recv::<u32>(&b).await, Err(WireError::Json(_))));
    }
}
