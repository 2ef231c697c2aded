//! Types shared by the aqd XDP program and userspace: map names, map keys and values, event records, and the
//! numeric codes (actions, reasons) both sides agree on.
//!
//! Invariants:
//! - every type that crosses the kernel boundary is `#[repr(C)]` with **no implicit padding** (explicit `_pad`
//!   fields, checked by the size assertions at the bottom), so the kernel and userspace see the same bytes;
//! - this is the only definition of each layout; changing one means bumping [`LAYOUT_VERSION`], which moves the
//!   bpffs pin directory so an old daemon's maps are never reused with a new layout.
#![no_std]

pub mod addr;
pub mod event;
pub mod flow;
pub mod hello;
pub mod syn;

pub use addr::AddrKey;
pub use event::{ConnEvent, DropEvent, EventHeader, EventKind, FlowEvent, FlowTuple, PayloadEvent};
pub use flow::{FlowState, HalfOpen, Scratch};
pub use syn::SynSignature;

/// Version of every map and event layout in this crate. Part of the pin path (`/sys/fs/bpf/aqd/v<N>`).
pub const LAYOUT_VERSION: u32 = 5;

/// Names of the maps, exactly as the XDP program declares them and as they are pinned in bpffs.
/// The kernel limits object names to 15 bytes.
pub mod map_names {
    pub const ALLOW_EXACT: &str = "ALLOW_EXACT";
    pub const ALLOW_PREFIX: &str = "ALLOW_PREFIX";
    pub const DENY_EXACT: &str = "DENY_EXACT";
    pub const DENY_PREFIX: &str = "DENY_PREFIX";
    pub const DECISION_EXACT: &str = "DECISION_EXACT";
    pub const DECISION_PREFIX: &str = "DECISION_PREFIX";
    pub const SOURCES: &str = "SOURCES";
    pub const RATE_CLASSES: &str = "RATE_CLASSES";
    pub const PROTECTED_PORTS: &str = "PROTECTED_PORTS";
    pub const CONFIG: &str = "CONFIG";
    pub const COUNTERS: &str = "COUNTERS";
    pub const EVENTS: &str = "EVENTS";
    pub const REASONS: &str = "REASONS";
    /// Verdicts by SYN signature key (`SynSignature::key`): value [`crate::Decision`].
    pub const SYN_VERDICTS: &str = "SYN_VERDICTS";
    /// Verdicts by kernel ClientHello key (`hello::HelloKeyParts::key`): value [`crate::Decision`].
    pub const HELLO_VERDICTS: &str = "HELLO_VERDICTS";
    /// Per-flow state of verified TCP connections to protected ports (LRU).
    pub const FLOWS: &str = "FLOWS";
    /// SYNs whose handshake has not completed yet (LRU; kept apart from `FLOWS` so a SYN flood evicts only these).
    pub const HALF_OPEN: &str = "HALF_OPEN";
    /// The tail-call table: index [`crate::PROG_INDEX_TCP`] and [`crate::PROG_INDEX_HELLO`].
    pub const PROGRAMS: &str = "PROGRAMS";
    /// Per-CPU hand-off and work space of the tail-called programs (never read by userspace).
    pub const SCRATCH: &str = "SCRATCH";
    /// The policy generation (one `u32`): bumped by userspace after every change to the allow, deny and
    /// decision maps, so the verdicts cached in `SOURCES` are walked again at once.
    pub const POLICY_GEN: &str = "POLICY_GEN";
    /// Shared limiter state of prefixes throttled at prefix scope (key: the /24 or /64), value [`crate::Bucket`].
    pub const PREFIX_BUCKETS: &str = "PREFIX_BUCKETS";
    /// Per-CPU work space of the verdict cache: admission window, the outcome being walked (never read by
    /// userspace).
    pub const CACHE_WORK: &str = "CACHE_WORK";
    /// Limiter state of addresses throttled by an exact decision (key: the address), value [`crate::Bucket`].
    /// Apart from `SOURCES` (an LRU every new source enters) and created only for a live throttle decision, so
    /// a random-source flood cannot evict it and hand the throttled source a fresh burst.
    pub const EXACT_BUCKETS: &str = "EXACT_BUCKETS";
    /// The management networks (LPM trie, value [`crate::ListEntry`]): passed ahead of every other rule. Written
    /// only from `protection.management` in the config, never by `allow`/`disallow`.
    pub const MANAGEMENT: &str = "MANAGEMENT";
    /// Per-CPU state of the kernel's hot path (value [`crate::CpuState`]): the coarse time read at the current
    /// jiffy, the last ring-buffer wake-up (never read by userspace).
    pub const CPU_STATE: &str = "CPU_STATE";

