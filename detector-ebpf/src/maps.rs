//! Every map of the object, shared by the XDP programs (one definition each; pinned by userspace by name).

use aya_ebpf::{
    macros::map,
    maps::{Array, HashMap, LpmTrie, LruHashMap, PerCpuArray, ProgramArray, RingBuf},
};
use detector_common::{
    AddrKey, Bucket, CacheWork, Config, Counters, CpuState, Decision, FlowState, FlowTuple, HalfOpen,
    ListEntry, RateClass, ReasonText, Scratch, SourceState, capacity,
};

#[map(name = "ALLOW_EXACT")]
pub static ALLOW_EXACT: HashMap<AddrKey, ListEntry> = HashMap::with_max_entries(capacity::ALLOW_EXACT, 0);
#[map(name = "ALLOW_PREFIX")]
pub static ALLOW_PREFIX: LpmTrie<AddrKey, ListEntry> = LpmTrie::with_max_entries(capacity::ALLOW_PREFIX, 0);
/// Management networks (exact addresses as /128): checked before everything else, written only from the config.
#[map(name = "MANAGEMENT")]
pub static MANAGEMENT: LpmTrie<AddrKey, ListEntry> = LpmTrie::with_max_entries(capacity::MANAGEMENT, 0);
#[map(name = "DENY_EXACT")]
pub static DENY_EXACT: HashMap<AddrKey, ListEntry> = HashMap::with_max_entries(capacity::DENY_EXACT, 0);
#[map(name = "DENY_PREFIX")]
pub static DENY_PREFIX: LpmTrie<AddrKey, ListEntry> = LpmTrie::with_max_entries(capacity::DENY_PREFIX, 0);
#[map(name = "DECISION_EXACT")]
pub static DECISION_EXACT: HashMap<AddrKey, Decision> =
    HashMap::with_max_entries(capacity::DECISION_EXACT, 0);
#[map(name = "DECISION_PREFIX")]
pub static DECISION_PREFIX: HashMap<AddrKey, Decision> =
    HashMap::with_max_entries(capacity::DECISION_PREFIX, 0);
#[map(name = "SOURCES")]
pub static SOURCES: LruHashMap<AddrKey, SourceState> = LruHashMap::with_max_entries(capacity::SOURCES, 0);
/// Bumped by userspace after every policy change: a cached verdict of another generation is walked again.
#[map(name = "POLICY_GEN")]
pub static POLICY_GEN: Array<u32> = Array::with_max_entries(1, 0);
/// Shared buckets of prefixes throttled at prefix scope, keyed by the /24 or /64.
#[map(name = "PREFIX_BUCKETS")]
pub static PREFIX_BUCKETS: LruHashMap<AddrKey, Bucket> =
    LruHashMap::with_max_entries(capacity::PREFIX_BUCKETS, 0);
/// Buckets of addresses throttled by an exact decision, keyed by the address (see `limits::Budget`).
#[map(name = "EXACT_BUCKETS")]
pub static EXACT_BUCKETS: LruHashMap<AddrKey, Bucket> =
    LruHashMap::with_max_entries(capacity::EXACT_BUCKETS, 0);
/// Per-CPU work space of the verdict cache (admission window, the outcome being walked).
#[map(name = "CACHE_WORK")]
pub static CACHE_WORK: PerCpuArray<CacheWork> = PerCpuArray::with_max_entries(1, 0);
/// Per-CPU state of the hot path: the coarse clock at the current jiffy (`clock.rs`), the last ring-buffer
/// wake-up (`account.rs`).
#[map(name = "CPU_STATE")]
pub static CPU_STATE: PerCpuArray<CpuState> = PerCpuArray::with_max_entries(1, 0);
#[map(name = "RATE_CLASSES")]
pub static RATE_CLASSES: Array<RateClass> = Array::with_max_entries(capacity::RATE_CLASSES, 0);
/// Non-zero at index `port` when `port` (TCP or UDP destination) is a protected service port.
#[map(name = "PROTECTED_PORTS")]
pub static PROTECTED_PORTS: Array<u8> = Array::with_max_entries(capacity::PROTECTED_PORTS, 0);
#[map(name = "CONFIG")]
pub static CONFIG: Array<Config> = Array::with_max_entries(1, 0);
#[map(name = "COUNTERS")]
pub static COUNTERS: PerCpuArray<Counters> = PerCpuArray::with_max_entries(1, 0);
/// Decision reason texts, for userspace only (see `detector_common::ReasonText`); pinned with the decisions.
#[map(name = "REASONS")]
pub static REASONS: Array<ReasonText> = Array::with_max_entries(capacity::REASONS, 0);
#[map(name = "EVENTS")]
pub static EVENTS: RingBuf = RingBuf::with_byte_size(capacity::EVENTS_BYTES, 0);

/// Verdicts by SYN signature key.
#[map(name = "SYN_VERDICTS")]
pub static SYN_VERDICTS: HashMap<u64, Decision> = HashMap::with_max_entries(capacity::SYN_VERDICTS, 0);
/// Verdicts by kernel ClientHello key.
#[map(name = "HELLO_VERDICTS")]
pub static HELLO_VERDICTS: HashMap<u64, Decision> = HashMap::with_max_entries(capacity::HELLO_VERDICTS, 0);
/// Verified TCP connections to protected ports, from the ACK that completed their handshake.
#[map(name = "FLOWS")]
pub static FLOWS: LruHashMap<FlowTuple, FlowState> = LruHashMap::with_max_entries(capacity::FLOWS, 0);
/// SYNs whose handshake has not completed (apart from `FLOWS`: a SYN flood evicts only these).
#[map(name = "HALF_OPEN")]
pub static HALF_OPEN: LruHashMap<FlowTuple, HalfOpen> = LruHashMap::with_max_entries(capacity::HALF_OPEN, 0);
/// Tail-call table (filled by the loader): `aqd_tcp`, `aqd_hello`.
#[map(name = "PROGRAMS")]
pub static PROGRAMS: ProgramArray = ProgramArray::with_max_entries(capacity::PROGRAMS, 0);
/// Per-CPU hand-off between the programs of one packet, and their work space.
#[map(name = "SCRATCH")]
pub static SCRATCH: PerCpuArray<Scratch> = PerCpuArray::with_max_entries(1, 0);

/// Set to 1 at load time (`detector_common::TEST_CLOCK_GLOBAL`) to take "now" from `Config::test_now_ns`.
/// Read-only: the verifier sees the constant and prunes the branch not taken.
#[unsafe(no_mangle)]
pub static AQD_TEST_CLOCK: u8 = 0;

pub static DEFAULT_CONFIG: Config = Config {
    drop_sample_every: 0,
    flags: 0,
    test_now_ns: 0,
    request_gap_ns: 0,
};
