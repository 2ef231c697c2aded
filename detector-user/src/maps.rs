//! Typed access to the kernel maps — the only module that reads or writes them.
//!
//! Opened either from a freshly loaded program ([`KernelMaps::from_ebpf`]) or from the pins a running (or
//! stopped) daemon left in bpffs ([`KernelMaps::from_pins`]), so the CLI works with or without the daemon.

use std::{net::IpAddr, path::Path, time::Duration};

use aya::{
    Ebpf,
    maps::{Array, HashMap, IterableMap as _, LpmTrie, Map, MapData, MapError, PerCpuArray, lpm_trie::Key},
};
use detector_common::{
    Action, AddrKey, Bucket, Config, Counters, Decision, FlowState, FlowTuple, ListEntry, Origin,
    PREFIX_SCOPE_V4, PREFIX_SCOPE_V6, REASON_COUNT, RateClass, ReasonText, SourceState,
    addr::V4_MAPPED_PREFIX_BITS, capacity, event::EVENT_KIND_COUNT, map_names,
};
use ipnet::IpNet;
use thiserror::Error;

use crate::{clock, paths};

#[derive(Debug, Error)]
pub enum MapsError {
    #[error("map {name} is missing from the program")]
    Missing { name: &'static str },
    #[error("map {name}: {source}")]
    Map {
        name: &'static str,
        #[source]
        source: MapError,
    },
    #[error(
        "cannot open pinned map {path}: {source}; is aqd loaded? (`aqd run` pins its maps there; check --pin-root)"
    )]
    Pin {
        path: String,
        #[source]
        source: MapError,
    },
    #[error("{net}: host bits are set; did you mean {truncated}?")]
    HostBits { net: IpNet, truncated: IpNet },
    #[error("{net}: {action} decisions take an address, an IPv4 /24 or an IPv6 /64 (block takes any prefix)")]
    DecisionScope { net: IpNet, action: &'static str },
    #[error("rate class {class} is out of range (0..{})", capacity::RATE_CLASSES)]
    RateClass { class: u32 },
}

/// Where an address or prefix lives in the kernel maps.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Slot {
    /// A single address: the exact-address maps.
    Exact(AddrKey),
    /// A prefix: the LPM tries (for lists) — with its trie prefix length (IPv4 is offset by 96).
    Prefix { key: AddrKey, trie_len: u32 },
}

/// The allowlist or the denylist.
#[derive(Clone, Copy, Debug, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum List {
    Allow,
    Deny,
}

impl List {
    /// `allowlist` / `denylist`, as messages say it.
    pub fn noun(self) -> &'static str {
        match self {
            Self::Allow => "allowlist",
            Self::Deny => "denylist",
        }
    }
}

/// Converts a CIDR to its map slot, rejecting host bits set (a typo more often than intent).
pub fn slot_for(net: IpNet) -> Result<Slot, MapsError> {
    if net.trunc() != net {
        return Err(MapsError::HostBits {
            net,
            truncated: net.trunc(),
        });
    }
    Ok(match net {
        IpNet::V4(n) if n.prefix_len() == 32 => Slot::Exact(AddrKey::from_v4(n.addr().octets())),
        IpNet::V6(n) if n.prefix_len() == 128 => Slot::Exact(AddrKey::from_v6(n.addr().octets())),
        IpNet::V4(n) => Slot::Prefix {
            key: AddrKey::from_v4(n.addr().octets()),
            trie_len: V4_MAPPED_PREFIX_BITS + n.prefix_len() as u32,
        },
        IpNet::V6(n) => Slot::Prefix {
            key: AddrKey::from_v6(n.addr().octets()),
            trie_len: n.prefix_len() as u32,
        },
    })
}

/// Where a decision on `net` goes: the exact map for one address, the prefix map for a /24 or /64.
/// Any other prefix length is not a decision scope.
pub fn decision_slot(net: IpNet) -> Option<(AddrKey, bool)> {
    match slot_for(net).ok()? {
        Slot::Exact(key) => Some((key, true)),
        Slot::Prefix { key, .. } => {
            let scope_ok = match net {
                IpNet::V4(n) => n.prefix_len() == PREFIX_SCOPE_V4,
                IpNet::V6(n) => n.prefix_len() == PREFIX_SCOPE_V6,
            };
            scope_ok.then_some((key, false))
        }
    }
}

/// The address an [`AddrKey`] holds.
pub fn key_addr(key: &AddrKey) -> IpAddr {
    if key.is_v4() {
        IpAddr::from([key.addr[12], key.addr[13], key.addr[14], key.addr[15]])
    } else {
        IpAddr::from(key.addr)
    }
}

/// The CIDR of a trie key.
pub fn trie_net(key: &AddrKey, trie_len: u32) -> IpNet {
    match key_addr(key) {
        IpAddr::V4(a) => IpNet::new(a.into(), trie_len.saturating_sub(V4_MAPPED_PREFIX_BITS) as u8),
        IpAddr::V6(a) => IpNet::new(a.into(), trie_len as u8),
    }
    .expect("prefix length comes from a valid trie key")
}

/// The CIDR of a decision key.
pub fn decision_net(key: &AddrKey, exact: bool) -> IpNet {
    let addr = key_addr(key);
    let len = match (addr, exact) {
        (IpAddr::V4(_), true) => 32,
        (IpAddr::V6(_), true) => 128,
        (IpAddr::V4(_), false) => PREFIX_SCOPE_V4,
        (IpAddr::V6(_), false) => PREFIX_SCOPE_V6,
    };
    IpNet::new(addr, len).expect("valid prefix length")
}

/// A list entry as read back.
#[derive(Clone, Debug, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct ListRow {
    pub list: List,
    pub net: IpNet,
    pub hits: u64,
    /// Seconds left; None = permanent.
    pub remaining_secs: Option<u64>,
}

