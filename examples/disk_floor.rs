//! The disk's own floor for big jobs, for `bench/run.py`: the time to store
//! N squares durably the way a SQLite server's lanes do it, with nothing
//! else — no HTTP, no database, no scheduler.
//!
//! ```sh
//! cargo build --release --example disk_floor
//! target/release/examples/disk_floor --dir /tmp/floor --n 1000000 --n 100000000 --repeats 3
//! ```
//!
//! For each N it creates a result file for N squares (`ResultFiles::create`,
//! as the insert of a big job does), then two threads (the lanes of a
//! `cores: 2` job, split as the scheduler splits it) square their half of
//! `0..N` segment by segment (`SEGMENT_LEN`, aligned as the lanes align them)
//! into a buffer with the server's kernel, write each segment with
//! `ResultFile::write` and end with `ResultFile::sync`; the file is removed
//! after each repeat, as a deleted job's is. The time per repeat runs from
//! the create to the second sync; it includes starting the two threads
//! (tens of microseconds; the server keeps its lane threads instead).
//!
//! It prints one JSON object: `{"runs": [{"n": N, "seconds": [..]}, ..]}`.

use std::path::PathBuf;
use std::thread;
use std::time::Instant;

use clap::Parser;
use squared::domain::{split, Simulate, SEGMENT_LEN};
use squared::exec::{segments, square_into, Source};
use squared::store::ResultFiles;
use uuid::Uuid;

#[derive(Parser, Debug)]
struct Args {
    /// A directory on the disk to measure (the result files go to DIR/floor.db-results).
    #[arg(long)]
    dir: PathBuf,
    /// Numbers per job; repeat for several sizes.
    #[arg(long, required = true)]
    n: Vec<u64>,
    /// Repeats per size.
    #[arg(long, default_value_t = 3)]
    repeats: usize,
    /// Lanes (threads) per job.
    #[arg(long, default_value_t = 2)]
    lanes: u64,
}

fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    let files = ResultFiles::open(&args.dir.join("floor.db"))?;
    let mut runs = Vec::new();
    for &n in &args.n {
        let mut seconds = Vec::new();
        for _ in 0..args.repeats {
            let id = Uuid::now_v7();
            let start = Instant::now();
            files.create(id, n)?;
            thread::scope(|s| -> anyhow::Result<()> {
                let lanes: Vec<_> = split(n, args.lanes, None)
                    .into_iter()
                    .map(|chunk| {
                        let files = &files;
                        s.spawn(move || store_chunk(files, id, chunk.offset, chunk.len))
                    })
                    .collect();
                for lane in lanes {
                    lane.join().expect("a lane panicked")?;
                }
                Ok(())
            })?;
            seconds.push(start.elapsed().as_secs_f64());
            files.remove(id);
        }
        runs.push(serde_json::json!({ "n": n, "seconds": seconds }));
    }
    println!("{}", serde_json::json!({ "runs": runs }));
    Ok(())
}

/// One lane: squares chunk `offset, len` segment by segment (cut as the
/// lanes cut it) into job `id`'s file, then syncs it.
fn store_chunk(files: &ResultFiles, id: Uuid, offset: u64, len: u64) -> anyhow::Result<()> {
    let mut file = files.writer(id)?.expect("created above");
    let mut squares = vec![0i64; SEGMENT_LEN as usize];
    for (pos, n) in segments(offset, len) {
        let out = &mut squares[..n];
        square_into(Source::Range { first: pos as i64, step: 1 }, out, Simulate::default(), None)?;
        file.write(pos, out)?;
    }
    file.sync()?;
    Ok(())
}
