//! Helpers shared by the fuzz targets.

/// A small deterministic generator seeded from the input itself, so that a crashing input
/// replays exactly (no state outside the input).
pub struct Rng(u64);

impl Rng {
    pub fn from_input(data: &[u8]) -> Rng {
        // FNV-1a over the input; never zero (xorshift would stay at zero).
        let mut h: u64 = 0xcbf2_9ce4_8422_2325;
        for &b in data {
            h = (h ^ u64::from(b)).wrapping_mul(0x0100_0000_01b3);
        }
        Rng(h | 1)
    }

    pub fn next(&mut self) -> u64 {
        let mut x = self.0;
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        self.0 = x;
        x
    }

    /// A number in `1..=max`.
    pub fn size(&mut self, max: usize) -> usize {
        1 + (self.next() % max.max(1) as u64) as usize
    }
}

/// `data` cut into pieces of random sizes (1 to 64 bytes, sometimes larger), as a network
/// read would hand them over.
pub fn random_splits<'a>(data: &'a [u8], rng: &mut Rng) -> Vec<&'a [u8]> {
    let mut parts = Vec::new();
    let mut rest = data;
    while !rest.is_empty() {
        let max = if rng.next() % 8 == 0 { 1024 } else { 64 };
        let n = rng.size(max).min(rest.len());
        let (head, tail) = rest.split_at(n);
        parts.push(head);
        rest = tail;
    }
    parts
}
