//! Shared memory between the server and a worker subprocess: an anonymous
//! `memfd` mapped by both, divided into fixed slots of `i64`s.
//!
//! The memfd has no name in the file system, so nothing is left behind when
//! either side dies (even by `kill -9`). The protocol guarantees that a slot is
//! touched by one side at a time: the server writes a slot's input only while
//! no request for that slot is outstanding, and reads its output only after
//! the worker's reply for it.

use std::io;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};
use std::ptr::NonNull;

/// A mapping of `slots × slot_len` `i64`s.
pub struct SharedSlots {
    ptr: NonNull<i64>,
    slots: usize,
    slot_len: usize,
    fd: OwnedFd,
}

// SAFETY: the mapping is plain memory owned by this value; access to slots is
// coordinated by the request/reply protocol (see the module doc).
unsafe impl Send for SharedSlots {}

impl SharedSlots {
    /// Creates a new anonymous shared region (server side).
    pub fn create(slots: usize, slot_len: usize) -> io::Result<Self> {
        // SAFETY: the name is a valid C string; flags are valid.
        let fd = unsafe { libc::memfd_create(c"squared-shm".as_ptr(), libc::MFD_CLOEXEC) };
        if fd < 0 {
            return Err(io::Error::last_os_error());
        }
        // SAFETY: fd was just returned by memfd_create and is owned by nobody else.
        let fd = unsafe { OwnedFd::from_raw_fd(fd) };
        let bytes = Self::byte_len(slots, slot_len)?;
        // SAFETY: fd is a valid memfd.
        if unsafe { libc::ftruncate(fd.as_raw_fd(), bytes as libc::off_t) } != 0 {
            return Err(io::Error::last_os_error());
        }
        Self::map(fd, slots, slot_len)
    }

    /// Maps a region inherited at `fd` (worker side).
    ///
    /// # Safety
    /// `fd` must be an open memfd of at least `slots × slot_len × 8` bytes that
    /// this process owns from now on.
    pub unsafe fn from_inherited(fd: RawFd, slots: usize, slot_len: usize) -> io::Result<Self> {
        let fd = OwnedFd::from_raw_fd(fd);
        let mut stat: libc::stat = std::mem::zeroed();
        if libc::fstat(fd.as_raw_fd(), &mut stat) != 0 {
            return Err(io::Error::last_os_error());
        }
        if (stat.st_size as u64) < Self::byte_len(slots, slot_len)? as u64 {
            return Err(io::Error::new(io::ErrorKind::InvalidInput, "shared memory smaller than its slots"));
        }
        Self::map(fd, slots, slot_len)
    }

    fn byte_len(slots: usize, slot_len: usize) -> io::Result<usize> {
        slots
            .checked_mul(slot_len)
            .and_then(|n| n.checked_mul(8))
            .filter(|n| *n > 0)
            .ok_or_else(|| io::Error::new(io::ErrorKind::InvalidInput, "bad shared memory size"))
    }

    fn map(fd: OwnedFd, slots: usize, slot_len: usize) -> io::Result<Self> {
        let bytes = Self::byte_len(slots, slot_len)?;
        // SAFETY: mapping a valid fd of at least `bytes` bytes, shared, read-write.
        let ptr = unsafe {
            libc::mmap(
                std::ptr::null_mut(),
                bytes,
                libc::PROT_READ | libc::PROT_WRITE,
                libc::MAP_SHARED,
                fd.as_raw_fd(),
                0,
            )
        };
        if ptr == libc::MAP_FAILED {
            return Err(io::Error::last_os_error());
        }
        let ptr = NonNull::new(ptr.cast::<i64>()).expect("mmap never returns null on success");
        Ok(SharedSlots { ptr, slots, slot_len, fd })
    }

    pub fn slots(&self) -> usize {
        self.slots
    }

    pub fn slot_len(&self) -> usize {
        self.slot_len
    }

    /// The descriptor, to hand to a worker subprocess.
    pub fn raw_fd(&self) -> RawFd {
        self.fd.as_raw_fd()
    }

    /// Slot `i`, mutably. Panics if `i` is out of range.
    ///
    /// Exclusive access to `self` stands for exclusive access to the slot on
    /// this side; the protocol keeps the other side off it meanwhile.
    pub fn slot_mut(&mut self, i: usize) -> &mut [i64] {
        assert!(i < self.slots, "slot {i} of {}", self.slots);
        // SAFETY: in bounds of the mapping; i64 is valid for any bit pattern.
        unsafe { std::slice::from_raw_parts_mut(self.ptr.as_ptr().add(i * self.slot_len), self.slot_len) }
    }
}

impl Drop for SharedSlots {
    fn drop(&mut self) {
        let bytes = self.slots * self.slot_len * 8;
        // SAFETY: unmapping exactly what `map` mapped.
        unsafe { libc::munmap(self.ptr.as_ptr().cast(), bytes) };
    }
}
