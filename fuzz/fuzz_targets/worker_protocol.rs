//! The worker wire protocol (`squared::exec::protocol`) and the real worker
//! loop (`squared::worker::run`), fuzzed in-process.
//!
//! Each input is used three ways:
//!
//! 1. Its first 48 / 24 bytes go to `Request::decode` / `Reply::decode`, which
//!    must not panic; whatever decodes must encode back to the same bytes and
//!    decode again to an equal value.
//! 2. It is the byte stream a server writes to a worker's stdin. Every request
//!    header in it that decodes with source RANGE is also checked against the
//!    kernel directly: `square_into` either refuses with `OutOfRange` (and
//!    then some number really is out of range) or yields exactly
//!    `(first + i·step)²`, computed in i128.
//! 3. The real `squared::worker::run` reads that stream: fd 0 is swapped for a
//!    memfd holding the input and fd 1 for a memfd collecting the replies, and
//!    the worker gets a real shared-memory region (2 slots × 4096 numbers).
//!    A model of the protocol predicts every reply, the squares on the pipe,
//!    the contents of the shared slots afterwards and whether the worker exits
//!    cleanly (EOF) or with an error (broken protocol).
//!
//! `simulate` fields in the stream are defanged before the worker sees them
//! (`sleep_ms` → 0, `spin` → `spin % 4`): the server bounds them, and a
//! worker told to sleep for 2⁶⁴ ms per number is obedient, not buggy.

#![no_main]

use std::io::{Read, Write};
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};
use std::sync::OnceLock;

use libfuzzer_sys::fuzz_target;
use squared::domain::{Simulate, MAX_ABS};
use squared::exec::protocol::{
    Reply, Request, OUTPUT_PIPE, OUTPUT_SLOT, REPLY_ERROR, REPLY_HELLO, REPLY_LEN, REPLY_OK, REQUEST_LEN,
    SOURCE_LIST_INLINE, SOURCE_LIST_IN_SLOT, SOURCE_RANGE,
};
use squared::exec::shm::SharedSlots;
use squared::exec::{from_le_bytes, square_into, KernelError, Source};
use squared::worker::WorkerArgs;

const SLOTS: usize = 2;
const SLOT_LEN: usize = 4096;
/// Longest range the direct kernel check computes.
const KERNEL_CAP: usize = 4096;

fuzz_target!(|data: &[u8]| {
    decode_prefix(data);
    let stream = defang(data);
    let model = Model::predict(&stream);
    let run = run_worker(&stream);
    model.check(&run);
});

// ---------------------------------------------------------------------------
// 1. Decoders on raw bytes.

fn decode_prefix(data: &[u8]) {
    let mut req = [0u8; REQUEST_LEN];
    let n = data.len().min(REQUEST_LEN);
    req[..n].copy_from_slice(&data[..n]);
    check_request_round_trip(&req);

    let mut rep = [0u8; REPLY_LEN];
    let n = data.len().min(REPLY_LEN);
    rep[..n].copy_from_slice(&data[..n]);
    if let Ok(r) = Reply::decode(&rep) {
        let bytes = r.encode();
        assert_eq!(Reply::decode(&bytes), Ok(r), "reply does not round-trip");
        // Bytes 6..8 are padding: everything else must come back verbatim.
        let mut want = rep;
        want[6..8].fill(0);
        assert_eq!(bytes, want, "reply encodes to different bytes than it decoded from");
    }
}

fn check_request_round_trip(b: &[u8; REQUEST_LEN]) -> Option<Request> {
    let r = Request::decode(b).ok()?;
    let bytes = r.encode();
    assert_eq!(Request::decode(&bytes), Ok(r), "request does not round-trip");
    assert_eq!(&bytes, b, "request encodes to different bytes than it decoded from");
    Some(r)
}

// ---------------------------------------------------------------------------
// 2. The kernel on decoded range requests.