    /// Every map, for pinning, layout checks and status output.
    pub const ALL: [&str; 25] = [
        ALLOW_EXACT,
        ALLOW_PREFIX,
        DENY_EXACT,
        DENY_PREFIX,
        DECISION_EXACT,
        DECISION_PREFIX,
        SOURCES,
        RATE_CLASSES,
        PROTECTED_PORTS,
        CONFIG,
        COUNTERS,
        EVENTS,
        REASONS,
        SYN_VERDICTS,
        HELLO_VERDICTS,
        FLOWS,
        HALF_OPEN,
        PROGRAMS,
        SCRATCH,
        POLICY_GEN,
        PREFIX_BUCKETS,
        CACHE_WORK,
        EXACT_BUCKETS,
        MANAGEMENT,
        CPU_STATE,
    ];
}

/// Name of the XDP program in the object file.
pub const PROGRAM_NAME: &str = "aqd_xdp";
/// A bare `XDP_PASS` program in the same object, for benchmarks (the per-packet floor). Never attached.
pub const FLOOR_PROGRAM_NAME: &str = "aqd_floor";
/// The TCP program `aqd_xdp` tail-calls for TCP packets to protected ports: SYN signatures, flows, requests.
pub const TCP_PROGRAM_NAME: &str = "aqd_tcp";
/// The program `aqd_tcp` tail-calls for a flow's first payload segment: the ClientHello key and its verdict.
pub const HELLO_PROGRAM_NAME: &str = "aqd_hello";
/// The TC egress program: learns the server's ISN from its SYN-ACK, so the client's ACK can be checked against
/// it (handshake verification). Attached to the same interfaces as the XDP program; it never drops.
pub const EGRESS_PROGRAM_NAME: &str = "aqd_egress";
/// Slots of the `PROGRAMS` tail-call table.
pub const PROG_INDEX_TCP: u32 = 0;
pub const PROG_INDEX_HELLO: u32 = 1;
/// Name of the read-only global that, when set to 1 at load time, makes the program read "now" from
/// [`Config::test_now_ns`] instead of the monotonic clock. Only tests set it; the verifier prunes the test path
/// from production loads.
pub const TEST_CLOCK_GLOBAL: &str = "AQD_TEST_CLOCK";

/// List-prefix lookups per packet at most: the longest match, then shorter ones while the match found has expired.
pub const MAX_EXPIRED_PREFIX_STEPS: usize = 4;

/// Capacities. Userspace reports fill levels against these.
pub mod capacity {
    pub const ALLOW_EXACT: u32 = 131_072;
    pub const ALLOW_PREFIX: u32 = 65_536;
    pub const MANAGEMENT: u32 = 1_024;
    pub const DENY_EXACT: u32 = 262_144;
    pub const DENY_PREFIX: u32 = 131_072;
    pub const DECISION_EXACT: u32 = 262_144;
    pub const DECISION_PREFIX: u32 = 65_536;
    /// LRU: the least recently seen sources are evicted first (their limiter restarts full, their counters at 0).
    pub const SOURCES: u32 = 524_288;
    /// One shared bucket per prefix decision at most.
    pub const PREFIX_BUCKETS: u32 = DECISION_PREFIX;
    /// One bucket per exact decision at most (LRU: buckets of decisions gone since are evicted first).
    pub const EXACT_BUCKETS: u32 = DECISION_EXACT;
    pub const RATE_CLASSES: u32 = 16;
    /// Reason texts (index = `Decision::reason` code; 0 means none).
    pub const REASONS: u32 = 4096;
    pub const PROTECTED_PORTS: u32 = 65_536;
    /// Ring buffer size in bytes (power of two, multiple of the page size).
    pub const EVENTS_BYTES: u32 = 1 << 22;
    pub const SYN_VERDICTS: u32 = 16_384;
    pub const HELLO_VERDICTS: u32 = 16_384;
    /// LRU: verified TCP connections to protected ports tracked at once.
    pub const FLOWS: u32 = 262_144;
    /// LRU: SYNs waiting for their handshake to complete.
    pub const HALF_OPEN: u32 = 262_144;
    pub const PROGRAMS: u32 = 2;
}

