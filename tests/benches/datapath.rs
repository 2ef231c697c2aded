//! Per-packet cost of aqd's XDP program on each datapath path, side by side with a bare `XDP_PASS` floor (the
//! `aqd_floor` program from the same object) and xdp-filter (Debian's xdp-tools `xdpfilt_alw_all.o`), all through
//! `BPF_PROG_TEST_RUN` with repeat 1,000,000 on the same frames.
//!
//! `cargo bench -p aqd-tests --bench datapath` (root). Prints Markdown tables; asserts nothing about speed.
//!
//! Method (see ../shared/research/perf-anchors.md for the same method applied to the anchors):
//! - the process moves into a private network namespace and a private mount namespace before anything else, so
//!   every veth and bpffs mount it makes disappears with it, whatever happens;
//! - aqd is loaded three times with the real clock (as in production) and production config (conn events on, 1-in-64
//!   drop samples): **full** (100,000 addresses in each of the allowlist, denylist and decision exact maps plus a
//!   few thousand prefixes in the tries), **exact** (the same exact maps, tries holding only the test prefixes), and
//!   **test** (only the entries the cases hit). Differences between them separate lookup costs;
//! - xdp-filter is loaded with aya, its `filter_ipv4` map enlarged to 131,072 entries and filled with the
//!   100,000 denylist addresses (`MAP_FLAG_SRC`), plus one port rule (11211, DST|TCP|UDP) that the frames miss;
//! - every program is parked (attached in native mode to an idle, down veth) so a test run does not add XDP
//!   dispatcher updates; the bench measures and prints the difference first;
//! - rounds are interleaved (every program on every frame each round, rotating the order); the bench thread is
//!   pinned to one CPU; cells are median (min–max); ratios use the wall-clock medians (CLOCK_MONOTONIC around the
//!   syscall ÷ repeat; the kernel's own figure is an integer ns), with the kernel-figure ratios beside them. When
//!   other tasks shared the CPU (the bench thread got < 90 % of the wall time) the summary judges on the kernel
//!   figures, which stop while the thread is rescheduled.
//!
//! Arguments (after `--`): `--rounds <n>` (default 5; or `AQD_BENCH_ROUNDS`), `--quick` (3 rounds), `--perf` (or
//! `AQD_BENCH_PERF=1`): adds a `perf record -e cpu-clock` profile of each path (top kernel symbols: the JITed
//! program's own instructions, hashing, trie walks, clock, ring buffer). Needs root.

use std::{
    collections::BTreeMap,
    ffi::CString,
    fs,
    net::{Ipv4Addr, Ipv6Addr},
    os::fd::{AsRawFd, RawFd},
    path::{Path, PathBuf},
    process::Command,
    sync::{
        Arc,
        atomic::{AtomicBool, AtomicU64, Ordering},
    },
    thread::{self, JoinHandle},
    time::{Duration, Instant},
};

use anyhow::{Context as _, bail, ensure};
use aqd_tests::packet::Frame;
use aya::{
    Ebpf, EbpfLoader,
    maps::{MapData, PerCpuArray, PerCpuHashMap, PerCpuValues, RingBuf},
    programs::{TestRun as _, TestRunOptions, Xdp, XdpMode, xdp::XdpLinkId},
};
use detector_common::{
    Action, CONFIG_FLAG_CAPTURE, CONFIG_FLAG_CONN_EVENTS, CONFIG_FLAG_REQUEST_EVENTS, Config, Decision,
    FLOOR_PROGRAM_NAME, Origin, PROGRAM_NAME, RateClass, Reason, event::EventKind, map_names,
};
use detector_user::{
    loader::{self, LoadOptions},
    maps::{CounterTotals, KernelMaps, List, rate_class_limits},
};
use ipnet::{IpNet, Ipv4Net, Ipv6Net};

const REPEAT: u32 = 1_000_000;
/// Interleaved rounds; `AQD_BENCH_ROUNDS` overrides (for quick looks).
const ROUNDS: usize = 5;
/// CPU the test runs are pinned to; the ring-buffer consumer runs on the other one.
const BENCH_CPU: usize = 1;
const CONSUMER_CPU: usize = 0;
const LIST_FILL: u32 = 100_000;
/// Prefixes in each list trie in the full load (IPv4 and IPv6 together), and /24 decisions.
const ALLOW_PREFIXES_V4: u32 = 2_000;
const ALLOW_PREFIXES_V6: u32 = 500;
const DENY_PREFIXES_V4: u32 = 1_500;
const DENY_PREFIXES_V6: u32 = 500;
const DECISION_PREFIXES: u32 = 1_000;
const PROTECTED_PORT: u16 = 443;
/// Production default (`events.drop_sample_every`).
const DROP_SAMPLE_EVERY: u32 = 64;

const XDP_FILTER_OBJECT: &str = "/usr/lib/x86_64-linux-gnu/bpf/xdpfilt_alw_all.o";
const XDP_FILTER_PROGRAM: &str = "xdpfilt_alw_all";
const XDP_FILTER_IPV4_ENTRIES: u32 = 131_072;
/// xdp-filter's value flags (xdp-filter/common_kern_user.h).
const XF_FLAG_SRC: u64 = 1 << 0;
const XF_FLAG_DST: u64 = 1 << 1;
const XF_FLAG_TCP: u64 = 1 << 2;
const XF_FLAG_UDP: u64 = 1 << 3;
const XF_PORT_RULE: u16 = 11211;

const XDP_DROP: u32 = 1;
const XDP_PASS: u32 = 2;

// ---- address plan ----
// Allowlist exact: 10.0.0.0 + i; denylist exact: 10.64.0.0 + i; decisions exact (block): 10.128.0.0 + i.
// Allow prefixes: 172.16.0.0/24 + i·256 and 2001:db8:8000+i::/48. Deny prefixes: 100.0.0.0 + i·4096 with lengths
// /20–/28, and 2001:db8:i::/48. Decision prefixes (block): 11.0.0.0/24 + i·256. Unknown sources: 198.18.0.0/24.
const ALLOW_BASE: [u8; 4] = [10, 0, 0, 0];
const DENY_BASE: [u8; 4] = [10, 64, 0, 0];
const DECISION_BASE: [u8; 4] = [10, 128, 0, 0];
/// The entry each list case hits: in the middle of the 100k.
const TEST_INDEX: u32 = 54_321;
const THROTTLE_INDEX: u32 = 12_345;
const DENY_PREFIX_TEST_INDEX: u32 = 777;
const UNKNOWN_V4: &str = "198.18.0.1";
/// The rate-limited case has its own source: its bucket stays over the limit for a second after the case.
const RATE_LIMITED_V4: &str = "198.18.0.3";
const DST_V4: &str = "198.18.0.2";
const UNKNOWN_V6: &str = "2001:db8:ffff::1";
const DST_V6: &str = "2001:db8:ffff::2";

fn v4_at(base: [u8; 4], offset: u32) -> Ipv4Addr {
    Ipv4Addr::from(u32::from_be_bytes(base) + offset)
}

fn deny_prefix_v4(i: u32) -> Ipv4Net {
    let addr = v4_at([100, 0, 0, 0], i * 4096);
    Ipv4Net::new(addr, 20 + (i % 9) as u8).expect("valid prefix length")
}

fn host_net(addr: Ipv4Addr) -> IpNet {
    IpNet::V4(Ipv4Net::new(addr, 32).expect("/32"))
}

/// How much of the address plan a load holds.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Fill {
    /// 100k per exact map + thousands of prefixes: what the targets are about.
    Full,
    /// 100k per exact map; the tries hold only the test prefixes.
    ExactOnly,
    /// Only the entries the cases hit.
    TestOnly,
}

impl Fill {
    fn label(self) -> &'static str {
        match self {
            Fill::Full => "full",
            Fill::ExactOnly => "exact",
            Fill::TestOnly => "test",
        }
    }

    fn describe(self) -> &'static str {
        match self {
            Fill::Full => {
                "100k allow + 100k deny + 100k decisions exact, 2.5k allow / 2k deny prefixes, 1k /24 decisions"
            }
            Fill::ExactOnly => "100k allow + 100k deny + 100k decisions exact, tries: only the test prefix",
            Fill::TestOnly => "only the entries the cases hit (4 exact, 1 prefix)",
        }
    }
}

