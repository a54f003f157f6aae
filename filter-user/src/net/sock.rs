//! A TCP stream whose writes are socket sends. tokio's stream writes a slice list with
//! `writev`, which is also what rustls hands every TLS record to; on a socket `writev` goes
//! through the file layer (file lookup, position lock, iterator set-up) before it reaches the
//! socket's own send, while `send` and `sendmsg` go there directly. HAProxy and nginx use
//! `send` too. Reads are the stream's own.

use std::{
    io::{self, IoSlice},
    pin::Pin,
    task::{ready, Context, Poll},
};

use rustix::net::{SendAncillaryBuffer, SendFlags};
use tokio::{
    io::{AsyncRead, AsyncWrite, Interest, ReadBuf},
    net::TcpStream,
};

pub struct Sock(TcpStream);

impl Sock {
    pub fn new(tcp: TcpStream) -> Sock {
        Sock(tcp)
    }

    pub fn tcp(&self) -> &TcpStream {
        &self.0
    }

    fn poll_send(&self, cx: &mut Context<'_>, bufs: &[IoSlice<'_>]) -> Poll<io::Result<usize>> {
        loop {
            ready!(self.0.poll_write_ready(cx))?;
            // try_io clears the readiness on WouldBlock, so the next poll waits for epoll.
            match self.0.try_io(Interest::WRITABLE, || send(&self.0, bufs)) {
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => continue,
                done => return Poll::Ready(done),
            }
        }
    }
}

/// One slice (a TLS record, mostly) by `send`; more by `sendmsg`. MSG_NOSIGNAL: a peer gone
/// is an error for this connection, not a SIGPIPE for the process.
fn send(tcp: &TcpStream, bufs: &[IoSlice<'_>]) -> io::Result<usize> {
    let flags = SendFlags::NOSIGNAL;
    let sent = match bufs {
        [one] => rustix::net::send(tcp, one, flags),
        _ => rustix::net::sendmsg(tcp, bufs, &mut SendAncillaryBuffer::default(), flags),
    };
    sent.map_err(io::Error::from)
}

impl AsyncRead for Sock {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().0).poll_read(cx, buf)
    }
}

impl AsyncWrite for Sock {
    fn poll_write(self: Pin<&mut Self>, cx: &mut Context<'_>, b: &[u8]) -> Poll<io::Result<usize>> {
        self.poll_send(cx, &[IoSlice::new(b)])
    }

    fn poll_write_vectored(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        self.poll_send(cx, bufs)
    }

    fn is_write_vectored(&self) -> bool {
        true
    }

    fn poll_flush(self: Pin<&mut Self>, _: &mut Context<'_>) -> Poll<io::Result<()>> {
        Poll::Ready(Ok(()))
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().0).poll_shutdown(cx)
    }
}

#[cfg(test)]
mod tests {
    use tokio::{
        io::{AsyncReadExt, AsyncWriteExt},
        net::TcpListener,
    };

    use super::*;

    async fn pair() -> (Sock, TcpStream) {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let ours = TcpStream::connect(listener.local_addr().unwrap())
            .await
            .unwrap();
        let (theirs, _) = listener.accept().await.unwrap();
        (Sock::new(ours), theirs)
    }

    #[tokio::test]
    async fn slices_arrive_in_order() {
        let (mut sock, mut peer) = pair().await;
        sock.write_all(b"one ").await.unwrap();
        let mut bufs = [
            IoSlice::new(b"two "),
            IoSlice::new(b""),
            IoSlice::new(b"three"),
        ];
        let n = sock.write_vectored(&bufs).await.unwrap();
        assert_eq!(n, 9, "sendmsg takes every slice of a small write");
        bufs[0] = IoSlice::new(b"!");
        sock.write_all(&bufs[0]).await.unwrap();
        sock.shutdown().await.unwrap();
        let mut got = String::new();
        peer.read_to_string(&mut got).await.unwrap();
        assert_eq!(got, "one two three!");
    }

    /// A peer that stops reading fills the socket's buffers: the send waits for room rather
    /// than failing or spinning, and finishes once the peer reads.
    #[tokio::test]
    async fn a_full_socket_waits_for_room() {
        let (mut sock, mut peer) = pair().await;
        let block = vec![b'x'; 1 << 20];
        // More than loopback's buffers take when autotuned to their limits (tcp_wmem's
        // 4 MB and tcp_rmem's 6 MB by default).
        const BLOCKS: usize = 32;
        let total = BLOCKS * block.len();
        let writer = tokio::spawn(async move {
            for _ in 0..BLOCKS {
                let halves = [IoSlice::new(&block[..1000]), IoSlice::new(&block[1000..])];
                let mut sent = 0;
                while sent < block.len() {
                    sent += match sent {
                        0 => sock.write_vectored(&halves).await.unwrap(),
                        _ => sock.write(&block[sent..]).await.unwrap(),
                    };
                }
            }
        });
        tokio::time::sleep(std::time::Duration::from_millis(50)).await;
        assert!(
            !writer.is_finished(),
            "32 MB cannot fit a loopback socket's buffers"
        );
        let mut got = 0;
        let mut buf = vec![0; 1 << 16];
        while got < total {
            let n = peer.read(&mut buf).await.unwrap();
            assert!(n > 0, "closed after {got} bytes");
            got += n;
        }
        writer.await.unwrap();
        assert_eq!(got, total);
    }

    #[tokio::test]
    async fn a_reset_peer_is_an_error() {
        let (mut sock, peer) = pair().await;
        peer.set_zero_linger().unwrap();
        drop(peer);
        tokio::time::sleep(std::time::Duration::from_millis(20)).await;
        let mut failed = false;
        for _ in 0..3 {
            if sock.write_all(b"after the reset").await.is_err() {
                failed = true;
                break;
            }
        }
        assert!(failed, "writing to a reset connection must fail");
    }
}