/// A decision as read back.
#[derive(Clone, Debug, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct DecisionRow {
    pub net: IpNet,
    /// None: a code this aqd does not know (written by another release).
    pub action: Option<Action>,
    pub rate_class: u8,
    pub reason: String,
    /// None: a code this aqd does not know.
    pub origin: Option<Origin>,
    pub hits: u64,
    /// Seconds left; None = permanent.
    pub remaining_secs: Option<u64>,
}

/// Kernel limits for a rate class given as rates and bursts (0 pps / 0 conns = unlimited).
pub fn rate_class_limits(
    packets_per_s: u32,
    packet_burst: u32,
    conns_per_s: u32,
    conn_burst: u32,
) -> RateClass {
    let interval = |rate: u32| if rate == 0 { 0 } else { 1_000_000_000 / rate as u64 };
    let tolerance = |rate: u32, burst: u32| interval(rate) * (burst.max(1) as u64 - 1);
    RateClass {
        packet_interval_ns: interval(packets_per_s),
        packet_tolerance_ns: tolerance(packets_per_s, packet_burst),
        conn_interval_ns: interval(conns_per_s),
        conn_tolerance_ns: tolerance(conns_per_s, conn_burst),
    }
}

/// An entry a walk found expired (see [`KernelMaps::expired_entries`]).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ExpiredEntry {
    ListExact(List, AddrKey),
    /// List, trie prefix length, key.
    ListPrefix(List, u32, AddrKey),
    Verdict(VerdictMap, u64),
    /// Exact scope (or prefix scope), key.
    Decision(bool, AddrKey),
}

/// The two verdict-by-fingerprint maps.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum VerdictMap {
    /// `SYN_VERDICTS`, by `SynSignature::key`.
    Syn,
    /// `HELLO_VERDICTS`, by the kernel ClientHello key.
    Hello,
}

/// Counters summed over CPUs.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct CounterTotals {
    pub by_reason: [u64; REASON_COUNT],
    pub events_sent: [u64; EVENT_KIND_COUNT],
    pub events_lost: [u64; EVENT_KIND_COUNT],
    /// Connection bookkeeping, by `detector_common::flow_counter` index.
    pub flows: [u64; detector_common::FLOW_COUNTER_COUNT],
}

impl CounterTotals {
    pub fn packets(&self) -> u64 {
        self.by_reason.iter().sum()
    }
}

/// The two maps of one list (exact addresses, prefixes) and their names, for error messages.
/// Keys of an LPM trie map.
type TrieKeys = Vec<Key<AddrKey>>;
type ListMaps<'a> = (
    &'a mut HashMap<MapData, AddrKey, ListEntry>,
    &'a mut LpmTrie<MapData, AddrKey, ListEntry>,
    &'static str,
    &'static str,
);

/// Handles on every map except the ring buffer (which the event reader owns).
pub struct KernelMaps {
    allow_exact: HashMap<MapData, AddrKey, ListEntry>,
    allow_prefix: LpmTrie<MapData, AddrKey, ListEntry>,
    /// Management networks: passed by the kernel ahead of every rule; written only by [`Self::management_sync`].
    management: LpmTrie<MapData, AddrKey, ListEntry>,
    deny_exact: HashMap<MapData, AddrKey, ListEntry>,
    deny_prefix: LpmTrie<MapData, AddrKey, ListEntry>,
    decision_exact: HashMap<MapData, AddrKey, Decision>,
    decision_prefix: HashMap<MapData, AddrKey, Decision>,
    sources: HashMap<MapData, AddrKey, SourceState>,
    rate_classes: Array<MapData, RateClass>,
    protected_ports: Array<MapData, u8>,
    config: Array<MapData, Config>,
    counters: PerCpuArray<MapData, Counters>,
    reasons: Array<MapData, ReasonText>,
    /// Verdicts by SYN-signature key and by kernel ClientHello key.
    syn_verdicts: HashMap<MapData, u64, Decision>,
    hello_verdicts: HashMap<MapData, u64, Decision>,
    /// Per-flow state (LRU) of TCP connections to protected ports.
    flows: HashMap<MapData, FlowTuple, FlowState>,
    /// The policy generation the kernel's cached verdicts are checked against (see [`Self::policy_changed`]).
    policy_gen: Array<MapData, u32>,
    /// Shared limiter state of prefixes throttled at prefix scope.
    prefix_buckets: HashMap<MapData, AddrKey, Bucket>,
    /// Limiter state of addresses throttled by an exact decision.
    exact_buckets: HashMap<MapData, AddrKey, Bucket>,
    /// Reason text → code, filled by one scan on first use, then kept in step by `reason_code` (this process
    /// is the writer while it holds the maps).
    reason_cache: Option<std::collections::HashMap<Vec<u8>, u16>>,
}

fn typed<T: TryFrom<Map, Error = MapError>>(name: &'static str, map: Map) -> Result<T, MapsError> {
    T::try_from(map).map_err(|source| MapsError::Map { name, source })
}

impl KernelMaps {
    /// Takes the maps out of a loaded program.
    pub fn from_ebpf(ebpf: &mut Ebpf) -> Result<Self, MapsError> {
        Self::open(|name| ebpf.take_map(name).ok_or(MapsError::Missing { name }))
    }

    /// Opens the maps pinned under a versioned pin directory.
    pub fn from_pins(pin_dir: &Path) -> Result<Self, MapsError> {
        Self::open(|name| {
            let path = paths::map_pin(pin_dir, name);
            let data = MapData::from_pin(&path).map_err(|source| MapsError::Pin {
                path: path.display().to_string(),
                source,
            })?;
            Map::from_map_data(data).map_err(|source| MapsError::Map { name, source })
        })
    }

