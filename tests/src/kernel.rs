//! The real XDP program under `BPF_PROG_TEST_RUN`, with private (unpinned) maps and a controllable clock.
//!
//! Needs root (CAP_BPF + CAP_NET_ADMIN). Each [`KernelUnderTest`] is an independent load: tests do not share
//! map state.

use std::time::Duration;

use anyhow::{Context as _, bail};
use aya::{
    Ebpf,
    maps::{HashMap, Map, MapData, RingBuf},
    programs::{TestRun as _, TestRunOptions},
};
use detector_common::{Config, Decision, FlowState, FlowTuple, REASON_COUNT, Reason, map_names};

use crate::packet::Segment;
use detector_user::{
    events::{self, Event},
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
    /// The fingerprint maps and the ring buffer, opened by id (second handles), so they are here whether or
    /// not `KernelMaps` takes them too.
    pub fp: FingerprintMaps,
    config: Config,
    /// `Config::flags` bits kept through every [`Self::set_config`].
    sticky_flags: u32,
    /// `FLOWS` and `HALF_OPEN` as the daemon's ager opens them.
    flow_tables: detector_user::aging::FlowTables,
}

/// Handles on the maps of the fingerprint path, and the event ring buffer.
pub struct FingerprintMaps {
    pub syn_verdicts: HashMap<MapData, u64, Decision>,
    pub hello_verdicts: HashMap<MapData, u64, Decision>,
    pub flows: HashMap<MapData, FlowTuple, FlowState>,
    pub events: RingBuf<MapData>,
}