fn check_kernel_range(req: &Request) {
    if req.source != SOURCE_RANGE || req.len > 65_536 {
        return;
    }
    let len = (req.len as usize).min(KERNEL_CAP);
    let (first, step) = (req.first, req.step);
    let mut out = vec![0i64; len];
    let result = square_into(Source::Range { first, step }, &mut out, Simulate::default(), None);
    let nth = |i: usize| first as i128 + i as i128 * step as i128;
    let any_out_of_range = (0..len).any(|i| nth(i).unsigned_abs() > MAX_ABS as u128);
    match result {
        Ok(()) => {
            assert!(!any_out_of_range, "range first={first} step={step} len={len}: accepted an out-of-range number");
            for (i, got) in out.iter().enumerate() {
                let want = nth(i) * nth(i);
                assert_eq!(*got as i128, want, "range first={first} step={step} len={len}: square {i}");
            }
        }
        Err(KernelError::OutOfRange(_)) => {
            // An empty range has no numbers; refusing it is harmless.
            assert!(
                any_out_of_range || len == 0,
                "range first={first} step={step} len={len}: refused, yet every number is in range"
            );
        }
        Err(e) => panic!("range first={first} step={step} len={len}: unexpected {e:?}"),
    }
}

// ---------------------------------------------------------------------------
// 3. The worker loop.

/// Walks the stream the way the worker frames it and makes every `simulate`
/// harmless. Bytes the worker would never frame as a header stay as they are.
fn defang(data: &[u8]) -> Vec<u8> {
    let mut s = data.to_vec();
    let mut pos = 0;
    while s.len() - pos >= REQUEST_LEN {
        let header: &mut [u8; REQUEST_LEN] = (&mut s[pos..pos + REQUEST_LEN]).try_into().unwrap();
        let Ok(req) = Request::decode(header) else { break };
        if req.len > SLOT_LEN as u64 {
            break;
        }
        header[32..40].copy_from_slice(&0u64.to_le_bytes());
        header[40..48].copy_from_slice(&(req.spin % 4).to_le_bytes());
        pos += REQUEST_LEN;
        if req.source == SOURCE_LIST_INLINE {
            pos = (pos + req.len as usize * 8).min(s.len());
        }
    }
    s
}

/// What the shared slots hold before the worker starts: a fixed pattern, in
/// range except for one number in 1000 at ±(MAX_ABS + 1).
fn initial_slot(slot: usize) -> Vec<i64> {
    (0..SLOT_LEN)
        .map(|i| {
            if i % 1000 == 999 {
                if (i / 1000 + slot) % 2 == 0 { MAX_ABS + 1 } else { -(MAX_ABS + 1) }
            } else {
                let x = (i as i64 * 1_000_003 + slot as i64 * 7_919) % (2 * MAX_ABS + 1);
                x - MAX_ABS
            }
        })
        .collect()
}

/// The reply the model expects for one request.
#[derive(Debug)]
enum Expect {
    /// `kind OK` and, for pipe output, these squares after the header.
    Ok { req: Request, squares: Vec<i64> },
    /// `kind ERROR` with one of these messages.
    Err { req: Request, messages: Vec<String> },
    /// A request for zero numbers: OK (no squares) or an out-of-range ERROR.
    Empty { req: Request },
}

struct Model {
    replies: Vec<Expect>,
    /// Whether the worker reaches EOF (`Ok`) rather than a protocol error.
    clean: bool,
    slots: Vec<Vec<i64>>,
}