/// Everything one load puts in its lists.
struct Plan {
    allow_exact: Vec<Ipv4Addr>,
    deny_exact: Vec<Ipv4Addr>,
    /// (address, action, rate class)
    decisions: Vec<(Ipv4Addr, Action, u8)>,
    allow_prefix: Vec<IpNet>,
    deny_prefix: Vec<IpNet>,
    decision_prefix: Vec<IpNet>,
}

impl Plan {
    fn new(fill: Fill) -> Self {
        let throttle = (v4_at(DECISION_BASE, THROTTLE_INDEX), Action::Throttle, 1);
        let deny_test_prefix = IpNet::V4(deny_prefix_v4(DENY_PREFIX_TEST_INDEX));
        let n = if fill == Fill::TestOnly { 0 } else { LIST_FILL };
        let mut plan = Plan {
            allow_exact: (0..n).map(|i| v4_at(ALLOW_BASE, i)).collect(),
            deny_exact: (0..n).map(|i| v4_at(DENY_BASE, i)).collect(),
            decisions: (0..n)
                .map(|i| {
                    if i == THROTTLE_INDEX {
                        throttle
                    } else {
                        (v4_at(DECISION_BASE, i), Action::Block, 0)
                    }
                })
                .collect(),
            allow_prefix: Vec::new(),
            deny_prefix: vec![deny_test_prefix],
            decision_prefix: Vec::new(),
        };
        if fill == Fill::TestOnly {
            plan.allow_exact.push(v4_at(ALLOW_BASE, TEST_INDEX));
            plan.deny_exact.push(v4_at(DENY_BASE, TEST_INDEX));
            plan.decisions
                .push((v4_at(DECISION_BASE, TEST_INDEX), Action::Block, 0));
            plan.decisions.push(throttle);
        }
        if fill == Fill::Full {
            plan.allow_prefix = (0..ALLOW_PREFIXES_V4)
                .map(|i| IpNet::V4(Ipv4Net::new(v4_at([172, 16, 0, 0], i * 256), 24).unwrap()))
                .chain((0..ALLOW_PREFIXES_V6).map(|i| {
                    let a = Ipv6Addr::new(0x2001, 0xdb8, 0x8000 + i as u16, 0, 0, 0, 0, 0);
                    IpNet::V6(Ipv6Net::new(a, 48).unwrap())
                }))
                .collect();
            plan.deny_prefix = (0..DENY_PREFIXES_V4)
                .map(|i| IpNet::V4(deny_prefix_v4(i)))
                .chain((0..DENY_PREFIXES_V6).map(|i| {
                    let a = Ipv6Addr::new(0x2001, 0xdb8, i as u16, 0, 0, 0, 0, 0);
                    IpNet::V6(Ipv6Net::new(a, 48).unwrap())
                }))
                .collect();
            plan.decision_prefix = (0..DECISION_PREFIXES)
                .map(|i| IpNet::V4(Ipv4Net::new(v4_at([11, 0, 0, 0], i * 256), 24).unwrap()))
                .collect();
        }
        plan
    }

    fn exact_entries(&self) -> usize {
        self.allow_exact.len() + self.deny_exact.len() + self.decisions.len()
    }

    fn prefix_entries(&self) -> usize {
        self.allow_prefix.len() + self.deny_prefix.len() + self.decision_prefix.len()
    }
}

// ---- rate classes ----

/// Class 0's setting for a case.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Class0 {
    /// Limited, but far above what one test run sends: the bucket is read and written, the packet conforms.
    Within,
    /// 1 packet/s, burst 1: after the first packet every packet is over the limit.
    Tiny,
    /// No limits (the shipped default): the limiter returns before touching a bucket.
    Unlimited,
}

fn within_limits() -> RateClass {
    rate_class_limits(1_000_000_000, 1_000_000, 1_000_000_000, 1_000_000)
}

impl Class0 {
    fn limits(self) -> RateClass {
        match self {
            Class0::Within => within_limits(),
            Class0::Tiny => rate_class_limits(1, 1, 0, 0),
            Class0::Unlimited => RateClass::UNLIMITED,
        }
    }
}

/// What the ring-buffer consumer does during a case.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Events {
    /// Consumer idle; whatever the case emits (drop samples) goes into the ring or is lost.
    Idle,
    /// A consumer thread (poll + drain, like the daemon) runs on the other CPU.
    Consumed,
    /// The ring is filled first and nobody reads it: every reservation fails and is counted as lost.
    RingFull,
}

struct Case {
    label: &'static str,
    frame_desc: &'static str,
    frame: Vec<u8>,
    reason: Reason,
    class0: Class0,
    events: Events,
    /// xdp-filter's verdict on the same frame.
    xf_action: u32,
    /// Whether xdp-filter does the same job on it (like for like): unknown-source pass and exact denylist drop.
    like_for_like: bool,
    /// Run once through aqd before the case (e.g. the SYN that creates the flow a data packet belongs to).
    setup: Option<Vec<u8>>,
}

fn cases() -> Vec<Case> {
    let udp64 = |src: &str, dst: &str, port: u16| Frame::udp(src, dst, port).with_payload(22).build();
    let allow_src = v4_at(ALLOW_BASE, TEST_INDEX).to_string();
    let deny_src = v4_at(DENY_BASE, TEST_INDEX).to_string();
    let block_src = v4_at(DECISION_BASE, TEST_INDEX).to_string();
    let throttle_src = v4_at(DECISION_BASE, THROTTLE_INDEX).to_string();
    let deny_prefix_src = {
        let net = deny_prefix_v4(DENY_PREFIX_TEST_INDEX);
        v4_at(net.network().octets(), 77).to_string()
    };
    let case = |label, frame_desc, frame, reason, xf_action, like_for_like| Case {
        label,
        frame_desc,
        frame,
        reason,
        class0: Class0::Within,
        events: Events::Idle,
        xf_action,
        like_for_like,
        setup: None,
    };
    vec![
        case(
            "unknown source → pass, unprotected port (no per-source state)",
            "UDP 64 B → :9",
            udp64(UNKNOWN_V4, DST_V4, 9),
            Reason::PassDefault,
            XDP_PASS,
            true,
        ),
        case(
            "unknown source → pass, protected port (per-source state + GCRA)",
            "UDP 64 B → :443",
            udp64(UNKNOWN_V4, DST_V4, PROTECTED_PORT),
            Reason::PassDefault,
            XDP_PASS,
            true,
        ),
        Case {
            class0: Class0::Unlimited,
            ..case(
                "unknown source → pass, protected port, class 0 unlimited (shipped default: state, no GCRA)",
                "UDP 64 B → :443",
                udp64(UNKNOWN_V4, DST_V4, PROTECTED_PORT),
                Reason::PassDefault,
                XDP_PASS,
                true,
            )
        },
        case(
            "unknown source → pass, established TCP (state + GCRA)",
            "TCP ACK 54 B → :443",
            Frame::tcp_ack(UNKNOWN_V4, DST_V4, PROTECTED_PORT).build(),
            Reason::PassDefault,
            XDP_PASS,
            true,
        ),
        case(
            "unknown IPv6 source → pass (state + GCRA)",
            "IPv6 UDP 64 B → :443",
            Frame::udp(UNKNOWN_V6, DST_V6, PROTECTED_PORT)
                .with_payload(2)
                .build(),
            Reason::PassDefault,
            XDP_PASS,
            true,
        ),
        case(
            "allowlisted (exact) → pass",
            "UDP 64 B → :443",
            udp64(&allow_src, DST_V4, PROTECTED_PORT),
            Reason::PassAllowExact,
            XDP_PASS,
            false,
        ),
        case(
            "denylisted (exact) → drop",
            "UDP 64 B → :443",
            udp64(&deny_src, DST_V4, PROTECTED_PORT),
            Reason::DropDenyExact,
            XDP_DROP,
            true,
        ),
        case(
            "denylisted (prefix) → drop",
            "UDP 64 B → :443",
            udp64(&deny_prefix_src, DST_V4, PROTECTED_PORT),
            Reason::DropDenyPrefix,
            XDP_PASS,
            false,
        ),
        case(
            "decision hit: block → drop",
            "UDP 64 B → :443",
            udp64(&block_src, DST_V4, PROTECTED_PORT),
            Reason::DropBlockExact,
            XDP_PASS,
            false,
        ),
        case(
            "decision hit: throttle, within class → pass",
            "UDP 64 B → :443",
            udp64(&throttle_src, DST_V4, PROTECTED_PORT),
            Reason::PassThrottled,
            XDP_PASS,
            false,
        ),
        Case {
            class0: Class0::Tiny,
            ..case(
                "rate-limited (class 0 over its limit) → drop",
                "UDP 64 B → :443",
                udp64(RATE_LIMITED_V4, DST_V4, PROTECTED_PORT),
                Reason::DropRatePackets,
                XDP_PASS,
                false,
            )
        },
        Case {
            events: Events::Consumed,
            ..case(
                "SYN to :443 → pass + conn event, consumer running",
                "TCP SYN 54 B → :443",
                Frame::tcp_syn(UNKNOWN_V4, DST_V4, PROTECTED_PORT).build(),
                Reason::PassDefault,
                XDP_PASS,
                false,
            )
        },
        Case {
            events: Events::RingFull,
            ..case(
                "SYN to :443 → pass, ring buffer full (event lost)",
                "TCP SYN 54 B → :443",
                Frame::tcp_syn(UNKNOWN_V4, DST_V4, PROTECTED_PORT).build(),
                Reason::PassDefault,
                XDP_PASS,
                false,
            )
        },
        Case {
            events: Events::Consumed,
            ..case(
                "SYN with Linux options → p0f signature + verdict lookup + flow + conn event",
                "TCP SYN 74 B (mss,sok,ts,nop,ws) → :443",
                syn_with_options(UNKNOWN_V4, 40_001, LINUX_WINDOW),
                Reason::PassDefault,
                XDP_PASS,
                false,
            )
        },
        Case {
            events: Events::Consumed,
            ..case(
                "SYN whose signature is blocked → drop at the SYN (+ conn event)",
                "TCP SYN 74 B (blocked signature) → :443",
                syn_with_options(UNKNOWN_V4, 40_002, BLOCKED_WINDOW),
                Reason::DropSynFingerprint,
                XDP_PASS,
                false,
            )
        },
        Case {
            events: Events::Consumed,
            setup: Some(syn_with_options(UNKNOWN_V4, 40_003, LINUX_WINDOW)),
            ..case(
                "data packet of a tracked flow (flow lookup + request tracking)",
                "TCP ACK+PSH 254 B (200 B payload) → :443",
                data_segment(UNKNOWN_V4, 40_003, 200),
                Reason::PassDefault,
                XDP_PASS,
                false,
            )
        },
    ]
}

