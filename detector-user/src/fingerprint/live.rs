//! The daemon's fingerprint pipeline: capture events from the kernel → per-flow reassembly → JA4/JA4_r and
//! p0f labels → the fingerprint table, plus the daemon's verdicts by fingerprint and the escalation of
//! repeated hits to source decisions.
//!
//! Everything here is plain data and pure logic (no maps, no I/O besides the verdict file), driven by the
//! daemon under its state lock; kernel writes go through the `Enforcer`.
//!
//! Bounds (memory never grows with traffic):
//! - flows being reassembled: at most `max_flows`, oldest evicted first, each at most
//!   [`detector_common::flow::CAPTURE_BYTES`] bytes, dropped after `flow_timeout` without progress. A
//!   ClientHello that arrives whole in one capture event is never buffered at all;
//! - fingerprints: at most `max_fingerprints` JA4 and as many SYN signatures, least recently seen evicted;
//!   distinct sources per fingerprint are exact up to [`EXACT_SOURCES`], then a 1 KiB linear-counting sketch;
//! - escalation: at most [`MAX_ESCALATION_SOURCES`] sources tracked at once.

use std::{
    collections::{BTreeMap, BTreeSet, HashMap, HashSet, VecDeque},
    hash::BuildHasher as _,
    net::IpAddr,
    path::{Path, PathBuf},
    time::{Duration, SystemTime, UNIX_EPOCH},
};

use detector_common::{
    Action, Origin, SynSignature,
    flow::{CAPTURE_BYTES, hello_status},
    syn::{SYN_MAX_OPTIONS, option_kind, quirk},
};
use serde::{Deserialize, Serialize};
use sha2::{Digest as _, Sha256};

use super::{
    hello_key::{key_of_client_hello, parts_of_ja4_r},
    ja4::{ClientHello, Ja4, Ja4Error, Protocol, ja4},
    p0f::P0fDb,
    reassembly::{Scan, StreamBuffer, first_client_hello},
    syn::{estimated_header_len, signature_text},
};
use crate::events::Flow;

/// Distinct sources counted exactly per fingerprint before switching to a sketch.
pub const EXACT_SOURCES: usize = 64;
/// Bits of the linear-counting sketch (1 KiB).
const SKETCH_BITS: usize = 8192;
/// Sources tracked at once for escalation.
pub const MAX_ESCALATION_SOURCES: usize = 65_536;

/// Tunables of the pipeline (the `[fingerprints]` section of the config).
#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct LiveSettings {
    /// p0f database for SYN labels; None = no labels.
    pub p0f_db: Option<PathBuf>,
    /// Flows being reassembled at once.
    pub max_flows: usize,
    /// A flow whose ClientHello is not complete after this long is given up.
    pub flow_timeout: Duration,
    /// JA4 entries (and, separately, SYN-signature entries) in the fingerprint table.
    pub max_fingerprints: usize,
    /// Hits of a blocked fingerprint from one source, within `escalate_window`, that block the source
    /// itself; 0 = never.
    pub escalate_after: u32,
    pub escalate_window: Duration,
    /// TTL of the source block an escalation makes.
    pub escalate_ttl: Duration,
}

impl Default for LiveSettings {
    fn default() -> Self {
        Self {
            p0f_db: Some(PathBuf::from(DEFAULT_P0F_DB)),
            max_flows: 4096,
            flow_timeout: Duration::from_secs(10),
            max_fingerprints: 4096,
            escalate_after: 20,
            escalate_window: Duration::from_secs(60),
            escalate_ttl: Duration::from_secs(3600),
        }
    }
}

/// Where the p0f database is looked for unless the config says otherwise (same default as `aqd fingerprint`).
pub const DEFAULT_P0F_DB: &str = "/etc/aqd/p0f.fp";

fn unix_now() -> f64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_secs_f64())
        .unwrap_or(0.0)
}

// ---------------------------------------------------------------------------------------------------------
// Distinct sources
// ---------------------------------------------------------------------------------------------------------

/// Distinct source addresses: exact up to [`EXACT_SOURCES`], then a linear-counting bitmap (±2% up to tens
/// of thousands; saturates at ~70,000 and then reports a lower bound).
#[derive(Clone, Debug)]
pub enum SourceSet {
    Exact(HashSet<IpAddr>),
    Sketch(Box<[u64; SKETCH_BITS / 64]>),
}

impl Default for SourceSet {
    fn default() -> Self {
        Self::Exact(HashSet::new())
    }
}

fn addr_hash(addr: &IpAddr) -> u64 {
    // A fixed-key hasher: the sketch must hash an address the same way every time.

    std::hash::BuildHasherDefault::<std::collections::hash_map::DefaultHasher>::default().hash_one(addr)
}

impl SourceSet {
    pub fn insert(&mut self, addr: IpAddr) {
        match self {
            Self::Exact(set) => {
                set.insert(addr);
                if set.len() > EXACT_SOURCES {
                    let mut bits = Box::new([0u64; SKETCH_BITS / 64]);
                    for a in set.iter() {
                        let b = (addr_hash(a) as usize) % SKETCH_BITS;
                        bits[b / 64] |= 1 << (b % 64);
                    }
                    *self = Self::Sketch(bits);
                }
            }
            Self::Sketch(bits) => {
                let b = (addr_hash(&addr) as usize) % SKETCH_BITS;
                bits[b / 64] |= 1 << (b % 64);
            }
        }
    }

    pub fn count(&self) -> u64 {
        match self {
            Self::Exact(set) => set.len() as u64,
            Self::Sketch(bits) => {
                let m = SKETCH_BITS as f64;
                let zeros = bits.iter().map(|w| w.count_zeros() as u64).sum::<u64>().max(1) as f64;
                (m * (m / zeros).ln()).round() as u64
            }
        }
    }

    /// Whether the count is an estimate.
    pub fn estimated(&self) -> bool {
        matches!(self, Self::Sketch(_))
    }

    fn memory(&self) -> usize {
        match self {
            Self::Exact(set) => set.capacity() * (size_of::<IpAddr>() + 8),
            Self::Sketch(_) => SKETCH_BITS / 8,
        }
    }
}

// ---------------------------------------------------------------------------------------------------------
// The fingerprint table
// ---------------------------------------------------------------------------------------------------------

/// What is known about one JA4.
#[derive(Clone, Debug)]
pub struct Ja4Entry {
    pub ja4: String,
    pub ja4_r: String,
    /// Kernel ClientHello keys seen with this JA4 (from the kernel's events and computed from the bytes).
    pub kernel_keys: BTreeSet<u64>,
    /// ClientHellos fingerprinted (one per flow).
    pub connections: u64,
    /// Of those, dropped by a verdict (in the kernel, or by the daemon for a flow).
    pub dropped: u64,
    pub sources: SourceSet,
    /// Unix seconds.
    pub first_seen: f64,
    pub last_seen: f64,
}