    fn open(mut get: impl FnMut(&'static str) -> Result<Map, MapsError>) -> Result<Self, MapsError> {
        use map_names as n;
        Ok(Self {
            allow_exact: typed(n::ALLOW_EXACT, get(n::ALLOW_EXACT)?)?,
            allow_prefix: typed(n::ALLOW_PREFIX, get(n::ALLOW_PREFIX)?)?,
            management: typed(n::MANAGEMENT, get(n::MANAGEMENT)?)?,
            deny_exact: typed(n::DENY_EXACT, get(n::DENY_EXACT)?)?,
            deny_prefix: typed(n::DENY_PREFIX, get(n::DENY_PREFIX)?)?,
            decision_exact: typed(n::DECISION_EXACT, get(n::DECISION_EXACT)?)?,
            decision_prefix: typed(n::DECISION_PREFIX, get(n::DECISION_PREFIX)?)?,
            sources: typed(n::SOURCES, get(n::SOURCES)?)?,
            rate_classes: typed(n::RATE_CLASSES, get(n::RATE_CLASSES)?)?,
            protected_ports: typed(n::PROTECTED_PORTS, get(n::PROTECTED_PORTS)?)?,
            config: typed(n::CONFIG, get(n::CONFIG)?)?,
            counters: typed(n::COUNTERS, get(n::COUNTERS)?)?,
            reasons: typed(n::REASONS, get(n::REASONS)?)?,
            syn_verdicts: typed(n::SYN_VERDICTS, get(n::SYN_VERDICTS)?)?,
            hello_verdicts: typed(n::HELLO_VERDICTS, get(n::HELLO_VERDICTS)?)?,
            flows: typed(n::FLOWS, get(n::FLOWS)?)?,
            policy_gen: typed(n::POLICY_GEN, get(n::POLICY_GEN)?)?,
            prefix_buckets: typed(n::PREFIX_BUCKETS, get(n::PREFIX_BUCKETS)?)?,
            exact_buckets: typed(n::EXACT_BUCKETS, get(n::EXACT_BUCKETS)?)?,
            reason_cache: None,
        })
    }

    // ---- allowlist / denylist ----

    /// Adds (or refreshes) `net` in a list, keeping its hit count if it was already there.
    pub fn list_insert(&mut self, list: List, net: IpNet, ttl: Option<Duration>) -> Result<(), MapsError> {
        self.list_put(list, net, clock::expiry_from_ttl(ttl))
    }

    /// Adds (or refreshes) `net` in a list with an absolute monotonic expiry (0 = never).
    pub fn list_put(&mut self, list: List, net: IpNet, expires_ns: u64) -> Result<(), MapsError> {
        self.list_write(list, net, expires_ns)?;
        self.policy_changed()
    }

    fn list_write(&mut self, list: List, net: IpNet, expires_ns: u64) -> Result<(), MapsError> {
        let (exact, prefix, exact_name, prefix_name) = self.list_maps(list);
        match slot_for(net)? {
            Slot::Exact(key) => {
                let hits = exact.get(&key, 0).map(|e| e.hits).unwrap_or(0);
                exact
                    .insert(
                        key,
                        ListEntry {
                            expires_ns,
                            hits,
                            prefix_len: 128,
                            _pad: 0,
                        },
                        0,
                    )
                    .map_err(|source| MapsError::Map {
                        name: exact_name,
                        source,
                    })
            }
            Slot::Prefix { key, trie_len } => {
                let trie_key = Key::new(trie_len, key);
                let hits = prefix.get(&trie_key, 0).map(|e| e.hits).unwrap_or(0);
                prefix
                    .insert(
                        &trie_key,
                        ListEntry {
                            expires_ns,
                            hits,
                            prefix_len: trie_len,
                            _pad: 0,
                        },
                        0,
                    )
                    .map_err(|source| MapsError::Map {
                        name: prefix_name,
                        source,
                    })
            }
        }
    }

    /// Removes `net` from a list; `Ok(false)` if it was not there.
    pub fn list_remove(&mut self, list: List, net: IpNet) -> Result<bool, MapsError> {
        let (exact, prefix, exact_name, prefix_name) = self.list_maps(list);
        let result = match slot_for(net)? {
            Slot::Exact(key) => exact.remove(&key).map_err(|source| (exact_name, source)),
            Slot::Prefix { key, trie_len } => prefix
                .remove(&Key::new(trie_len, key))
                .map_err(|source| (prefix_name, source)),
        };
        let removed = not_found_is_false(result)?;
        self.policy_changed()?;
        Ok(removed)
    }

    /// Every entry of a list.
    pub fn list_entries(&self, list: List) -> Result<Vec<ListRow>, MapsError> {
        let (exact, prefix, exact_name, prefix_name) = match list {
            List::Allow => (
                &self.allow_exact,
                &self.allow_prefix,
                map_names::ALLOW_EXACT,
                map_names::ALLOW_PREFIX,
            ),
            List::Deny => (
                &self.deny_exact,
                &self.deny_prefix,
                map_names::DENY_EXACT,
                map_names::DENY_PREFIX,
            ),
        };
        let mut rows = Vec::new();
        for item in exact.iter() {
            let (key, entry) = item.map_err(|source| MapsError::Map {
                name: exact_name,
                source,
            })?;
            let net = decision_net(&key, true);
            rows.push(ListRow {
                list,
                net,
                hits: entry.hits,
                remaining_secs: remaining_secs(entry.expires_ns),
            });
        }
        for item in prefix.iter() {
            let (key, entry) = item.map_err(|source| MapsError::Map {
                name: prefix_name,
                source,
            })?;
            let data = key.data();
            let net = trie_net(&data, key.prefix_len());
            rows.push(ListRow {
                list,
                net,
                hits: entry.hits,
                remaining_secs: remaining_secs(entry.expires_ns),
            });
        }
        Ok(rows)
    }

    // ---- management networks ----

    /// The management networks the kernel holds (what the guard protects when the config at hand is not the
    /// one the daemon was started with: the offline CLI).
    pub fn management_entries(&self) -> Result<Vec<IpNet>, MapsError> {
        self.management
            .keys()
            .map(|key| {
                let key = key.map_err(|source| MapsError::Map {
                    name: map_names::MANAGEMENT,
                    source,
                })?;
                Ok(trie_net(&key.data(), key.prefix_len()))
            })
            .collect()
    }

    /// Makes the kernel's management networks exactly `nets` (new ones first, then stale ones removed, so a
    /// network kept across a reload is never absent). The only writer of `MANAGEMENT`.
    pub fn management_sync(&mut self, nets: &[IpNet]) -> Result<(), MapsError> {
        let (wanted, present) = self.management_add_keys(nets)?;
        let same =
            |a: &Key<AddrKey>, b: &Key<AddrKey>| a.prefix_len() == b.prefix_len() && a.data() == b.data();
        for key in present.iter().filter(|p| !wanted.iter().any(|w| same(p, w))) {
            not_found_is_false(
                self.management
                    .remove(key)
                    .map_err(|source| (map_names::MANAGEMENT, source)),
            )?;
        }
        self.policy_changed()
    }

    /// Adds the management networks `nets`, removing none: a reload writes these first and removes the
    /// networks it drops only once every other step has succeeded, so a failed reload never loses one.
    pub fn management_add(&mut self, nets: &[IpNet]) -> Result<(), MapsError> {
        self.management_add_keys(nets)?;
        self.policy_changed()
    }

    /// Inserts `nets` (hit counts kept for networks already there); returns their keys and the keys that were
    /// present before.
    fn management_add_keys(&mut self, nets: &[IpNet]) -> Result<(TrieKeys, TrieKeys), MapsError> {
        let err = |source| MapsError::Map {
            name: map_names::MANAGEMENT,
            source,
        };
        let wanted: Vec<Key<AddrKey>> = nets
            .iter()
            .map(|net| {
                let (key, trie_len) = match slot_for(*net)? {
                    Slot::Exact(key) => (key, 128),
                    Slot::Prefix { key, trie_len } => (key, trie_len),
                };
                Ok(Key::new(trie_len, key))
            })
            .collect::<Result<_, MapsError>>()?;
        let present: Vec<Key<AddrKey>> = self.management.keys().collect::<Result<_, _>>().map_err(err)?;
        let same =
            |a: &Key<AddrKey>, b: &Key<AddrKey>| a.prefix_len() == b.prefix_len() && a.data() == b.data();
        for key in &wanted {
            // A trie lookup answers the longest match: keep hits only for this very network.
            let hits = if present.iter().any(|p| same(p, key)) {
                self.management.get(key, 0).map(|e| e.hits).unwrap_or(0)
            } else {
                0
            };
            let entry = ListEntry {
                expires_ns: 0,
                hits,
                prefix_len: key.prefix_len(),
                _pad: 0,
            };
            self.management.insert(key, entry, 0).map_err(err)?;
        }
        Ok((wanted, present))
    }

    fn list_maps(&mut self, list: List) -> ListMaps<'_> {
        match list {
            List::Allow => (
                &mut self.allow_exact,
                &mut self.allow_prefix,
                map_names::ALLOW_EXACT,
                map_names::ALLOW_PREFIX,
            ),
            List::Deny => (
                &mut self.deny_exact,
                &mut self.deny_prefix,
                map_names::DENY_EXACT,
                map_names::DENY_PREFIX,
            ),
        }
    }

