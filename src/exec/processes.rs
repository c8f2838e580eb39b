//! A lane backed by a `squared worker` subprocess.
//!
//! Workers are started by one long-lived spawner thread: `PR_SET_PDEATHSIG`
//! fires when the *thread* that forked a child exits, so forking from a pooled
//! thread that later retires would kill healthy workers. With the spawner, a
//! worker dies exactly when the server process dies (no orphans), and every
//! lane reaps its worker when it is done with it (no zombies).
//!
//! Results come back through shared memory (two slots, so the worker computes
//! one segment while the server stores the other) or through the stdout pipe
//! (one segment in flight: the naive queue pattern of the seed).

use std::collections::VecDeque;
use std::io::{self, Read, Write};
use std::os::fd::AsRawFd;
use std::os::unix::process::{CommandExt, ExitStatusExt};
use std::path::PathBuf;
use std::process::{Child, ChildStdin, ChildStdout, Command, ExitStatus, Stdio};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::mpsc;
use std::sync::OnceLock;
use std::time::{Duration, Instant};

use super::protocol::{self, Reply, Request};
use super::shm::SharedSlots;
use super::{le_bytes, segments, ChunkOutcome, ChunkWork, ExecError, Inputs, Lane, Sink};
use crate::domain::{Transport, SEGMENT_LEN};

/// Shared-memory slots per worker: one being computed, one being stored.
const SLOTS: usize = 2;
/// How long a new worker may take to say hello.
const HELLO_TIMEOUT: Duration = Duration::from_secs(10);
/// The descriptor number a worker finds its shared memory at.
pub const SHM_FD: i32 = 3;

/// How to start a worker: the `squared` executable (the server's own binary by default).
#[derive(Debug, Clone)]
pub struct WorkerCommand {
    pub exe: PathBuf,
}

impl WorkerCommand {
    pub fn current_exe() -> io::Result<Self> {
        Ok(WorkerCommand { exe: std::env::current_exe()? })
    }
}

type SpawnRequest = (Command, mpsc::Sender<io::Result<Child>>);

/// Spawns `command` on the long-lived spawner thread.
fn spawn(command: Command) -> io::Result<Child> {
    static SPAWNER: OnceLock<mpsc::Sender<SpawnRequest>> = OnceLock::new();
    let spawner = SPAWNER.get_or_init(|| {
        let (tx, rx) = mpsc::channel::<SpawnRequest>();
        std::thread::Builder::new()
            .name("squared-spawner".into())
            .spawn(move || {
                for (mut command, reply) in rx {
                    let _ = reply.send(command.spawn());
                }
            })
            .expect("start the worker spawner thread");
        tx
    });
    let (tx, rx) = mpsc::channel();
    spawner.send((command, tx)).map_err(|_| io::Error::other("spawner thread is gone"))?;
    rx.recv().map_err(|_| io::Error::other("spawner thread is gone"))?
}

/// Describes how a worker ended, for error messages.
pub fn describe_exit(pid: u32, status: ExitStatus) -> String {
    if let Some(code) = status.code() {
        format!("worker process {pid} exited with status {code}")
    } else if let Some(sig) = status.signal() {
        format!("worker process {pid} was killed by signal {sig} ({})", signal_name(sig))
    } else {
        format!("worker process {pid} ended: {status}")
    }
}

fn signal_name(sig: i32) -> &'static str {
    match sig {
        libc::SIGKILL => "SIGKILL",
        libc::SIGTERM => "SIGTERM",
        libc::SIGSEGV => "SIGSEGV",
        libc::SIGABRT => "SIGABRT",
        libc::SIGBUS => "SIGBUS",
        libc::SIGINT => "SIGINT",
        libc::SIGPIPE => "SIGPIPE",
        libc::SIGILL => "SIGILL",
        libc::SIGFPE => "SIGFPE",
        _ => "signal",
    }
}