impl Model {
    fn predict(s: &[u8]) -> Model {
        let mut slots: Vec<Vec<i64>> = (0..SLOTS).map(initial_slot).collect();
        let mut replies = Vec::new();
        let mut pos = 0;
        let clean = loop {
            if s.len() - pos < REQUEST_LEN {
                // EOF, or a partial header: both end the worker quietly.
                break true;
            }
            let header: &[u8; REQUEST_LEN] = s[pos..pos + REQUEST_LEN].try_into().unwrap();
            pos += REQUEST_LEN;
            let Some(req) = check_request_round_trip(header) else { break false };
            check_kernel_range(&req);
            if req.len > SLOT_LEN as u64 {
                break false;
            }
            let len = req.len as usize;
            let mut values: Vec<i128> = match req.source {
                SOURCE_RANGE => (0..len).map(|i| req.first as i128 + i as i128 * req.step as i128).collect(),
                _ => Vec::new(),
            };
            if req.source == SOURCE_LIST_INLINE {
                if s.len() - pos < len * 8 {
                    break false;
                }
                values = from_le_bytes(&s[pos..pos + len * 8]).map(i128::from).collect();
                pos += len * 8;
            }
            let needs_slot = req.source == SOURCE_LIST_IN_SLOT || req.output == OUTPUT_SLOT;
            if needs_slot && req.slot as usize >= SLOTS {
                break false;
            }
            if req.source == SOURCE_LIST_IN_SLOT {
                values = slots[req.slot as usize][..len].iter().copied().map(i128::from).collect();
            }
            if len == 0 {
                replies.push(Expect::Empty { req });
                continue;
            }
            let out_of_range = |v: &i128| v.unsigned_abs() > MAX_ABS as u128;
            if values.iter().any(out_of_range) {
                let offenders: Vec<i64> = match req.source {
                    // The kernel checks the ends of a range (the numbers in
                    // between lie between them) and may name either.
                    SOURCE_RANGE => [values[0], values[len - 1]].into_iter().filter(out_of_range).map(|v| v as i64).collect(),
                    _ => vec![*values.iter().find(|v| out_of_range(v)).unwrap() as i64],
                };
                let messages = offenders.into_iter().map(|v| KernelError::OutOfRange(v).to_string()).collect();
                replies.push(Expect::Err { req, messages });
                continue;
            }
            let squares: Vec<i64> = values.iter().map(|v| i64::try_from(v * v).expect("in range")).collect();
            if req.output == OUTPUT_SLOT {
                slots[req.slot as usize][..len].copy_from_slice(&squares);
            }
            replies.push(Expect::Ok { req, squares });
        };
        Model { replies, clean, slots }
    }

    fn check(&self, run: &WorkerRun) {
        let out = &run.stdout;
        let mut pos = 0;
        let mut take = |n: usize, what: &str| -> &[u8] {
            assert!(out.len() - pos >= n, "worker output ends inside {what} (at byte {pos} of {})", out.len());
            pos += n;
            &out[pos - n..pos]
        };
        let reply = |bytes: &[u8]| -> Reply {
            let reply = Reply::decode(bytes.try_into().unwrap()).expect("worker sent an undecodable reply");
            assert_eq!(Reply::decode(&reply.encode()), Ok(reply), "reply does not round-trip");
            reply
        };

        let hello = reply(take(REPLY_LEN, "the hello"));
        assert_eq!(hello, Reply { kind: REPLY_HELLO, slot: 0, len: 0, compute_ns: 0 }, "bad hello");

        for (n, expect) in self.replies.iter().enumerate() {
            let got = reply(take(REPLY_LEN, "a reply header"));
            match expect {
                Expect::Ok { req, squares } => {
                    assert_eq!(
                        (got.kind, got.slot, got.len),
                        (REPLY_OK, req.slot, req.len),
                        "reply {n} to {req:?}: want OK"
                    );
                    if req.output == OUTPUT_PIPE {
                        let sent: Vec<i64> = from_le_bytes(take(squares.len() * 8, "squares")).collect();
                        assert_eq!(&sent, squares, "reply {n} to {req:?}: wrong squares on the pipe");
                    }
                }
                Expect::Err { req, messages } => {
                    assert_eq!((got.kind, got.slot), (REPLY_ERROR, req.slot), "reply {n} to {req:?}: want ERROR");
                    let msg = String::from_utf8(take(got.len as usize, "an error message").to_vec())
                        .expect("error message is not UTF-8");
                    assert!(messages.contains(&msg), "reply {n} to {req:?}: message {msg:?}, want one of {messages:?}");
                }
                Expect::Empty { req } => {
                    assert_eq!(got.slot, req.slot, "reply {n} to {req:?}: slot");
                    match got.kind {
                        REPLY_OK => assert_eq!(got.len, 0, "reply {n} to {req:?}: OK for zero numbers"),
                        REPLY_ERROR => {
                            let msg = String::from_utf8(take(got.len as usize, "an error message").to_vec())
                                .expect("error message is not UTF-8");
                            assert!(msg.contains("is outside"), "reply {n} to {req:?}: message {msg:?}");
                        }
                        kind => panic!("reply {n} to {req:?}: kind {kind}"),
                    }
                }
            }
        }
        assert_eq!(pos, out.len(), "worker sent {} bytes more than the model expects", out.len() - pos);
        assert_eq!(
            run.result.is_ok(),
            self.clean,
            "worker ended with {:?}, the model expected {}",
            run.result,
            if self.clean { "a clean EOF" } else { "a protocol error" }
        );
        for (i, (got, want)) in run.slots.iter().zip(&self.slots).enumerate() {
            if got != want {
                let at = got.iter().zip(want).position(|(a, b)| a != b).unwrap();
                panic!("shared slot {i} differs at {at}: worker left {}, model expects {}", got[at], want[at]);
            }
        }
    }
}

