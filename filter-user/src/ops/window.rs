//! Small fixed-size counters for the detections, and local civil time.

/// Sub-windows per sliding window.
pub(crate) const SLOTS: usize = 8;

/// A sliding-window sum in a fixed 64 bytes: the window is split into `SLOTS` slots, each
/// holding the sum of its events. The sum covers the current slot and the `SLOTS - 1` before
/// it, so an event may count for up to one slot width (window / 8) past the window.
#[derive(Debug, Clone, Copy, Default)]
pub(crate) struct Window {
    /// Slot number (seconds / width) each entry holds; 0 = empty.
    slot: [u32; SLOTS],
    count: [u32; SLOTS],
}

impl Window {
    /// Adds `n` at `now` (seconds) and returns the sum over the window.
    pub(crate) fn add(&mut self, now: u64, window_secs: u32, n: u32) -> u64 {
        let width = u64::from(window_secs.div_ceil(SLOTS as u32).max(1));
        // +1 keeps slot 0 free to mean "empty".
        let current = (now / width + 1) as u32;
        let i = current as usize % SLOTS;
        if self.slot[i] != current {
            self.slot[i] = current;
            self.count[i] = 0;
        }
        self.count[i] = self.count[i].saturating_add(n);
        self.sum(current)
    }

    fn sum(&self, current: u32) -> u64 {
        self.slot
            .iter()
            .zip(self.count)
            .filter(|(s, _)| **s != 0 && current.wrapping_sub(**s) < SLOTS as u32)
            .map(|(_, c)| u64::from(c))
            .sum()
    }
}

/// Local (weekday, minute of day) at `secs` since the epoch, `offset` minutes from UTC.
/// Weekday 0 = Monday.
pub(crate) fn local_weekday_minute(secs: u64, offset_minutes: i32) -> (u8, u16) {
    let local = secs as i64 + i64::from(offset_minutes) * 60;
    let days = local.div_euclid(86_400);
    // 1970-01-01 was a Thursday (3 with Monday = 0).
    let weekday = (days + 3).rem_euclid(7) as u8;
    let minute = (local.rem_euclid(86_400) / 60) as u16;
    (weekday, minute)
}

/// Whether `minute` lies in [from, to), a range that may span midnight.
pub(crate) fn in_hours(minute: u16, (from, to): (u16, u16)) -> bool {
    if from < to {
        (from..to).contains(&minute)
    } else {
        minute >= from || minute < to
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn window_sums_and_forgets() {
        let mut w = Window::default();
        assert_eq!(w.add(1_000, 80, 3), 3);
        assert_eq!(w.add(1_005, 80, 2), 5);
        // One window later (80 s = 8 slots of 10 s): the early events are gone.
        assert_eq!(w.add(1_090, 80, 1), 1);
        assert_eq!(w.add(1_091, 80, 0), 1);
    }

    #[test]
    fn weekdays_and_hours() {
        // 2026-11-23 12:00 UTC is a Monday.
        assert_eq!(local_weekday_minute(1_795_435_200, 0), (0, 720));
        // UTC+13 turns it into Tuesday 01:00.
        assert_eq!(local_weekday_minute(1_795_435_200, 13 * 60), (1, 60));
        assert_eq!(local_weekday_minute(1_795_435_200, -13 * 60), (6, 23 * 60));
        assert!(in_hours(420, (420, 1200)) && !in_hours(1200, (420, 1200)));
        assert!(in_hours(1380, (1320, 360)) && in_hours(0, (1320, 360)));
        assert!(!in_hours(600, (1320, 360)));
    }
}