const LINUX_WINDOW: u16 = 64_240;
/// The window that makes the "blocked signature" SYN's signature differ from the Linux one.
const BLOCKED_WINDOW: u16 = 1_234;
const BENCH_ISN: u32 = 1_000_000;

/// A SYN with the option layout Linux sends (mss, sok, ts, nop, ws).
fn syn_with_options(src: &str, src_port: u16, window: u16) -> Vec<u8> {
    use etherparse::{PacketBuilder, TcpOptionElement};
    let src: Ipv4Addr = src.parse().expect("IPv4");
    let dst: Ipv4Addr = DST_V4.parse().expect("IPv4");
    let builder = PacketBuilder::ethernet2([2, 0, 0, 0, 0, 1], [2, 0, 0, 0, 0, 2])
        .ipv4(src.octets(), dst.octets(), 64)
        .tcp(src_port, PROTECTED_PORT, BENCH_ISN, window)
        .syn()
        .options(&[
            TcpOptionElement::MaximumSegmentSize(1460),
            TcpOptionElement::SelectiveAcknowledgementPermitted,
            TcpOptionElement::Timestamp(12_345, 0),
            TcpOptionElement::Noop,
            TcpOptionElement::WindowScale(7),
        ])
        .expect("options fit");
    let mut frame = Vec::new();
    builder.write(&mut frame, &[]).expect("write frame");
    frame
}

/// A data segment of the flow `syn_with_options(src, src_port, …)` opened, far past the captured start.
fn data_segment(src: &str, src_port: u16, payload: usize) -> Vec<u8> {
    use etherparse::PacketBuilder;
    let src: Ipv4Addr = src.parse().expect("IPv4");
    let dst: Ipv4Addr = DST_V4.parse().expect("IPv4");
    let builder = PacketBuilder::ethernet2([2, 0, 0, 0, 0, 1], [2, 0, 0, 0, 0, 2])
        .ipv4(src.octets(), dst.octets(), 64)
        .tcp(src_port, PROTECTED_PORT, BENCH_ISN + 1 + 100_000, LINUX_WINDOW)
        .ack(5_000)
        .psh();
    let mut frame = Vec::new();
    builder
        .write(&mut frame, &vec![0x17; payload])
        .expect("write frame");
    frame
}

/// The kernel key of the "blocked signature" SYN, computed by the userspace twin of the kernel's parser.
fn blocked_syn_key() -> u64 {
    let frame = syn_with_options(UNKNOWN_V4, 40_002, BLOCKED_WINDOW);
    detector_user::fingerprint::syn::parse_ip_tcp(&frame[14..])
        .expect("a TCP SYN")
        .signature
        .key()
}

// ---- programs under test ----

/// One load of aqd.
struct AqdLoad {
    fill: Fill,
    ebpf: Ebpf,
    maps: KernelMaps,
    fill_report: String,
}

/// Which program a measurement is of.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
enum Target {
    Floor,
    Aqd(usize),
    XdpFilter,
}

struct Programs {
    aqd: Vec<AqdLoad>,
    xdp_filter: Ebpf,
}

impl Programs {
    fn targets(&self) -> Vec<Target> {
        let mut t = vec![Target::Floor];
        t.extend((0..self.aqd.len()).map(Target::Aqd));
        t.push(Target::XdpFilter);
        t
    }

    fn name(&self, target: Target) -> String {
        match target {
            Target::Floor => "floor".into(),
            Target::Aqd(i) => format!("aqd/{}", self.aqd[i].fill.label()),
            Target::XdpFilter => "xdp-filter".into(),
        }
    }

    fn program(&mut self, target: Target) -> anyhow::Result<&mut Xdp> {
        let (ebpf, name) = match target {
            // The floor comes from the first (full) load's object.
            Target::Floor => (&mut self.aqd[0].ebpf, FLOOR_PROGRAM_NAME),
            Target::Aqd(i) => (&mut self.aqd[i].ebpf, PROGRAM_NAME),
            Target::XdpFilter => (&mut self.xdp_filter, XDP_FILTER_PROGRAM),
        };
        let program = ebpf
            .program_mut(name)
            .with_context(|| format!("program {name} missing"))?;
        Ok(program.try_into()?)
    }
}

#[derive(Clone, Copy, Debug)]
struct Sample {
    action: u32,
    kernel_ns: f64,
    wall_ns: f64,
}

fn test_run(program: &mut Xdp, frame: &[u8], repeat: u32) -> anyhow::Result<Sample> {
    let options = TestRunOptions {
        data_in: Some(frame),
        repeat,
        ..TestRunOptions::default()
    };
    let start = Instant::now();
    let result = program.test_run(options).context("BPF_PROG_TEST_RUN")?;
    let wall = start.elapsed();
    Ok(Sample {
        action: result.return_value,
        kernel_ns: result.duration.as_nanos() as f64,
        wall_ns: wall.as_nanos() as f64 / repeat as f64,
    })
}

// ---- loading and filling ----