    // ---- decisions ----

    /// Writes a decision. Block on a prefix that is not a decision scope goes to the denylist (with its TTL).
    pub fn decision_insert(
        &mut self,
        net: IpNet,
        action: Action,
        rate_class: u8,
        reason: u16,
        origin: Origin,
        ttl: Option<Duration>,
    ) -> Result<(), MapsError> {
        let decision = Decision {
            expires_ns: clock::expiry_from_ttl(ttl),
            hits: 0,
            action: action as u8,
            rate_class,
            reason,
            origin: origin as u8,
            _pad: [0; 3],
        };
        self.decision_put(net, decision)
    }

    /// Writes a decision as given (absolute monotonic expiry, 0 = never), keeping the hit count of the one it
    /// replaces. Block on a prefix that is not a decision scope goes to the denylist (with the same expiry).
    pub fn decision_put(&mut self, net: IpNet, mut decision: Decision) -> Result<(), MapsError> {
        if decision.rate_class as u32 >= capacity::RATE_CLASSES {
            return Err(MapsError::RateClass {
                class: decision.rate_class as u32,
            });
        }
        let action = Action::from_u8(decision.action);
        let Some((key, exact)) = decision_slot(net) else {
            slot_for(net)?; // host bits: the clearer error first
            if action == Some(Action::Block) {
                return self.list_put(List::Deny, net, decision.expires_ns);
            }
            return Err(MapsError::DecisionScope {
                net,
                action: action.map_or("unknown", Action::name),
            });
        };
        let (map, name) = self.decision_map(exact);
        decision.hits = map.get(&key, 0).map(|d| d.hits).unwrap_or(0);
        map.insert(key, decision, 0)
            .map_err(|source| MapsError::Map { name, source })?;
        self.policy_changed()
    }

    /// Writes many decisions at once (batch syscalls for the hash maps). Unlike [`Self::decision_put`], replaced
    /// decisions restart their hit counts at 0.
    pub fn decision_put_many(&mut self, decisions: &[(IpNet, Decision)]) -> Result<(), MapsError> {
        let (mut exact, mut prefix) = (Vec::new(), Vec::new());
        let mut rest = Vec::new();
        for (net, d) in decisions {
            if d.rate_class as u32 >= capacity::RATE_CLASSES {
                return Err(MapsError::RateClass {
                    class: d.rate_class as u32,
                });
            }
            match decision_slot(*net) {
                Some((key, true)) => exact.push((key, *d)),
                Some((key, false)) => prefix.push((key, *d)),
                None => rest.push((*net, *d)),
            }
        }
        for (entries, exact_scope) in [(exact, true), (prefix, false)] {
            if entries.is_empty() {
                continue;
            }
            let (keys, values): (Vec<AddrKey>, Vec<Decision>) = entries.into_iter().unzip();
            let (map, name) = self.decision_map(exact_scope);
            update_batch(map.map(), &keys, &values).map_err(|io_error| MapsError::Map {
                name,
                source: MapError::SyscallError(aya::sys::SyscallError {
                    call: "BPF_MAP_UPDATE_BATCH",
                    io_error,
                }),
            })?;
        }
        for (net, d) in rest {
            self.decision_put(net, d)?;
        }
        self.policy_changed()
    }