/// A name that is not one of an enum's names (the message lists the valid ones).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct UnknownName {
    pub what: &'static str,
    pub expected: &'static str,
}

impl core::fmt::Display for UnknownName {
    fn fmt(&self, f: &mut core::fmt::Formatter<'_>) -> core::fmt::Result {
        write!(f, "unknown {} (expected {})", self.what, self.expected)
    }
}

/// `ALL`-based `from_name`, `Display`, `FromStr` and (userspace) serde by name for a named enum: the names are
/// written once, in `name()`.
macro_rules! names {
    ($ty:ident, $what:literal, $expected:literal) => {
        impl $ty {
            /// The variant with this [`Self::name`].
            pub fn from_name(name: &str) -> Option<Self> {
                Self::ALL.iter().copied().find(|v| v.name() == name)
            }
        }

        impl core::fmt::Display for $ty {
            fn fmt(&self, f: &mut core::fmt::Formatter<'_>) -> core::fmt::Result {
                f.write_str(self.name())
            }
        }

        impl core::str::FromStr for $ty {
            type Err = UnknownName;

            fn from_str(s: &str) -> Result<Self, UnknownName> {
                Self::from_name(s).ok_or(UnknownName {
                    what: $what,
                    expected: $expected,
                })
            }
        }

        #[cfg(feature = "user")]
        impl serde::Serialize for $ty {
            fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
                s.serialize_str(self.name())
            }
        }

        #[cfg(feature = "user")]
        impl<'de> serde::Deserialize<'de> for $ty {
            fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
                struct Visitor;
                impl serde::de::Visitor<'_> for Visitor {
                    type Value = $ty;
                    fn expecting(&self, f: &mut core::fmt::Formatter<'_>) -> core::fmt::Result {
                        write!(f, "{} name ({})", $what, $expected)
                    }
                    fn visit_str<E: serde::de::Error>(self, v: &str) -> Result<$ty, E> {
                        $ty::from_name(v).ok_or_else(|| {
                            E::custom(format_args!(
                                "unknown {} '{v}' (expected {})",
                                $what, $expected
                            ))
                        })
                    }
                }
                d.deserialize_str(Visitor)
            }
        }
    };
}

/// Prefix lengths of the "prefix" decision scope: a /24 for IPv4, a /64 for IPv6.
pub const PREFIX_SCOPE_V4: u8 = 24;
pub const PREFIX_SCOPE_V6: u8 = 64;

/// What a decision does to its source.
#[repr(u8)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum Action {
    /// Watched and counted; traffic passes.
    Monitor = 1,
    /// Traffic to protected ports is limited by the decision's rate class.
    Throttle = 2,
    /// Everything from the source is dropped.
    Block = 3,
}

impl Action {
    pub const ALL: [Self; 3] = [Self::Monitor, Self::Throttle, Self::Block];

    pub const fn from_u8(v: u8) -> Option<Self> {
        match v {
            1 => Some(Self::Monitor),
            2 => Some(Self::Throttle),
            3 => Some(Self::Block),
            _ => None,
        }
    }

    /// Stable lowercase name for the CLI, the control protocol, logs, metrics and the audit log.
    pub const fn name(self) -> &'static str {
        match self {
            Self::Monitor => "monitor",
            Self::Throttle => "throttle",
            Self::Block => "block",
        }
    }
}

names!(Action, "action", "monitor, throttle or block");

/// Who made a decision. Stored in the kernel value so `aqd list` can say it even when the daemon is down.
#[repr(u8)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum Origin {
    Cli = 1,
    Import = 2,
    Model = 3,
    Config = 4,
    Fleet = 5,
}

impl Origin {
    pub const ALL: [Self; 5] = [Self::Cli, Self::Import, Self::Model, Self::Config, Self::Fleet];

    pub const fn from_u8(v: u8) -> Option<Self> {
        match v {
            1 => Some(Self::Cli),
            2 => Some(Self::Import),
            3 => Some(Self::Model),
            4 => Some(Self::Config),
            5 => Some(Self::Fleet),
            _ => None,
        }
    }