/// A running worker subprocess and its channels.
pub struct ProcessLane {
    child: Child,
    pid: u32,
    stdin: Option<ChildStdin>,
    stdout: ChildStdout,
    shm: SharedSlots,
    spawn_time: Duration,
    /// Receive buffer for squares that come through the pipe.
    buf: Vec<i64>,
    /// Cleared when the worker misbehaved: it is killed, not asked to exit.
    healthy: bool,
    /// Set while no request is outstanding: only such a worker may serve
    /// another job (a stale reply would otherwise answer the next request).
    idle: bool,
}

impl ProcessLane {
    /// Starts a worker and waits for its hello, so `spawn_time` covers exec and start-up.
    pub fn spawn(command: &WorkerCommand) -> Result<Self, ExecError> {
        let started = Instant::now();
        let shm = SharedSlots::create(SLOTS, SEGMENT_LEN as usize).map_err(ExecError::Spawn)?;
        let shm_fd = shm.raw_fd();
        // SAFETY: getpid is always safe.
        let parent = unsafe { libc::getpid() };
        let mut cmd = Command::new(&command.exe);
        cmd.arg("worker")
            .args(["--shm-fd", &SHM_FD.to_string(), "--slots", &SLOTS.to_string()])
            .args(["--slot-len", &SEGMENT_LEN.to_string()])
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit());
        // SAFETY: only async-signal-safe calls (dup2, fcntl, prctl, getppid) between fork and exec.
        unsafe {
            cmd.pre_exec(move || {
                if shm_fd == SHM_FD {
                    if libc::fcntl(SHM_FD, libc::F_SETFD, 0) != 0 {
                        return Err(io::Error::last_os_error());
                    }
                } else if libc::dup2(shm_fd, SHM_FD) < 0 {
                    return Err(io::Error::last_os_error());
                }
                if libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGKILL) != 0 {
                    return Err(io::Error::last_os_error());
                }
                // The server died before prctl took effect: do not become an orphan.
                if libc::getppid() != parent {
                    libc::_exit(1);
                }
                Ok(())
            });
        }
        let mut child = spawn(cmd).map_err(ExecError::Spawn)?;
        let pid = child.id();
        let stdin = child.stdin.take().expect("piped stdin");
        let stdout = child.stdout.take().expect("piped stdout");
        let mut lane = ProcessLane {
            child,
            pid,
            stdin: Some(stdin),
            stdout,
            shm,
            spawn_time: Duration::ZERO,
            buf: Vec::new(),
            healthy: true,
            idle: true,
        };
        // A worker that never starts must not pin a lane (and its core) forever.
        if !readable_within(lane.stdout.as_raw_fd(), HELLO_TIMEOUT) {
            return Err(lane.broken(format!("did not start within {} s", HELLO_TIMEOUT.as_secs())));
        }
        let hello = lane.recv()?;
        if hello.kind != protocol::REPLY_HELLO {
            return Err(lane.broken(format!("sent reply kind {} instead of hello", hello.kind)));
        }
        lane.spawn_time = started.elapsed();
        Ok(lane)
    }

    fn send(&mut self, request: &Request, inline: Option<&[i64]>) -> Result<(), ExecError> {
        let stdin = self.stdin.as_mut().expect("stdin open while the lane runs");
        let result = stdin
            .write_all(&request.encode())
            .and_then(|()| inline.map_or(Ok(()), |nums| stdin.write_all(&le_bytes(nums))));
        result.map_err(|e| self.crashed(e))
    }

    fn recv(&mut self) -> Result<Reply, ExecError> {
        let mut header = [0u8; protocol::REPLY_LEN];
        if let Err(e) = self.stdout.read_exact(&mut header) {
            return Err(self.crashed(e));
        }
        let reply = Reply::decode(&header).map_err(|e| self.broken(e.to_string()))?;
        if reply.kind == protocol::REPLY_ERROR {
            let mut msg = vec![0u8; reply.len.min(64 * 1024) as usize];
            if let Err(e) = self.stdout.read_exact(&mut msg) {
                return Err(self.crashed(e));
            }
            return Err(ExecError::Worker(String::from_utf8_lossy(&msg).into_owned()));
        }
        Ok(reply)
    }

    /// The worker broke the protocol: kill it and say so.
    fn broken(&mut self, what: String) -> ExecError {
        self.healthy = false;
        // Killed, not reaped: the pid stays ours until Drop, after the
        // scheduler has stopped tracking it, so no kill can reach a recycled pid.
        let _ = self.child.kill();
        ExecError::WorkerCrashed(format!("worker process {} broke the protocol: {what}", self.pid))
    }

    /// The pipe to the worker failed: find out how the worker ended, without
    /// reaping it (see `broken`).
    fn crashed(&mut self, io: io::Error) -> ExecError {
        self.healthy = false;
        let deadline = Instant::now() + Duration::from_secs(2);
        let status = loop {
            match peek_exit(self.pid, false) {
                Some(status) => break Some(status),
                None if Instant::now() < deadline => std::thread::sleep(Duration::from_millis(5)),
                None => {
                    let _ = self.child.kill();
                    break peek_exit(self.pid, true);
                }
            }
        };
        ExecError::WorkerCrashed(match status {
            Some(status) => describe_exit(self.pid, status),
            None => format!("worker process {} stopped answering: {io}", self.pid),
        })
    }
}