/// What is known about one SYN signature (by its kernel key).
#[derive(Clone, Debug)]
pub struct SynEntry {
    pub key: u64,
    /// p0f text form as first seen (the observed TTL differs by path; the key does not).
    pub text: String,
    pub label: Option<String>,
    /// SYNs seen (retransmissions included).
    pub connections: u64,
    /// SYNs dropped by a verdict.
    pub dropped: u64,
    pub sources: SourceSet,
    pub first_seen: f64,
    pub last_seen: f64,
}

/// Every fingerprint seen, bounded.
#[derive(Debug, Default)]
pub struct FingerprintTable {
    pub ja4: HashMap<String, Ja4Entry>,
    pub syn: HashMap<u64, SynEntry>,
    /// Kernel ClientHello key → JA4, for keys seen or computed.
    pub ja4_by_key: HashMap<u64, String>,
    /// JA4_r → JA4.
    pub ja4_by_r: HashMap<String, String>,
    pub evicted: u64,
}

impl FingerprintTable {
    /// Records a fingerprinted ClientHello. Returns whether the JA4 is new to the table.
    pub fn record_ja4(&mut self, fp: &Ja4, src: IpAddr, keys: &[u64], dropped: bool, max: usize) -> bool {
        let now = unix_now();
        let new = !self.ja4.contains_key(&fp.ja4);
        if new && self.ja4.len() >= max.max(1) {
            // Least recently seen goes (O(n), only when a new JA4 arrives at a full table).
            if let Some(old) = self
                .ja4
                .values()
                .min_by(|a, b| a.last_seen.total_cmp(&b.last_seen))
                .map(|e| e.ja4.clone())
                && let Some(e) = self.ja4.remove(&old)
            {
                self.ja4_by_r.remove(&e.ja4_r);
                for k in &e.kernel_keys {
                    self.ja4_by_key.remove(k);
                }
                self.evicted += 1;
            }
        }
        let entry = self.ja4.entry(fp.ja4.clone()).or_insert_with(|| Ja4Entry {
            ja4: fp.ja4.clone(),
            ja4_r: fp.ja4_r.clone(),
            kernel_keys: BTreeSet::new(),
            connections: 0,
            dropped: 0,
            sources: SourceSet::default(),
            first_seen: now,
            last_seen: now,
        });
        entry.connections += 1;
        entry.dropped += dropped as u64;
        entry.sources.insert(src);
        entry.last_seen = now;
        for &k in keys {
            if k != 0 && entry.kernel_keys.len() < 64 && entry.kernel_keys.insert(k) {
                self.ja4_by_key.insert(k, fp.ja4.clone());
            }
        }
        self.ja4_by_r.insert(fp.ja4_r.clone(), fp.ja4.clone());
        new
    }

    /// Records a SYN.
    pub fn record_syn(
        &mut self,
        key: u64,
        sig: &SynSignature,
        src: IpAddr,
        dropped: bool,
        db: Option<&P0fDb>,
        max: usize,
    ) {
        let now = unix_now();
        if !self.syn.contains_key(&key)
            && self.syn.len() >= max.max(1)
            && let Some(old) = self
                .syn
                .values()
                .min_by(|a, b| a.last_seen.total_cmp(&b.last_seen))
                .map(|e| e.key)
        {
            self.syn.remove(&old);
            self.evicted += 1;
        }
        let entry = self.syn.entry(key).or_insert_with(|| SynEntry {
            key,
            text: signature_text(sig, None),
            label: db
                .and_then(|db| db.match_syn(sig, None))
                .map(|m| m.display_label()),
            connections: 0,
            dropped: 0,
            sources: SourceSet::default(),
            first_seen: now,
            last_seen: now,
        });
        entry.connections += 1;
        entry.dropped += dropped as u64;
        entry.sources.insert(src);
        entry.last_seen = now;
    }

    /// Approximate heap bytes held.
    pub fn memory(&self) -> usize {
        let ja4: usize = self
            .ja4
            .values()
            .map(|e| {
                size_of::<Ja4Entry>()
                    + 2 * e.ja4.len()
                    + 2 * e.ja4_r.len()
                    + e.kernel_keys.len() * 48
                    + e.sources.memory()
            })
            .sum();
        let syn: usize = self
            .syn
            .values()
            .map(|e| {
                size_of::<SynEntry>()
                    + e.text.len()
                    + e.label.as_ref().map_or(0, String::len)
                    + e.sources.memory()
            })
            .sum();
        ja4 + syn + self.ja4_by_key.len() * 64
    }
}

// ---------------------------------------------------------------------------------------------------------
// Reassembly of capture events
// ---------------------------------------------------------------------------------------------------------

type FlowKey = (IpAddr, IpAddr, u16, u16);

fn flow_key(f: &Flow) -> FlowKey {
    (f.src, f.dst, f.src_port, f.dst_port)
}

#[derive(Debug)]
enum AsmState {
    Collecting(StreamBuffer),
    /// Fingerprinted or given up: later capture events of the flow are ignored.
    Done,
}

#[derive(Debug)]
struct Assembly {
    order: u64,
    /// Kernel time of the flow's first capture event (the ClientHello's first segment).
    first_ns: u64,
    last_ns: u64,
    kernel_key: u64,
    /// The first hello_status other than NONE.
    kernel_status: u8,
    /// The kernel's verdict action on the ClientHello (highest seen).
    kernel_action: u8,
    state: AsmState,
}

/// One capture event, as the pipeline needs it.
#[derive(Clone, Copy, Debug)]
pub struct Capture<'a> {
    pub time_ns: u64,
    pub flow: &'a Flow,
    pub stream_offset: u32,
    pub hello_key: u64,
    pub hello_status: u8,
    pub action: u8,
    pub data: &'a [u8],
}

/// A ClientHello fingerprinted from capture events.
#[derive(Clone, Debug)]
pub struct HelloSeen {
    pub flow: Flow,
    pub hello: ClientHello,
    pub fp: Ja4,
    /// The kernel's key when it keyed the ClientHello itself.
    pub kernel_key: Option<u64>,
    /// The key computed here from the bytes.
    pub computed_key: u64,
    /// A `hello_status` value: how the kernel fared.
    pub kernel_status: u8,
    /// The kernel verdict action that applied to the ClientHello (0 = none).
    pub kernel_action: u8,
    /// Kernel time of the ClientHello's first segment.
    pub first_ns: u64,
}

/// What one capture event led to.
#[derive(Clone, Debug, Default)]
pub struct CaptureResult {
    /// The first capture event of this flow (retransmissions and later segments are not).
    pub first_event: bool,
    pub hello: Option<HelloSeen>,
}

/// Reassembly and JA4 counters (also the metrics).
#[derive(Clone, Debug, Default, Serialize)]
pub struct PipelineStats {
    pub capture_events: u64,
    pub ja4_computed: u64,
    /// Flows whose first bytes gave no JA4, by why.
    pub ja4_failed: BTreeMap<&'static str, u64>,
    /// Flows whose first bytes were not TLS at all (plain HTTP, SSH, …): not a failure.
    pub not_tls: u64,
    pub flows_evicted: u64,
    pub flows_timed_out: u64,
    /// ClientHellos the kernel keyed with a different key than the one computed here (a mirror bug).
    pub key_mismatch: u64,
}

