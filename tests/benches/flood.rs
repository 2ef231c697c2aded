//! Packet rates over a real veth and HTTPS requests/s with and without aqd: tables (b) and (c) of `cargo xtask
//! bench` (table (a), the per-path BPF_PROG_TEST_RUN cost, is the `datapath` bench).
//!
//! `cargo bench -p aqd-tests --bench flood [-- --quick] [-- --rounds N]` (root). Prints Markdown tables; asserts
//! nothing about speed (the targets are printed beside the ratios).
//!
//! Both tables run in one [`Lab`]: two network namespaces joined by a veth (`aqd-c0` client ↔ `aqd-s0` server)
//! and a private bpffs, all removed when the lab is dropped, also on failure (and by the next lab if the process was
//! killed). Traffic only ever flows between those two namespaces, and every run is bounded in packets and time.
//!
//! **(b) flood.** The generator is a two-instruction XDP program (`r0 = XDP_TX; exit`, loaded with bpf(2) by this
//! bench: no extra program in the aqd object) run with `BPF_PROG_TEST_RUN` + `BPF_F_TEST_XDP_LIVE_FRAMES` (batch
//! 64) on one CPU in the client namespace, with `ingress_ifindex` = `aqd-c0`: each frame is transmitted out of
//! `aqd-c0`, so the receiver's XDP (native mode on `aqd-s0`) or its stack (GRO on: that is what makes a veth run
//! NAPI for frames from its peer's XDP) processes it in the generator's softirq, on the same CPU. The generator is
//! parked (attached to an idle, down veth) so a test run does not add XDP dispatcher updates. Receivers:
//! - **aqd**: the real `aqd_xdp` (with its tail-called programs), loaded by the bench like the `datapath` bench's
//!   full load: 100,000 addresses in each of the allowlist, denylist and decision exact maps, 2,000 allow /
//!   1,500 deny IPv4 prefixes and 1,000 /24 decisions, production config (port 443 protected, conn events, 1-in-64
//!   drop samples; the ring is not read, so after it fills a sample is the failed-reservation path);
//! - **XDP_DROP**: a bare `r0 = XDP_DROP; exit` (the floor of the drop cases);
//! - **xdp-filter**: Debian's `xdp-filter load -m native` (policy allow: `xdpfilt_alw_all`) with the blocked source
//!   added by `xdp-filter ip ADDR -m src` (its CLI has no prefixes, so the prefix case is n/a; one address instead
//!   of 100k: its lookup is one hash lookup whatever the fill, perf-anchors §2 (b) vs (b′));
//! - **nft**: a netdev table with an ingress hook on `aqd-s0`: `ip saddr @deny counter drop` (a set holding the same
//!   100,000 addresses as aqd's decisions) and `ip saddr <the deny prefix> counter drop`;
//! - **none** (unknown-source case only): nothing attached, the stack alone.
//!
//! What is counted at the receiver: drops in `ethtool -S aqd-s0` (`rx_queue_*_xdp_drops`) for XDP programs and the
//! rule's named counter for nft; for the passing unknown source, what reached UDP (`Udp NoPorts` of the server
//! namespace: port 9 has no listener), i.e. the program *and* the stack up to UDP. aqd's own per-reason counter
//! is checked to have counted every frame under the expected reason. Rates: counted ÷ wall time of the
//! generator's test run; cells are median (min–max) over interleaved rounds (every receiver and case each round,
//! order rotated); runs are sized from a calibration run to take about 1 s (0.3 s with `--quick`).
//!
//! **(c) HTTPS.** `nghttpd` (TLS, HTTP/2, one thread) in the server namespace, `h2load` in the client namespace
//! (`-D 5` seconds, 1 s warm-up, 8 connections × 1 stream, one thread; `-D 2` with `--quick`), 3 interleaved rounds
//! without and with `aqd run` (the **release** daemon, native mode, port 8443 protected, the shipped defaults)
//! attached to `aqd-s0`. TX checksum offload is off on `aqd-c0` (else the veth delivers CHECKSUM_PARTIAL packets
//! without a real checksum, which aqd checks). Between rounds the daemon is stopped and `aqd detach` removes the
//! attachment.

use std::{
    collections::BTreeMap,
    fs, io,
    net::Ipv4Addr,
    os::fd::{AsFd as _, AsRawFd as _, BorrowedFd, FromRawFd as _, OwnedFd, RawFd},
    path::PathBuf,
    process::Stdio,
    thread,
    time::{Duration, Instant},
};

use anyhow::{Context as _, bail, ensure};
use aqd_tests::{
    kernel::{BPF_PROG_TEST_RUN, TestRunAttr, bpf, pin_current_thread},
    netns::{self, CLIENT_IF, CmdOutput, Lab, SERVER_IF, SERVICE_PORT, run_bounded},
    packet::Frame,
    tls,
};
use aya::Ebpf;
use detector_common::{
    Action, CONFIG_FLAG_CAPTURE, CONFIG_FLAG_CONN_EVENTS, CONFIG_FLAG_REQUEST_EVENTS, Config, Decision,
    Origin, Reason,
};
use detector_user::{
    attach::{self, AttachMode},
    loader::{self, LoadOptions},
    maps::{KernelMaps, List},
};
use ipnet::{IpNet, Ipv4Net};

/// The generator's CPU (the receiver's NAPI runs there too).
const GEN_CPU: usize = 0;
/// Live frames per batch (the kernel allows up to 256).
const BATCH: u32 = 64;
const ROUNDS: usize = 5;
const QUICK_ROUNDS: usize = 3;
/// Frames of the calibration run of each receiver × case.
const CALIBRATION_FRAMES: u32 = 1_000_000;
/// Bounds of one measured run.
const MIN_FRAMES: u32 = 500_000;
const MAX_FRAMES: u32 = 60_000_000;
const COMMAND_TIMEOUT: Duration = Duration::from_secs(30);

