//! Arbitrary bytes as a `POST /v1/jobs` body: `JobSpec::parse` must never
//! panic, and a spec it accepts must be self-consistent.

#![no_main]

use libfuzzer_sys::fuzz_target;
use squared::domain::{Input, JobSpec, Limits, MAX_ABS};

fn limits() -> Limits {
    Limits {
        default_cores: 2,
        max_cores_per_job: 1024,
        max_numbers: 100_000,
        max_chunks: 10_000,
        max_sleep_ms: 1000,
        max_spin: 1_000_000,
    }
}

fuzz_target!(|data: &[u8]| {
    let limits = limits();
    let Ok(spec) = JobSpec::parse(data, &limits) else {
        return;
    };

    let numbers = match &spec.input {
        Input::List(v) => {
            for (i, n) in v.iter().enumerate() {
                assert!(n.unsigned_abs() <= MAX_ABS as u64, "numbers[{i}] = {n} is outside ±{MAX_ABS}");
            }
            v.len() as u64
        }
        Input::Range(r) => {
            assert_ne!(r.step, 0, "accepted a zero step: {r:?}");
            assert!(r.start.unsigned_abs() <= MAX_ABS as u64, "range start out of bounds: {r:?}");
            let last = r.last().expect("accepted an empty range");
            assert!(last.unsigned_abs() <= MAX_ABS as u64, "range reaches {last}: {r:?}");
            r.count()
        }
    };
    assert_eq!(spec.count, numbers, "count disagrees with the input");
    assert!(spec.count > 0, "accepted an empty job");
    assert!(spec.count <= limits.max_numbers, "accepted {} numbers", spec.count);
    assert!(spec.cores >= 1 && spec.cores <= limits.max_cores_per_job, "cores = {}", spec.cores);
    assert!(spec.simulate.sleep_ms <= limits.max_sleep_ms && spec.simulate.spin <= limits.max_spin);

    let chunks = spec.chunks();
    assert!(chunks.len() as u64 <= limits.max_chunks, "{} chunks", chunks.len());
    let mut next = 0u64;
    for (i, c) in chunks.iter().enumerate() {
        assert_eq!(c.index as usize, i, "chunk index");
        assert_eq!(c.offset, next, "chunk {i} does not start where chunk {} ended", i.wrapping_sub(1));
        assert!(c.len > 0, "chunk {i} is empty");
        next += c.len;
    }
    assert_eq!(next, spec.count, "chunks cover {next} of {} numbers", spec.count);

    // The echo must not panic either (it divides by the chunk count).
    let echo = spec.echo();
    assert_eq!(echo.count, spec.count);
});