/// Whether `fd` has data (or EOF) to read within `timeout`.
fn readable_within(fd: std::os::fd::RawFd, timeout: Duration) -> bool {
    let mut poll = libc::pollfd { fd, events: libc::POLLIN, revents: 0 };
    let deadline = Instant::now() + timeout;
    loop {
        let left = deadline.saturating_duration_since(Instant::now()).as_millis().min(i32::MAX as u128) as i32;
        // SAFETY: one valid pollfd, for the duration of the call.
        match unsafe { libc::poll(&mut poll, 1, left) } {
            n if n > 0 => return true,
            0 => return false,
            _ if io::Error::last_os_error().kind() == io::ErrorKind::Interrupted => continue,
            _ => return true, // let the read report the error
        }
    }
}

/// How child `pid` ended, if it has, leaving it unreaped (`WNOWAIT`);
/// with `block`, waits for it to end.
fn peek_exit(pid: u32, block: bool) -> Option<ExitStatus> {
    // SAFETY: a zeroed siginfo_t is a valid out-parameter for waitid.
    let mut info: libc::siginfo_t = unsafe { std::mem::zeroed() };
    let flags = libc::WEXITED | libc::WNOWAIT | if block { 0 } else { libc::WNOHANG };
    // SAFETY: waitid writes only into `info`.
    if unsafe { libc::waitid(libc::P_PID, pid as libc::id_t, &mut info, flags) } != 0 {
        return None;
    }
    // SAFETY: after a successful waitid with WEXITED, the child fields are set.
    let (child, code, status) = unsafe { (info.si_pid(), info.si_code, info.si_status()) };
    if child == 0 {
        return None; // WNOHANG: still running
    }
    // Rebuild the wait(2) status word the standard library decodes.
    let raw = match code {
        libc::CLD_EXITED => (status & 0xff) << 8,
        libc::CLD_DUMPED => (status & 0x7f) | 0x80,
        _ => status & 0x7f,
    };
    Some(ExitStatus::from_raw(raw))
}

impl Lane for ProcessLane {
    fn worker(&self) -> String {
        format!("process {}", self.pid)
    }

    fn spawn_time(&self) -> Duration {
        self.spawn_time
    }

    fn pid(&self) -> Option<u32> {
        Some(self.pid)
    }

    fn is_reusable(&mut self) -> bool {
        self.healthy && self.idle && matches!(self.child.try_wait(), Ok(None))
    }

