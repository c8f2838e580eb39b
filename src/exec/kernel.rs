//! The squaring kernel, shared by threads and worker subprocesses.

use std::hint::black_box;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use crate::domain::{Simulate, MAX_ABS};

/// Where a segment's numbers come from.
#[derive(Debug, Clone, Copy)]
pub enum Source<'a> {
    /// `first, first + step, …` — range jobs never materialise their input.
    Range { first: i64, step: i64 },
    /// Explicit numbers (list jobs).
    List(&'a [i64]),
}

/// Why the kernel stopped.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum KernelError {
    #[error("{0} is outside ±{MAX_ABS}")]
    OutOfRange(i64),
    #[error("canceled")]
    Canceled,
}

/// Squares `out.len()` numbers from `source` into `out`.
///
/// Inputs are bounds-checked (a validated job never trips this; a worker fed
/// garbage reports it instead of wrapping silently). With `simulate`, each
/// item also sleeps and/or spins, and `cancel` is checked between items.
pub fn square_into(
    source: Source<'_>,
    out: &mut [i64],
    simulate: Simulate,
    cancel: Option<&AtomicBool>,
) -> Result<(), KernelError> {
    match source {
        Source::List(input) => {
            let input = &input[..out.len()];
            if let Some(bad) = input.iter().find(|n| n.unsigned_abs() > MAX_ABS as u64) {
                return Err(KernelError::OutOfRange(*bad));
            }
            for (o, n) in out.iter_mut().zip(input) {
                *o = n.wrapping_mul(*n);
            }
        }
        Source::Range { first, step } => {
            let last = first as i128 + step as i128 * (out.len() as i128 - 1).max(0);
            for end in [first as i128, last] {
                if end.unsigned_abs() > MAX_ABS as u128 {
                    return Err(KernelError::OutOfRange(end as i64));
                }
            }
            let mut n = first;
            for o in out.iter_mut() {
                *o = n.wrapping_mul(n);
                n = n.wrapping_add(step);
            }
        }
    }
    if simulate != Simulate::default() {
        for _ in 0..out.len() {
            if cancel.is_some_and(|c| c.load(Ordering::Relaxed)) {
                return Err(KernelError::Canceled);
            }
            simulate_item(simulate);
        }
    }
    Ok(())
}

/// One item's artificial work: a sleep (I/O-bound) and/or a busy loop (CPU-bound).
fn simulate_item(simulate: Simulate) {
    if simulate.sleep_ms > 0 {
        std::thread::sleep(Duration::from_millis(simulate.sleep_ms));
    }
    let mut x = black_box(0x9e37_79b9_7f4a_7c15u64);
    for _ in 0..simulate.spin {
        x = black_box(x.wrapping_mul(6_364_136_223_846_793_005).wrapping_add(1_442_695_040_888_963_407));
    }
    black_box(x);
}

/// Views squares as the little-endian bytes they are stored as.
pub fn le_bytes(values: &[i64]) -> std::borrow::Cow<'_, [u8]> {
    if cfg!(target_endian = "little") {
        // SAFETY: i64 has no padding and any byte pattern is a valid u8; the
        // length covers exactly the slice's memory, which stays borrowed.
        std::borrow::Cow::Borrowed(unsafe {
            std::slice::from_raw_parts(values.as_ptr().cast::<u8>(), std::mem::size_of_val(values))
        })
    } else {
        std::borrow::Cow::Owned(values.iter().flat_map(|v| v.to_le_bytes()).collect())
    }
}

/// Decodes little-endian `i64`s (a trailing partial value is ignored).
pub fn from_le_bytes(bytes: &[u8]) -> impl Iterator<Item = i64> + '_ {
    bytes.chunks_exact(8).map(|b| i64::from_le_bytes(b.try_into().expect("chunks_exact(8)")))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ranges_and_lists_square_exactly_at_the_bounds() {
        let mut out = [0i64; 3];
        square_into(Source::List(&[MAX_ABS, -MAX_ABS, 0]), &mut out, Simulate::default(), None).unwrap();
        assert_eq!(out, [9_223_372_030_926_249_001, 9_223_372_030_926_249_001, 0]);
        square_into(Source::Range { first: 3, step: -3 }, &mut out, Simulate::default(), None).unwrap();
        assert_eq!(out, [9, 0, 9]);
    }

    #[test]
    fn out_of_range_input_is_reported_not_wrapped() {
        let mut out = [0i64; 1];
        let err = square_into(Source::List(&[MAX_ABS + 1]), &mut out, Simulate::default(), None);
        assert_eq!(err, Err(KernelError::OutOfRange(MAX_ABS + 1)));
    }

    #[test]
    fn bytes_round_trip() {
        let v = [1i64, -1, i64::MAX];
        assert_eq!(from_le_bytes(&le_bytes(&v)).collect::<Vec<_>>(), v);
    }
}
