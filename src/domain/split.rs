//! The chunk split, as in the seed note.

use serde::{Deserialize, Serialize};

/// One chunk of a job: `len` numbers starting at input position `offset`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct ChunkPlan {
    pub index: u32,
    pub offset: u64,
    pub len: u64,
}

/// Splits `count` numbers for `workers` workers.
///
/// Without `chunk_size` this is the seed's split: `workers = min(workers, count)`
/// chunks of `count / workers` numbers, the remainder spread one extra over the
/// first chunks (10 numbers on 3 workers: 4, 3, 3). With `chunk_size`, chunks of
/// exactly that many numbers, the last one shorter. Returns no chunks for
/// `count == 0`. `workers` and `chunk_size` of zero are treated as one.
pub fn split(count: u64, workers: u64, chunk_size: Option<u64>) -> Vec<ChunkPlan> {
    if count == 0 {
        return Vec::new();
    }
    let mut chunks = Vec::new();
    let mut offset = 0u64;
    let mut push = |len: u64| {
        chunks.push(ChunkPlan { index: chunks.len() as u32, offset, len });
        offset += len;
    };
    match chunk_size {
        Some(size) => {
            let size = size.max(1);
            let mut left = count;
            while left > 0 {
                let len = size.min(left);
                push(len);
                left -= len;
            }
        }
        None => {
            let workers = workers.clamp(1, count);
            let (base, extra) = (count / workers, count % workers);
            for i in 0..workers {
                push(base + u64::from(i < extra));
            }
        }
    }
    chunks
}

/// How many chunks [`split`] would make, without making them.
pub fn chunk_count(count: u64, workers: u64, chunk_size: Option<u64>) -> u64 {
    match chunk_size {
        _ if count == 0 => 0,
        Some(size) => count.div_ceil(size.max(1)),
        None => workers.clamp(1, count),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn lens(chunks: &[ChunkPlan]) -> Vec<u64> {
        chunks.iter().map(|c| c.len).collect()
    }

    #[test]
    fn ten_numbers_on_three_cores_split_four_three_three() {
        assert_eq!(lens(&split(10, 3, None)), vec![4, 3, 3]);
    }

    #[test]
    fn the_seeds_fifty_numbers_on_five_cores_split_evenly() {
        assert_eq!(lens(&split(50, 5, None)), vec![10; 5]);
    }

    #[test]
    fn more_cores_than_numbers_gives_one_number_per_chunk() {
        assert_eq!(lens(&split(3, 8, None)), vec![1, 1, 1]);
    }

    #[test]
    fn chunk_size_overrides_the_even_split() {
        assert_eq!(lens(&split(10, 3, Some(4))), vec![4, 4, 2]);
        assert_eq!(split(10, 3, Some(4))[2].offset, 8);
    }

    proptest! {
        #[test]
        fn every_number_is_covered_exactly_once_in_order(
            count in 0u64..5_000, workers in 0u64..64, chunk_size in proptest::option::of(0u64..700)
        ) {
            let chunks = split(count, workers, chunk_size);
            prop_assert_eq!(chunks.len() as u64, chunk_count(count, workers, chunk_size));
            let mut next = 0u64;
            for (i, c) in chunks.iter().enumerate() {
                prop_assert_eq!(c.index as usize, i);
                prop_assert_eq!(c.offset, next);
                prop_assert!(c.len > 0);
                next += c.len;
            }
            prop_assert_eq!(next, count);
            if chunk_size.is_none() && count > 0 {
                let (min, max) = (chunks.iter().map(|c| c.len).min().unwrap(), chunks.iter().map(|c| c.len).max().unwrap());
                prop_assert!(max - min <= 1);
            }
        }
    }
}