    /// Removes the decision on `net` (or, for other prefix lengths, its denylist entry).
    pub fn decision_remove(&mut self, net: IpNet) -> Result<bool, MapsError> {
        let Some((key, exact)) = decision_slot(net) else {
            return self.list_remove(List::Deny, net);
        };
        let (map, name) = self.decision_map(exact);
        let removed = not_found_is_false(map.remove(&key).map_err(|source| (name, source)))?;
        self.policy_changed()?;
        Ok(removed)
    }

    /// Tells the kernel that the allow, deny or decision maps changed: bumps `POLICY_GEN`, so every verdict
    /// the kernel cached per source is walked again on the source's next packet. Called after the map
    /// write: a walk that read the generation before the bump may cache an outcome of the old maps, but with
    /// the old generation, which the bump then invalidates. Expired entries need no bump (the cached outcome
    /// carries the expiry of the entry that decided it).
    pub fn policy_changed(&mut self) -> Result<(), MapsError> {
        let name = map_names::POLICY_GEN;
        let generation = self
            .policy_gen
            .get(&0, 0)
            .map_err(|source| MapsError::Map { name, source })?;
        self.policy_gen
            .set(0, generation.wrapping_add(1), 0)
            .map_err(|source| MapsError::Map { name, source })
    }

    /// The current policy generation (for tests and `aqd status`).
    pub fn policy_generation(&self) -> Result<u32, MapsError> {
        let name = map_names::POLICY_GEN;
        self.policy_gen
            .get(&0, 0)
            .map_err(|source| MapsError::Map { name, source })
    }

    /// Every decision, exact and prefix scope.
    pub fn decisions(&self) -> Result<Vec<DecisionRow>, MapsError> {
        let mut rows = Vec::new();
        for (map, exact, name) in [
            (&self.decision_exact, true, map_names::DECISION_EXACT),
            (&self.decision_prefix, false, map_names::DECISION_PREFIX),
        ] {
            for item in map.iter() {
                let (key, d) = item.map_err(|source| MapsError::Map { name, source })?;
                rows.push(DecisionRow {
                    net: decision_net(&key, exact),
                    action: Action::from_u8(d.action),
                    rate_class: d.rate_class,
                    reason: self.reason_text(d.reason),
                    origin: Origin::from_u8(d.origin),
                    hits: d.hits,
                    remaining_secs: remaining_secs(d.expires_ns),
                });
            }
        }
        Ok(rows)
    }

    fn decision_map(&mut self, exact: bool) -> (&mut HashMap<MapData, AddrKey, Decision>, &'static str) {
        if exact {
            (&mut self.decision_exact, map_names::DECISION_EXACT)
        } else {
            (&mut self.decision_prefix, map_names::DECISION_PREFIX)
        }
    }

    // ---- verdicts by fingerprint ----

    fn verdict_map(&mut self, map: VerdictMap) -> (&mut HashMap<MapData, u64, Decision>, &'static str) {
        match map {
            VerdictMap::Syn => (&mut self.syn_verdicts, map_names::SYN_VERDICTS),
            VerdictMap::Hello => (&mut self.hello_verdicts, map_names::HELLO_VERDICTS),
        }
    }

    /// Writes a verdict under a fingerprint key, keeping the hit count of the one it replaces.
    pub fn verdict_put(
        &mut self,
        map: VerdictMap,
        key: u64,
        mut decision: Decision,
    ) -> Result<(), MapsError> {
        if decision.rate_class as u32 >= capacity::RATE_CLASSES {
            return Err(MapsError::RateClass {
                class: decision.rate_class as u32,
            });
        }
        let (m, name) = self.verdict_map(map);
        decision.hits = m.get(&key, 0).map(|d| d.hits).unwrap_or(0);
        m.insert(key, decision, 0)
            .map_err(|source| MapsError::Map { name, source })
    }

    /// Removes the verdict under a fingerprint key; `Ok(false)` if there was none.
    pub fn verdict_remove(&mut self, map: VerdictMap, key: u64) -> Result<bool, MapsError> {
        let (m, name) = self.verdict_map(map);
        not_found_is_false(m.remove(&key).map_err(|source| (name, source)))
    }

    /// The verdict under a fingerprint key, if any.
    pub fn verdict_get(&self, map: VerdictMap, key: u64) -> Option<Decision> {
        match map {
            VerdictMap::Syn => self.syn_verdicts.get(&key, 0).ok(),
            VerdictMap::Hello => self.hello_verdicts.get(&key, 0).ok(),
        }
    }

    /// Every verdict of one map.
    pub fn verdicts(&self, map: VerdictMap) -> Result<Vec<(u64, Decision)>, MapsError> {
        let (m, name) = match map {
            VerdictMap::Syn => (&self.syn_verdicts, map_names::SYN_VERDICTS),
            VerdictMap::Hello => (&self.hello_verdicts, map_names::HELLO_VERDICTS),
        };
        m.iter()
            .map(|item| item.map_err(|source| MapsError::Map { name, source }))
            .collect()
    }