    /// Stable lowercase name for `aqd list`, the audit log and the control protocol.
    pub const fn name(self) -> &'static str {
        match self {
            Self::Cli => "cli",
            Self::Import => "import",
            Self::Model => "model",
            Self::Config => "config",
            Self::Fleet => "fleet",
        }
    }
}

names!(Origin, "origin", "cli, import, model, config or fleet");

/// The verdict the program returns, as the XDP action codes.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Verdict {
    Drop,
    Pass,
}

impl Verdict {
    /// The `xdp_action` value.
    pub const fn xdp_action(self) -> u32 {
        match self {
            Self::Drop => 1,
            Self::Pass => 2,
        }
    }
}

/// Why the program gave its verdict. Every packet is counted under exactly one reason, so the per-reason
/// counters add up to the packets seen; the verdict is a function of the reason.
#[repr(u32)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Reason {
    /// Not IPv4 or IPv6 (ARP, LLDP, …): left to the kernel.
    PassNotIp = 0,
    /// A truncated or invalid IP header: left to the kernel stack, which drops it properly.
    PassMalformed = 1,
    /// Source in the allowlist (exact address).
    PassAllowExact = 2,
    /// Source in the allowlist (prefix).
    PassAllowPrefix = 3,
    /// No rule matched and no limit was exceeded.
    PassDefault = 4,
    /// A monitor decision matched: counted, not acted on.
    PassMonitor = 5,
    /// A throttle decision matched and the traffic was within its rate class.
    PassThrottled = 6,
    /// Source in the denylist (exact address).
    DropDenyExact = 7,
    /// Source in the denylist (prefix).
    DropDenyPrefix = 8,
    /// A block decision on the exact source address.
    DropBlockExact = 9,
    /// A block decision on the source's /24 or /64.
    DropBlockPrefix = 10,
    /// Over the packets-per-second limit of the source's rate class.
    DropRatePackets = 11,
    /// Over the new-connections-per-second limit of the source's rate class.
    DropRateConnections = 12,
    /// A SYN whose signature has a block verdict.
    DropSynFingerprint = 13,
    /// A ClientHello whose kernel key has a block verdict (the packet carrying it is dropped).
    DropHelloFingerprint = 14,
    /// A packet of a flow blocked by its fingerprint (after the ClientHello, or set by the daemon for a
    /// ClientHello the kernel could not key).
    DropFlowFingerprint = 15,
    /// A TCP fragment towards a protected port: no honest TLS client fragments at the IP layer, and a
    /// fragmented ClientHello or tiny first fragment would slip past flow handling. `pass_tcp_fragments` passes them.
    DropTcpFragment = 16,
    /// A segment of a tracked flow (or one completing a handshake) with a wrong TCP checksum: passed (the stack
    /// drops it) without changing any state or being keyed.
    PassBadChecksum = 17,
    /// A FIN or RST of a tracked flow whose sequence number the server would not accept (RFC 5961): passed,
    /// the flow kept.
    PassCloseIgnored = 18,
    /// A TCP packet of no verified flow (not a SYN: a forged ACK, data, FIN or RST, or a flow the kernel lost)
    /// from a source under a throttle decision: dropped rather than charged, so packets anyone can forge never
    /// spend the decision's budget (a throttled /24's honest users share it).
    DropUnverifiedThrottled = 19,
    /// The source is in a management network (`MANAGEMENT`): passed ahead of every other rule.
    PassManagement = 20,
}

/// Number of [`Reason`] values; the size of the per-reason counter array.
pub const REASON_COUNT: usize = 21;

impl Reason {
    pub const ALL: [Reason; REASON_COUNT] = [
        Self::PassNotIp,
        Self::PassMalformed,
        Self::PassAllowExact,
        Self::PassAllowPrefix,
        Self::PassDefault,
        Self::PassMonitor,
        Self::PassThrottled,
        Self::DropDenyExact,
        Self::DropDenyPrefix,
        Self::DropBlockExact,
        Self::DropBlockPrefix,
        Self::DropRatePackets,
        Self::DropRateConnections,
        Self::DropSynFingerprint,
        Self::DropHelloFingerprint,
        Self::DropFlowFingerprint,
        Self::DropTcpFragment,
        Self::PassBadChecksum,
        Self::PassCloseIgnored,
        Self::DropUnverifiedThrottled,
        Self::PassManagement,
    ];