// Address plan (as the datapath bench): allowlist 10.0.0.0 + i, denylist 10.64.0.0 + i, block decisions
// 10.128.0.0 + i, deny prefixes 100.0.0.0 + i·4096 (/20–/28), allow prefixes 172.16.0.0/24 + i·256, /24 decisions
// 11.0.0.0 + i·256. The lab's own addresses are 10.200.0.0/13 and up.
const LIST_FILL: u32 = 100_000;
const ALLOW_BASE: [u8; 4] = [10, 0, 0, 0];
const DENY_BASE: [u8; 4] = [10, 64, 0, 0];
const DECISION_BASE: [u8; 4] = [10, 128, 0, 0];
const ALLOW_PREFIXES: u32 = 2_000;
const DENY_PREFIXES: u32 = 1_500;
const DECISION_PREFIXES: u32 = 1_000;
const TEST_INDEX: u32 = 54_321;
const DENY_PREFIX_TEST_INDEX: u32 = 777;
const UNKNOWN_SRC: &str = "198.18.0.1";
const PROTECTED_PORT: u16 = 443;
/// UDP port the frames go to: unprotected, no listener (the stack counts `NoPorts`).
const FLOOD_PORT: u16 = 9;
const DROP_SAMPLE_EVERY: u32 = 64;

const XDP_DROP: i32 = 1;
const XDP_TX: i32 = 3;

/// Park veth pair (client namespace, never up): holds the generator so test runs skip dispatcher updates.
const PARK_IF: &str = "aqd-park0";
const PARK_PEER: &str = "aqd-park1";
const NFT_TABLE: &str = "aqdbench";

fn v4_at(base: [u8; 4], offset: u32) -> Ipv4Addr {
    Ipv4Addr::from(u32::from_be_bytes(base) + offset)
}

fn deny_prefix_v4(i: u32) -> Ipv4Net {
    Ipv4Net::new(v4_at([100, 0, 0, 0], i * 4096), 20 + (i % 9) as u8).expect("valid prefix length")
}

fn host(addr: Ipv4Addr) -> IpNet {
    IpNet::V4(Ipv4Net::new(addr, 32).expect("/32"))
}

fn blocked_src() -> Ipv4Addr {
    v4_at(DECISION_BASE, TEST_INDEX)
}

fn deny_prefix_src() -> Ipv4Addr {
    v4_at(deny_prefix_v4(DENY_PREFIX_TEST_INDEX).network().octets(), 77)
}

// ---------------------------------------------------------------------------------------------------------------
// bpf(2) directly: a constant XDP program, and BPF_PROG_TEST_RUN with live frames on a raw fd
// ---------------------------------------------------------------------------------------------------------------

const BPF_PROG_LOAD: libc::c_long = 5;
const BPF_PROG_TYPE_XDP: u32 = 6;
const BPF_F_TEST_XDP_LIVE_FRAMES: u32 = 1 << 1;

/// The head of `union bpf_attr` for BPF_PROG_LOAD (the kernel zero-extends a shorter attr).
#[repr(C)]
#[derive(Default)]
struct ProgLoadAttr {
    prog_type: u32,
    insn_cnt: u32,
    insns: u64,
    license: u64,
    log_level: u32,
    log_size: u32,
    log_buf: u64,
    kern_version: u32,
    prog_flags: u32,
    prog_name: [u8; 16],
    prog_ifindex: u32,
    expected_attach_type: u32,
}

/// `struct xdp_md`, the XDP test run's context.
#[repr(C)]
struct XdpMd {
    data: u32,
    data_end: u32,
    data_meta: u32,
    ingress_ifindex: u32,
    rx_queue_index: u32,
    egress_ifindex: u32,
}

/// Loads the XDP program `r0 = action; exit` (BPF_MOV64_IMM, BPF_EXIT) under `name`.
fn load_constant_xdp(name: &str, action: i32) -> io::Result<OwnedFd> {
    // struct bpf_insn { u8 code; u8 dst:4, src:4; s16 off; s32 imm; }
    let insn = |code: u8, imm: i32| -> u64 {
        let mut b = [0u8; 8];
        b[0] = code;
        b[4..].copy_from_slice(&imm.to_le_bytes());
        u64::from_le_bytes(b)
    };
    let insns = [insn(0xb7, action), insn(0x95, 0)];
    let license = c"GPL";
    let mut attr = ProgLoadAttr {
        prog_type: BPF_PROG_TYPE_XDP,
        insn_cnt: insns.len() as u32,
        insns: insns.as_ptr() as u64,
        license: license.as_ptr() as u64,
        ..ProgLoadAttr::default()
    };
    let n = name.len().min(15);
    attr.prog_name[..n].copy_from_slice(&name.as_bytes()[..n]);
    let fd = bpf(BPF_PROG_LOAD, &mut attr)?;
    // SAFETY: BPF_PROG_LOAD returned a new fd that nothing else owns.
    Ok(unsafe { OwnedFd::from_raw_fd(fd as RawFd) })
}

