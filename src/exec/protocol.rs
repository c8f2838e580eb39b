//! The wire protocol between the server and a `squared worker` subprocess.
//!
//! The server writes requests to the worker's stdin; the worker answers each on
//! its stdout, in order. All integers are little-endian. One request computes
//! one segment (at most the worker's slot length):
//!
//! ```text
//! request  (48 bytes): magic u32 | op u8 | source u8 | output u8 | slot u8
//!                      | len u64 | first i64 | step i64 | sleep_ms u64 | spin u64
//!                      then, for source LIST_INLINE, len × i64 numbers
//! reply    (24 bytes): magic u32 | kind u8 | slot u8 | 0u16 | len u64 | compute_ns u64
//!                      then, for kind OK with output PIPE, len × i64 squares;
//!                      for kind ERROR, len bytes of UTF-8 message
//! ```
//!
//! On start the worker sends one `HELLO` reply, so the server can time a
//! worker's start-up honestly. EOF on stdin tells the worker to exit.

use thiserror::Error;

pub const MAGIC: u32 = 0x5351_5731; // "SQW1"
pub const REQUEST_LEN: usize = 48;
pub const REPLY_LEN: usize = 24;

pub const OP_COMPUTE: u8 = 1;

/// Where the numbers of a request come from.
pub const SOURCE_RANGE: u8 = 0;
/// Numbers follow the request header on the pipe.
pub const SOURCE_LIST_INLINE: u8 = 1;
/// Numbers were placed in the request's shared-memory slot.
pub const SOURCE_LIST_IN_SLOT: u8 = 2;

/// Squares go into the shared-memory slot.
pub const OUTPUT_SLOT: u8 = 0;
/// Squares follow the reply header on the pipe.
pub const OUTPUT_PIPE: u8 = 1;

pub const REPLY_OK: u8 = 0;
pub const REPLY_ERROR: u8 = 1;
pub const REPLY_HELLO: u8 = 2;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Request {
    pub source: u8,
    pub output: u8,
    pub slot: u8,
    pub len: u64,
    pub first: i64,
    pub step: i64,
    pub sleep_ms: u64,
    pub spin: u64,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Reply {
    pub kind: u8,
    pub slot: u8,
    pub len: u64,
    pub compute_ns: u64,
}

#[derive(Debug, Clone, PartialEq, Eq, Error)]
pub enum ProtocolError {
    #[error("bad magic {0:#x}")]
    BadMagic(u32),
    #[error("unknown {what} {value}")]
    Unknown { what: &'static str, value: u8 },
}

fn u64_at(b: &[u8], at: usize) -> u64 {
    u64::from_le_bytes(b[at..at + 8].try_into().expect("8 bytes"))
}

fn check_magic(b: &[u8]) -> Result<(), ProtocolError> {
    match u32::from_le_bytes(b[0..4].try_into().expect("4 bytes")) {
        MAGIC => Ok(()),
        other => Err(ProtocolError::BadMagic(other)),
    }
}

impl Request {
    pub fn encode(&self) -> [u8; REQUEST_LEN] {
        let mut b = [0u8; REQUEST_LEN];
        b[0..4].copy_from_slice(&MAGIC.to_le_bytes());
        b[4] = OP_COMPUTE;
        b[5] = self.source;
        b[6] = self.output;
        b[7] = self.slot;
        b[8..16].copy_from_slice(&self.len.to_le_bytes());
        b[16..24].copy_from_slice(&self.first.to_le_bytes());
        b[24..32].copy_from_slice(&self.step.to_le_bytes());
        b[32..40].copy_from_slice(&self.sleep_ms.to_le_bytes());
        b[40..48].copy_from_slice(&self.spin.to_le_bytes());
        b
    }

    pub fn decode(b: &[u8; REQUEST_LEN]) -> Result<Self, ProtocolError> {
        check_magic(b)?;
        if b[4] != OP_COMPUTE {
            return Err(ProtocolError::Unknown { what: "op", value: b[4] });
        }
        if b[5] > SOURCE_LIST_IN_SLOT {
            return Err(ProtocolError::Unknown { what: "source", value: b[5] });
        }
        if b[6] > OUTPUT_PIPE {
            return Err(ProtocolError::Unknown { what: "output", value: b[6] });
        }
        Ok(Request {
            source: b[5],
            output: b[6],
            slot: b[7],
            len: u64_at(b, 8),
            first: u64_at(b, 16) as i64,
            step: u64_at(b, 24) as i64,
            sleep_ms: u64_at(b, 32),
            spin: u64_at(b, 40),
        })
    }
}

impl Reply {
    pub fn encode(&self) -> [u8; REPLY_LEN] {
        let mut b = [0u8; REPLY_LEN];
        b[0..4].copy_from_slice(&MAGIC.to_le_bytes());
        b[4] = self.kind;
        b[5] = self.slot;
        b[8..16].copy_from_slice(&self.len.to_le_bytes());
        b[16..24].copy_from_slice(&self.compute_ns.to_le_bytes());
        b
    }

    pub fn decode(b: &[u8; REPLY_LEN]) -> Result<Self, ProtocolError> {
        check_magic(b)?;
        if b[4] > REPLY_HELLO {
            return Err(ProtocolError::Unknown { what: "reply kind", value: b[4] });
        }
        Ok(Reply { kind: b[4], slot: b[5], len: u64_at(b, 8), compute_ns: u64_at(b, 16) })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    proptest! {
        #[test]
        fn requests_round_trip(source in 0u8..3, output in 0u8..2, slot: u8, len: u64, first: i64, step: i64, sleep_ms: u64, spin: u64) {
            let r = Request { source, output, slot, len, first, step, sleep_ms, spin };
            prop_assert_eq!(Request::decode(&r.encode()), Ok(r));
        }

        #[test]
        fn no_header_makes_the_decoders_panic(bytes in proptest::array::uniform32(any::<u8>()), more in proptest::array::uniform16(any::<u8>())) {
            let mut req = [0u8; REQUEST_LEN];
            req[..32].copy_from_slice(&bytes);
            req[32..].copy_from_slice(&more);
            let _ = Request::decode(&req);
            let _ = Reply::decode(req[..REPLY_LEN].try_into().unwrap());
        }
    }
}