/// Per-flow reassembly of capture events.
#[derive(Debug, Default)]
pub struct Reassembler {
    flows: HashMap<FlowKey, Assembly>,
    order: VecDeque<(FlowKey, u64)>,
    next_order: u64,
    pub stats: PipelineStats,
}

fn failure_name(e: &Ja4Error) -> &'static str {
    match e {
        Ja4Error::NotTls => "not_tls",
        Ja4Error::NotClientHello(_) => "not_client_hello",
        Ja4Error::Truncated => "truncated",
        Ja4Error::TooLarge => "too_large",
        Ja4Error::Malformed(_) => "malformed",
    }
}

impl Reassembler {
    pub fn flows_in_progress(&self) -> usize {
        self.flows
            .values()
            .filter(|a| matches!(a.state, AsmState::Collecting(_)))
            .count()
    }

    pub fn flows_tracked(&self) -> usize {
        self.flows.len()
    }

    /// Approximate heap bytes held.
    pub fn memory(&self) -> usize {
        let buffered: usize = self
            .flows
            .values()
            .map(|a| match &a.state {
                AsmState::Collecting(s) => s.contiguous().len() + 256,
                AsmState::Done => 0,
            })
            .sum();
        buffered + self.flows.capacity() * (size_of::<(FlowKey, Assembly)>() + 8) + self.order.capacity() * 48
    }

    fn fail(&mut self, e: &Ja4Error) {
        if *e == Ja4Error::NotTls {
            self.stats.not_tls += 1;
        } else {
            *self.stats.ja4_failed.entry(failure_name(e)).or_default() += 1;
        }
        tracing::trace!(error = %e, "no JA4 for a flow");
    }

    /// Takes one capture event.
    pub fn on_capture(&mut self, c: &Capture<'_>, max_flows: usize) -> CaptureResult {
        self.stats.capture_events += 1;
        let key = flow_key(c.flow);
        let mut result = CaptureResult::default();
        if !self.flows.contains_key(&key) {
            result.first_event = true;
            while self.flows.len() >= max_flows.max(1) {
                let Some((k, order)) = self.order.pop_front() else {
                    break;
                };
                if self.flows.get(&k).is_some_and(|a| a.order == order) {
                    let a = self.flows.remove(&k).expect("present");
                    if matches!(a.state, AsmState::Collecting(_)) {
                        self.stats.flows_evicted += 1;
                    }
                }
            }
            let order = self.next_order;
            self.next_order += 1;
            self.order.push_back((key, order));
            if self.order.len() > 2 * max_flows.max(1) + 16 {
                let flows = &self.flows;
                self.order
                    .retain(|(k, o)| flows.get(k).is_some_and(|a| a.order == *o));
            }
            self.flows.insert(
                key,
                Assembly {
                    order,
                    first_ns: c.time_ns,
                    last_ns: c.time_ns,
                    kernel_key: 0,
                    kernel_status: hello_status::NONE,
                    kernel_action: 0,
                    state: AsmState::Collecting(StreamBuffer::new()),
                },
            );
        }
        let a = self.flows.get_mut(&key).expect("inserted above");
        a.last_ns = a.last_ns.max(c.time_ns);
        a.kernel_action = a.kernel_action.max(c.action);
        if a.kernel_status == hello_status::NONE && c.hello_status != hello_status::NONE {
            a.kernel_status = c.hello_status;
        }
        if c.hello_status == hello_status::KEYED && c.hello_key != 0 {
            a.kernel_key = c.hello_key;
        }
        let AsmState::Collecting(buf) = &mut a.state else {
            return result;
        };
        // Bounded to what the kernel captures: nothing past CAPTURE_BYTES is kept.
        let offset = c.stream_offset as usize;
        if offset >= CAPTURE_BYTES as usize {
            return result;
        }
        let data = &c.data[..c.data.len().min(CAPTURE_BYTES as usize - offset)];
        // Fast path: a whole ClientHello in the flow's first event is parsed without buffering.
        let fast = if offset == 0 && buf.contiguous().is_empty() {
            match first_client_hello(data) {
                Scan::NeedMore => None,
                other => Some(other),
            }
        } else {
            None
        };
        let outcome = match fast {
            Some(scan) => Some(scan),
            None => {
                buf.set_isn(u32::MAX); // stream offsets count from 0
                if buf.push(c.stream_offset, data) {
                    match first_client_hello(buf.contiguous()) {
                        Scan::NeedMore if buf.contiguous().len() >= CAPTURE_BYTES as usize => {
                            Some(Scan::Rejected(Ja4Error::TooLarge))
                        }
                        Scan::NeedMore => None,
                        other => Some(other),
                    }
                } else {
                    None
                }
            }
        };
        let (first_ns, kernel_key, kernel_status, kernel_action) =
            (a.first_ns, a.kernel_key, a.kernel_status, a.kernel_action);
        match outcome {
            None => {}
            Some(Scan::NeedMore) => unreachable!("handled above"),
            Some(Scan::Rejected(e)) => {
                a.state = AsmState::Done;
                self.fail(&e);
            }
            Some(Scan::Hello(msg)) => {
                a.state = AsmState::Done;
                match ClientHello::parse_message(&msg) {
                    Ok(hello) => {
                        self.stats.ja4_computed += 1;
                        let fp = ja4(&hello, Protocol::Tcp);
                        let computed_key = key_of_client_hello(&hello);
                        if kernel_key != 0 && kernel_key != computed_key {
                            self.stats.key_mismatch += 1;
                            tracing::debug!(
                                ja4 = %fp.ja4,
                                kernel = format_args!("{kernel_key:#x}"),
                                computed = format_args!("{computed_key:#x}"),
                                "the kernel keyed a ClientHello differently"
                            );
                        }
                        result.hello = Some(HelloSeen {
                            flow: *c.flow,
                            hello,
                            fp,
                            kernel_key: (kernel_key != 0).then_some(kernel_key),
                            computed_key,
                            kernel_status,
                            kernel_action,
                            first_ns,
                        });
                    }
                    Err(e) => self.fail(&e),
                }
            }
        }
        result
    }

    /// The flow ended: forget it.
    pub fn flow_end(&mut self, flow: &Flow) {
        // A flow that ends before its ClientHello is complete gives neither a JA4 nor a failure.
        self.flows.remove(&flow_key(flow));
    }

    /// Drops flows without progress for `timeout` (kernel monotonic clock).
    pub fn expire(&mut self, now_ns: u64, timeout: Duration) {
        let timeout = timeout.as_nanos() as u64;
        let mut timed_out = 0;
        self.flows.retain(|_, a| {
            let keep = now_ns.saturating_sub(a.last_ns) < timeout;
            if !keep && matches!(a.state, AsmState::Collecting(_)) {
                timed_out += 1;
            }
            keep
        });
        self.stats.flows_timed_out += timed_out;
        if timed_out > 0 {
            *self.stats.ja4_failed.entry("incomplete").or_default() += timed_out;
        }
        let flows = &self.flows;
        self.order
            .retain(|(k, o)| flows.get(k).is_some_and(|a| a.order == *o));
    }
}