    pub const fn verdict(self) -> Verdict {
        match self {
            Self::PassNotIp
            | Self::PassMalformed
            | Self::PassAllowExact
            | Self::PassAllowPrefix
            | Self::PassDefault
            | Self::PassMonitor
            | Self::PassThrottled
            | Self::PassBadChecksum
            | Self::PassCloseIgnored
            | Self::PassManagement => Verdict::Pass,
            Self::DropDenyExact
            | Self::DropDenyPrefix
            | Self::DropBlockExact
            | Self::DropBlockPrefix
            | Self::DropRatePackets
            | Self::DropRateConnections
            | Self::DropSynFingerprint
            | Self::DropHelloFingerprint
            | Self::DropFlowFingerprint
            | Self::DropTcpFragment
            | Self::DropUnverifiedThrottled => Verdict::Drop,
        }
    }

    pub const fn from_u32(v: u32) -> Option<Self> {
        if (v as usize) < REASON_COUNT {
            Some(Self::ALL[v as usize])
        } else {
            None
        }
    }

    /// Stable snake_case name for metrics, logs and JSON.
    pub const fn name(self) -> &'static str {
        match self {
            Self::PassNotIp => "pass_not_ip",
            Self::PassMalformed => "pass_malformed",
            Self::PassAllowExact => "pass_allow_exact",
            Self::PassAllowPrefix => "pass_allow_prefix",
            Self::PassDefault => "pass_default",
            Self::PassMonitor => "pass_monitor",
            Self::PassThrottled => "pass_throttled",
            Self::DropDenyExact => "drop_deny_exact",
            Self::DropDenyPrefix => "drop_deny_prefix",
            Self::DropBlockExact => "drop_block_exact",
            Self::DropBlockPrefix => "drop_block_prefix",
            Self::DropRatePackets => "drop_rate_packets",
            Self::DropRateConnections => "drop_rate_connections",
            Self::DropSynFingerprint => "drop_syn_fingerprint",
            Self::DropHelloFingerprint => "drop_hello_fingerprint",
            Self::DropFlowFingerprint => "drop_flow_fingerprint",
            Self::DropTcpFragment => "drop_tcp_fragment",
            Self::PassBadChecksum => "pass_bad_checksum",
            Self::PassCloseIgnored => "pass_close_ignored",
            Self::DropUnverifiedThrottled => "drop_unverified_throttled",
            Self::PassManagement => "pass_management",
        }
    }
}

/// Value of the allowlist and denylist maps (exact and prefix).
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct ListEntry {
    /// Monotonic-clock expiry in ns; 0 = never. An expired entry is ignored by the kernel.
    pub expires_ns: u64,
    /// Packets that matched this entry. Written by the kernel without atomics: approximate under contention.
    pub hits: u64,
    /// The entry's own prefix length as a trie key length (IPv4 + 96); 128 in the exact maps. When the
    /// longest match has expired, the kernel looks again below this length, so an expired specific prefix
    /// never hides a live shorter one.
    pub prefix_len: u32,
    pub _pad: u32,
}

/// Value of the decision maps (exact source and /24 or /64 prefix).
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Decision {
    /// Monotonic-clock expiry in ns; 0 = never. An expired decision is ignored by the kernel.
    pub expires_ns: u64,
    /// Packets that matched this decision (approximate under contention, like [`ListEntry::hits`]).
    pub hits: u64,
    /// An [`Action`] value.
    pub action: u8,
    /// Index into `RATE_CLASSES` used while throttled.
    pub rate_class: u8,
    /// Free-form reason code chosen by whoever made the decision (0 = none given).
    pub reason: u16,
    /// An [`Origin`] value.
    pub origin: u8,
    pub _pad: [u8; 3],
}

/// The text of a decision reason code: entry `code` of the `REASONS` array. The XDP program never reads it; it
/// is pinned with the decisions so the texts survive restarts and the CLI can show them without the daemon.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct ReasonText {
    /// Bytes used in `text` (UTF-8); 0 = free slot.
    pub len: u16,
    pub text: [u8; 62],
}

impl Default for ReasonText {
    fn default() -> Self {
        Self {
            len: 0,
            text: [0; 62],
        }
    }
}

