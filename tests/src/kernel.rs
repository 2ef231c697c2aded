//! The real XDP program under `BPF_PROG_TEST_RUN`, with private (unpinned) maps and a controllable clock.
//!
//! Needs root (CAP_BPF + CAP_NET_ADMIN). Each [`KernelUnderTest`] is an independent load: tests do not share
//! map state.

use std::time::Duration;

use anyhow::{Context as _, bail};
use aya::{
    Ebpf,
    programs::{TestRun as _, TestRunOptions},
};
use detector_common::{Config, REASON_COUNT, Reason};
use detector_user::{
    loader::{self, LoadOptions},
    maps::{CounterTotals, KernelMaps},
};

pub const XDP_ABORTED: u32 = 0;
pub const XDP_DROP: u32 = 1;
pub const XDP_PASS: u32 = 2;

/// A loaded program whose clock the test sets.
pub struct KernelUnderTest {
    ebpf: Ebpf,
    pub maps: KernelMaps,
    config: Config,
}

/// The outcome of one packet.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Outcome {
    /// The XDP action returned.
    pub action: u32,
    /// The reason counter that moved (exactly one must).
    pub reason: Reason,
}

impl KernelUnderTest {
    /// Loads the program with the test clock at `now_ns` (must be non-zero) and event sampling off.
    pub fn load(now_ns: u64) -> anyhow::Result<Self> {
        let mut ebpf = loader::load(&LoadOptions {
            pin_dir: None,
            test_clock: true,
        })
        .context("loading the XDP program (tests need root)")?;
        let maps = KernelMaps::from_ebpf(&mut ebpf)?;
        let mut k = Self {
            ebpf,
            maps,
            config: Config::default(),
        };
        k.set_now(now_ns)?;
        Ok(k)
    }

    /// Sets the program's "now" (monotonic ns). Expiries and buckets use it.
    pub fn set_now(&mut self, now_ns: u64) -> anyhow::Result<()> {
        self.config.test_now_ns = now_ns;
        self.maps.set_config(self.config)?;
        Ok(())
    }

    pub fn now(&self) -> u64 {
        self.config.test_now_ns
    }

    /// Replaces the program config (keeping the test clock).
    pub fn set_config(&mut self, mut config: Config) -> anyhow::Result<()> {
        config.test_now_ns = self.config.test_now_ns;
        self.config = config;
        self.maps.set_config(config)?;
        Ok(())
    }

    /// Runs one frame; returns the XDP action.
    pub fn run(&mut self, frame: &[u8]) -> anyhow::Result<u32> {
        Ok(self.run_repeat(frame, 1)?.0)
    }

    /// Runs a frame `repeat` times in the kernel; returns the action and the kernel's mean time per run.
    pub fn run_repeat(&mut self, frame: &[u8], repeat: u32) -> anyhow::Result<(u32, Duration)> {
        let program = loader::program_mut(&mut self.ebpf)?;
        let result = program
            .test_run(TestRunOptions {
                data_in: Some(frame),
                repeat,
                ..TestRunOptions::default()
            })
            .with_context(|| format!("BPF_PROG_TEST_RUN on a {}-byte frame", frame.len()))?;
        Ok((result.return_value, result.duration))
    }

    /// Runs one frame and reports which reason counter it was counted under.
    pub fn classify(&mut self, frame: &[u8]) -> anyhow::Result<Outcome> {
        let before = self.maps.counters()?;
        let action = self.run(frame)?;
        let after = self.maps.counters()?;
        let moved: Vec<usize> = (0..REASON_COUNT)
            .filter(|&i| after.by_reason[i] != before.by_reason[i])
            .collect();
        let [index] = moved[..] else {
            bail!("expected exactly one reason counter to move, got {moved:?} (action {action})");
        };
        let moved_by = after.by_reason[index] - before.by_reason[index];
        if moved_by != 1 {
            bail!("reason counter {index} moved by {moved_by}, expected 1");
        }
        Ok(Outcome {
            action,
            reason: Reason::from_u32(index as u32).expect("index below REASON_COUNT"),
        })
    }

    pub fn counters(&self) -> anyhow::Result<CounterTotals> {
        Ok(self.maps.counters()?)
    }
}