/// Runs `prog` on `repeat` live frames (copies of `frame`) arriving on `ifindex` of the calling thread's network
/// namespace, `BATCH` at a time; returns the wall time of the call and the kernel's own ns per frame (its timer
/// leaves out the time the thread is rescheduled, so it holds up when other tasks share the CPU; an integer). `data_end` must be the frame length (else
/// EINVAL); data_out/ctx_out are not allowed with live frames.
fn live_frames(prog: RawFd, frame: &[u8], ifindex: u32, repeat: u32) -> io::Result<(Duration, u32)> {
    let ctx = XdpMd {
        data: 0,
        data_end: frame.len() as u32,
        data_meta: 0,
        ingress_ifindex: ifindex,
        rx_queue_index: 0,
        egress_ifindex: 0,
    };
    let mut attr = TestRunAttr {
        prog_fd: prog as u32,
        data_size_in: frame.len() as u32,
        data_in: frame.as_ptr() as u64,
        repeat,
        ctx_size_in: size_of::<XdpMd>() as u32,
        ctx_in: &ctx as *const XdpMd as u64,
        flags: BPF_F_TEST_XDP_LIVE_FRAMES,
        batch_size: BATCH,
        ..TestRunAttr::default()
    };
    let start = Instant::now();
    bpf(BPF_PROG_TEST_RUN, &mut attr)?;
    Ok((start.elapsed(), attr.duration))
}

// ---------------------------------------------------------------------------------------------------------------
// Commands in the lab's namespaces
// ---------------------------------------------------------------------------------------------------------------

fn in_server(lab: &Lab, program: &str, args: &[&str]) -> anyhow::Result<CmdOutput> {
    let mut cmd = lab.server.command(program);
    cmd.args(args);
    run_bounded(cmd, COMMAND_TIMEOUT)?.ok()
}

fn in_client(lab: &Lab, program: &str, args: &[&str]) -> anyhow::Result<CmdOutput> {
    let mut cmd = lab.client.command(program);
    cmd.args(args);
    run_bounded(cmd, COMMAND_TIMEOUT)?.ok()
}

/// xdp-filter and libxdp keep their pins in the lab's bpffs (`ip netns exec` remounts /sys: no /sys/fs/bpf).
fn xdp_filter(lab: &Lab, args: &[&str]) -> anyhow::Result<CmdOutput> {
    let bpffs = lab
        .pin_root()
        .parent()
        .expect("pin root is inside the bpffs")
        .to_path_buf();
    let mut cmd = lab.server.command("xdp-filter");
    cmd.args(args).env("LIBXDP_BPFFS", bpffs);
    run_bounded(cmd, COMMAND_TIMEOUT)?.ok()
}

/// Sum of the `ethtool -S aqd-s0` counters whose name ends with `suffix` (per rx queue).
fn ethtool_sum(lab: &Lab, suffix: &str) -> anyhow::Result<u64> {
    let out = in_server(lab, "ethtool", &["-S", SERVER_IF])?;
    let mut sum = 0;
    let mut found = false;
    for line in out.stdout.lines() {
        if let Some((name, value)) = line.trim().split_once(':')
            && name.starts_with("rx_queue_")
            && name.ends_with(suffix)
        {
            sum += value.trim().parse::<u64>().unwrap_or(0);
            found = true;
        }
    }
    ensure!(found, "no rx_queue_*{suffix} in `ethtool -S {SERVER_IF}`:\n{out}");
    Ok(sum)
}

/// `Udp: … NoPorts …` of the server namespace (read on a thread inside it).
fn udp_no_ports(lab: &Lab) -> anyhow::Result<u64> {
    let snmp = lab
        .server
        .run(|| fs::read_to_string("/proc/thread-self/net/snmp"))
        .context("reading the server's /proc/net/snmp")?;
    let mut udp = snmp.lines().filter(|l| l.starts_with("Udp:"));
    let (names, values) = (udp.next(), udp.next());
    let (Some(names), Some(values)) = (names, values) else {
        bail!("no Udp lines in /proc/net/snmp");
    };
    let i = names
        .split_whitespace()
        .position(|n| n == "NoPorts")
        .context("no Udp NoPorts")?;
    Ok(values
        .split_whitespace()
        .nth(i)
        .context("short Udp line")?
        .parse()?)
}

fn nft_counter(lab: &Lab, name: &str) -> anyhow::Result<u64> {
    let out = in_server(lab, "nft", &["list", "counter", "netdev", NFT_TABLE, name])?;
    let text = out.stdout;
    let at = text.find("packets ").context("no packets in nft counter")?;
    Ok(text[at + 8..]
        .split_whitespace()
        .next()
        .context("no packet count")?
        .parse()?)
}

fn server_mac(lab: &Lab) -> anyhow::Result<[u8; 6]> {
    let out = in_server(lab, "ip", &["-j", "link", "show", SERVER_IF])?;
    let json: serde_json::Value = serde_json::from_str(&out.stdout)?;
    let text = json[0]["address"].as_str().context("no address")?;
    let mut mac = [0u8; 6];
    for (i, part) in text.split(':').enumerate().take(6) {
        mac[i] = u8::from_str_radix(part, 16)?;
    }
    Ok(mac)
}

// ---------------------------------------------------------------------------------------------------------------
// (b) receivers and cases
// ---------------------------------------------------------------------------------------------------------------

#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
enum Receiver {
    Aqd,
    Drop,
    XdpFilter,
    Nft,
    None,
}

impl Receiver {
    const ALL: [Receiver; 5] = [
        Receiver::Aqd,
        Receiver::Drop,
        Receiver::XdpFilter,
        Receiver::Nft,
        Receiver::None,
    ];