    fn run_chunk(
        &mut self,
        work: &ChunkWork,
        inputs: &mut dyn Inputs,
        sink: &mut dyn Sink,
        cancel: &AtomicBool,
    ) -> Result<ChunkOutcome, ExecError> {
        self.idle = false;
        let shared = work.transport == Transport::SharedMemory;
        // Pipe replies carry megabytes while requests may too: one in flight
        // keeps both sides from blocking on full pipes at once.
        let depth = if shared { SLOTS } else { 1 };
        let mut free: Vec<u8> = (0..depth as u8).rev().collect();
        let mut in_flight: VecDeque<(u64, usize, u8)> = VecDeque::new();
        let mut pieces = segments(work.offset, work.len);
        let mut compute_ns = 0u64;
        loop {
            while let Some(&slot) = free.last() {
                let Some((offset, len)) = pieces.next() else { break };
                if cancel.load(Ordering::Relaxed) {
                    return Err(ExecError::Canceled);
                }
                free.pop();
                let mut request = Request {
                    source: protocol::SOURCE_RANGE,
                    output: if shared { protocol::OUTPUT_SLOT } else { protocol::OUTPUT_PIPE },
                    slot,
                    len: len as u64,
                    first: 0,
                    step: 0,
                    sleep_ms: work.simulate.sleep_ms,
                    spin: work.simulate.spin,
                };
                match &work.range {
                    Some(range) => {
                        request.first = range.nth(offset);
                        request.step = range.step;
                        self.send(&request, None)?;
                    }
                    None if shared => {
                        let numbers = inputs.numbers(offset, len)?;
                        self.shm.slot_mut(slot as usize)[..len].copy_from_slice(numbers);
                        request.source = protocol::SOURCE_LIST_IN_SLOT;
                        self.send(&request, None)?;
                    }
                    None => {
                        request.source = protocol::SOURCE_LIST_INLINE;
                        self.send(&request, Some(inputs.numbers(offset, len)?))?;
                    }
                }
                in_flight.push_back((offset, len, slot));
            }
            let Some((offset, len, slot)) = in_flight.pop_front() else { break };
            let reply = self.recv()?;
            if reply.kind != protocol::REPLY_OK || reply.slot != slot || reply.len != len as u64 {
                return Err(self.broken(format!("unexpected reply {reply:?} for slot {slot}, {len} numbers")));
            }
            compute_ns += reply.compute_ns;
            if shared {
                sink.segment(offset, &self.shm.slot_mut(slot as usize)[..len])?;
            } else {
                self.buf.resize(len, 0);
                if let Err(e) = read_i64s(&mut self.stdout, &mut self.buf[..len]) {
                    return Err(self.crashed(e));
                }
                sink.segment(offset, &self.buf[..len])?;
            }
            free.push(slot);
        }
        self.idle = true;
        Ok(ChunkOutcome { compute: Duration::from_nanos(compute_ns) })
    }
}

/// Reads little-endian `i64`s straight into `out`.
pub fn read_i64s(from: &mut impl Read, out: &mut [i64]) -> io::Result<()> {
    // SAFETY: any byte pattern is a valid i64; the view covers exactly `out`.
    let bytes = unsafe { std::slice::from_raw_parts_mut(out.as_mut_ptr().cast::<u8>(), std::mem::size_of_val(out)) };
    from.read_exact(bytes)?;
    if cfg!(target_endian = "big") {
        out.iter_mut().for_each(|v| *v = i64::from_le(*v));
    }
    Ok(())
}

impl Drop for ProcessLane {
    /// Asks a healthy worker to exit (EOF on stdin), kills one that does not
    /// within a moment, and always reaps it.
    fn drop(&mut self) {
        drop(self.stdin.take());
        if self.healthy {
            let deadline = Instant::now() + Duration::from_secs(2);
            while Instant::now() < deadline {
                match self.child.try_wait() {
                    Ok(Some(_)) | Err(_) => return,
                    Ok(None) => std::thread::sleep(Duration::from_millis(1)),
                }
            }
        }
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}