// ---------------------------------------------------------------------------------------------------------
// Fingerprint names
// ---------------------------------------------------------------------------------------------------------

/// A fingerprint a verdict is about.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum FpTarget {
    /// A JA4, with its JA4_r when known (given, or learned from traffic).
    Ja4 { ja4: String, ja4_r: Option<String> },
    /// A SYN signature by its kernel key, with its p0f text when known.
    Syn { key: u64, text: Option<String> },
    /// A kernel ClientHello key.
    Hello { key: u64 },
}

impl FpTarget {
    /// The verdict table's id: `ja4:<JA4>`, `syn:0x<key>`, `hello:0x<key>`.
    pub fn id(&self) -> String {
        match self {
            Self::Ja4 { ja4, .. } => format!("ja4:{ja4}"),
            Self::Syn { key, .. } => format!("syn:{key:#018x}"),
            Self::Hello { key } => format!("hello:{key:#018x}"),
        }
    }
}

fn hash12(s: &str) -> String {
    if s.is_empty() {
        return super::ja4::EMPTY_HASH.to_owned();
    }
    let digest = Sha256::digest(s.as_bytes());
    digest[..6].iter().map(|b| format!("{b:02x}")).collect()
}

/// Whether `s` has JA4's shape (`t13d1516h2_8daaf6152771_b186095e22b6`).
pub fn is_ja4(s: &str) -> bool {
    let parts: Vec<&str> = s.split('_').collect();
    parts.len() == 3
        && parts[0].len() == 10
        && parts[0].bytes().all(|b| b.is_ascii_alphanumeric())
        && parts[1..].iter().all(|p| {
            p.len() == 12
                && p.bytes()
                    .all(|b| b.is_ascii_digit() || (b'a'..=b'f').contains(&b))
        })
}

/// The JA4 a JA4_r string hashes to.
pub fn ja4_of_ja4_r(ja4_r: &str) -> Result<String, String> {
    parts_of_ja4_r(ja4_r).map_err(|e| e.to_string())?;
    let mut fields = ja4_r.trim().splitn(3, '_');
    let a = fields.next().unwrap_or_default();
    let c = fields.next().unwrap_or_default();
    let e = fields.next().unwrap_or_default();
    Ok(format!("{a}_{}_{}", hash12(c), hash12(e)))
}

fn parse_key(hex: &str, what: &str) -> Result<u64, String> {
    let h = hex.trim();
    let h = h.strip_prefix("0x").unwrap_or(h);
    u64::from_str_radix(h, 16)
        .ok()
        .filter(|k| *k != 0)
        .ok_or_else(|| format!("'{hex}' is not a {what} key (0x followed by up to 16 hex digits, not 0)"))
}

/// The SYN signatures (as the kernel records them) whose p0f text form is exactly `text`. Usually one; the
/// text can be ambiguous (`mss*N` windows), then several.
pub fn syn_signatures_of_text(text: &str) -> Result<Vec<SynSignature>, String> {
    let text = text.trim();
    let bad = |m: &str| format!("'{text}' is not a p0f SYN signature as `aqd fp list` prints it: {m}");
    let f: Vec<&str> = text.split(':').collect();
    if f.len() != 8 {
        return Err(bad(
            "expected 8 ':'-separated fields (ver:ttl:olen:mss:wsize,scale:olayout:quirks:pclass)",
        ));
    }
    let mut sig = SynSignature {
        ip_version: match f[0] {
            "4" => 4,
            "6" => 6,
            _ => return Err(bad("version must be 4 or 6")),
        },
        ..Default::default()
    };
    let ttl = f[1].split('+').next().unwrap_or_default();
    sig.ttl = ttl.parse().map_err(|_| bad("bad TTL"))?;
    sig.ip_opts_len = f[2].parse().map_err(|_| bad("bad IP options length"))?;
    sig.mss = f[3].parse().map_err(|_| bad("bad MSS"))?;
    let (wsize, scale) = f[4].split_once(',').ok_or_else(|| bad("wsize,scale expected"))?;
    sig.wscale = scale.parse().map_err(|_| bad("bad window scale"))?;
    if !f[5].is_empty() {
        for o in f[5].split(',') {
            if sig.option_count as usize >= SYN_MAX_OPTIONS {
                return Err(bad("too many options"));
            }
            let kind = match o {
                "nop" => option_kind::NOP,
                "mss" => option_kind::MSS,
                "ws" => option_kind::WS,
                "sok" => option_kind::SACK_PERMITTED,
                "sack" => option_kind::SACK,
                "ts" => option_kind::TIMESTAMP,
                o if o.starts_with("eol+") => {
                    sig.eol_pad = o[4..].parse().map_err(|_| bad("bad eol+N"))?;
                    option_kind::EOL
                }
                o if o.starts_with('?') => o[1..].parse().map_err(|_| bad("bad ?N option"))?,
                _ => return Err(bad(&format!("unknown option '{o}'"))),
            };
            sig.options[sig.option_count as usize] = kind;
            sig.option_count += 1;
        }
    }
    if !f[6].is_empty() {
        for q in f[6].split(',') {
            let bit = quirk::ALL
                .iter()
                .find(|(_, name)| *name == q)
                .map(|(b, _)| *b)
                .ok_or_else(|| bad(&format!("unknown quirk '{q}'")))?;
            sig.quirks |= bit;
        }
    }
    sig.payload = match f[7] {
        "0" => 0,
        "+" => 1,
        _ => return Err(bad("payload class must be 0 or +")),
    };
    let candidates: Vec<u32> = if let Some(n) = wsize.strip_prefix("mss*") {
        let n: u32 = n.parse().map_err(|_| bad("bad mss*N"))?;
        let mss = sig.mss as u32;
        [mss, mss.saturating_sub(12), 1460, 1448, 1440, 1428]
            .iter()
            .map(|d| d * n)
            .collect()
    } else if let Some(n) = wsize.strip_prefix("mtu*") {
        let n: u32 = n.parse().map_err(|_| bad("bad mtu*N"))?;
        let mss = sig.mss as u32;
        let hl = estimated_header_len(&sig) as u32;
        [mss + 40, mss + hl, mss + 60, 1500]
            .iter()
            .map(|d| d * n)
            .collect()
    } else {
        vec![wsize.parse::<u16>().map_err(|_| bad("bad window size"))? as u32]
    };
    let mut out: Vec<SynSignature> = Vec::new();
    for w in candidates.into_iter().filter(|w| *w <= u16::MAX as u32) {
        let s = SynSignature {
            window: w as u16,
            ..sig
        };
        if signature_text(&s, None) == text && !out.iter().any(|o| o.key() == s.key()) {
            out.push(s);
        }
    }
    if out.is_empty() {
        return Err(bad("it does not describe a SYN the kernel can record"));
    }
    Ok(out)
}