fn load_aqd(fill: Fill) -> anyhow::Result<AqdLoad> {
    let plan = Plan::new(fill);
    let mut ebpf = loader::load(&LoadOptions {
        pin_dir: None,
        test_clock: false,
    })
    .map_err(|e| anyhow::anyhow!("loading aqd_xdp: {}", shorten(&format!("{e:#}"))))?;
    let mut maps = KernelMaps::from_ebpf(&mut ebpf)?;
    let mut report = Vec::new();
    let mut timed = |what: String, n: usize, f: &mut dyn FnMut(&mut KernelMaps) -> anyhow::Result<()>| {
        let start = Instant::now();
        let r = f(&mut maps);
        let took = start.elapsed().as_secs_f64();
        if n >= 1000 {
            report.push(format!(
                "{what} {n}: {took:.2} s ({:.0} k/s)",
                n as f64 / took / 1e3
            ));
        }
        r
    };
    timed("allowlist `list_put`".into(), plan.allow_exact.len(), &mut |m| {
        for a in &plan.allow_exact {
            m.list_put(List::Allow, host_net(*a), 0)?;
        }
        Ok(())
    })?;
    timed("denylist `list_put`".into(), plan.deny_exact.len(), &mut |m| {
        for a in &plan.deny_exact {
            m.list_put(List::Deny, host_net(*a), 0)?;
        }
        Ok(())
    })?;
    let decision = |action: Action, class: u8| Decision {
        action: action as u8,
        rate_class: class,
        origin: Origin::Import as u8,
        ..Decision::default()
    };
    if fill == Fill::Full {
        // The full load takes its decisions the way the daemon imports them (batch updates).
        timed(
            "decisions `decision_put_many`".into(),
            plan.decisions.len(),
            &mut |m| {
                let batch: Vec<(IpNet, Decision)> = plan
                    .decisions
                    .iter()
                    .map(|(a, action, class)| (host_net(*a), decision(*action, *class)))
                    .collect();
                Ok(m.decision_put_many(&batch)?)
            },
        )?;
    } else {
        timed(
            "decisions `decision_put` (one by one)".into(),
            plan.decisions.len(),
            &mut |m| {
                for (a, action, class) in &plan.decisions {
                    m.decision_put(host_net(*a), decision(*action, *class))?;
                }
                Ok(())
            },
        )?;
    }
    timed(
        "prefixes `list_put`/`decision_put`".into(),
        plan.prefix_entries(),
        &mut |m| {
            for net in &plan.allow_prefix {
                m.list_put(List::Allow, *net, 0)?;
            }
            for net in &plan.deny_prefix {
                m.list_put(List::Deny, *net, 0)?;
            }
            for net in &plan.decision_prefix {
                m.decision_put(*net, decision(Action::Block, 0))?;
            }
            Ok(())
        },
    )?;
    let mut load = AqdLoad {
        fill,
        ebpf,
        maps,
        fill_report: if report.is_empty() {
            format!("{} entries", plan.exact_entries() + plan.prefix_entries())
        } else {
            report.join("; ")
        },
    };
    configure(&mut load)?;
    Ok(load)
}

/// Keeps the head and the tail of a long message (a verifier log ends with the reason it refused the program).
fn shorten(message: &str) -> String {
    const HEAD: usize = 1_500;
    const TAIL: usize = 3_000;
    let chars: Vec<char> = message.chars().collect();
    if chars.len() <= HEAD + TAIL {
        return message.to_string();
    }
    let head: String = chars[..HEAD].iter().collect();
    let tail: String = chars[chars.len() - TAIL..].iter().collect();
    format!(
        "{head}\n[… {} characters of verifier log left out …]\n{tail}",
        chars.len() - HEAD - TAIL
    )
}

/// Production settings: port 443 protected, conn events on, 1-in-64 drop samples; class 1 for throttles.
fn configure(load: &mut AqdLoad) -> anyhow::Result<()> {
    let maps = &mut load.maps;
    maps.set_protected_ports(&[PROTECTED_PORT])?;
    maps.set_rate_class(0, within_limits())?;
    maps.set_rate_class(1, within_limits())?;
    maps.set_config(Config {
        drop_sample_every: DROP_SAMPLE_EVERY,
        flags: CONFIG_FLAG_CONN_EVENTS | CONFIG_FLAG_CAPTURE | CONFIG_FLAG_REQUEST_EVENTS,
        test_now_ns: 0,
        request_gap_ns: 0,
    })?;
    let block = Decision {
        action: Action::Block as u8,
        origin: Origin::Cli as u8,
        ..Decision::default()
    };
    load.maps
        .verdict_put(detector_user::maps::VerdictMap::Syn, blocked_syn_key(), block)?;
    Ok(())
}

/// xdp-filter through aya. Its maps are pinned by name (libbpf convention), so it gets a private bpffs.
fn load_xdp_filter(bpffs: &Path, deny: &[Ipv4Addr]) -> anyhow::Result<(Ebpf, String)> {
    let start = Instant::now();
    let mut ebpf = EbpfLoader::new()
        .default_map_pin_directory(bpffs)
        .map_max_entries("filter_ipv4", XDP_FILTER_IPV4_ENTRIES)
        .load_file(XDP_FILTER_OBJECT)
        .with_context(|| format!("aya could not load {XDP_FILTER_OBJECT}"))?;
    let program: &mut Xdp = ebpf
        .program_mut(XDP_FILTER_PROGRAM)
        .context("xdp-filter program missing")?
        .try_into()?;
    program.load()?;
    let cpus = aya::util::nr_cpus().map_err(|(path, e)| anyhow::anyhow!("{path}: {e}"))?;
    let per_cpu = |v: u64| PerCpuValues::try_from(vec![v; cpus]);
    {
        let mut ipv4: PerCpuHashMap<_, u32, u64> =
            PerCpuHashMap::try_from(ebpf.map_mut("filter_ipv4").context("filter_ipv4 missing")?)?;
        for a in deny {
            // The program looks up `iph->saddr` as a u32 in host order of the network bytes.
            ipv4.insert(u32::from_ne_bytes(a.octets()), per_cpu(XF_FLAG_SRC)?, 0)?;
        }
    }
    let mut ports: PerCpuArray<_, u64> =
        PerCpuArray::try_from(ebpf.map_mut("filter_ports").context("filter_ports missing")?)?;
    ports.set(
        XF_PORT_RULE.to_be() as u32,
        per_cpu(XF_FLAG_DST | XF_FLAG_TCP | XF_FLAG_UDP)?,
        0,
    )?;
    let note = format!(
        "xdp-filter: `{XDP_FILTER_OBJECT}` loaded with aya (BTF maps, `filter_ipv4` max_entries {XDP_FILTER_IPV4_ENTRIES}), \
         {} IPv4 sources with MAP_FLAG_SRC + port rule {XF_PORT_RULE} DST|TCP|UDP, {:.2} s",
        deny.len(),
        start.elapsed().as_secs_f64()
    );
    Ok((ebpf, note))
}

// ---- isolation: private namespaces, bpffs, parking veths ----

fn check(rc: libc::c_int, what: &str) -> anyhow::Result<()> {
    if rc != 0 {
        bail!("{what}: {}", std::io::Error::last_os_error());
    }
    Ok(())
}

/// Moves the (still single-threaded) process into new network and mount namespaces.
fn isolate() -> anyhow::Result<()> {
    // SAFETY: plain syscalls; no other thread exists yet (CLONE_NEWNS requires that).
    unsafe {
        check(
            libc::unshare(libc::CLONE_NEWNET | libc::CLONE_NEWNS),
            "unshare(CLONE_NEWNET | CLONE_NEWNS) (the bench needs root)",
        )?;
        check(
            libc::mount(
                std::ptr::null(),
                c"/".as_ptr(),
                std::ptr::null(),
                libc::MS_REC | libc::MS_PRIVATE,
                std::ptr::null(),
            ),
            "making / private in the bench's mount namespace",
        )?;
    }
    Ok(())
}

/// A bpffs mounted (only in our mount namespace) on a fresh directory; unmounted and removed on drop.
struct PrivateBpffs {
    dir: PathBuf,
    mounted: bool,
}

