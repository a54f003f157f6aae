//! Read buffers shared by the connections of one thread, the most recently returned first.
//!
//! A connection that kept its own read buffer between requests found it pushed out of the
//! CPU's cache by the requests of the other connections in between: with 64 busy
//! connections, each request's bytes were copied into memory that had to be fetched first.
//! A buffer given back when a request is done and taken by the next read, whichever
//! connection it is for, is the one last written: still in the cache, as HAProxy's pooled
//! buffers are.

use std::cell::RefCell;

use bytes::BytesMut;

/// Buffers kept for reuse; beyond this the allocator has them back. Enough for a few
/// hundred requests in flight at once: with 32, the 64 connections of `bench proxy` gave
/// back more than were kept between their bursts, and the buffers freed and allocated
/// again cost 7,000–16,000 page faults in an 8-second round (none before).
const KEEP: usize = 256;
/// The largest buffer kept: one grown for a large body is freed.
const KEEP_MAX: usize = 64 * 1024;

thread_local! {
    static SPARE: RefCell<Vec<BytesMut>> = const { RefCell::new(Vec::new()) };
}

/// Room for `len` more bytes in `buf`. A buffer with no allocation of its own gets the last
/// one given back, if any.
pub fn reserve(buf: &mut BytesMut, len: usize) {
    if buf.capacity() == 0 {
        if let Some(spare) = SPARE.with(|s| s.borrow_mut().pop()) {
            *buf = spare;
        }
    }
    buf.reserve(len);
}

/// Gives back an emptied buffer, moved back to the start of its allocation. One still
/// shared with bytes handed out (a head or a body not yet dropped), one not emptied, or one
/// grown past [`KEEP_MAX`] goes to the allocator instead.
pub fn give(mut buf: BytesMut) {
    // Asking for one byte more than it holds moves an emptied buffer to the start of its
    // allocation, without allocating, only when no other handle shares it. A buffer already
    // at its start (nothing was ever read into it) is not worth keeping either.
    if !buf.is_empty() || !buf.try_reclaim(buf.capacity() + 1) || buf.capacity() > KEEP_MAX {
        return;
    }
    SPARE.with(|s| {
        let mut s = s.borrow_mut();
        if s.len() < KEEP {
            s.push(buf);
        }
    });
}

#[cfg(test)]
mod tests {
    use super::*;

    fn take(len: usize) -> BytesMut {
        let mut buf = BytesMut::new();
        reserve(&mut buf, len);
        buf
    }

    fn kept() -> usize {
        SPARE.with(|s| s.borrow().len())
    }

    /// A buffer after a request: bytes read into it and split off as a head.
    fn used(len: usize) -> (BytesMut, bytes::Bytes) {
        let mut buf = take(len);
        buf.extend_from_slice(b"GET / HTTP/1.1\r\n\r\n");
        let head = buf.split().freeze();
        (buf, head)
    }

    #[test]
    fn the_last_buffer_given_back_is_the_next_taken_from_its_start() {
        let (buf, head) = used(4096);
        let start = head.as_ptr();
        drop(head);
        give(buf);
        assert_eq!(kept(), 1);
        let again = take(1024);
        assert!(again.is_empty());
        assert!(again.capacity() >= 4096);
        assert_eq!(again.as_ptr(), start);
        assert_eq!(kept(), 0);
    }

    #[test]
    fn a_shared_unemptied_or_large_buffer_goes_to_the_allocator() {
        let (buf, _head) = used(4096);
        give(buf);
        assert_eq!(kept(), 0, "its head is still held");
        let (mut buf, head) = used(4096);
        drop(head);
        buf.extend_from_slice(b"x");
        give(buf);
        assert_eq!(kept(), 0, "not emptied");
        let (buf, head) = used(KEEP_MAX + 1);
        drop(head);
        give(buf);
        assert_eq!(kept(), 0, "too large");
        give(take(16));
        assert_eq!(kept(), 0, "never used");
    }

    #[test]
    fn no_more_than_keep_are_kept() {
        let bufs: Vec<BytesMut> = (0..KEEP + 5).map(|_| used(4096).0).collect();
        for buf in bufs {
            give(buf);
        }
        assert_eq!(kept(), KEEP);
    }
}