/// Reads a fingerprint as the operator writes it: a JA4, a JA4_r, a p0f SYN signature text (as `aqd fp list`
/// and `aqd fingerprint` print it), `syn:0x<key>` or `hello:0x<key>`. `known_syn` looks a text up among the
/// signatures seen (which settles texts that could stand for several windows).
pub fn parse_fp(s: &str, known_syn: impl Fn(&str) -> Option<u64>) -> Result<FpTarget, String> {
    let s = s.trim();
    if let Some(k) = s.strip_prefix("syn:") {
        return Ok(FpTarget::Syn {
            key: parse_key(k, "SYN signature")?,
            text: None,
        });
    }
    if let Some(k) = s.strip_prefix("hello:") {
        return Ok(FpTarget::Hello {
            key: parse_key(k, "ClientHello")?,
        });
    }
    let s = s.strip_prefix("ja4:").unwrap_or(s);
    if is_ja4(s) {
        return Ok(FpTarget::Ja4 {
            ja4: s.to_string(),
            ja4_r: None,
        });
    }
    if s.starts_with("4:") || s.starts_with("6:") {
        if let Some(key) = known_syn(s) {
            return Ok(FpTarget::Syn {
                key,
                text: Some(s.to_string()),
            });
        }
        let sigs = syn_signatures_of_text(s)?;
        if sigs.len() > 1 {
            let keys: Vec<String> = sigs.iter().map(|g| format!("syn:{:#018x}", g.key())).collect();
            return Err(format!(
                "'{s}' can stand for {} SYN signatures ({}); give the key from `aqd fp list`",
                sigs.len(),
                keys.join(", ")
            ));
        }
        return Ok(FpTarget::Syn {
            key: sigs[0].key(),
            text: Some(s.to_string()),
        });
    }
    if s.contains('_') && s.len() > 10 {
        let ja4 = ja4_of_ja4_r(s)?;
        return Ok(FpTarget::Ja4 {
            ja4,
            ja4_r: Some(s.to_string()),
        });
    }
    Err(format!(
        "'{s}' is not a fingerprint: give a JA4 (t13d1516h2_8daaf6152771_b186095e22b6), a JA4_r, a p0f SYN \
         signature (4:64+0:0:1460:65535,7:mss,sok,ts,nop,ws:df,id+:0), syn:0x<key> or hello:0x<key>"
    ))
}

// ---------------------------------------------------------------------------------------------------------
// Verdicts by fingerprint
// ---------------------------------------------------------------------------------------------------------

/// What a verdict by fingerprint does.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum FpAction {
    Block,
    Throttle,
    Monitor,
    /// Explicitly allowed: nothing in the kernel, and the model must never act on it.
    Allow,
}

impl FpAction {
    pub fn parse(s: &str) -> Result<Self, String> {
        match s {
            "block" => Ok(Self::Block),
            "throttle" => Ok(Self::Throttle),
            "monitor" => Ok(Self::Monitor),
            "allow" => Ok(Self::Allow),
            other => Err(format!(
                "unknown action '{other}' (block, throttle, monitor or allow)"
            )),
        }
    }

    pub fn name(self) -> &'static str {
        match self {
            Self::Block => "block",
            Self::Throttle => "throttle",
            Self::Monitor => "monitor",
            Self::Allow => "allow",
        }
    }

    /// The verdict that applies a kernel action.
    pub fn from_kernel(action: Action) -> Self {
        match action {
            Action::Block => Self::Block,
            Action::Throttle => Self::Throttle,
            Action::Monitor => Self::Monitor,
        }
    }

    /// The kernel action, None for allow.
    pub fn kernel(self) -> Option<Action> {
        match self {
            Self::Block => Some(Action::Block),
            Self::Throttle => Some(Action::Throttle),
            Self::Monitor => Some(Action::Monitor),
            Self::Allow => None,
        }
    }
}

/// One verdict by fingerprint, as the daemon keeps (and persists) it.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct FpVerdict {
    /// [`FpTarget::id`].
    pub id: String,
    pub action: FpAction,
    #[serde(default)]
    pub rate_class: u8,
    /// Kernel monotonic expiry in ns; 0 = never (the file lives in /run, as long as the pinned maps).
    pub expires_ns: u64,
    #[serde(default)]
    pub reason: String,
    /// Who set it (a file written before origins were typed holds the same names).
    pub origin: Origin,
    /// Unix seconds when set.
    pub set_at: f64,
    #[serde(default)]
    pub ja4_r: Option<String>,
    #[serde(default)]
    pub syn_text: Option<String>,
    /// Kernel ClientHello keys this verdict covers (JA4: every key known for it; hello: the key).
    #[serde(default)]
    pub hello_keys: BTreeSet<u64>,
    /// For config verdicts: the rule as written (a reload leaves an unchanged rule's expiry alone).
    #[serde(default)]
    pub config_rule: Option<String>,
}

impl FpVerdict {
    pub fn live(&self, now_ns: u64) -> bool {
        self.expires_ns == 0 || self.expires_ns > now_ns
    }

    /// The SYN key of a `syn:` verdict.
    pub fn syn_key(&self) -> Option<u64> {
        self.id.strip_prefix("syn:").and_then(|k| parse_key(k, "").ok())
    }
}

/// The daemon's verdicts by fingerprint, persisted as JSON beside the control socket.
#[derive(Debug, Default)]
pub struct FpVerdicts {
    pub by_id: BTreeMap<String, FpVerdict>,
    path: Option<PathBuf>,
}

impl FpVerdicts {
    /// Loads the table a previous daemon left (empty if none or unreadable: the kernel maps keep enforcing
    /// what they hold until it expires).
    pub fn load(path: &Path) -> Self {
        let by_id = match std::fs::read(path) {
            Ok(bytes) => match serde_json::from_slice::<Vec<FpVerdict>>(&bytes) {
                Ok(list) => list.into_iter().map(|v| (v.id.clone(), v)).collect(),
                Err(e) => {
                    tracing::warn!(
                        "{}: {e}; starting without the saved fingerprint verdicts",
                        path.display()
                    );
                    BTreeMap::new()
                }
            },
            Err(_) => BTreeMap::new(),
        };
        Self {
            by_id,
            path: Some(path.to_path_buf()),
        }
    }

    /// Writes the table atomically (temp file + rename); nothing when it has no file.
    pub fn save(&self) -> std::io::Result<()> {
        let Some(path) = &self.path else {
            return Ok(());
        };
        if let Some(dir) = path.parent() {
            std::fs::create_dir_all(dir)?;
        }
        let tmp = path.with_extension("tmp");
        let list: Vec<&FpVerdict> = self.by_id.values().collect();
        std::fs::write(
            &tmp,
            serde_json::to_vec_pretty(&list).expect("verdicts serialize"),
        )?;
        std::fs::rename(&tmp, path)
    }

    /// The live verdict on a JA4.
    pub fn for_ja4(&self, ja4: &str, now_ns: u64) -> Option<&FpVerdict> {
        self.by_id.get(&format!("ja4:{ja4}")).filter(|v| v.live(now_ns))
    }