impl PrivateBpffs {
    fn new() -> anyhow::Result<Self> {
        let dir = std::env::temp_dir().join(format!("aqd-bench-bpffs-{}", std::process::id()));
        fs::create_dir_all(&dir)?;
        let mut me = Self { dir, mounted: false };
        loader::mount_bpffs(&me.dir).context("mounting a private bpffs")?;
        me.mounted = true;
        Ok(me)
    }
}

impl Drop for PrivateBpffs {
    fn drop(&mut self) {
        if self.mounted {
            let path = CString::new(self.dir.as_os_str().as_encoded_bytes()).expect("no NUL in temp path");
            // SAFETY: valid NUL-terminated path.
            unsafe { libc::umount2(path.as_ptr(), libc::MNT_DETACH) };
        }
        let _ = fs::remove_dir(&self.dir);
    }
}

fn ip(args: &[&str]) -> anyhow::Result<()> {
    let status = Command::new("ip").args(args).status().context("running ip")?;
    ensure!(status.success(), "ip {} failed: {status}", args.join(" "));
    Ok(())
}

/// Idle veth ends (down, in our own network namespace) that hold the programs so test runs skip dispatcher
/// updates. Deleted on drop (and gone with the namespace anyway).
struct Parking {
    pairs: usize,
    links: Vec<(Target, XdpLinkId)>,
}

impl Parking {
    fn new(programs: usize) -> anyhow::Result<Self> {
        let pairs = programs.div_ceil(2);
        for p in 0..pairs {
            ip(&[
                "link",
                "add",
                &format!("aqdpk{p}a"),
                "type",
                "veth",
                "peer",
                "name",
                &format!("aqdpk{p}b"),
            ])?;
        }
        Ok(Self {
            pairs,
            links: Vec::new(),
        })
    }

    fn park(&mut self, programs: &mut Programs, targets: &[Target]) -> anyhow::Result<()> {
        for (i, &target) in targets.iter().enumerate() {
            let dev = format!("aqdpk{}{}", i / 2, if i % 2 == 0 { 'a' } else { 'b' });
            let link = programs
                .program(target)?
                .attach(&dev, XdpMode::Driver)
                .with_context(|| format!("parking {} on {dev}", programs.name(target)))?;
            self.links.push((target, link));
        }
        Ok(())
    }

    fn unpark(&mut self, programs: &mut Programs) -> anyhow::Result<()> {
        for (target, link) in self.links.drain(..) {
            programs.program(target)?.detach(link)?;
        }
        Ok(())
    }
}

impl Drop for Parking {
    fn drop(&mut self) {
        for p in 0..self.pairs {
            let _ = Command::new("ip")
                .args(["link", "del", &format!("aqdpk{p}a")])
                .status();
        }
    }
}

fn pin_to_cpu(cpu: usize) -> anyhow::Result<()> {
    // SAFETY: `set` is a plain bitmask filled by the CPU_* helpers; pid 0 = the calling thread.
    unsafe {
        let mut set: libc::cpu_set_t = std::mem::zeroed();
        libc::CPU_SET(cpu, &mut set);
        check(
            libc::sched_setaffinity(0, std::mem::size_of::<libc::cpu_set_t>(), &set),
            "sched_setaffinity",
        )
    }
}

// ---- ring-buffer consumer ----

struct Consumer {
    consume: Arc<AtomicBool>,
    stop: Arc<AtomicBool>,
    passes: Arc<AtomicU64>,
    consumed: Arc<AtomicU64>,
    handle: Option<JoinHandle<()>>,
}

impl Consumer {
    /// Drains every ring while `consume` is set: poll (1 ms) then read until empty, like the daemon's event loop.
    fn spawn(mut rings: Vec<RingBuf<MapData>>, cpu: usize) -> Self {
        let consume = Arc::new(AtomicBool::new(false));
        let stop = Arc::new(AtomicBool::new(false));
        let passes = Arc::new(AtomicU64::new(0));
        let consumed = Arc::new(AtomicU64::new(0));
        let (c, s, p, n) = (consume.clone(), stop.clone(), passes.clone(), consumed.clone());
        let handle = thread::spawn(move || {
            let _ = pin_to_cpu(cpu);
            let fds: Vec<RawFd> = rings.iter().map(|r| r.as_raw_fd()).collect();
            while !s.load(Ordering::Acquire) {
                if c.load(Ordering::Acquire) {
                    let mut pollfds: Vec<libc::pollfd> = fds
                        .iter()
                        .map(|&fd| libc::pollfd {
                            fd,
                            events: libc::POLLIN,
                            revents: 0,
                        })
                        .collect();
                    // SAFETY: `pollfds` is a valid array of `len` pollfd structs.
                    unsafe { libc::poll(pollfds.as_mut_ptr(), pollfds.len() as libc::nfds_t, 1) };
                    let mut got = 0;
                    for ring in rings.iter_mut() {
                        while let Some(item) = ring.next() {
                            std::hint::black_box(item.len());
                            got += 1;
                        }
                    }
                    n.fetch_add(got, Ordering::AcqRel);
                } else {
                    thread::sleep(Duration::from_micros(500));
                }
                p.fetch_add(1, Ordering::AcqRel);
            }
        });
        Self {
            consume,
            stop,
            passes,
            consumed,
            handle: Some(handle),
        }
    }

    /// Switches consuming on or off and waits until the thread has run a full pass in the new mode.
    fn set(&self, on: bool) {
        self.consume.store(on, Ordering::Release);
        let start = self.passes.load(Ordering::Acquire);
        while self.passes.load(Ordering::Acquire) < start + 2 {
            thread::sleep(Duration::from_micros(200));
        }
    }

    fn consumed(&self) -> u64 {
        self.consumed.load(Ordering::Acquire)
    }
}

impl Drop for Consumer {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Release);
        if let Some(h) = self.handle.take() {
            let _ = h.join();
        }
    }
}

// ---- contention and profiling ----

/// One CPU's line of /proc/stat (jiffies): (busy, idle, steal).
fn cpu_times(cpu: usize) -> Option<(u64, u64, u64)> {
    let stat = fs::read_to_string("/proc/stat").ok()?;
    let line = stat.lines().find(|l| l.starts_with(&format!("cpu{cpu} ")))?;
    let v: Vec<u64> = line
        .split_whitespace()
        .skip(1)
        .filter_map(|f| f.parse().ok())
        .collect();
    // user nice system idle iowait irq softirq steal
    let busy = v.first()? + v.get(1)? + v.get(2)? + v.get(5)? + v.get(6)?;
    Some((busy, v.get(3)? + v.get(4)?, *v.get(7)?))
}

/// CPU time the calling thread has used.
fn thread_cpu_time() -> Duration {
    // SAFETY: `usage` is a plain struct the call fills.
    let mut usage: libc::rusage = unsafe { std::mem::zeroed() };
    unsafe { libc::getrusage(libc::RUSAGE_THREAD, &mut usage) };
    let tv = |t: libc::timeval| Duration::new(t.tv_sec as u64, t.tv_usec as u32 * 1000);
    tv(usage.ru_utime) + tv(usage.ru_stime)
}

/// Samples this thread with `perf record -e cpu-clock` while `work` runs; returns perf's top symbols.
fn perf_profile(
    dir: &Path,
    tag: &str,
    mut work: impl FnMut() -> anyhow::Result<()>,
) -> anyhow::Result<Vec<(f64, String)>> {
    let data = dir.join(format!("{tag}.data"));
    // SAFETY: no preconditions.
    let tid = unsafe { libc::gettid() };
    let mut perf = Command::new("perf")
        .args([
            "record",
            "-q",
            "-e",
            "cpu-clock",
            "-F",
            "10000",
            "-t",
            &tid.to_string(),
            "-o",
        ])
        .arg(&data)
        .stdin(std::process::Stdio::null())
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .spawn()
        .context("starting perf record")?;
    thread::sleep(Duration::from_millis(300));
    let result = work();
    // SAFETY: signalling our own child.
    unsafe { libc::kill(perf.id() as libc::pid_t, libc::SIGINT) };
    perf.wait()?;
    result?;
    let report = Command::new("perf")
        .args([
            "report",
            "--stdio",
            "-q",
            "--sort",
            "sym",
            "--percent-limit",
            "2",
            "-i",
        ])
        .arg(&data)
        .output()
        .context("perf report")?;
    let _ = fs::remove_file(&data);
    let _ = fs::remove_file(dir.join(format!("{tag}.data.old")));
    Ok(String::from_utf8_lossy(&report.stdout)
        .lines()
        .filter_map(|l| {
            let (pct, rest) = l.trim().split_once('%')?;
            let sym = rest
                .trim()
                .trim_start_matches("[k]")
                .trim_start_matches("[.]")
                .trim();
            // JITed programs show as bpf_prog_<tag>_<name>: keep the name (the program's own instructions).
            let sym = match sym
                .strip_prefix("bpf_prog_")
                .and_then(|rest| rest.split_once('_'))
            {
                Some((_tag, name)) => format!("prog:{name}"),
                None => sym.to_string(),
            };
            Some((pct.trim().parse().ok()?, sym))
        })
        .collect())
}

