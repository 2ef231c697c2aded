//! Zeroing and copying structs without `memset`/`memmove`.
//!
//! LLVM lowers a zeroed struct assignment (`*p = T::default()`) to a call of the object's `memset`, and some
//! struct copies between map memory and a ring-buffer slot to its `memmove`: byte loops (4–7 instructions per
//! byte: a 72-byte `SourceState` cost ~290 instructions, the 32-byte SYN signature of every connection event
//! ~220). These helpers move aligned words instead; volatile so LLVM cannot fold them back into those calls.

use core::mem::{align_of, size_of};

/// Sets `*dst` to all zero bytes, one aligned word (8 or 4 bytes) at a time.
///
/// # Safety
/// `dst` must be valid for writes of a `T`, and all zero bytes must be a valid `T`.
#[inline(always)]
pub unsafe fn zero<T>(dst: *mut T) {
    const {
        assert!(
            align_of::<T>() >= 4 && size_of::<T>() % 4 == 0,
            "zero<T> needs 4-byte words"
        );
    }
    // SAFETY: per the caller's contract; every write is inside `*dst` and aligned for its word size.
    unsafe {
        if align_of::<T>() >= 8 && size_of::<T>() % 8 == 0 {
            let words = dst.cast::<u64>();
            for i in 0..size_of::<T>() / 8 {
                core::ptr::write_volatile(words.add(i), 0);
            }
        } else {
            let words = dst.cast::<u32>();
            for i in 0..size_of::<T>() / 4 {
                core::ptr::write_volatile(words.add(i), 0);
            }
        }
    }
}

/// Copies `*src` to `*dst` in aligned 4-byte words.
///
/// # Safety
/// `src` must be valid for reads and `dst` for writes of a `T`; they must not overlap.
#[inline(always)]
pub unsafe fn copy<T: Copy>(dst: *mut T, src: *const T) {
    const {
        assert!(
            align_of::<T>() >= 4 && size_of::<T>() % 4 == 0,
            "copy<T> needs 4-byte words"
        );
    }
    // SAFETY: per the caller's contract; every access is inside `*src` / `*dst`, 4-byte aligned (the type's).
    unsafe {
        let (d, s) = (dst.cast::<u32>(), src.cast::<u32>());
        for i in 0..size_of::<T>() / 4 {
            core::ptr::write_volatile(d.add(i), core::ptr::read_volatile(s.add(i)));
        }
    }
}