    /// Sets the fingerprint action of one tracked flow (`Action::Block` drops the rest of the flow). Only an
    /// existing flow is changed (`BPF_EXIST`): `Ok(false)` when the flow is not (or no longer) tracked.
    pub fn flow_set_action(
        &mut self,
        flow: &FlowTuple,
        action: Action,
        rate_class: u8,
    ) -> Result<bool, MapsError> {
        const BPF_EXIST: u64 = 2;
        let mut state = match self.flows.get(flow, 0) {
            Ok(s) => s,
            Err(MapError::KeyNotFound) => return Ok(false),
            Err(MapError::SyscallError(e)) if e.io_error.raw_os_error() == Some(libc::ENOENT) => {
                return Ok(false);
            }
            Err(source) => {
                return Err(MapsError::Map {
                    name: map_names::FLOWS,
                    source,
                });
            }
        };
        state.action = action as u8;
        state.rate_class = if action == Action::Throttle { rate_class } else { 0 };
        match self.flows.insert(flow, state, BPF_EXIST) {
            Ok(()) => Ok(true),
            Err(MapError::SyscallError(e)) if e.io_error.raw_os_error() == Some(libc::ENOENT) => Ok(false),
            Err(source) => Err(MapsError::Map {
                name: map_names::FLOWS,
                source,
            }),
        }
    }

    /// The state of one tracked flow.
    pub fn flow(&self, flow: &FlowTuple) -> Option<FlowState> {
        self.flows.get(flow, 0).ok()
    }

    // ---- settings ----

    pub fn set_rate_class(&mut self, class: u32, limits: RateClass) -> Result<(), MapsError> {
        if class >= capacity::RATE_CLASSES {
            return Err(MapsError::RateClass { class });
        }
        self.rate_classes
            .set(class, limits, 0)
            .map_err(|source| MapsError::Map {
                name: map_names::RATE_CLASSES,
                source,
            })
    }

    pub fn rate_class(&self, class: u32) -> Result<RateClass, MapsError> {
        self.rate_classes.get(&class, 0).map_err(|source| MapsError::Map {
            name: map_names::RATE_CLASSES,
            source,
        })
    }

    /// Makes exactly `ports` the protected ports: one batch write of the whole array, where every element
    /// goes straight to its final value (a port in both the old and the new set is never unprotected).
    pub fn set_protected_ports(&mut self, ports: &[u16]) -> Result<(), MapsError> {
        let keys: Vec<u32> = (0..capacity::PROTECTED_PORTS).collect();
        let mut values = vec![0u8; capacity::PROTECTED_PORTS as usize];
        for &port in ports {
            values[port as usize] = 1;
        }
        update_batch(self.protected_ports.map(), &keys, &values).map_err(|io_error| MapsError::Map {
            name: map_names::PROTECTED_PORTS,
            source: MapError::SyscallError(aya::sys::SyscallError {
                call: "BPF_MAP_UPDATE_BATCH",
                io_error,
            }),
        })
    }

    pub fn protected_ports(&self) -> Result<Vec<u16>, MapsError> {
        let mut ports = Vec::new();
        for (port, value) in self.protected_ports.iter().enumerate() {
            let value = value.map_err(|source| MapsError::Map {
                name: map_names::PROTECTED_PORTS,
                source,
            })?;
            if value != 0 {
                ports.push(port as u16);
            }
        }
        Ok(ports)
    }

    pub fn set_config(&mut self, config: Config) -> Result<(), MapsError> {
        self.config.set(0, config, 0).map_err(|source| MapsError::Map {
            name: map_names::CONFIG,
            source,
        })
    }

    pub fn config(&self) -> Result<Config, MapsError> {
        self.config.get(&0, 0).map_err(|source| MapsError::Map {
            name: map_names::CONFIG,
            source,
        })
    }

    // ---- observation ----

    /// Counters summed over all CPUs.
    pub fn counters(&self) -> Result<CounterTotals, MapsError> {
        let per_cpu = self.counters.get(&0, 0).map_err(|source| MapsError::Map {
            name: map_names::COUNTERS,
            source,
        })?;
        let mut totals = CounterTotals::default();
        for c in per_cpu.iter() {
            for (t, v) in totals.by_reason.iter_mut().zip(c.by_reason) {
                *t += v;
            }
            for (t, v) in totals.events_sent.iter_mut().zip(c.events_sent) {
                *t += v;
            }
            for (t, v) in totals.events_lost.iter_mut().zip(c.events_lost) {
                *t += v;
            }
            for (t, v) in totals.flows.iter_mut().zip(c.flows) {
                *t += v;
            }
        }
        Ok(totals)
    }

    /// The limiter state of one source, if it has any.
    pub fn bucket(&self, addr: IpAddr) -> Option<Bucket> {
        let key = match addr {
            IpAddr::V4(a) => AddrKey::from_v4(a.octets()),
            IpAddr::V6(a) => AddrKey::from_v6(a.octets()),
        };
        // A cache-only entry (a dropped source, never limited) has no bucket to show.
        self.sources
            .get(&key, 0)
            .ok()
            .filter(|s| s.last_seen_ns != 0)
            .map(|s| s.bucket)
    }

    /// The shared limiter state of `addr`'s /24 or /64, if a prefix throttle ever limited it.
    pub fn prefix_bucket(&self, addr: IpAddr) -> Option<Bucket> {
        let key = match addr {
            IpAddr::V4(a) => AddrKey::from_v4(a.octets()),
            IpAddr::V6(a) => AddrKey::from_v6(a.octets()),
        };
        self.prefix_buckets.get(&key.prefix_scope(), 0).ok()
    }

    /// The limiter state of `addr` under an exact throttle decision, if one ever limited it (kept apart from
    /// its `SOURCES` entry, whose own bucket such a decision leaves alone).
    pub fn exact_bucket(&self, addr: IpAddr) -> Option<Bucket> {
        let key = match addr {
            IpAddr::V4(a) => AddrKey::from_v4(a.octets()),
            IpAddr::V6(a) => AddrKey::from_v6(a.octets()),
        };
        self.exact_buckets.get(&key, 0).ok()
    }