    fn name(self) -> &'static str {
        match self {
            Receiver::Aqd => "aqd (aqd_xdp, 100k per list)",
            Receiver::Drop => "bare XDP_DROP (floor)",
            Receiver::XdpFilter => "xdp-filter (native, deny src)",
            Receiver::Nft => "nft netdev ingress",
            Receiver::None => "none (stack only)",
        }
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
enum CaseKind {
    Blocked,
    DenyPrefix,
    Unknown,
}

struct Case {
    kind: CaseKind,
    label: &'static str,
    src: Ipv4Addr,
    frame: Vec<u8>,
    /// aqd's reason for it.
    reason: Reason,
    receivers: &'static [Receiver],
}

impl Case {
    fn drops(&self) -> bool {
        self.kind != CaseKind::Unknown
    }
}

fn cases(server: Ipv4Addr, dst_mac: [u8; 6]) -> Vec<Case> {
    let frame = |src: Ipv4Addr| {
        let mut f = Frame::udp(&src.to_string(), &server.to_string(), FLOOD_PORT)
            .with_payload(22)
            .build();
        f[..6].copy_from_slice(&dst_mac);
        f[6..12].copy_from_slice(&[0x02, 0x62, 0x65, 0x6e, 0x63, 0x68]);
        f
    };
    let unknown: Ipv4Addr = UNKNOWN_SRC.parse().expect("IPv4");
    vec![
        Case {
            kind: CaseKind::Blocked,
            label: "blocked source (block decision, exact address)",
            src: blocked_src(),
            frame: frame(blocked_src()),
            reason: Reason::DropBlockExact,
            receivers: &[Receiver::Aqd, Receiver::Drop, Receiver::XdpFilter, Receiver::Nft],
        },
        Case {
            kind: CaseKind::DenyPrefix,
            label: "denylisted prefix",
            src: deny_prefix_src(),
            frame: frame(deny_prefix_src()),
            reason: Reason::DropDenyPrefix,
            receivers: &[Receiver::Aqd, Receiver::Drop, Receiver::Nft],
        },
        Case {
            kind: CaseKind::Unknown,
            label: "unknown source → pass (counted at UDP)",
            src: unknown,
            frame: frame(unknown),
            reason: Reason::PassDefault,
            receivers: &[Receiver::Aqd, Receiver::XdpFilter, Receiver::Nft, Receiver::None],
        },
    ]
}

/// aqd loaded and filled by the bench (unpinned maps), like the datapath bench's full load.
fn load_aqd() -> anyhow::Result<(Ebpf, KernelMaps, String)> {
    let start = Instant::now();
    let mut ebpf = loader::load(&LoadOptions {
        pin_dir: None,
        test_clock: false,
    })
    .map_err(|e| anyhow::anyhow!("loading aqd_xdp: {e:#}"))?;
    let mut maps = KernelMaps::from_ebpf(&mut ebpf)?;
    for i in 0..LIST_FILL {
        maps.list_put(List::Allow, host(v4_at(ALLOW_BASE, i)), 0)?;
        maps.list_put(List::Deny, host(v4_at(DENY_BASE, i)), 0)?;
    }
    let block = Decision {
        action: Action::Block as u8,
        origin: Origin::Import as u8,
        ..Decision::default()
    };
    let decisions: Vec<(IpNet, Decision)> = (0..LIST_FILL)
        .map(|i| (host(v4_at(DECISION_BASE, i)), block))
        .chain((0..DECISION_PREFIXES).map(|i| {
            let net = Ipv4Net::new(v4_at([11, 0, 0, 0], i * 256), 24).expect("/24");
            (IpNet::V4(net), block)
        }))
        .collect();
    maps.decision_put_many(&decisions)?;
    for i in 0..ALLOW_PREFIXES {
        let net = Ipv4Net::new(v4_at([172, 16, 0, 0], i * 256), 24).expect("/24");
        maps.list_put(List::Allow, IpNet::V4(net), 0)?;
    }
    for i in 0..DENY_PREFIXES.max(DENY_PREFIX_TEST_INDEX + 1) {
        maps.list_put(List::Deny, IpNet::V4(deny_prefix_v4(i)), 0)?;
    }
    maps.set_protected_ports(&[PROTECTED_PORT])?;
    maps.set_config(Config {
        drop_sample_every: DROP_SAMPLE_EVERY,
        flags: CONFIG_FLAG_CONN_EVENTS | CONFIG_FLAG_CAPTURE | CONFIG_FLAG_REQUEST_EVENTS,
        test_now_ns: 0,
        request_gap_ns: 0,
    })?;
    let note = format!(
        "aqd: {} allow + {} deny + {} decision exact entries, {} allow / {} deny prefixes, {} /24 decisions; load + \
         fill {:.1} s",
        LIST_FILL,
        LIST_FILL,
        LIST_FILL,
        ALLOW_PREFIXES,
        DENY_PREFIXES.max(DENY_PREFIX_TEST_INDEX + 1),
        DECISION_PREFIXES,
        start.elapsed().as_secs_f64()
    );
    Ok((ebpf, maps, note))
}

/// The nft ruleset: a netdev table on the server veth with the decision addresses in a set, plus the deny prefix.
fn write_nft_ruleset(lab: &Lab) -> anyhow::Result<PathBuf> {
    let mut text = format!(
        "table netdev {NFT_TABLE} {{\n  counter deny_hits {{ }}\n  counter prefix_hits {{ }}\n  set deny {{\n    \
         type ipv4_addr\n    size 131072\n    elements = {{\n"
    );
    let addrs: Vec<String> = (0..LIST_FILL)
        .map(|i| v4_at(DECISION_BASE, i).to_string())
        .collect();
    for chunk in addrs.chunks(16) {
        text.push_str("      ");
        text.push_str(&chunk.join(", "));
        text.push_str(",\n");
    }
    text.push_str(&format!(
        "    }}\n  }}\n  chain ingress {{\n    type filter hook ingress device \"{SERVER_IF}\" priority 0; policy accept;\n    \
         ip saddr @deny counter name \"deny_hits\" drop\n    ip saddr {} counter name \"prefix_hits\" drop\n  }}\n}}\n",
        deny_prefix_v4(DENY_PREFIX_TEST_INDEX)
    ));
    let path = lab.file("flood.nft");
    fs::write(&path, text)?;
    Ok(path)
}

/// What the receivers need: program fds and files.
struct Receivers {
    aqd: Ebpf,
    maps: KernelMaps,
    drop: OwnedFd,
    nft_rules: PathBuf,
}

impl Receivers {
    fn attach_fd(lab: &Lab, fd: RawFd) -> anyhow::Result<()> {
        lab.server
            .run(move || {
                // SAFETY: the fd stays open (owned by `Receivers`) until `run` returns.
                let fd = unsafe { BorrowedFd::borrow_raw(fd) };
                attach::attach(fd, SERVER_IF, AttachMode::Native)
                    .map(|_| ())
                    .map_err(io::Error::other)
            })
            .context("attaching in native mode")
    }