/// A second handle on the loaded map `name` (by its kernel id).
fn reopen<T: TryFrom<Map, Error = aya::maps::MapError>>(ebpf: &Ebpf, name: &str) -> anyhow::Result<T> {
    let map = ebpf.map(name).with_context(|| format!("map {name} missing"))?;
    let data = match map {
        Map::HashMap(d) | Map::LruHashMap(d) | Map::RingBuf(d) => d,
        _ => bail!("map {name} has an unexpected type"),
    };
    let id = data.info()?.id();
    let map = Map::from_map_data(MapData::from_id(id)?)?;
    Ok(T::try_from(map)?)
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
        Self::load_resized(now_ns, &[])
    }

    /// [`Self::load`] with the capacities of some maps changed (`(map name, max entries)`): e.g. a small
    /// `SOURCES`, so that a flood of new sources evicts from it within a few thousand packets.
    pub fn load_resized(now_ns: u64, max_entries: &[(&'static str, u32)]) -> anyhow::Result<Self> {
        let mut ebpf = loader::load_resized(
            &LoadOptions {
                pin_dir: None,
                test_clock: true,
            },
            max_entries,
        )
        .context("loading the XDP program (tests need root)")?;
        let fp = FingerprintMaps {
            syn_verdicts: reopen(&ebpf, map_names::SYN_VERDICTS)?,
            hello_verdicts: reopen(&ebpf, map_names::HELLO_VERDICTS)?,
            flows: reopen(&ebpf, map_names::FLOWS)?,
            events: reopen(&ebpf, map_names::EVENTS)?,
        };
        let flow_tables = detector_user::aging::FlowTables::from_ebpf(&ebpf)?;
        let maps = KernelMaps::from_ebpf(&mut ebpf)?;
        let mut k = Self {
            flow_tables,
            ebpf,
            maps,
            fp,
            config: Config::default(),
            sticky_flags: 0,
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
        config.flags |= self.sticky_flags;
        self.config = config;
        self.maps.set_config(config)?;
        Ok(())
    }

    /// Passes TCP fragments to protected ports from now on (`CONFIG_FLAG_PASS_TCP_FRAGMENTS`, kept through
    /// `set_config`): for the suites that test how the parser and the limits treat fragments. By default
    /// they are dropped (`Reason::DropTcpFragment`).
    pub fn pass_tcp_fragments(&mut self) -> anyhow::Result<()> {
        self.sticky_flags |= detector_common::CONFIG_FLAG_PASS_TCP_FRAGMENTS;
        self.set_config(self.config)
    }

    /// Passes (`true`) or drops (`false`, the default) TCP fragments to protected ports.
    pub fn set_pass_tcp_fragments(&mut self, pass: bool) -> anyhow::Result<()> {
        let flag = detector_common::CONFIG_FLAG_PASS_TCP_FRAGMENTS;
        if pass {
            self.sticky_flags |= flag;
        } else {
            self.sticky_flags &= !flag;
            self.config.flags &= !flag;
        }
        self.set_config(self.config)
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

    /// Runs `frame` `repeat` times on each of `cpus`, all at once (one thread pinned per CPU, started together):
    /// the program's shared state sees the concurrency of as many receive queues. Returns when all are done.
    pub fn run_concurrently(
        &mut self,
        frames: &[Vec<u8>],
        cpus: &[usize],
        repeat: u32,
    ) -> anyhow::Result<()> {
        use std::os::fd::{AsFd as _, AsRawFd as _};
        let fd = loader::program_mut(&mut self.ebpf)?.fd()?.as_fd().as_raw_fd();
        let start = std::sync::Barrier::new(cpus.len());
        std::thread::scope(|scope| {
            let runs: Vec<_> = cpus
                .iter()
                .zip(frames.iter().cycle())
                .map(|(&cpu, frame)| {
                    let start = &start;
                    scope.spawn(move || -> anyhow::Result<()> {
                        pin_current_thread(cpu).with_context(|| format!("pinning to CPU {cpu}"))?;
                        start.wait();
                        test_run_raw(fd, frame, repeat).context("BPF_PROG_TEST_RUN")
                    })
                })
                .collect();
            runs.into_iter().try_for_each(|run| {
                run.join()
                    .map_err(|_| anyhow::anyhow!("a test-run thread panicked"))?
            })
        })
    }

    /// Runs one frame through the TC egress program, as a packet the host sends; returns the TC action.
    pub fn run_egress(&mut self, frame: &[u8]) -> anyhow::Result<u32> {
        let program = loader::egress_program_mut(&mut self.ebpf)?;
        let result = program
            .test_run(TestRunOptions {
                data_in: Some(frame),
                repeat: 1,
                ..TestRunOptions::default()
            })
            .with_context(|| format!("BPF_PROG_TEST_RUN (egress) on a {}-byte frame", frame.len()))?;
        Ok(result.return_value)
    }

    /// The whole handshake of `syn`'s flow: the SYN (XDP), the server's SYN-ACK (egress), the client's ACK
    /// (XDP). Afterwards the flow is verified (in `FLOWS`) unless a verdict or limit dropped the SYN.
    pub fn handshake(&mut self, syn: &Segment) -> anyhow::Result<()> {
        self.run(&syn.build())?;
        self.run_egress(&syn.syn_ack().build())?;
        self.run(&syn.handshake_ack().build())?;
        Ok(())
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

    /// The program config as the test last set it.
    pub fn config(&self) -> Config {
        self.config
    }

    /// Puts a verdict under a SYN signature key (`SynSignature::key`).
    pub fn set_syn_verdict(&mut self, key: u64, decision: Decision) -> anyhow::Result<()> {
        self.fp.syn_verdicts.insert(key, decision, 0)?;
        Ok(())
    }

    /// Puts a verdict under a kernel ClientHello key.
    pub fn set_hello_verdict(&mut self, key: u64, decision: Decision) -> anyhow::Result<()> {
        self.fp.hello_verdicts.insert(key, decision, 0)?;
        Ok(())
    }

    pub fn syn_verdict(&self, key: u64) -> Option<Decision> {
        self.fp.syn_verdicts.get(&key, 0).ok()
    }

    /// Fresh handles on `FLOWS` and `HALF_OPEN`, as the daemon's ager uses them.
    pub fn flow_tables(&self) -> anyhow::Result<detector_user::aging::FlowTables> {
        self.flow_tables.try_clone()
    }

    /// The kernel's state of a tracked flow.
    pub fn flow(&self, tuple: &FlowTuple) -> Option<FlowState> {
        self.fp.flows.get(tuple, 0).ok()
    }

    /// Every event waiting in the ring buffer, decoded (an undecodable record fails the call).
    pub fn drain_events(&mut self) -> anyhow::Result<Vec<Event>> {
        let mut out = Vec::new();
        while let Some(record) = self.fp.events.next() {
            out.push(events::decode(&record)?);
        }
        Ok(out)
    }
}

/// Pins the calling thread to one CPU: per-CPU kernel state (`BPF_PROG_TEST_RUN` runs on the caller's CPU)
/// then stays on one CPU for the whole test.
pub fn pin_current_thread(cpu: usize) -> std::io::Result<()> {
    // SAFETY: a zeroed cpu_set_t is valid; CPU_SET stays within it; pid 0 = the calling thread.
    unsafe {
        let mut set: libc::cpu_set_t = std::mem::zeroed();
        libc::CPU_SET(cpu, &mut set);
        if libc::sched_setaffinity(0, std::mem::size_of::<libc::cpu_set_t>(), &set) != 0 {
            return Err(std::io::Error::last_os_error());
        }
    }
    Ok(())
}

/// `BPF_PROG_TEST_RUN`, the bpf(2) command.
pub const BPF_PROG_TEST_RUN: libc::c_long = 10;

/// `union bpf_attr`'s `test` member (BPF_PROG_TEST_RUN), for test runs on a raw program fd (threads, live
/// frames) where aya's `test_run` and its `&mut` program do not fit.
#[repr(C)]
#[derive(Default)]
pub struct TestRunAttr {
    pub prog_fd: u32,
    pub retval: u32,
    pub data_size_in: u32,
    pub data_size_out: u32,
    pub data_in: u64,
    pub data_out: u64,
    pub repeat: u32,
    pub duration: u32,
    pub ctx_size_in: u32,
    pub ctx_size_out: u32,
    pub ctx_in: u64,
    pub ctx_out: u64,
    pub flags: u32,
    pub cpu: u32,
    pub batch_size: u32,
    pub _pad: u32,
}

/// bpf(2) with `cmd`'s attribute; the caller makes sure `attr` is that command's layout and its pointers are
/// valid for the call.
pub fn bpf<T>(cmd: libc::c_long, attr: &mut T) -> std::io::Result<libc::c_long> {
    // SAFETY: per the contract above; the kernel reads and writes only `size_of::<T>()` bytes of `attr`.
    let rc = unsafe { libc::syscall(libc::SYS_bpf, cmd, attr as *mut T, std::mem::size_of::<T>()) };
    if rc < 0 {
        return Err(std::io::Error::last_os_error());
    }
    Ok(rc)
}

/// `BPF_PROG_TEST_RUN` of program `fd` on `frame`, `repeat` times: aya's `test_run` needs the `&mut` program,
/// which threads cannot share.
fn test_run_raw(fd: std::os::fd::RawFd, frame: &[u8], repeat: u32) -> std::io::Result<()> {
    let mut attr = TestRunAttr {
        prog_fd: fd as u32,
        data_size_in: frame.len() as u32,
        data_in: frame.as_ptr() as u64,
        repeat,
        ..TestRunAttr::default()
    };
    bpf(BPF_PROG_TEST_RUN, &mut attr).map(|_| ())
}
