//! The `squared worker` subprocess: reads requests on stdin, squares, answers
//! on stdout (see [`crate::exec::protocol`]). It exits when stdin closes, and
//! the kernel kills it if the server dies (`PR_SET_PDEATHSIG`, set by the
//! server before exec).

use std::io::{self, BufWriter, Read, Write};
use std::time::Instant;

use crate::domain::Simulate;
use crate::exec::processes::read_i64s;
use crate::exec::protocol::{self, Reply, Request};
use crate::exec::shm::SharedSlots;
use crate::exec::{le_bytes, square_into, Source};

/// How the server set this worker up (hidden command-line arguments).
#[derive(Debug, Clone, clap::Args)]
pub struct WorkerArgs {
    /// Descriptor of the shared memory region.
    #[arg(long)]
    pub shm_fd: Option<i32>,
    /// Slots in the shared memory region.
    #[arg(long, default_value_t = 2)]
    pub slots: usize,
    /// Numbers per slot, and the most one request may ask for.
    #[arg(long, default_value_t = 65_536)]
    pub slot_len: usize,
}

/// Runs the worker loop until stdin closes. An `Err` means the protocol broke.
pub fn run(args: &WorkerArgs) -> anyhow::Result<()> {
    use anyhow::Context;
    let mut shm = match args.shm_fd {
        // SAFETY: the server placed a memfd of this size at this descriptor for us alone.
        Some(fd) => {
            Some(unsafe { SharedSlots::from_inherited(fd, args.slots, args.slot_len) }.context("map shared memory")?)
        }
        None => None,
    };
    let mut input = io::stdin().lock();
    let mut output = BufWriter::with_capacity(1 << 16, io::stdout().lock());
    let mut numbers = vec![0i64; args.slot_len];
    let mut squares = vec![0i64; args.slot_len];
    let hello = Reply { kind: protocol::REPLY_HELLO, slot: 0, len: 0, compute_ns: 0 };
    output.write_all(&hello.encode())?;
    output.flush()?;

    let mut header = [0u8; protocol::REQUEST_LEN];
    loop {
        match input.read_exact(&mut header) {
            Ok(()) => {}
            Err(e) if e.kind() == io::ErrorKind::UnexpectedEof => return Ok(()),
            Err(e) => return Err(e).context("read request"),
        }
        let request = Request::decode(&header).context("decode request")?;
        let len = request.len as usize;
        if request.len > args.slot_len as u64 {
            anyhow::bail!("request for {} numbers exceeds the slot length {}", request.len, args.slot_len);
        }
        if request.source == protocol::SOURCE_LIST_INLINE {
            read_i64s(&mut input, &mut numbers[..len]).context("read numbers")?;
        }
        let needs_slot = request.source == protocol::SOURCE_LIST_IN_SLOT || request.output == protocol::OUTPUT_SLOT;
        let slot = match (&mut shm, needs_slot) {
            (Some(shm), true) if (request.slot as usize) < shm.slots() => Some(shm.slot_mut(request.slot as usize)),
            (_, true) => anyhow::bail!("request names slot {} that this worker does not have", request.slot),
            (_, false) => None,
        };
        if request.source == protocol::SOURCE_LIST_IN_SLOT {
            numbers[..len].copy_from_slice(&slot.as_deref().expect("checked above")[..len]);
        }
        let source = match request.source {
            protocol::SOURCE_RANGE => Source::Range { first: request.first, step: request.step },
            _ => Source::List(&numbers[..len]),
        };
        let out = match (request.output, slot) {
            (protocol::OUTPUT_SLOT, Some(slot)) => &mut slot[..len],
            _ => &mut squares[..len],
        };
        let simulate = Simulate { sleep_ms: request.sleep_ms, spin: request.spin };
        let started = Instant::now();
        let result = square_into(source, out, simulate, None);
        let compute_ns = started.elapsed().as_nanos() as u64;
        match result {
            Ok(()) => {
                let reply = Reply { kind: protocol::REPLY_OK, slot: request.slot, len: request.len, compute_ns };
                output.write_all(&reply.encode())?;
                if request.output == protocol::OUTPUT_PIPE {
                    output.write_all(&le_bytes(&squares[..len]))?;
                }
            }
            Err(e) => {
                let msg = e.to_string();
                let reply =
                    Reply { kind: protocol::REPLY_ERROR, slot: request.slot, len: msg.len() as u64, compute_ns };
                output.write_all(&reply.encode())?;
                output.write_all(msg.as_bytes())?;
            }
        }
        output.flush()?;
    }
}