    /// Every tracked source seen at or after `since_ns` (monotonic), with its state.
    pub fn sources(&self, since_ns: u64) -> Result<Vec<(IpAddr, SourceState)>, MapsError> {
        let mut out = Vec::new();
        for item in self.sources.iter() {
            let (key, state) = item.map_err(|source| MapsError::Map {
                name: map_names::SOURCES,
                source,
            })?;
            // A zero last-seen time is a cache-only entry (a dropped source that never reached the limiter).
            if state.last_seen_ns != 0 && state.last_seen_ns >= since_ns {
                out.push((key_addr(&key), state));
            }
        }
        Ok(out)
    }

    /// The code of a reason text, allocating a slot the first time it is seen ("" is code 0). Texts longer
    /// than a slot are cut at a character boundary.
    pub fn reason_code(&mut self, text: &str) -> Result<u16, MapsError> {
        let text = text.trim();
        if text.is_empty() {
            return Ok(0);
        }
        let mut cut = text.len().min(62);
        while !text.is_char_boundary(cut) {
            cut -= 1;
        }
        let bytes = &text.as_bytes()[..cut];
        let err = |source| MapsError::Map {
            name: map_names::REASONS,
            source,
        };
        if self.reason_cache.is_none() {
            let mut cache = std::collections::HashMap::new();
            for code in 1..capacity::REASONS {
                let slot = self.reasons.get(&code, 0).map_err(err)?;
                if slot.len != 0 {
                    cache.insert(slot.text[..(slot.len as usize).min(62)].to_vec(), code as u16);
                }
            }
            self.reason_cache = Some(cache);
        }
        let cache = self.reason_cache.as_mut().expect("filled above");
        if let Some(code) = cache.get(bytes) {
            return Ok(*code);
        }
        // The lowest free slot; when all are taken the reason is still in the audit log, just not in `list`.
        let used: std::collections::HashSet<u16> = cache.values().copied().collect();
        let Some(code) = (1..capacity::REASONS as u16).find(|c| !used.contains(c)) else {
            return Ok(0);
        };
        let mut slot = ReasonText {
            len: bytes.len() as u16,
            ..ReasonText::default()
        };
        slot.text[..bytes.len()].copy_from_slice(bytes);
        self.reasons.set(code as u32, slot, 0).map_err(err)?;
        cache.insert(bytes.to_vec(), code);
        Ok(code)
    }

    /// The text of a reason code ("" for 0 or an unknown code).
    pub fn reason_text(&self, code: u16) -> String {
        if code == 0 {
            return String::new();
        }
        match self.reasons.get(&(code as u32), 0) {
            Ok(slot) => String::from_utf8_lossy(&slot.text[..(slot.len as usize).min(62)]).into_owned(),
            Err(_) => String::new(),
        }
    }

    /// The allowlist entry (exact, or the longest prefix) that covers `addr`, if any.
    pub fn allow_covering(&self, addr: IpAddr) -> Result<Option<IpNet>, MapsError> {
        let key = match addr {
            IpAddr::V4(a) => AddrKey::from_v4(a.octets()),
            IpAddr::V6(a) => AddrKey::from_v6(a.octets()),
        };
        if self.allow_exact.get(&key, 0).is_ok() {
            return Ok(Some(IpNet::from(addr)));
        }
        match self.allow_prefix.get(&Key::new(128, key), 0) {
            Ok(entry) => Ok(Some(trie_net(&key, entry.prefix_len).trunc())),
            Err(MapError::KeyNotFound) => Ok(None),
            Err(MapError::SyscallError(e)) if e.io_error.raw_os_error() == Some(libc::ENOENT) => Ok(None),
            Err(source) => Err(MapsError::Map {
                name: map_names::ALLOW_PREFIX,
                source,
            }),
        }
    }

    /// Removes every expired list entry, verdict and decision at once (the offline CLI; the daemon walks with
    /// [`Self::expired_entries`] on its own handles and removes with [`Self::remove_if_expired`] in small steps).
    pub fn purge_expired(&mut self) -> Result<usize, MapsError> {
        let now = clock::monotonic_ns();
        let mut removed = 0;
        for entry in self.expired_entries(now) {
            removed += self.remove_if_expired(&entry, now)? as usize;
        }
        Ok(removed)
    }

    /// Every list entry, verdict and decision expired at `now`: a read-only walk (one syscall per entry, two for
    /// LPM tries), which needs no lock on the writer's state. Unreadable entries are skipped.
    pub fn expired_entries(&self, now: u64) -> Vec<ExpiredEntry> {
        let expired = |e: u64| e != 0 && e <= now;
        let mut out = Vec::new();
        for (list, exact, prefix) in [
            (List::Allow, &self.allow_exact, &self.allow_prefix),
            (List::Deny, &self.deny_exact, &self.deny_prefix),
        ] {
            out.extend(
                exact
                    .iter()
                    .filter_map(Result::ok)
                    .filter(|(_, e)| expired(e.expires_ns))
                    .map(|(k, _)| ExpiredEntry::ListExact(list, k)),
            );
            out.extend(
                prefix
                    .iter()
                    .filter_map(Result::ok)
                    .filter(|(_, e)| expired(e.expires_ns))
                    .map(|(k, _)| ExpiredEntry::ListPrefix(list, k.prefix_len(), k.data())),
            );
        }
        for (which, map) in [
            (VerdictMap::Syn, &self.syn_verdicts),
            (VerdictMap::Hello, &self.hello_verdicts),
        ] {
            out.extend(
                map.iter()
                    .filter_map(Result::ok)
                    .filter(|(_, d)| expired(d.expires_ns))
                    .map(|(k, _)| ExpiredEntry::Verdict(which, k)),
            );
        }
        for (exact_scope, map) in [(true, &self.decision_exact), (false, &self.decision_prefix)] {
            out.extend(
                map.iter()
                    .filter_map(Result::ok)
                    .filter(|(_, d)| expired(d.expires_ns))
                    .map(|(k, _)| ExpiredEntry::Decision(exact_scope, k)),
            );
        }
        out
    }