    fn attach(&mut self, lab: &Lab, r: Receiver, blocked: Ipv4Addr) -> anyhow::Result<()> {
        match r {
            Receiver::Aqd => {
                let fd = loader::program_mut(&mut self.aqd)?.fd()?.as_fd().as_raw_fd();
                Self::attach_fd(lab, fd)
            }
            Receiver::Drop => Self::attach_fd(lab, self.drop.as_raw_fd()),
            Receiver::XdpFilter => {
                xdp_filter(lab, &["load", "-m", "native", SERVER_IF])?;
                xdp_filter(lab, &["ip", &blocked.to_string(), "-m", "src"])?;
                Ok(())
            }
            Receiver::Nft => {
                in_server(lab, "nft", &["-f", &self.nft_rules.to_string_lossy()])?;
                Ok(())
            }
            Receiver::None => Ok(()),
        }
    }

    fn detach(&mut self, lab: &Lab, r: Receiver) -> anyhow::Result<()> {
        match r {
            Receiver::Aqd | Receiver::Drop => {
                in_server(lab, "ip", &["link", "set", "dev", SERVER_IF, "xdpdrv", "off"])?;
            }
            Receiver::XdpFilter => {
                xdp_filter(lab, &["unload", SERVER_IF])?;
            }
            Receiver::Nft => {
                in_server(lab, "nft", &["delete", "table", "netdev", NFT_TABLE])?;
            }
            Receiver::None => {}
        }
        Ok(())
    }

    /// What the receiver counts for this case: (counter value, aqd's counter for the case's reason).
    fn counted(&self, lab: &Lab, r: Receiver, case: &Case) -> anyhow::Result<(u64, u64)> {
        let aqd_reason = self.maps.counters()?.by_reason[case.reason as usize];
        let n = if !case.drops() {
            udp_no_ports(lab)?
        } else if r == Receiver::Nft {
            nft_counter(
                lab,
                if case.kind == CaseKind::Blocked {
                    "deny_hits"
                } else {
                    "prefix_hits"
                },
            )?
        } else {
            ethtool_sum(lab, "_xdp_drops")?
        };
        Ok((n, aqd_reason))
    }
}

#[derive(Clone, Copy, Debug)]
struct Run {
    offered_mpps: f64,
    counted_mpps: f64,
    /// counted ÷ sent
    share: f64,
    /// Counted rate by the kernel's clock (share ÷ its ns per frame).
    kernel_mpps: f64,
    /// The kernel's run time ÷ wall time: below 1 when other tasks took the CPU.
    cpu_share: f64,
    aqd_share: f64,
}

/// The generator: the XDP_TX program, parked, and the client's ifindex.
struct Generator {
    fd: OwnedFd,
    ifindex: u32,
}

impl Generator {
    fn new(lab: &Lab) -> anyhow::Result<Self> {
        let fd = load_constant_xdp("aqd_bench_tx", XDP_TX)?;
        in_client(
            lab,
            "ip",
            &["link", "add", PARK_IF, "type", "veth", "peer", "name", PARK_PEER],
        )?;
        let raw = fd.as_raw_fd();
        let ifindex = lab
            .client
            .run(move || {
                // SAFETY: `fd` outlives this call.
                let fd = unsafe { BorrowedFd::borrow_raw(raw) };
                attach::attach(fd, PARK_IF, AttachMode::Native).map_err(io::Error::other)?;
                attach::interface_index(CLIENT_IF)
                    .ok_or_else(|| io::Error::other(format!("no {CLIENT_IF} in the client namespace")))
            })
            .context("parking the generator")?;
        Ok(Self { fd, ifindex })
    }

