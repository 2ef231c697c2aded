//! "Now" for one packet.

use aya_ebpf::helpers::{bpf_jiffies64, bpf_ktime_get_coarse_ns, bpf_ktime_get_ns};
use detector_common::Config;

use crate::maps::{AQD_TEST_CLOCK, CPU_STATE};

/// "Now", read at most once per packet and only when something needs it. Two resolutions: the precise clock
/// (`bpf_ktime_get_ns`, costly in VMs) for rate limits and event timestamps; the coarse one (same
/// CLOCK_MONOTONIC base, tick resolution) for expiries and last-seen times.
///
/// The coarse time only changes when the tick advances `jiffies`, and `bpf_jiffies64` is one load (the
/// verifier inlines it), so the coarse helper is called once per jiffy per CPU and its result kept in
/// `CPU_STATE`; every other packet of that jiffy reads it from there. The kernel advances `jiffies` just
/// before the coarse time at each tick, so a value cached in that instant is one tick old for one tick: the
/// coarse time lags the real one by at most two ticks instead of one (expiries apply a few ms later at most).
pub struct Clock {
    now: u64,
    coarse: u64,
    test_now: u64,
}

impl Clock {
    #[inline(always)]
    pub fn new(config: &Config) -> Self {
        Self {
            now: 0,
            coarse: 0,
            test_now: config.test_now_ns,
        }
    }

    #[inline(always)]
    pub fn test_clock() -> bool {
        // SAFETY: a read-only global; volatile so the load is not folded at compile time.
        unsafe { core::ptr::read_volatile(&AQD_TEST_CLOCK) != 0 }
    }

    #[inline(always)]
    pub fn now(&mut self) -> u64 {
        if self.now == 0 {
            self.now = if Self::test_clock() {
                self.test_now
            } else {
                unsafe { bpf_ktime_get_ns() }
            };
        }
        self.now
    }

    #[inline(always)]
    pub fn coarse(&mut self) -> u64 {
        if self.now != 0 {
            return self.now;
        }
        if self.coarse == 0 {
            self.coarse = if Self::test_clock() {
                self.test_now
            } else {
                cached_coarse()
            };
        }
        self.coarse
    }
}

/// `jiffies` (the verifier inlines the helper as one load).
#[inline(always)]
pub fn jiffies() -> u64 {
    // SAFETY: a helper without arguments.
    unsafe { bpf_jiffies64() }
}

/// The coarse time, from this CPU's `CPU_STATE` entry when it was read at the current jiffy.
#[inline(always)]
fn cached_coarse() -> u64 {
    let jiffies = jiffies();
    let Some(cpu) = CPU_STATE.get_ptr_mut(0) else {
        // SAFETY: a helper without arguments.
        return unsafe { bpf_ktime_get_coarse_ns() };
    };
    // SAFETY: per-CPU map memory from a successful lookup; nothing else runs on this CPU meanwhile.
    unsafe {
        if (*cpu).coarse_jiffies != jiffies || (*cpu).coarse_ns == 0 {
            (*cpu).coarse_ns = bpf_ktime_get_coarse_ns();
            (*cpu).coarse_jiffies = jiffies;
        }
        (*cpu).coarse_ns
    }
}