    /// The live verdict with this id.
    pub fn get_live(&self, id: &str, now_ns: u64) -> Option<&FpVerdict> {
        self.by_id.get(id).filter(|v| v.live(now_ns))
    }

    /// What the kernel should hold under a key: the live verdicts covering it; any allow wins (no entry),
    /// else the most recently set one.
    pub fn desired(&self, syn: bool, key: u64, now_ns: u64) -> Option<&FpVerdict> {
        let covering: Vec<&FpVerdict> = self
            .by_id
            .values()
            .filter(|v| v.live(now_ns))
            .filter(|v| {
                if syn {
                    v.syn_key() == Some(key)
                } else {
                    v.hello_keys.contains(&key)
                }
            })
            .collect();
        if covering.iter().any(|v| v.action == FpAction::Allow) {
            return None;
        }
        covering.into_iter().max_by(|a, b| a.set_at.total_cmp(&b.set_at))
    }

    /// Removes expired verdicts other than config ones (a config rule's expiry is kept so a reload does not
    /// restart it). Returns the removed verdicts.
    pub fn purge_expired(&mut self, now_ns: u64) -> Vec<FpVerdict> {
        let expired: Vec<String> = self
            .by_id
            .values()
            .filter(|v| !v.live(now_ns) && v.origin != Origin::Config)
            .map(|v| v.id.clone())
            .collect();
        expired.iter().filter_map(|id| self.by_id.remove(id)).collect()
    }
}

/// Whether a fingerprint (any form [`parse_fp`] reads, or a JA4_r) has a live allow verdict: the model must
/// never act on it.
pub fn is_allowed(verdicts: &FpVerdicts, table: &FingerprintTable, fp: &str, now_ns: u64) -> bool {
    let known_syn = |t: &str| {
        table
            .syn
            .values()
            .find(|e| e.text == t)
            .map(|e| e.key)
            .or_else(|| {
                let seen: Vec<u64> = syn_signatures_of_text(t)
                    .ok()?
                    .iter()
                    .map(SynSignature::key)
                    .filter(|k| table.syn.contains_key(k))
                    .collect();
                (seen.len() == 1).then(|| seen[0])
            })
    };
    let Ok(target) = parse_fp(fp, known_syn) else {
        return false;
    };
    let allowed = |id: &str| {
        verdicts
            .get_live(id, now_ns)
            .is_some_and(|v| v.action == FpAction::Allow)
    };
    match &target {
        FpTarget::Hello { key } => {
            allowed(&target.id())
                || table
                    .ja4_by_key
                    .get(key)
                    .is_some_and(|j| allowed(&format!("ja4:{j}")))
                || verdicts
                    .by_id
                    .values()
                    .any(|v| v.live(now_ns) && v.action == FpAction::Allow && v.hello_keys.contains(key))
        }
        _ => allowed(&target.id()),
    }
}

// ---------------------------------------------------------------------------------------------------------
// Escalation
// ---------------------------------------------------------------------------------------------------------

#[derive(Clone, Debug)]
struct SourceHits {
    fingerprint: String,
    hits: u32,
    window_start_ns: u64,
    last_port: u16,
    escalated: bool,
}

/// Hits of blocked fingerprints per source, for escalation to a source decision.
#[derive(Debug, Default)]
pub struct Escalation {
    sources: HashMap<IpAddr, SourceHits>,
    pub escalations: u64,
    pub untracked: u64,
}

/// A source to block: it kept sending a blocked fingerprint.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Escalate {
    pub source: IpAddr,
    pub fingerprint: String,
    pub hits: u32,
}

impl Escalation {
    /// Counts a hit (a connection attempt dropped by, or blocked for, fingerprint `fp`). `port`: the client
    /// port, so a retransmitted SYN is not a second hit. Returns the escalation when the threshold is reached.
    pub fn hit(
        &mut self,
        source: IpAddr,
        fp: &str,
        port: u16,
        now_ns: u64,
        settings: &LiveSettings,
    ) -> Option<Escalate> {
        if settings.escalate_after == 0 {
            return None;
        }
        let window = settings.escalate_window.as_nanos() as u64;
        if !self.sources.contains_key(&source) && self.sources.len() >= MAX_ESCALATION_SOURCES {
            self.sources
                .retain(|_, h| now_ns.saturating_sub(h.window_start_ns) < window);
            if self.sources.len() >= MAX_ESCALATION_SOURCES {
                self.untracked += 1;
                return None;
            }
        }
        let h = self.sources.entry(source).or_insert_with(|| SourceHits {
            fingerprint: fp.to_string(),
            hits: 0,
            window_start_ns: now_ns,
            last_port: 0,
            escalated: false,
        });
        if now_ns.saturating_sub(h.window_start_ns) >= window {
            *h = SourceHits {
                fingerprint: fp.to_string(),
                hits: 0,
                window_start_ns: now_ns,
                last_port: 0,
                escalated: false,
            };
        }
        if port != 0 && port == h.last_port {
            return None;
        }
        h.last_port = port;
        h.hits += 1;
        h.fingerprint = fp.to_string();
        if h.hits >= settings.escalate_after && !h.escalated {
            h.escalated = true;
            self.escalations += 1;
            return Some(Escalate {
                source,
                fingerprint: h.fingerprint.clone(),
                hits: h.hits,
            });
        }
        None
    }

    pub fn tracked(&self) -> usize {
        self.sources.len()
    }
}

// ---------------------------------------------------------------------------------------------------------
// The daemon's live state
// ---------------------------------------------------------------------------------------------------------

/// Everything the pipeline keeps in the daemon (besides the verdicts, which the Enforcer holds).
#[derive(Debug, Default)]
pub struct LiveState {
    pub settings: LiveSettings,
    pub reassembler: Reassembler,
    pub table: FingerprintTable,
    pub escalation: Escalation,
    /// ClientHello → flow verdict in FLOWS (the path that depends on the daemon).
    pub latency: LatencyHistogram,
    pub p0f: Option<P0fDb>,
    /// The database path `p0f` was loaded from (or tried).
    pub p0f_path: Option<PathBuf>,
    pub p0f_error: Option<String>,
}

impl LiveState {
    /// Loads the p0f database named by the settings when it changed. A missing or bad file leaves SYN
    /// signatures unlabelled, with a warning (never fatal: a production box may not ship the database).
    pub fn configure(&mut self, settings: &LiveSettings) {
        if self.p0f_path != settings.p0f_db || (self.p0f.is_none() && self.p0f_error.is_none()) {
            self.p0f = None;
            self.p0f_error = None;
            if let Some(path) = &settings.p0f_db {
                match P0fDb::load(path) {
                    Ok(db) => {
                        tracing::info!(path = %path.display(), signatures = db.signatures.len(), "p0f database loaded");
                        self.p0f = Some(db);
                    }
                    Err(e) => {
                        tracing::warn!("p0f database: {e:#}; SYN signatures stay unlabelled");
                        self.p0f_error = Some(format!("{e:#}"));
                    }
                }
            }
            self.p0f_path = settings.p0f_db.clone();
        }
        self.settings = settings.clone();
    }