// ---- statistics and output ----

fn median_min_max(values: &[f64]) -> (f64, f64, f64) {
    let mut v = values.to_vec();
    v.sort_by(|a, b| a.partial_cmp(b).expect("no NaN"));
    let n = v.len();
    let median = if n % 2 == 1 {
        v[n / 2]
    } else {
        (v[n / 2 - 1] + v[n / 2]) / 2.0
    };
    (median, v[0], v[n - 1])
}

struct Cell {
    kernel: (f64, f64, f64),
    wall: (f64, f64, f64),
    action: u32,
}

impl Cell {
    fn from(samples: &[Sample]) -> Self {
        let kernel: Vec<f64> = samples.iter().map(|s| s.kernel_ns).collect();
        let wall: Vec<f64> = samples.iter().map(|s| s.wall_ns).collect();
        Self {
            kernel: median_min_max(&kernel),
            wall: median_min_max(&wall),
            action: samples[0].action,
        }
    }

    fn kernel_str(&self) -> String {
        let (m, lo, hi) = self.kernel;
        format!("{m:.0} ({lo:.0}–{hi:.0})")
    }

    fn wall_str(&self) -> String {
        let (m, lo, hi) = self.wall;
        format!("{m:.2} ({lo:.2}–{hi:.2})")
    }
}

fn action_name(action: u32) -> &'static str {
    match action {
        XDP_DROP => "drop",
        XDP_PASS => "pass",
        0 => "aborted",
        _ => "other",
    }
}

/// Reason counters that moved between two snapshots.
fn reason_moved(before: &CounterTotals, after: &CounterTotals) -> Vec<(Reason, u64)> {
    Reason::ALL
        .iter()
        .filter_map(|&r| {
            let d = after.by_reason[r as usize] - before.by_reason[r as usize];
            (d != 0).then_some((r, d))
        })
        .collect()
}

// ---- the run ----

/// Applies a case's settings to one aqd load.
fn prepare_aqd(load: &mut AqdLoad, case: &Case, prefill: bool) -> anyhow::Result<()> {
    load.maps.set_rate_class(0, case.class0.limits())?;
    if let Some(setup) = &case.setup {
        let program = loader::program_mut(&mut load.ebpf)?;
        test_run(program, setup, 1)?;
    }
    if case.events == Events::RingFull && prefill {
        // Fill the ring: 4 MiB of 64-byte conn records is 65,536 events.
        let program = loader::program_mut(&mut load.ebpf)?;
        test_run(program, &case.frame, 100_000)?;
    }
    Ok(())
}

#[derive(Default)]
struct EventStats {
    sent: u64,
    lost: u64,
    consumed: u64,
    runs: u64,
}