/// Limits of one rate class, in the form the kernel's GCRA check needs (no division in the kernel).
/// An interval of 0 means "unlimited".
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct RateClass {
    /// ns between packets at the sustained rate (1e9 / packets-per-second).
    pub packet_interval_ns: u64,
    /// Burst tolerance in ns: `(burst - 1) * packet_interval_ns`.
    pub packet_tolerance_ns: u64,
    /// ns between new TCP connections (SYNs) at the sustained rate.
    pub conn_interval_ns: u64,
    /// Burst tolerance for new connections in ns.
    pub conn_tolerance_ns: u64,
}

impl RateClass {
    pub const UNLIMITED: Self = Self {
        packet_interval_ns: 0,
        packet_tolerance_ns: 0,
        conn_interval_ns: 0,
        conn_tolerance_ns: 0,
    };
}

/// Per-source limiter state (generic cell rate algorithm): the theoretical arrival time of the next packet.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Bucket {
    pub packet_tat_ns: u64,
    pub conn_tat_ns: u64,
}

/// Value of the `SOURCES` LRU map: everything the kernel keeps per source address — its cached policy
/// verdict, and for sources that send to a protected port their limiter and traffic counters (for `aqd top`).
/// Counters are updated without atomics: approximate when one source's packets land on several CPUs at once.
/// The limiter's TATs are advanced atomically (see the kernel's `limits.rs`).
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct SourceState {
    pub bucket: Bucket,
    pub packets: u64,
    pub bytes: u64,
    /// New TCP connections (SYN without ACK).
    pub conns: u64,
    /// Packets dropped by the rate limits.
    pub rate_drops: u64,
    /// Coarse monotonic ns of the last packet to a protected port (0: none yet, a cache-only entry).
    pub last_seen_ns: u64,
    /// The cached result of the allow/deny/decision walk; see [`CachedPolicy`].
    pub policy: CachedPolicy,
}

impl SourceState {
    /// A new source: no counts, a full burst allowance (a TAT of 0 is "any time before now"), nothing cached.
    pub const NEW: Self = Self {
        bucket: Bucket {
            packet_tat_ns: 0,
            conn_tat_ns: 0,
        },
        packets: 0,
        bytes: 0,
        conns: 0,
        rate_drops: 0,
        last_seen_ns: 0,
        policy: CachedPolicy {
            expires_ns: 0,
            generation: 0,
            reason: 0,
            rate_class: 0,
            flags: 0,
            _pad: 0,
        },
    };
}

/// The outcome of the policy walk (allowlist, denylist, decisions) for one source, cached in its
/// [`SourceState`]. Valid while `generation` equals `POLICY_GEN` and `expires_ns` has not passed (the expiry
/// of the entry that matched: an expired entry changes the outcome without any write from userspace).
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct CachedPolicy {
    pub expires_ns: u64,
    pub generation: u32,
    /// The [`Reason`] of the outcome: a final one (allow, deny, block) or the pass reason limits start from.
    pub reason: u8,
    /// Rate class of a throttle decision (0 = the default class).
    pub rate_class: u8,
    /// `policy_flag` bits.
    pub flags: u8,
    pub _pad: u8,
}

/// Bits of [`CachedPolicy::flags`].
pub mod policy_flag {
    /// The entry holds a walk's outcome (a fresh entry does not).
    pub const VALID: u8 = 1 << 0;
    /// `reason` is final: the packet gets it without limits (allow, deny, block).
    pub const FINAL: u8 = 1 << 1;
    /// The throttle came from a prefix decision: the limit is the prefix's shared bucket, not the source's.
    pub const PREFIX_LIMIT: u8 = 1 << 2;
    /// The throttle came from a decision on the exact address: the limit is its bucket in `EXACT_BUCKETS`.
    pub const EXACT_LIMIT: u8 = 1 << 3;
}

/// Per-CPU work space of the verdict cache (`CACHE_WORK`). `window_ns`/`admitted`: cache-only entries created
/// in the current admission window, which bounds how fast a random-source flood can churn `SOURCES`.
/// `new_source`: a new `SOURCES` entry, its `policy` the outcome of this packet's walk, kept in map memory
/// rather than on the stack so the verifier does not carry each outcome's exact values (and a path per
/// outcome) through the rest of the program.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct CacheWork {
    pub window_ns: u64,
    pub admitted: u64,
    /// A new `SOURCES` entry being built (too big for the BPF stack beside the parser's state).
    pub new_source: SourceState,
}