struct WorkerRun {
    result: anyhow::Result<()>,
    stdout: Vec<u8>,
    slots: Vec<Vec<i64>>,
}

fn check_os(ret: libc::c_int, what: &str) -> libc::c_int {
    assert!(ret >= 0, "{what}: {}", std::io::Error::last_os_error());
    ret
}

fn memfd(name: &std::ffi::CStr) -> OwnedFd {
    // SAFETY: valid C string and flags; the new fd is owned by nobody else.
    unsafe { OwnedFd::from_raw_fd(check_os(libc::memfd_create(name.as_ptr(), libc::MFD_CLOEXEC), "memfd_create")) }
}

/// The process's own stdin and stdout, kept open to put back after each run.
fn saved_stdio() -> (RawFd, RawFd) {
    static SAVED: OnceLock<(RawFd, RawFd)> = OnceLock::new();
    // SAFETY: dup of the standard descriptors; the copies live for the whole process.
    *SAVED.get_or_init(|| unsafe { (check_os(libc::dup(0), "dup stdin"), check_os(libc::dup(1), "dup stdout")) })
}

/// Runs the real worker loop on `stream` as stdin; collects stdout and the slots.
fn run_worker(stream: &[u8]) -> WorkerRun {
    let (saved_in, saved_out) = saved_stdio();

    let mut shm = SharedSlots::create(SLOTS, SLOT_LEN).expect("create shared memory");
    for i in 0..SLOTS {
        shm.slot_mut(i).copy_from_slice(&initial_slot(i));
    }
    // The worker owns (and closes) the descriptor it is given.
    // SAFETY: dup of a descriptor we own.
    let worker_fd = check_os(unsafe { libc::dup(shm.raw_fd()) }, "dup shm");
    let args = WorkerArgs { shm_fd: Some(worker_fd), slots: SLOTS, slot_len: SLOT_LEN };

    let input = memfd(c"fuzz-stdin");
    let mut file = std::fs::File::from(input);
    file.write_all(stream).expect("write stdin memfd");
    // SAFETY: plain syscalls on descriptors we own.
    unsafe {
        check_os(libc::lseek(file.as_raw_fd(), 0, libc::SEEK_SET) as libc::c_int, "lseek");
    }
    let mut output = std::fs::File::from(memfd(c"fuzz-stdout"));

    std::io::stdout().flush().expect("flush stdout");
    // SAFETY: replacing fds 0 and 1 with descriptors we own; restored below.
    unsafe {
        check_os(libc::dup2(file.as_raw_fd(), 0), "dup2 stdin");
        check_os(libc::dup2(output.as_raw_fd(), 1), "dup2 stdout");
    }
    let result = squared::worker::run(&args);
    // Whatever the worker left buffered must reach the memfd, and whatever it
    // did not read must not leak into the next run through std's stdin buffer.
    let flushed = std::io::stdout().flush();
    let mut rest = Vec::new();
    let drained = std::io::stdin().lock().read_to_end(&mut rest);
    // SAFETY: putting the saved descriptors back.
    unsafe {
        check_os(libc::dup2(saved_in, 0), "restore stdin");
        check_os(libc::dup2(saved_out, 1), "restore stdout");
    }
    flushed.expect("flush worker stdout");
    drained.expect("drain stdin");

    let mut stdout = Vec::new();
    // SAFETY: plain syscall on a descriptor we own.
    unsafe {
        check_os(libc::lseek(output.as_raw_fd(), 0, libc::SEEK_SET) as libc::c_int, "lseek");
    }
    output.read_to_end(&mut stdout).expect("read stdout memfd");
    let slots = (0..SLOTS).map(|i| shm.slot_mut(i).to_vec()).collect();
    WorkerRun { result, stdout, slots }
}