    /// Sends `frames` copies of `frame` out of the client veth from CPU `GEN_CPU`; returns the wall time.
    fn send(&self, lab: &Lab, frame: &[u8], frames: u32) -> anyhow::Result<(Duration, u32)> {
        let (fd, ifindex, frame) = (self.fd.as_raw_fd(), self.ifindex, frame.to_vec());
        lab.client
            .run(move || {
                pin_current_thread(GEN_CPU)?;
                live_frames(fd, &frame, ifindex, frames)
            })
            .context("BPF_PROG_TEST_RUN with BPF_F_TEST_XDP_LIVE_FRAMES")
    }
}

fn measure(
    lab: &Lab,
    gen_: &Generator,
    receivers: &Receivers,
    r: Receiver,
    case: &Case,
    frames: u32,
) -> anyhow::Result<Run> {
    let (before, aqd_before) = receivers.counted(lab, r, case)?;
    let (wall, kernel_ns) = gen_.send(lab, &case.frame, frames)?;
    // The receiver's NAPI ran in the generator's softirq; give any tail a moment anyway.
    thread::sleep(Duration::from_millis(20));
    let (after, aqd_after) = receivers.counted(lab, r, case)?;
    let secs = wall.as_secs_f64();
    Ok(Run {
        offered_mpps: frames as f64 / secs / 1e6,
        counted_mpps: (after - before) as f64 / secs / 1e6,
        share: (after - before) as f64 / frames as f64,
        kernel_mpps: (after - before) as f64 / frames as f64 * 1e3 / f64::from(kernel_ns.max(1)),
        cpu_share: f64::from(kernel_ns) * frames as f64 / 1e9 / secs,
        aqd_share: (aqd_after - aqd_before) as f64 / frames as f64,
    })
}

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

fn cell(v: &[f64], digits: usize) -> String {
    let (m, lo, hi) = median_min_max(v);
    format!("{m:.digits$} ({lo:.digits$}–{hi:.digits$})")
}

fn flood(lab: &Lab, rounds: usize, quick: bool) -> anyhow::Result<()> {
    let run_secs = if quick { 0.3 } else { 1.0 };
    in_server(lab, "ethtool", &["-K", SERVER_IF, "gro", "on"])?;
    let mac = server_mac(lab)?;
    let cases = cases(lab.server_v4, mac);
    let (aqd, maps, aqd_note) = load_aqd()?;
    let drop_fd = load_constant_xdp("bench_drop", XDP_DROP)?;
    let nft_rules = write_nft_ruleset(lab)?;
    let mut receivers = Receivers {
        aqd,
        maps,
        drop: drop_fd,
        nft_rules,
    };
    let generator = Generator::new(lab)?;
    println!(
        "# Flood over a veth (live frames, XDP_TX out of {CLIENT_IF} on CPU {GEN_CPU}, batch {BATCH})\n"
    );
    println!("- {aqd_note}");
    println!(
        "- frames: 64 B Ethernet/IPv4/UDP → {}:{FLOOD_PORT}; receivers attached to {SERVER_IF} (native XDP; nft: \
         netdev ingress; GRO on)",
        lab.server_v4
    );

    // Calibration: every receiver × case once (also checks the counting), sizes the measured runs.
    let mut frames: BTreeMap<(CaseKind, Receiver), u32> = BTreeMap::new();
    for r in Receiver::ALL {
        receivers.attach(lab, r, blocked_src())?;
        for case in cases.iter().filter(|c| c.receivers.contains(&r)) {
            let run = measure(lab, &generator, &receivers, r, case, CALIBRATION_FRAMES)?;
            ensure!(
                run.share > 0.95,
                "{} on '{}': the receiver counted only {:.1} % of the frames sent",
                r.name(),
                case.label,
                run.share * 100.0
            );
            if r == Receiver::Aqd {
                ensure!(
                    run.aqd_share > 0.99,
                    "aqd on '{}': reason {} counted {:.1} % of the frames",
                    case.label,
                    case.reason.name(),
                    run.aqd_share * 100.0
                );
            }
            let n = (run.offered_mpps * 1e6 * run_secs) as u64;
            frames.insert(
                (case.kind, r),
                n.clamp(MIN_FRAMES as u64, MAX_FRAMES as u64) as u32,
            );
        }
        receivers.detach(lab, r)?;
    }

    let mut samples: BTreeMap<(CaseKind, Receiver), Vec<Run>> = BTreeMap::new();
    let start = Instant::now();
    for round in 0..rounds {
        let mut order = Receiver::ALL.to_vec();
        order.rotate_left(round % Receiver::ALL.len());
        for r in order {
            receivers.attach(lab, r, blocked_src())?;
            for case in cases.iter().filter(|c| c.receivers.contains(&r)) {
                let n = frames[&(case.kind, r)];
                let run = measure(lab, &generator, &receivers, r, case, n)?;
                samples.entry((case.kind, r)).or_default().push(run);
            }
            receivers.detach(lab, r)?;
        }
    }
    let took = start.elapsed();

    println!(
        "\n## (b) Flood: Mpps counted at the receiver, median (min–max) of {rounds} interleaved rounds; ns/frame = \
         1 / rate (generator + receiver on one CPU)\n"
    );
    let shares: Vec<f64> = samples.values().flatten().map(|r| r.cpu_share).collect();
    let (cpu_share, _, _) = median_min_max(&shares);
    let contended = cpu_share < 0.9;
    println!(
        "| case | receiver | offered Mpps (wall) | counted Mpps (wall) | counted Mpps (kernel clock) | ns/frame \
         (kernel) | counted share | aqd reason (share) |"
    );
    println!("|---|---|---|---|---|---|---|---|");
    // Ratios on wall-clock rates, unless the CPU was shared: then on the kernel clock's.
    let median = |k: (CaseKind, Receiver)| -> Option<f64> {
        samples.get(&k).map(|v| {
            let rates: Vec<f64> = v
                .iter()
                .map(|r| if contended { r.kernel_mpps } else { r.counted_mpps })
                .collect();
            median_min_max(&rates).0
        })
    };
    for case in &cases {
        for &r in case.receivers {
            let v = &samples[&(case.kind, r)];
            let offered: Vec<f64> = v.iter().map(|s| s.offered_mpps).collect();
            let counted: Vec<f64> = v.iter().map(|s| s.counted_mpps).collect();
            let share: Vec<f64> = v.iter().map(|s| s.share * 100.0).collect();
            let kernel: Vec<f64> = v.iter().map(|s| s.kernel_mpps).collect();
            let aqd = if r == Receiver::Aqd {
                let s: Vec<f64> = v.iter().map(|s| s.aqd_share * 100.0).collect();
                format!("{} ({:.1} %)", case.reason.name(), median_min_max(&s).0)
            } else {
                "–".into()
            };
            println!(
                "| {} | {} | {} | {} | {} | {:.1} | {:.1} % | {aqd} |",
                case.label,
                r.name(),
                cell(&offered, 2),
                cell(&counted, 2),
                cell(&kernel, 2),
                1e3 / median_min_max(&kernel).0,
                median_min_max(&share).0,
            );
        }
    }
    println!(
        "\nThe generator's test runs got {:.0} % of the wall time (kernel run time ÷ wall, median){}.",
        cpu_share * 100.0,
        if contended {
            ": the CPU was shared, so the ratios below use the kernel-clock rates"
        } else {
            ""
        }
    );
    println!(
        "\n### (b) Ratios of counted medians (aqd ÷ other; {} rates)\n",
        if contended { "kernel-clock" } else { "wall-clock" }
    );
    println!(
        "| case | src | aqd Mpps | ÷ xdp-filter | ÷ nft netdev ingress | ÷ bare XDP_DROP / stack only |"
    );
    println!("|---|---|---|---|---|---|");
    let ratio = |case: &Case, other: Receiver| -> String {
        match (median((case.kind, Receiver::Aqd)), median((case.kind, other))) {
            (Some(a), Some(o)) => format!("{:.2}×", a / o),
            _ => "n/a".into(),
        }
    };
    for case in &cases {
        let floor = if case.drops() {
            Receiver::Drop
        } else {
            Receiver::None
        };
        println!(
            "| {} | {} | {:.2} | {} | {} | {} |",
            case.label,
            case.src,
            median((case.kind, Receiver::Aqd)).unwrap_or(f64::NAN),
            ratio(case, Receiver::XdpFilter),
            ratio(case, Receiver::Nft),
            ratio(case, floor)
        );
    }
    let blocked = &cases[0];
    let (a, x, n) = (
        median((blocked.kind, Receiver::Aqd)).unwrap_or(f64::NAN),
        median((blocked.kind, Receiver::XdpFilter)).unwrap_or(f64::NAN),
        median((blocked.kind, Receiver::Nft)).unwrap_or(f64::NAN),
    );
    let verdict = |ok: bool| if ok { "met" } else { "NOT met" };
    println!(
        "\n**Targets, blocked source:** aqd ÷ xdp-filter {:.2}× (target ≥ 1.1×: {}); aqd ÷ nft netdev ingress {:.2}× \
         (target ≥ 3×: {}). The xdp-filter prefix cell is n/a: its CLI matches addresses only. Pass rows include the \
         stack up to UDP (the `none` row is the stack alone). Rounds took {:.1} s; load average {}.",
        a / x,
        verdict(a / x >= 1.1),
        a / n,
        verdict(a / n >= 3.0),
        took.as_secs_f64(),
        fs::read_to_string("/proc/loadavg").unwrap_or_default().trim()
    );
    drop(generator);
    drop(receivers);
    Ok(())
}

// ---------------------------------------------------------------------------------------------------------------
// (c) HTTPS requests/s with and without aqd
// ---------------------------------------------------------------------------------------------------------------

const HTTPS_ROUNDS: usize = 3;
const H2LOAD_CLIENTS: &str = "8";
const H2LOAD_STREAMS: &str = "1";
const BODY: &str = "aqd bench ok\n";

struct H2load {
    req_per_s: f64,
    succeeded: u64,
    failed: u64,
}

/// `h2load` from the client namespace for `secs` (after 1 s of warm-up); parses its summary.
fn h2load(lab: &Lab, secs: u32) -> anyhow::Result<H2load> {
    let url = format!("https://{}:{SERVICE_PORT}/index.html", lab.server_v4);
    let mut cmd = lab.client.command("h2load");
    cmd.args([
        "-D",
        &secs.to_string(),
        "--warm-up-time",
        "1",
        "-c",
        H2LOAD_CLIENTS,
        "-m",
        H2LOAD_STREAMS,
        "-t",
        "1",
        &url,
    ]);
    let out = run_bounded(cmd, Duration::from_secs(u64::from(secs) + 30))?.ok()?;
    // "finished in 5.00s, 12345.60 req/s, 1.23MB/s"
    // "requests: 61728 total, 61736 started, 61728 done, 61728 succeeded, 0 failed, 0 errored, 0 timeout"
    let text = &out.stdout;
    let req_per_s = text
        .lines()
        .find(|l| l.starts_with("finished in"))
        .and_then(|l| l.split(", ").nth(1))
        .and_then(|f| f.strip_suffix(" req/s"))
        .and_then(|f| f.parse().ok())
        .with_context(|| format!("no req/s in h2load's output:\n{out}"))?;
    let field = |name: &str| -> u64 {
        text.lines()
            .find(|l| l.starts_with("requests:"))
            .and_then(|l| l.split(", ").find(|f| f.ends_with(name)))
            .and_then(|f| f.trim_start_matches("requests: ").split(' ').next())
            .and_then(|n| n.parse().ok())
            .unwrap_or(0)
    };
    Ok(H2load {
        req_per_s,
        succeeded: field("succeeded"),
        failed: field("failed") + field("errored") + field("timeout"),
    })
}

fn https(lab: &mut Lab, quick: bool) -> anyhow::Result<()> {
    let secs = if quick { 2 } else { 5 };
    // Real checksums on what the client sends (aqd verifies TCP checksums).
    in_client(lab, "ethtool", &["-K", CLIENT_IF, "tx", "off"])?;
    let dir = lab.file("https");
    let htdocs = dir.join("htdocs");
    fs::create_dir_all(&htdocs)?;
    fs::write(htdocs.join("index.html"), BODY)?;
    let (cert, key) = tls::self_signed_cert(&dir)?;
    let mut cmd = lab.server.command("nghttpd");
    cmd.arg("-d")
        .arg(&htdocs)
        .arg(SERVICE_PORT.to_string())
        .arg(&key)
        .arg(&cert)
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::null());
    let mut server = tls::spawn_tied(&mut cmd).context("starting nghttpd")?;
    let result = (|| -> anyhow::Result<()> {
        // Wait until it answers.
        let deadline = Instant::now() + Duration::from_secs(10);
        loop {
            let mut probe = lab.client.command("h2load");
            probe.args([
                "-n",
                "1",
                &format!("https://{}:{SERVICE_PORT}/index.html", lab.server_v4),
            ]);
            if let Ok(out) = run_bounded(probe, Duration::from_secs(5))
                && out.success()
                && out.stdout.contains("1 succeeded")
            {
                break;
            }
            ensure!(Instant::now() < deadline, "nghttpd did not answer within 10 s");
            thread::sleep(Duration::from_millis(100));
        }
        let aqd = std::env::var_os("AQD_BIN").map(PathBuf::from).unwrap_or_default();
        println!(
            "\n# (c) HTTPS through the veth: h2load → nghttpd (TLS, HTTP/2), with and without `aqd run`\n\n\
             - h2load -D {secs} --warm-up-time 1 -c {H2LOAD_CLIENTS} -m {H2LOAD_STREAMS} -t 1, {HTTPS_ROUNDS} \
             interleaved rounds; aqd: `{}` (release build) run -i {SERVER_IF} --xdp-mode native --protected-ports \
             {SERVICE_PORT}; TX checksum offload off on {CLIENT_IF}\n",
            aqd.display()
        );
        let mut without = Vec::new();
        let mut with = Vec::new();
        let mut seen = Vec::new();
        let mut failed = 0;
        let mut succeeded = 0;
        for round in 0..HTTPS_ROUNDS {
            let order = if round % 2 == 0 {
                [false, true]
            } else {
                [true, false]
            };
            for with_aqd in order {
                if with_aqd {
                    lab.start_daemon()?;
                }
                let before = if with_aqd {
                    Some(lab.status()?.packets())
                } else {
                    None
                };
                let r = h2load(lab, secs)?;
                if with_aqd {
                    let status = lab.status()?;
                    ensure!(
                        status.dropped() == 0,
                        "aqd dropped {} packets of the HTTPS run",
                        status.dropped()
                    );
                    seen.push(status.packets() - before.unwrap_or(0));
                    lab.stop_daemon()?;
                    lab.aqd(&["detach"])?.ok()?;
                    with.push(r.req_per_s);
                } else {
                    without.push(r.req_per_s);
                }
                failed += r.failed;
                succeeded += r.succeeded;
            }
        }
        let (w, o) = (median_min_max(&with).0, median_min_max(&without).0);
        println!("| setup | req/s, median (min–max) of {HTTPS_ROUNDS} | rounds |");
        println!("|---|---|---|");
        let list = |v: &[f64]| v.iter().map(|x| format!("{x:.0}")).collect::<Vec<_>>().join(", ");
        println!("| without aqd | {} | {} |", cell(&without, 0), list(&without));
        println!(
            "| with `aqd run` attached | {} | {} |",
            cell(&with, 0),
            list(&with)
        );
        println!(
            "\n**with ÷ without: {:.1} %** (target ≥ 97 %: {}). Requests succeeded {succeeded}, failed/errored/timed \
             out {failed}; aqd counted {} packets per with-aqd round (median) and dropped none.",
            100.0 * w / o,
            if w / o >= 0.97 { "met" } else { "NOT met" },
            median_min_max(&seen.iter().map(|&n| n as f64).collect::<Vec<_>>()).0
        );
        Ok(())
    })();
    let _ = server.kill();
    let _ = server.wait();
    result
}