/// Per-CPU state of the hot path (`CPU_STATE`), keyed to `jiffies` (which the verifier turns into one load):
/// - `bpf_ktime_get_coarse_ns` only changes when the tick advances `jiffies`, so the coarse time is read by a
///   helper call once per jiffy per CPU and otherwise taken from `coarse_ns`;
/// - a CPU forces a ring-buffer wake-up at most once per jiffy (`wakeup_jiffies`): a wake-up is an
///   inter-processor interrupt (a VM exit in a guest), and a reader that falls behind must not make every
///   later event pay for one.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct CpuState {
    /// `jiffies` when `coarse_ns` was read (0: never).
    pub coarse_jiffies: u64,
    /// `bpf_ktime_get_coarse_ns` at that jiffy.
    pub coarse_ns: u64,
    /// `jiffies` of this CPU's last forced ring-buffer wake-up.
    pub wakeup_jiffies: u64,
}

/// Cache-only `SOURCES` entries (for dropped sources) one CPU may create per [`ADMISSION_WINDOW_NS`].
pub const ADMISSION_PER_WINDOW: u64 = 64;
/// 1 ms: at most 64,000 new cache-only entries per second per CPU.
pub const ADMISSION_WINDOW_NS: u64 = 1_000_000;

/// The program's runtime settings: the single entry of the `CONFIG` array.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Config {
    /// Emit a drop-sample event for 1 in N drops (per CPU); 0 disables drop samples.
    pub drop_sample_every: u32,
    /// Bit flags, see `CONFIG_FLAG_*`.
    pub flags: u32,
    /// "Now" for the test clock (only read when the program was loaded with [`TEST_CLOCK_GLOBAL`] = 1).
    pub test_now_ns: u64,
    /// Idle gap that ends a request on a flow (0 = [`flow::DEFAULT_REQUEST_GAP_NS`]).
    pub request_gap_ns: u64,
}

/// Emit a connection event for every new TCP connection (SYN without ACK) to a protected port.
pub const CONFIG_FLAG_CONN_EVENTS: u32 = 1 << 0;
/// Hand the first client bytes of each flow to userspace (ClientHello capture for JA4).
pub const CONFIG_FLAG_CAPTURE: u32 = 1 << 1;
/// Emit request and flow-end events.
pub const CONFIG_FLAG_REQUEST_EVENTS: u32 = 1 << 2;
/// Pass TCP fragments towards protected ports (by default they are dropped: `Reason::DropTcpFragment`).
pub const CONFIG_FLAG_PASS_TCP_FRAGMENTS: u32 = 1 << 3;
/// Do not verify TCP checksums (for generic XDP behind GRO, where merged segments carry stale checksums).
pub const CONFIG_FLAG_NO_TCP_CHECKSUM: u32 = 1 << 4;
/// Complete a handshake on the client's first ACK with the right sequence number, without the server's ISN:
/// for hosts that never see the SYN-ACK (a load balancer that does not terminate TCP, direct server return).
/// Forged sources can then feed the model; see the README.
pub const CONFIG_FLAG_HANDSHAKE_ACK_ONLY: u32 = 1 << 5;

/// Indexes of `Counters::flows`: what happened to connections on their way to and in `FLOWS`.
pub mod flow_counter {
    /// SYNs that made a `HALF_OPEN` entry.
    pub const HALF_OPEN: usize = 0;
    /// Server SYN-ACKs recorded at egress.
    pub const SERVER_ISN: usize = 1;
    /// Handshakes completed: flows inserted into `FLOWS`.
    pub const ESTABLISHED: usize = 2;
    /// ACKs of a half-open flow that did not complete its handshake (wrong acknowledgement or sequence
    /// number, bad checksum, or no SYN-ACK seen).
    pub const HANDSHAKE_FAILED: usize = 3;
    /// Flows removed by an accepted RST.
    pub const RESET: usize = 4;
    /// Flows closed by an accepted FIN (kept in the map until evicted, so their verdict keeps applying).
    pub const FIN: usize = 5;
    /// Non-SYN TCP packets to a protected port of no verified flow (a forged source, a handshake not seen, a
    /// connection older than aqd): they pass under their address reason; limits and ClientHello verdicts
    /// apply, nothing is recorded for the model.
    pub const UNVERIFIED: usize = 6;
}
/// Number of `flow_counter` indexes.
pub const FLOW_COUNTER_COUNT: usize = 7;