fn main() -> anyhow::Result<()> {
    let bench_start = Instant::now();
    // `cargo bench` passes `--bench`; `cargo xtask bench -- <args>` passes the rest.
    let args: Vec<String> = std::env::args().skip(1).collect();
    let arg_value = |name: &str| args.iter().position(|a| a == name).and_then(|i| args.get(i + 1));
    let rounds: usize = arg_value("--rounds")
        .cloned()
        .or_else(|| std::env::var("AQD_BENCH_ROUNDS").ok())
        .and_then(|v| v.parse().ok())
        .unwrap_or(if args.iter().any(|a| a == "--quick") {
            3
        } else {
            ROUNDS
        })
        .max(1);
    let perf = args.iter().any(|a| a == "--perf") || std::env::var_os("AQD_BENCH_PERF").is_some();
    isolate()?;
    let cpus = thread::available_parallelism().map(|n| n.get()).unwrap_or(1);
    let bench_cpu = if cpus > BENCH_CPU { BENCH_CPU } else { 0 };
    pin_to_cpu(bench_cpu)?;
    let bpffs = PrivateBpffs::new()?;

    println!("# aqd datapath benchmark (BPF_PROG_TEST_RUN, repeat {REPEAT}, {rounds} interleaved rounds)\n");
    let uname = Command::new("uname").arg("-r").output().ok();
    println!(
        "kernel {}, {cpus} CPUs, bench thread on CPU {bench_cpu}, ring-buffer consumer on CPU {CONSUMER_CPU}, \
         load average at start: {}",
        uname
            .map(|o| String::from_utf8_lossy(&o.stdout).trim().to_string())
            .unwrap_or_default(),
        fs::read_to_string("/proc/loadavg").unwrap_or_default().trim()
    );

    // Load and fill.
    let mut aqd = Vec::new();
    for fill in [Fill::Full, Fill::ExactOnly, Fill::TestOnly] {
        let start = Instant::now();
        let load = load_aqd(fill)?;
        println!(
            "- aqd/{} ({}): load + fill {:.2} s — {}",
            fill.label(),
            fill.describe(),
            start.elapsed().as_secs_f64(),
            load.fill_report
        );
        aqd.push(load);
    }
    // The floor: the bare XDP_PASS program of the full load's object.
    {
        let floor: &mut Xdp = aqd[0]
            .ebpf
            .program_mut(FLOOR_PROGRAM_NAME)
            .context("floor program missing")?
            .try_into()?;
        floor.load()?;
    }
    let deny_plan = Plan::new(Fill::Full).deny_exact;
    let (xdp_filter, xf_note) = load_xdp_filter(&bpffs.dir, &deny_plan)?;
    println!("- {xf_note}");
    let mut programs = Programs { aqd, xdp_filter };
    let targets = programs.targets();

    // Program facts.
    println!();
    for target in [Target::Aqd(0), Target::Floor, Target::XdpFilter] {
        let info = programs.program(target)?.info()?;
        println!(
            "- {}: jited {} B, xlated {} B, verified instructions {}",
            match target {
                Target::Aqd(_) => PROGRAM_NAME.to_string(),
                Target::Floor => FLOOR_PROGRAM_NAME.to_string(),
                Target::XdpFilter => XDP_FILTER_PROGRAM.to_string(),
            },
            info.size_jitted(),
            info.size_translated().unwrap_or(0),
            info.verified_instruction_count()
                .map_or("n/a".to_string(), |n| n.to_string())
        );
    }

    // The ring buffers go to the consumer thread.
    let mut rings = Vec::new();
    for load in &mut programs.aqd {
        let map = load.ebpf.take_map(map_names::EVENTS).context("EVENTS missing")?;
        rings.push(RingBuf::try_from(map)?);
    }
    let consumer = Consumer::spawn(rings, CONSUMER_CPU);

    // Check every case on every program once (verdict and reason) before timing anything.
    let cases = cases();
    for case in &cases {
        for &target in &targets {
            let (action, detail) = match target {
                Target::Aqd(i) => {
                    let load = &mut programs.aqd[i];
                    prepare_aqd(load, case, false)?;
                    let program = loader::program_mut(&mut load.ebpf)?;
                    test_run(program, &case.frame, 1)?; // the first over-limit packet still conforms
                    let before = load.maps.counters()?;
                    let program = loader::program_mut(&mut load.ebpf)?;
                    let s = test_run(program, &case.frame, 1)?;
                    let after = load.maps.counters()?;
                    let moved = reason_moved(&before, &after);
                    ensure!(
                        moved == vec![(case.reason, 1)] && s.action == case.reason.verdict().xdp_action(),
                        "aqd/{} on '{}': expected {} ({}), got action {} with reasons {moved:?}",
                        load.fill.label(),
                        case.label,
                        case.reason.name(),
                        action_name(case.reason.verdict().xdp_action()),
                        s.action
                    );
                    (s.action, case.reason.verdict().xdp_action())
                }
                Target::Floor => (
                    test_run(programs.program(target)?, &case.frame, 1)?.action,
                    XDP_PASS,
                ),
                Target::XdpFilter => (
                    test_run(programs.program(target)?, &case.frame, 1)?.action,
                    case.xf_action,
                ),
            };
            ensure!(
                action == detail,
                "{} on '{}': action {action}, expected {detail}",
                programs.name(target),
                case.label
            );
        }
    }
    for load in &mut programs.aqd {
        load.maps.set_rate_class(0, within_limits())?;
    }
    println!(
        "\nAll {} cases verified on every program (verdict; for aqd also the reason counter).",
        cases.len()
    );

    // Parked or not. What parking removes is a fixed cost per BPF_PROG_TEST_RUN call: with repeat > 1 the kernel
    // adds the program to the XDP dispatcher and removes it again (image update + synchronize_rcu) unless it is
    // already there, i.e. attached somewhere. So it is measured per call with repeat 2, fastest of
    // PARK_PROBE_CALLS calls (the minimum is robust to other tasks sharing the CPU).
    const PARK_PROBE_CALLS: usize = 10;
    let probe_frame = &cases[1].frame;
    let probe = |programs: &mut Programs| -> anyhow::Result<BTreeMap<Target, Duration>> {
        let mut out = BTreeMap::new();
        for &target in &[Target::Floor, Target::Aqd(0), Target::XdpFilter] {
            let mut best = Duration::MAX;
            for _ in 0..PARK_PROBE_CALLS {
                let start = Instant::now();
                test_run(programs.program(target)?, probe_frame, 2)?;
                best = best.min(start.elapsed());
            }
            out.insert(target, best);
        }
        Ok(out)
    };
    let unparked = probe(&mut programs)?;
    let mut parking = Parking::new(targets.len())?;
    parking.park(&mut programs, &targets)?;
    let parked = probe(&mut programs)?;
    println!(
        "\nParking check: wall time of one BPF_PROG_TEST_RUN call with repeat 2 (fastest of {PARK_PROBE_CALLS}), and what \
         that per-call overhead adds per packet at repeat {REPEAT}:\n"
    );
    println!("| program | unparked µs/call | parked µs/call | adds ns/packet unparked | parked |");
    println!("|---|---|---|---|---|");
    let mut parking_helps = true;
    for (target, u) in &unparked {
        let p = parked[target];
        println!(
            "| {} | {:.1} | {:.1} | {:.2} | {:.3} |",
            programs.name(*target),
            u.as_secs_f64() * 1e6,
            p.as_secs_f64() * 1e6,
            u.as_secs_f64() * 1e9 / REPEAT as f64,
            p.as_secs_f64() * 1e9 / REPEAT as f64
        );
        parking_helps &= p < *u;
    }
    if parking_helps {
        println!("\nParking removes the per-call overhead: the rounds run parked.");
    } else {
        parking.unpark(&mut programs)?;
        println!("\nParking did not lower the per-call overhead of every program: the rounds run unparked.");
    }

    // The rounds.
    let mut samples: BTreeMap<(usize, Target), Vec<Sample>> = BTreeMap::new();
    let mut events: BTreeMap<(usize, usize), EventStats> = BTreeMap::new();
    let rounds_start = Instant::now();
    let cpu_before = cpu_times(bench_cpu);
    let thread_before = thread_cpu_time();
    for round in 0..rounds {
        for (ci, case) in cases.iter().enumerate() {
            consumer.set(case.events == Events::Consumed);
            let mut order = targets.clone();
            order.rotate_left((round + ci) % targets.len());
            for target in order {
                let sample = match target {
                    Target::Aqd(i) => {
                        let load = &mut programs.aqd[i];
                        prepare_aqd(load, case, true)?;
                        let before = load.maps.counters()?;
                        let consumed_before = consumer.consumed();
                        let program = loader::program_mut(&mut load.ebpf)?;
                        let s = test_run(program, &case.frame, REPEAT)?;
                        if case.events != Events::Idle {
                            let after = load.maps.counters()?;
                            let kind = EventKind::Conn as usize;
                            let e = events.entry((ci, i)).or_default();
                            e.sent += after.events_sent[kind] - before.events_sent[kind];
                            e.lost += after.events_lost[kind] - before.events_lost[kind];
                            e.consumed += consumer.consumed() - consumed_before;
                            e.runs += 1;
                        }
                        s
                    }
                    _ => test_run(programs.program(target)?, &case.frame, REPEAT)?,
                };
                samples.entry((ci, target)).or_default().push(sample);
            }
        }
        for load in &mut programs.aqd {
            load.maps.set_rate_class(0, within_limits())?;
        }
    }
    consumer.set(false);
    let rounds_took = rounds_start.elapsed();
    let thread_share = (thread_cpu_time() - thread_before).as_secs_f64() / rounds_took.as_secs_f64();
    let contention = match (cpu_before, cpu_times(bench_cpu)) {
        (Some((b0, i0, s0)), Some((b1, i1, s1))) => {
            let total = ((b1 - b0) + (i1 - i0) + (s1 - s0)).max(1) as f64;
            format!(
                "CPU {bench_cpu} during the rounds: busy {:.0} %, idle {:.0} %, steal {:.0} %; the bench thread got \
                 {:.0} % of the wall time (the rest went to other tasks or the hypervisor)",
                100.0 * (b1 - b0) as f64 / total,
                100.0 * (i1 - i0) as f64 / total,
                100.0 * (s1 - s0) as f64 / total,
                100.0 * thread_share
            )
        }
        _ => format!("bench thread got {:.0} % of the wall time", 100.0 * thread_share),
    };

    // Tables.
    let cell = |ci: usize, t: Target| Cell::from(&samples[&(ci, t)]);
    println!(
        "\n## Per-packet cost, aqd/full vs floor vs xdp-filter (ns/packet: median (min–max) of {rounds} rounds; \
         ratios of wall medians)\n"
    );
    println!(
        "| # | path | frame | aqd reason | floor kernel | floor wall | aqd kernel | aqd wall | aqd ×floor wall \
         (kernel) | xdp-filter verdict | xdp-filter kernel | xdp-filter wall | xdp-filter ×floor wall (kernel) | \
         aqd ÷ xdp-filter wall (kernel) |"
    );
    println!("|---|---|---|---|---|---|---|---|---|---|---|---|---|---|");
    // (ratio by wall medians, ratio by kernel medians, case label)
    let mut by_floor: Vec<(f64, f64, &str, bool)> = Vec::new();
    let mut xf_floor: Vec<(f64, f64)> = Vec::new();
    let mut by_xf: Vec<(f64, f64, &str, bool)> = Vec::new();
    for (ci, case) in cases.iter().enumerate() {
        let floor = cell(ci, Target::Floor);
        let a = cell(ci, Target::Aqd(0));
        let x = cell(ci, Target::XdpFilter);
        by_floor.push((
            a.wall.0 / floor.wall.0,
            a.kernel.0 / floor.kernel.0,
            case.label,
            case.events != Events::Idle,
        ));
        xf_floor.push((x.wall.0 / floor.wall.0, x.kernel.0 / floor.kernel.0));
        by_xf.push((
            a.wall.0 / x.wall.0,
            a.kernel.0 / x.kernel.0,
            case.label,
            case.like_for_like,
        ));
        println!(
            "| {} | {} | {} | {} | {} | {} | {} | {} | {:.2} ({:.2}) | {}{} | {} | {} | {:.2} ({:.2}) | {:.2} ({:.2}) |",
            ci + 1,
            case.label,
            case.frame_desc,
            case.reason.name(),
            floor.kernel_str(),
            floor.wall_str(),
            a.kernel_str(),
            a.wall_str(),
            a.wall.0 / floor.wall.0,
            a.kernel.0 / floor.kernel.0,
            action_name(x.action),
            if case.like_for_like {
                ""
            } else {
                " (not the same work)"
            },
            x.kernel_str(),
            x.wall_str(),
            x.wall.0 / floor.wall.0,
            x.kernel.0 / floor.kernel.0,
            a.wall.0 / x.wall.0,
            a.kernel.0 / x.kernel.0
        );
    }

    println!(
        "\n## Where the time goes: aqd by list fill (kernel ns/packet, median of {rounds}), and differences\n\n\
         Loads: full = {}; exact = {}; test = {}.\n",
        Fill::Full.describe(),
        Fill::ExactOnly.describe(),
        Fill::TestOnly.describe()
    );
    println!(
        "| # | path | floor | full | exact | test | full − floor | prefix tries (full − exact) | 100k exact maps \
         (exact − test) |"
    );
    println!("|---|---|---|---|---|---|---|---|---|");
    for (ci, case) in cases.iter().enumerate() {
        let floor = cell(ci, Target::Floor).kernel.0;
        let k: Vec<f64> = (0..programs.aqd.len())
            .map(|i| cell(ci, Target::Aqd(i)).kernel.0)
            .collect();
        println!(
            "| {} | {} | {floor:.0} | {:.0} | {:.0} | {:.0} | {:+.0} | {:+.0} | {:+.0} |",
            ci + 1,
            case.label,
            k[0],
            k[1],
            k[2],
            k[0] - floor,
            k[0] - k[1],
            k[1] - k[2]
        );
    }

    println!("\n## Conn events in the SYN cases (all rounds)\n");
    println!("| case | load | runs | events sent | lost (ring full) | read by the consumer | sent share |");
    println!("|---|---|---|---|---|---|---|");
    for ((ci, i), e) in &events {
        println!(
            "| {} | aqd/{} | {} | {} | {} | {} | {:.1} % |",
            cases[*ci].label,
            programs.aqd[*i].fill.label(),
            e.runs,
            e.sent,
            e.lost,
            e.consumed,
            100.0 * e.sent as f64 / (e.sent + e.lost).max(1) as f64
        );
    }
    println!(
        "\nThe consumer polls (1 ms timeout) and drains all three rings on CPU {CONSUMER_CPU}, like the daemon's event \
         loop without the decoding; its count is attributed to the load that was running. The 'consumer running' row \
         is the reserve + submit + wake-up path, the 'ring full' row the failed-reservation path (counted as lost)."
    );

    // Optional: where the time goes inside the kernel, per path (`AQD_BENCH_PERF=1`).
    if perf {
        println!(
            "\n## perf profile per path (cpu-clock samples on the bench thread, symbols ≥ 2 %; ≈ ns = share × the \
             program's kernel median above)\n"
        );
        println!("| # | program | path | top symbols |");
        println!("|---|---|---|---|");
        let dir = std::env::temp_dir().join(format!("aqd-bench-perf-{}", std::process::id()));
        fs::create_dir_all(&dir)?;
        let mut jobs: Vec<(usize, Target)> = vec![(0, Target::Floor), (0, Target::XdpFilter)];
        jobs.extend((0..cases.len()).map(|ci| (ci, Target::Aqd(0))));
        for (ci, target) in jobs {
            let case = &cases[ci];
            consumer.set(case.events == Events::Consumed);
            if let Target::Aqd(i) = target {
                prepare_aqd(&mut programs.aqd[i], case, true)?;
            }
            let kernel_ns = cell(ci, target).kernel.0;
            let top = perf_profile(&dir, &format!("case{ci}"), || {
                let until = Instant::now() + Duration::from_millis(1500);
                while Instant::now() < until {
                    test_run(programs.program(target)?, &case.frame, REPEAT / 10)?;
                }
                Ok(())
            })?;
            let top: Vec<String> = top
                .iter()
                .map(|(p, sym)| format!("{sym} {p:.0} % (≈{:.0})", p / 100.0 * kernel_ns))
                .collect();
            println!(
                "| {} | {} | {} | {} |",
                ci + 1,
                programs.name(target),
                case.label,
                top.join(", ")
            );
        }
        consumer.set(false);
        for load in &mut programs.aqd {
            load.maps.set_rate_class(0, within_limits())?;
        }
        let _ = fs::remove_dir(&dir);
    }

    // Summary.
    let cmp = |a: &f64, b: &f64| a.partial_cmp(b).expect("no NaN");
    // Judged on wall medians as specified, unless the CPU was shared: then on the kernel's own figures.
    let contended = thread_share < 0.9;
    let pick = |wall: f64, kernel: f64| if contended { kernel } else { wall };
    let basis = if contended {
        "kernel medians (the CPU was shared, see above)"
    } else {
        "wall medians"
    };
    let max_by = |v: &mut dyn Iterator<Item = (f64, String)>| {
        v.max_by(|a, b| cmp(&a.0, &b.0)).expect("at least one case")
    };
    let worst_floor = max_by(&mut by_floor.iter().map(|r| (pick(r.0, r.1), r.2.to_string())));
    let worst_floor_no_events = max_by(
        &mut by_floor
            .iter()
            .filter(|r| !r.3)
            .map(|r| (pick(r.0, r.1), r.2.to_string())),
    );
    let best_floor = by_floor
        .iter()
        .map(|r| (pick(r.0, r.1), r.2))
        .min_by(|a, b| cmp(&a.0, &b.0))
        .expect("cases");
    let like: Vec<(f64, &str)> = by_xf
        .iter()
        .filter(|r| r.3)
        .map(|r| (pick(r.0, r.1), r.2))
        .collect();
    let worst_like = like
        .iter()
        .max_by(|a, b| cmp(&a.0, &b.0))
        .expect("like-for-like cases");
    let best_like = like
        .iter()
        .min_by(|a, b| cmp(&a.0, &b.0))
        .expect("like-for-like cases");
    let worst_all = max_by(&mut by_xf.iter().map(|r| (pick(r.0, r.1), r.2.to_string())));
    let xf_floor: Vec<f64> = xf_floor.iter().map(|r| pick(r.0, r.1)).collect();
    let (xf_floor_median, _, _) = median_min_max(&xf_floor);
    println!("\n{contention}.");
    if contended {
        println!(
            "\n**The CPU was shared during the rounds**: wall times include time the bench thread was not running, so \
             the wall ratios are distorted; the kernel figures (BPF_PROG_TEST_RUN's own clock, which stops while the \
             thread is rescheduled) and their ratios, in parentheses, are the ones to read, and the summary uses them."
        );
    }
    let verdict = |ok: bool| if ok { "met" } else { "NOT met" };
    println!(
        "\n**Summary** (ratios of {basis}): aqd with 100k-entry lists, worst path {:.2}× floor ({}); worst without \
         conn events {:.2}× ({}); best {:.2}× ({}) — target ≤ 3×: {}. (xdp-filter itself: {:.2}× floor, median over the \
         frames.) aqd vs xdp-filter on like-for-like paths: {:.2}× ({}) to {:.2}× ({}); over every path up to {:.2}× \
         ({}) — target ≤ 1.00×: {}.",
        worst_floor.0,
        worst_floor.1,
        worst_floor_no_events.0,
        worst_floor_no_events.1,
        best_floor.0,
        best_floor.1,
        verdict(worst_floor.0 <= 3.0),
        xf_floor_median,
        best_like.0,
        best_like.1,
        worst_like.0,
        worst_like.1,
        worst_all.0,
        worst_all.1,
        verdict(worst_like.0 <= 1.0),
    );
    println!(
        "\nRounds took {:.1} s; whole bench {:.1} s. Load average at end: {}.",
        rounds_took.as_secs_f64(),
        bench_start.elapsed().as_secs_f64(),
        fs::read_to_string("/proc/loadavg").unwrap_or_default().trim(),
    );

    // Clean up: detach, stop the consumer, drop programs and maps, delete veths, unmount bpffs.
    parking.unpark(&mut programs)?;
    drop(consumer);
    drop(programs);
    drop(parking);
    drop(bpffs);
    Ok(())
}
