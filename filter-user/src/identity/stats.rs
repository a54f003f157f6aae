//! Process-wide counts of the token cache and the signing-key fetches, read by the proxy's
//! `/metrics` at scrape time. Relaxed atomics: one add on the path, nothing else.

use std::sync::atomic::{AtomicU64, Ordering};

/// Bearer tokens answered from the cache (verified or refused).
pub static TOKEN_CACHE_HITS: AtomicU64 = AtomicU64::new(0);
/// Bearer tokens that had to be checked (signature and claims).
pub static TOKEN_CACHE_MISSES: AtomicU64 = AtomicU64::new(0);
/// Signing-key documents fetched and accepted.
pub static KEY_FETCHES_OK: AtomicU64 = AtomicU64::new(0);
/// Signing-key fetches that failed (the last good keys stayed).
pub static KEY_FETCHES_FAILED: AtomicU64 = AtomicU64::new(0);

pub fn count(counter: &AtomicU64) {
    counter.fetch_add(1, Ordering::Relaxed);
}

pub fn read(counter: &AtomicU64) -> u64 {
    counter.load(Ordering::Relaxed)
}