    /// Removes `entry` if it is (still) expired at `now`: an entry rewritten since the walk that found it is
    /// kept. False if it was gone or live.
    pub fn remove_if_expired(&mut self, entry: &ExpiredEntry, now: u64) -> Result<bool, MapsError> {
        let expired = |e: u64| e != 0 && e <= now;
        match *entry {
            ExpiredEntry::ListExact(list, key) => {
                let (exact, _, name, _) = self.list_maps(list);
                match exact.get(&key, 0) {
                    Ok(e) if expired(e.expires_ns) => {
                        not_found_is_false(exact.remove(&key).map_err(|e| (name, e)))
                    }
                    _ => Ok(false),
                }
            }
            ExpiredEntry::ListPrefix(list, len, data) => {
                let (_, prefix, _, name) = self.list_maps(list);
                let key = Key::new(len, data);
                match prefix.get(&key, 0) {
                    Ok(e) if expired(e.expires_ns) => {
                        not_found_is_false(prefix.remove(&key).map_err(|e| (name, e)))
                    }
                    _ => Ok(false),
                }
            }
            ExpiredEntry::Verdict(which, key) => {
                let (map, name) = self.verdict_map(which);
                remove_decision_if_expired(map, name, &key, now)
            }
            ExpiredEntry::Decision(exact_scope, key) => {
                let (map, name) = self.decision_map(exact_scope);
                remove_decision_if_expired(map, name, &key, now)
            }
        }
    }

    /// Entries in each map, for fill levels. Walks the maps: O(entries).
    pub fn fill_levels(&self) -> Vec<(&'static str, usize, u32)> {
        vec![
            (
                map_names::ALLOW_EXACT,
                self.allow_exact.keys().count(),
                capacity::ALLOW_EXACT,
            ),
            (
                map_names::ALLOW_PREFIX,
                self.allow_prefix.keys().count(),
                capacity::ALLOW_PREFIX,
            ),
            (
                map_names::MANAGEMENT,
                self.management.keys().count(),
                capacity::MANAGEMENT,
            ),
            (
                map_names::DENY_EXACT,
                self.deny_exact.keys().count(),
                capacity::DENY_EXACT,
            ),
            (
                map_names::DENY_PREFIX,
                self.deny_prefix.keys().count(),
                capacity::DENY_PREFIX,
            ),
            (
                map_names::DECISION_EXACT,
                self.decision_exact.keys().count(),
                capacity::DECISION_EXACT,
            ),
            (
                map_names::DECISION_PREFIX,
                self.decision_prefix.keys().count(),
                capacity::DECISION_PREFIX,
            ),
            (map_names::SOURCES, self.sources.keys().count(), capacity::SOURCES),
            (
                map_names::PREFIX_BUCKETS,
                self.prefix_buckets.keys().count(),
                capacity::PREFIX_BUCKETS,
            ),
            (
                map_names::EXACT_BUCKETS,
                self.exact_buckets.keys().count(),
                capacity::EXACT_BUCKETS,
            ),
            (
                map_names::SYN_VERDICTS,
                self.syn_verdicts.keys().count(),
                capacity::SYN_VERDICTS,
            ),
            (
                map_names::HELLO_VERDICTS,
                self.hello_verdicts.keys().count(),
                capacity::HELLO_VERDICTS,
            ),
        ]
    }
}

fn remaining_secs(expires_ns: u64) -> Option<u64> {
    clock::remaining(expires_ns).map(|d| d.as_secs())
}

/// `BPF_MAP_UPDATE_BATCH`: many keys and values in one syscall per chunk (Linux ≥ 5.6, hash maps).
/// Hand-written because aya 0.14 exposes no batch operations.
fn update_batch<K: aya::Pod, V: aya::Pod>(
    map: &MapData,
    keys: &[K],
    values: &[V],
) -> Result<(), std::io::Error> {
    use crate::bpf_sys::{BPF_MAP_UPDATE_BATCH, BatchAttr, bpf};
    use std::os::fd::{AsFd as _, AsRawFd as _};
    assert_eq!(keys.len(), values.len());
    let fd = map.fd().as_fd().as_raw_fd();
    for (k, v) in keys.chunks(8192).zip(values.chunks(8192)) {
        let mut attr = BatchAttr {
            in_batch: 0,
            out_batch: 0,
            keys: k.as_ptr() as u64,
            values: v.as_ptr() as u64,
            count: k.len() as u32,
            map_fd: fd as u32,
            elem_flags: 0,
            flags: 0,
        };
        // Keys and values point to `count` Pod elements of the map's key and value sizes, alive for the call.
        bpf(BPF_MAP_UPDATE_BATCH, &mut attr)?;
    }
    Ok(())
}

/// `remove` on a missing key is ENOENT; callers want "was it there".
/// Removes the expired entries of a map of [`Decision`]s (by address or by fingerprint key); returns how many.
fn remove_decision_if_expired<K: aya::Pod>(
    map: &mut HashMap<MapData, K, Decision>,
    name: &'static str,
    key: &K,
    now: u64,
) -> Result<bool, MapsError> {
    match map.get(key, 0) {
        Ok(d) if d.expires_ns != 0 && d.expires_ns <= now => {
            not_found_is_false(map.remove(key).map_err(|e| (name, e)))
        }
        _ => Ok(false),
    }
}

fn not_found_is_false(result: Result<(), (&'static str, MapError)>) -> Result<bool, MapsError> {
    match result {
        Ok(()) => Ok(true),
        Err((_, MapError::KeyNotFound)) => Ok(false),
        Err((_, MapError::SyscallError(e))) if e.io_error.raw_os_error() == Some(libc::ENOENT) => Ok(false),
        Err((name, source)) => Err(MapsError::Map { name, source }),
    }
}
