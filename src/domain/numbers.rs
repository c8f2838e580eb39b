//! Number bounds and Python-style ranges.

use serde::{Deserialize, Serialize};

/// The largest magnitude whose square still fits in an `i64`
/// (3,037,000,499² = 9,223,372,030,926,249,001 ≤ 2⁶³ − 1).
pub const MAX_ABS: i64 = 3_037_000_499;

/// A half-open range with Python `range()` semantics; `step` is never zero.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct RangeSpec {
    pub start: i64,
    pub end: i64,
    pub step: i64,
}

impl RangeSpec {
    /// How many numbers the range yields (Python's `len(range(...))`).
    pub fn count(&self) -> u64 {
        let (start, end, step) = (self.start as i128, self.end as i128, self.step as i128);
        let n = if step > 0 {
            (end - start + step - 1).div_euclid(step)
        } else {
            (start - end - step - 1).div_euclid(-step)
        };
        n.max(0) as u64
    }

    /// The `i`-th number of the range; `i` must be below [`RangeSpec::count`].
    pub fn nth(&self, i: u64) -> i64 {
        (self.start as i128 + self.step as i128 * i as i128) as i64
    }

    /// The last number of a non-empty range.
    pub fn last(&self) -> Option<i64> {
        let n = self.count();
        (n > 0).then(|| self.nth(n - 1))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn py(start: i64, end: i64, step: i64) -> Vec<i64> {
        let mut v = Vec::new();
        let mut x = start;
        while (step > 0 && x < end) || (step < 0 && x > end) {
            v.push(x);
            x += step;
        }
        v
    }

    #[test]
    fn ranges_count_like_python() {
        for (s, e, st) in [
            (0, 10, 1),
            (0, 10, 3),
            (10, 0, -1),
            (10, 0, -3),
            (5, 5, 1),
            (5, 0, 1),
            (0, 5, -1),
            (-7, 7, 2),
            (7, -7, -2),
        ] {
            let r = RangeSpec { start: s, end: e, step: st };
            let want = py(s, e, st);
            assert_eq!(r.count(), want.len() as u64, "{r:?}");
            let got: Vec<i64> = (0..r.count()).map(|i| r.nth(i)).collect();
            assert_eq!(got, want, "{r:?}");
            assert_eq!(r.last(), want.last().copied());
        }
    }

    #[test]
    fn extreme_ranges_do_not_overflow() {
        let r = RangeSpec { start: i64::MIN, end: i64::MAX, step: i64::MAX };
        assert_eq!(r.count(), 3);
    }
}