fn main() -> anyhow::Result<()> {
    if let Some(why) = netns::unavailable() {
        eprintln!("flood bench skipped: {why}");
        return Ok(());
    }
    let args: Vec<String> = std::env::args().skip(1).collect();
    let quick = args.iter().any(|a| a == "--quick");
    let rounds = args
        .iter()
        .position(|a| a == "--rounds")
        .and_then(|i| args.get(i + 1))
        .and_then(|v| v.parse().ok())
        .unwrap_or(if quick { QUICK_ROUNDS } else { ROUNDS })
        .max(1);
    let missing = tls::missing_from_path(&["h2load", "nghttpd", "nft", "xdp-filter", "ethtool", "openssl"]);
    ensure!(
        missing.is_empty(),
        "missing tools {missing:?}: run `cargo xtask bootstrap`"
    );
    let start = Instant::now();
    let aqd = netns::release_aqd()?;
    // SAFETY: no other thread exists yet. The lab runs `$AQD_BIN`.
    unsafe { std::env::set_var("AQD_BIN", &aqd) };
    let mut lab = Lab::new()?;
    let result = flood(&lab, rounds, quick).and_then(|()| https(&mut lab, quick));
    drop(lab);
    result?;
    println!(
        "\nFlood bench wall time {:.1} s (lab set up and torn down).",
        start.elapsed().as_secs_f64()
    );
    Ok(())
}