/// Per-CPU counters: the single entry of the `COUNTERS` per-CPU array.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Counters {
    /// Packets by [`Reason`].
    pub by_reason: [u64; REASON_COUNT],
    /// Events written to the ring buffer, by [`EventKind`] index.
    pub events_sent: [u64; event::EVENT_KIND_COUNT],
    /// Events lost because the ring buffer was full, by [`EventKind`] index.
    pub events_lost: [u64; event::EVENT_KIND_COUNT],
    /// Events deliberately not sent because the ring buffer was more than half full (load shedding of the
    /// events the model can do without: requests and flow ends), by [`EventKind`] index.
    pub events_shed: [u64; event::EVENT_KIND_COUNT],
    /// Connection bookkeeping, by `flow_counter` index.
    pub flows: [u64; FLOW_COUNTER_COUNT],
    /// Running count of drops on this CPU, for 1-in-N sampling.
    pub drop_sample_tick: u64,
}

impl Default for Counters {
    fn default() -> Self {
        Self {
            by_reason: [0; REASON_COUNT],
            events_sent: [0; event::EVENT_KIND_COUNT],
            events_lost: [0; event::EVENT_KIND_COUNT],
            events_shed: [0; event::EVENT_KIND_COUNT],
            flows: [0; FLOW_COUNTER_COUNT],
            drop_sample_tick: 0,
        }
    }
}

#[cfg(feature = "user")]
mod pod {
    //! `aya::Pod` for the map types. Sound because every type is `#[repr(C)]`, `Copy`, and has no padding.
    use super::*;
    unsafe impl aya::Pod for AddrKey {}
    unsafe impl aya::Pod for ListEntry {}
    unsafe impl aya::Pod for Decision {}
    unsafe impl aya::Pod for RateClass {}
    unsafe impl aya::Pod for Bucket {}
    unsafe impl aya::Pod for SourceState {}
    unsafe impl aya::Pod for CachedPolicy {}
    unsafe impl aya::Pod for CacheWork {}
    unsafe impl aya::Pod for CpuState {}
    unsafe impl aya::Pod for Config {}
    unsafe impl aya::Pod for Counters {}
    unsafe impl aya::Pod for ReasonText {}
    unsafe impl aya::Pod for FlowTuple {}
    unsafe impl aya::Pod for FlowState {}
    unsafe impl aya::Pod for HalfOpen {}
    unsafe impl aya::Pod for Scratch {}
}

// No implicit padding anywhere: the sizes are the sums of the fields.
const _: () = assert!(core::mem::size_of::<AddrKey>() == 16);
const _: () = assert!(core::mem::size_of::<ListEntry>() == 24);
const _: () = assert!(core::mem::size_of::<Decision>() == 24);
const _: () = assert!(core::mem::size_of::<RateClass>() == 32);
const _: () = assert!(core::mem::size_of::<Bucket>() == 16);
const _: () = assert!(core::mem::size_of::<SourceState>() == 72);
const _: () = assert!(core::mem::size_of::<CachedPolicy>() == 16);
const _: () = assert!(core::mem::size_of::<CacheWork>() == 88);
const _: () = assert!(core::mem::size_of::<CpuState>() == 24);
const _: () = assert!(core::mem::size_of::<Config>() == 24);
const _: () = assert!(core::mem::size_of::<ReasonText>() == 64);
const _: () = assert!(
    core::mem::size_of::<Counters>()
        == 8 * (REASON_COUNT + 3 * event::EVENT_KIND_COUNT + FLOW_COUNTER_COUNT + 1)
);

#[cfg(test)]
mod tests {
    use super::*;

    /// The kernel starts a new `SOURCES` entry by zeroing its work copy word by word (detector-ebpf's
    /// `mem::zero`), not by copying `SourceState::NEW`: the two must stay the same.
    #[test]
    fn new_source_is_all_zero() {
        assert_eq!(SourceState::NEW, SourceState::default());
    }
}