    /// The SYN key of a signature text seen in traffic: the text as first printed, or a text that can only
    /// stand for one signature seen (another TTL on the path, or a window `mss*N` that is ambiguous alone).
    pub fn known_syn(&self, text: &str) -> Option<u64> {
        if let Some(e) = self.table.syn.values().find(|e| e.text == text) {
            return Some(e.key);
        }
        let seen: Vec<u64> = syn_signatures_of_text(text)
            .ok()?
            .iter()
            .map(SynSignature::key)
            .filter(|k| self.table.syn.contains_key(k))
            .collect();
        (seen.len() == 1).then(|| seen[0])
    }
}

// ---------------------------------------------------------------------------------------------------------
// Latency of daemon-made flow verdicts
// ---------------------------------------------------------------------------------------------------------

/// Upper bounds (µs) of the latency buckets.
pub const LATENCY_BUCKETS_US: [u64; 12] = [
    100, 250, 500, 1_000, 2_500, 5_000, 10_000, 25_000, 50_000, 100_000, 250_000, 1_000_000,
];

/// ClientHello (kernel timestamp of its first segment) → flow verdict written in `FLOWS`.
#[derive(Clone, Debug, Default)]
pub struct LatencyHistogram {
    /// Per bucket of [`LATENCY_BUCKETS_US`], plus one for larger values.
    pub counts: [u64; 13],
    pub count: u64,
    pub sum_us: u64,
    pub max_us: u64,
}

impl LatencyHistogram {
    pub fn record(&mut self, us: u64) {
        let i = LATENCY_BUCKETS_US
            .iter()
            .position(|b| us <= *b)
            .unwrap_or(LATENCY_BUCKETS_US.len());
        self.counts[i] += 1;
        self.count += 1;
        self.sum_us += us;
        self.max_us = self.max_us.max(us);
    }

