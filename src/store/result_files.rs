//! Big jobs' squares on SQLite: one file per job beside the database, written
//! in place by the lanes, so each byte is written once.
//!
//! Through the WAL a square is written twice (into the WAL, then by the
//! checkpoint into the database file), and past 64 MiB of WAL the writer
//! waits for the checkpoint: a 10^8-number job (800 MB) took three times as
//! long per number as a 10^6 one. A job of more than one segment
//! ([`SEGMENT_LEN`]) therefore gets a file `DB-results/JOB-ID`, created (at its
//! full size) in the transaction that stores the job; each lane writes its
//! chunk's squares at their positions and makes them durable (`fdatasync`,
//! and the directory entry the first time) before the transaction that marks
//! the chunk done, so a chunk that is `done` has its squares on disk even
//! after a power loss (the writer thread itself never waits for these
//! files). The `results` table keeps the squares of smaller jobs (stored with
//! their completion, one write for many tiny jobs) and those of big jobs
//! stored before result files existed: a job reads from its file when it has
//! one.
//!
//! A job that ends without success, or is deleted, loses its file after the
//! transaction that says so; files left by a crash between the two are
//! removed when the store opens (`SqliteStore::sweep_result_files`).

use std::fs::{self, File, OpenOptions};
use std::io::{self, ErrorKind};
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};

use uuid::Uuid;

use super::Segment;
use crate::domain::SEGMENT_LEN;
use crate::exec::le_bytes;

/// Whether a job of `count` numbers keeps its squares in a file.
pub fn in_file(count: u64) -> bool {
    count > SEGMENT_LEN
}

/// The directory of result files. Cheap to clone.
#[derive(Debug, Clone)]
pub struct ResultFiles {
    dir: PathBuf,
}

impl ResultFiles {
    /// The result files of the database at `db` (`DB-results/`), created when missing.
    pub fn open(db: &Path) -> io::Result<ResultFiles> {
        let mut name = db.as_os_str().to_owned();
        name.push("-results");
        let dir = PathBuf::from(name);
        fs::create_dir_all(&dir)?;
        Ok(ResultFiles { dir })
    }

    fn path(&self, id: Uuid) -> PathBuf {
        self.dir.join(id.to_string())
    }

    /// Creates job `id`'s file for `count` squares (holes until written).
    /// Nothing is synced here: the lanes make the file's name and contents
    /// durable before they mark a chunk done ([`ResultFile::sync`]).
    pub fn create(&self, id: Uuid, count: u64) -> io::Result<()> {
        let file = OpenOptions::new().write(true).create(true).truncate(false).open(self.path(id))?;
        file.set_len(count * 8)
    }

    /// Job `id`'s file, to write its squares into; `None` if it has none.
    pub fn writer(&self, id: Uuid) -> io::Result<Option<ResultFile>> {
        match OpenOptions::new().write(true).open(self.path(id)) {
            Ok(file) => Ok(Some(ResultFile { file, dir: Some(self.dir.clone()) })),
            Err(e) if e.kind() == ErrorKind::NotFound => Ok(None),
            Err(e) => Err(e),
        }
    }

    /// The squares at `[from, to)` of job `id`, as one segment; `None` if the job has no file.
    pub fn read(&self, id: Uuid, from: u64, to: u64) -> io::Result<Option<Segment>> {
        let file = match File::open(self.path(id)) {
            Ok(file) => file,
            Err(e) if e.kind() == ErrorKind::NotFound => return Ok(None),
            Err(e) => return Err(e),
        };
        let mut data = vec![0u8; (to.saturating_sub(from) * 8) as usize];
        file.read_exact_at(&mut data, from * 8)?;
        Ok(Some(Segment { pos: from, data }))
    }

    /// Removes job `id`'s file, if it has one.
    pub fn remove(&self, id: Uuid) {
        match fs::remove_file(self.path(id)) {
            Err(e) if e.kind() != ErrorKind::NotFound => {
                tracing::warn!(job = %id, error = %e, "could not remove a result file")
            }
            _ => {}
        }
    }

    /// The jobs that have a file (names that are not job ids are left alone).
    pub fn jobs(&self) -> io::Result<Vec<Uuid>> {
        let mut ids = Vec::new();
        for entry in fs::read_dir(&self.dir)? {
            if let Some(id) = entry?.file_name().to_str().and_then(|name| Uuid::parse_str(name).ok()) {
                ids.push(id);
            }
        }
        Ok(ids)
    }
}

/// One job's result file, open for writing.
#[derive(Debug)]
pub struct ResultFile {
    file: File,
    /// The directory, until its entry for this file has been synced.
    dir: Option<PathBuf>,
}

impl ResultFile {
    /// Writes `squares` at position `pos`, and starts writing them to the
    /// disk without waiting (`sync_file_range`), so the disk works while the
    /// lane computes the next segment and [`ResultFile::sync`] waits only for
    /// the last ones.
    pub fn write(&self, pos: u64, squares: &[i64]) -> io::Result<()> {
        let bytes = le_bytes(squares);
        self.file.write_all_at(&bytes, pos * 8)?;
        start_writeback(&self.file, pos * 8, bytes.len() as u64);
        Ok(())
    }

    /// Makes everything written so far durable, and the file's name the first time.
    pub fn sync(&mut self) -> io::Result<()> {
        self.file.sync_data()?;
        if let Some(dir) = &self.dir {
            File::open(dir)?.sync_all()?;
            self.dir = None;
        }
        Ok(())
    }
}

/// Asks the kernel to start writing `[offset, offset + len)` of `file` to the
/// disk. Only a head start: durability still comes from `fdatasync`, so a
/// failure (or a platform without it) changes nothing but the timing.
fn start_writeback(file: &File, offset: u64, len: u64) {
    #[cfg(target_os = "linux")]
    {
        use std::os::fd::AsRawFd;
        // SAFETY: a plain syscall on an open descriptor; it touches no memory of ours.
        let _ =
            unsafe { libc::sync_file_range(file.as_raw_fd(), offset as i64, len as i64, libc::SYNC_FILE_RANGE_WRITE) };
    }
    #[cfg(not(target_os = "linux"))]
    let _ = (file, offset, len);
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn squares_written_at_their_positions_read_back_and_a_removed_file_is_gone() {
        let dir = tempfile::tempdir().unwrap();
        let files = ResultFiles::open(&dir.path().join("squared.db")).unwrap();
        let id = Uuid::now_v7();
        assert!(files.writer(id).unwrap().is_none());
        files.create(id, 10).unwrap();
        let mut file = files.writer(id).unwrap().expect("created");
        file.write(6, &[36, 49, 64, 81]).unwrap();
        file.write(0, &[0, 1, 4, 9, 16, 25]).unwrap();
        file.sync().unwrap();
        let read = files.read(id, 4, 8).unwrap().expect("has a file");
        assert_eq!(read.pos, 4);
        assert_eq!(crate::exec::from_le_bytes(&read.data).collect::<Vec<_>>(), vec![16, 25, 36, 49]);
        assert_eq!(files.jobs().unwrap(), vec![id]);
        files.remove(id);
        assert!(files.read(id, 0, 1).unwrap().is_none());
        assert!(files.jobs().unwrap().is_empty());
        files.remove(id); // already gone: nothing to do
    }
}