    /// The bucket bound at or below which `q` of the samples lie (None without samples).
    pub fn quantile_le_us(&self, q: f64) -> Option<u64> {
        if self.count == 0 {
            return None;
        }
        let want = (q * self.count as f64).ceil().max(1.0) as u64;
        let mut seen = 0;
        for (i, c) in self.counts.iter().enumerate() {
            seen += c;
            if seen >= want {
                return Some(LATENCY_BUCKETS_US.get(i).copied().unwrap_or(self.max_us));
            }
        }
        Some(self.max_us)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::fingerprint::{hello_key::key_of_ja4_r, ja4::build, ja4::ja4_from_stream};

    fn flow(port: u16) -> Flow {
        Flow {
            src: "192.0.2.9".parse().unwrap(),
            dst: "198.51.100.1".parse().unwrap(),
            src_port: port,
            dst_port: 443,
            proto: 6,
        }
    }

    fn capture<'a>(f: &'a Flow, offset: u32, data: &'a [u8], status: u8) -> Capture<'a> {
        Capture {
            time_ns: 1_000 + offset as u64,
            flow: f,
            stream_offset: offset,
            hello_key: 0,
            hello_status: status,
            action: 0,
            data,
        }
    }

    #[test]
    fn split_hello_out_of_order_and_duplicated() {
        let stream = build::chrome_like().records(16384);
        let expected = ja4_from_stream(&stream).unwrap().1;
        assert!(stream.len() > 1500, "a ClientHello that needs two segments");
        let f = flow(40000);
        let mut r = Reassembler::default();
        let (a, b) = stream.split_at(1000);
        // Second segment first, then it again (retransmission), then the first.
        assert!(r.on_capture(&capture(&f, 1000, b, 0), 16).hello.is_none());
        assert!(r.on_capture(&capture(&f, 1000, b, 0), 16).hello.is_none());
        assert_eq!(r.flows_in_progress(), 1);
        let got = r
            .on_capture(&capture(&f, 0, a, hello_status::SPLIT), 16)
            .hello
            .unwrap();
        assert_eq!(got.fp, expected);
        assert_eq!(got.kernel_status, hello_status::SPLIT);
        assert_eq!(got.first_ns, 2_000, "the first event's kernel time");
        // Later segments of a fingerprinted flow are ignored, not counted again.
        assert!(r.on_capture(&capture(&f, 0, a, 0), 16).hello.is_none());
        assert_eq!(r.stats.ja4_computed, 1);
        assert_eq!(r.flows_in_progress(), 0);
    }

    #[test]
    fn whole_hello_in_one_event_is_not_buffered() {
        let stream = build::chrome_like().records(16384);
        let f = flow(40001);
        let mut r = Reassembler::default();
        let mut c = capture(&f, 0, &stream, hello_status::KEYED);
        c.hello_key = 0x1234;
        let got = r.on_capture(&c, 16).hello.unwrap();
        assert_eq!(got.kernel_key, Some(0x1234));
        assert_eq!(r.stats.key_mismatch, 1, "0x1234 is not the real key");
        assert_eq!(got.computed_key, key_of_ja4_r(&got.fp.ja4_r).unwrap());
    }

    #[test]
    fn garbage_and_truncation_give_no_fingerprint_and_are_counted() {
        let mut r = Reassembler::default();
        let f = flow(1);
        assert!(
            r.on_capture(&capture(&f, 0, b"GET / HTTP/1.1\r\n\r\n", 3), 16)
                .hello
                .is_none()
        );
        assert_eq!(r.stats.not_tls, 1);
        let f = flow(2);
        let mut junk = vec![0x16, 0x03, 0x01, 0x00, 0x10, 0x02];
        junk.extend([0u8; 16]);
        assert!(r.on_capture(&capture(&f, 0, &junk, 0), 16).hello.is_none());
        assert_eq!(r.stats.ja4_failed.get("not_client_hello"), Some(&1));
        // A ClientHello cut short: waits, then times out as incomplete.
        let f = flow(3);
        let stream = build::chrome_like().records(16384);
        assert!(
            r.on_capture(&capture(&f, 0, &stream[..600], 0), 16)
                .hello
                .is_none()
        );
        r.expire(u64::MAX / 2, Duration::from_secs(10));
        assert_eq!(r.stats.ja4_failed.get("incomplete"), Some(&1));
        assert_eq!(r.flows_tracked(), 0);
        // Far-away offsets are never stored.
        let f = flow(4);
        r.on_capture(&capture(&f, 1 << 20, &[1; 100], 0), 16);
        assert!(r.memory() < 64 * 1024);
    }

    #[test]
    fn flows_in_progress_are_bounded() {
        let mut r = Reassembler::default();
        let stream = build::chrome_like().records(16384);
        let flows: Vec<Flow> = (0..100).map(|p| flow(10_000 + p)).collect();
        for f in &flows {
            r.on_capture(&capture(f, 0, &stream[..700], 0), 8);
        }
        assert!(r.flows_tracked() <= 8);
        assert_eq!(r.stats.flows_evicted, 92);
        assert!(r.order.len() <= 2 * 8 + 16);
    }

    #[test]
    fn ja4_r_maps_to_its_ja4_and_key() {
        let stream = build::chrome_like().records(16384);
        let (hello, fp) = ja4_from_stream(&stream).unwrap();
        assert_eq!(ja4_of_ja4_r(&fp.ja4_r).unwrap(), fp.ja4);
        let t = parse_fp(&fp.ja4_r, |_| None).unwrap();
        assert_eq!(
            t,
            FpTarget::Ja4 {
                ja4: fp.ja4.clone(),
                ja4_r: Some(fp.ja4_r.clone())
            }
        );
        assert_eq!(key_of_ja4_r(&fp.ja4_r).unwrap(), key_of_client_hello(&hello));
        assert_eq!(
            parse_fp(&fp.ja4, |_| None).unwrap().id(),
            format!("ja4:{}", fp.ja4)
        );
    }

    #[test]
    fn fingerprint_names() {
        assert_eq!(
            parse_fp("syn:0x00000000000000ff", |_| None).unwrap(),
            FpTarget::Syn { key: 255, text: None }
        );
        assert_eq!(
            parse_fp("hello:0xabc", |_| None).unwrap(),
            FpTarget::Hello { key: 0xabc }
        );
        for bad in [
            "",
            "hello:0x0",
            "syn:zz",
            "t13d1516h2_8daaf6152771",
            "4:64+0:0:1460",
        ] {
            assert!(parse_fp(bad, |_| None).is_err(), "{bad}");
        }
        // A SYN text round-trips to the kernel key of the signature it was printed from.
        let sig = SynSignature {
            ip_version: 4,
            ttl: 60,
            mss: 1460,
            window: 65535,
            wscale: 7,
            option_count: 5,
            options: {
                let mut o = [0u8; SYN_MAX_OPTIONS];
                o[..5].copy_from_slice(&[2, 4, 8, 1, 3]);
                o
            },
            quirks: quirk::DF | quirk::ID_PLUS,
            ..Default::default()
        };
        let text = signature_text(&sig, None);
        match parse_fp(&text, |_| None).unwrap() {
            FpTarget::Syn { key, .. } => assert_eq!(key, sig.key(), "{text}"),
            other => panic!("{other:?}"),
        }
        // Another path (TTL) prints another text with the same key.
        let far = SynSignature { ttl: 51, ..sig };
        match parse_fp(&signature_text(&far, None), |_| None).unwrap() {
            FpTarget::Syn { key, .. } => assert_eq!(key, sig.key()),
            other => panic!("{other:?}"),
        }
        // A known text is looked up first.
        match parse_fp(&text, |_| Some(42)).unwrap() {
            FpTarget::Syn { key, .. } => assert_eq!(key, 42),
            other => panic!("{other:?}"),
        }
        // Linux's 64240 = 44 × 1460 prints as mss*44, as does 44 × 1448 with timestamps: alone, ambiguous.
        let linux = SynSignature { window: 64240, ..sig };
        let text = signature_text(&linux, None);
        let e = parse_fp(&text, |_| None).unwrap_err();
        assert!(
            e.contains("can stand for 2") && e.contains(&format!("{:#018x}", linux.key())),
            "{e}"
        );
        // Settled by the signatures seen.
        let mut state = LiveState::default();
        state
            .table
            .record_syn(linux.key(), &linux, "192.0.2.1".parse().unwrap(), false, None, 10);
        let other_ttl = signature_text(&SynSignature { ttl: 50, ..linux }, None);
        assert_eq!(state.known_syn(&other_ttl), Some(linux.key()));
    }

    #[test]
    fn source_counts_switch_to_a_sketch() {
        let mut s = SourceSet::default();
        for i in 0..5000u32 {
            s.insert(IpAddr::from(i.to_be_bytes()));
            s.insert(IpAddr::from(i.to_be_bytes()));
        }
        assert!(s.estimated());
        let n = s.count() as f64;
        assert!((n - 5000.0).abs() < 250.0, "{n}");
        assert!(s.memory() <= 1024);
    }

    #[test]
    fn desired_kernel_state_allow_wins_then_latest() {
        let mut v = FpVerdicts::default();
        let mk = |id: &str, action, set_at, keys: &[u64]| FpVerdict {
            id: id.into(),
            action,
            rate_class: 0,
            expires_ns: 0,
            reason: String::new(),
            origin: Origin::Cli,
            set_at,
            ja4_r: None,
            syn_text: None,
            hello_keys: keys.iter().copied().collect(),
            config_rule: None,
        };
        v.by_id
            .insert("ja4:a".into(), mk("ja4:a", FpAction::Block, 1.0, &[5]));
        v.by_id
            .insert("hello:0x5".into(), mk("hello:0x5", FpAction::Monitor, 2.0, &[5]));
        assert_eq!(v.desired(false, 5, 0).unwrap().action, FpAction::Monitor);
        v.by_id
            .insert("ja4:b".into(), mk("ja4:b", FpAction::Allow, 0.5, &[5]));
        assert!(v.desired(false, 5, 0).is_none());
        assert!(v.desired(false, 6, 0).is_none());
        v.by_id
            .insert("syn:0x07".into(), mk("syn:0x07", FpAction::Block, 1.0, &[]));
        assert!(v.desired(true, 7, 0).is_some());
    }

    #[test]
    fn escalation_counts_connections_not_retransmissions() {
        let settings = LiveSettings {
            escalate_after: 3,
            ..LiveSettings::default()
        };
        let mut e = Escalation::default();
        let src: IpAddr = "192.0.2.50".parse().unwrap();
        assert!(e.hit(src, "ja4:x", 1000, 1, &settings).is_none());
        assert!(
            e.hit(src, "ja4:x", 1000, 2, &settings).is_none(),
            "same port: a retransmission"
        );
        assert!(e.hit(src, "ja4:x", 1001, 3, &settings).is_none());
        let got = e.hit(src, "ja4:x", 1002, 4, &settings).unwrap();
        assert_eq!((got.hits, got.fingerprint.as_str()), (3, "ja4:x"));
        assert!(
            e.hit(src, "ja4:x", 1003, 5, &settings).is_none(),
            "once per window"
        );
        // A new window starts over.
        let later = 5 + settings.escalate_window.as_nanos() as u64;
        assert!(e.hit(src, "ja4:x", 1004, later, &settings).is_none());
        let off = LiveSettings {
            escalate_after: 0,
            ..settings
        };
        assert!(e.hit(src, "ja4:x", 1, 1, &off).is_none());
    }

    #[test]
    fn latency_quantiles() {
        let mut h = LatencyHistogram::default();
        assert_eq!(h.quantile_le_us(0.5), None);
        for us in [50, 300, 300, 4000] {
            h.record(us);
        }
        assert_eq!(h.quantile_le_us(0.5), Some(500));
        assert_eq!(h.quantile_le_us(0.99), Some(5000));
        assert_eq!(h.max_us, 4000);
    }
}
