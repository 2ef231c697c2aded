//! A userspace reference model of the XDP program's verdict: pure Rust, no kernel, no aya.
//!
//! The differential test (`tests/kernel_differential.rs`) runs the same frames through this model and through
//! the real program and demands the same [`Reason`] for every one. The model is written from the *documented*
//! contract (the module docs of `detector-ebpf/src/main.rs` and `parse.rs`, the docs in `detector-common`), not
//! by transcribing the kernel code, so a disagreement points at one of the two.
//!
//! What it models:
//! - parsing: Ethernet, ≤ 2 VLAN tags (0x8100 / 0x88A8, in any order), IPv4 (options allowed), IPv6 with up to
//!   [`MAX_IPV6_EXT_HEADERS`] extension headers (hop-by-hop, routing, destination options, fragment, AH), TCP and
//!   UDP. Not IP after the tags → [`Reason::PassNotIp`]; a cut-off tag or IP header, a wrong IP version, IHL < 5
//!   → [`Reason::PassMalformed`];
//! - ports: read from a first (or unfragmented) packet's TCP header once its first 4 bytes are there (RFC 1858
//!   tiny fragments), with the flags when byte 13 is there too — a TCP header too short for its flags is a new
//!   connection; from a complete 8-byte UDP header;
//! - which packets the limits see: with ports, those to a protected port; without ports, TCP, UDP and packets
//!   whose transport is unknown (see [`Transport::NoPorts`]) — so fragmenting is no way around the limits;
//! - the rule order: management networks → allowlist (exact, prefix) → denylist (exact, prefix) → the most
//!   specific live decision (exact address, then its /24 or /64) → rate limits;
//! - expiry: an entry with `expires_ns != 0 && expires_ns <= now` is ignored. Among the prefixes covering a
//!   source, the longest wins; an expired one passes the question to the next shorter one, for at most
//!   [`MAX_EXPIRED_PREFIX_STEPS`] prefixes in all;
//! - the limiter: one GCRA state per source (shared by every rate class), a new source starting at "now", the
//!   packet limit checked before the connection limit (SYN without ACK), and a packet dropped by the connection
//!   limit not consuming a packet token. A throttle decision has a budget of its own instead: one per exact
//!   address, one per /24 or /64 shared by the prefix. On it a SYN spends only the connection budget (the packet
//!   budget too when the class has no connection limit), and in the TCP program a packet of no verified flow
//!   is [`Reason::DropUnverifiedThrottled`] and spends nothing;
//! - TCP fragments (IPv4 MF or offset, a non-atomic IPv6 fragment header) towards protected ports:
//!   [`Reason::DropTcpFragment`] before the limits, unless `CONFIG_FLAG_PASS_TCP_FRAGMENTS`
//!   ([`Reference::set_pass_tcp_fragments`]);
//! - the TCP program (`aqd_tcp`), reached by TCP packets to protected ports whose whole 20-byte header is in
//!   the frame: a SYN (without ACK) is looked up in the SYN-signature verdicts under the key userspace computes
//!   for it (`detector_user::fingerprint::syn::parse_ip_tcp`, the kernel's twin): block → [`Reason::DropSynFingerprint`]
//!   before the limits; throttle → the verdict's rate class (unless the source's decision has one) and
//!   [`Reason::PassThrottled`]; monitor → [`Reason::PassMonitor`] instead of a default pass. A SYN that passes
//!   makes a half-open entry (never replacing one; it never touches a verified flow) carrying the client's ISN
//!   and a throttle verdict's class;
//! - the TC egress program (`aqd_egress`, [`Reference::egress`]): a SYN-ACK from a protected port records the
//!   server's ISN and the client ISN it acknowledges in the half-open entry (making one if there is none);
//! - handshake verification: an ACK (without RST) with seq = client ISN + 1 and ack = server ISN + 1 moves the
//!   half-open entry into the verified flows, or, with a wrong TCP checksum, is [`Reason::PassBadChecksum`]
//!   before any limit and changes nothing. Packets of no verified flow get the limits only;
//! - verified flows (`track_flow`): a throttle verdict's class applies, then the limits, then the checksum
//!   (wrong → [`Reason::PassBadChecksum`], no change), then sequence numbers: a FIN/RST not exactly at
//!   `next_seq` → [`Reason::PassCloseIgnored`]; after an in-sequence FIN (`FIN_SEEN`, `next_seq` + 1, the flow
//!   kept) only an in-sequence RST does anything (ends the flow); only new in-order bytes advance `next_seq`;
//!   an in-sequence RST ends the flow. A segment with payload at stream offset 0 goes through the ClientHello
//!   step: the first one sets the flow's key when it is a ClientHello the reference knows
//!   ([`Reference::know_client_hello`]: the kernel keys exactly those whole one-segment ClientHellos), a later
//!   one that disagrees (keyed or not, or another key) marks the flow suspect;
//! - checksums as `csum.rs` computes them: RFC 1071 over the segment up to the IP length field (never Ethernet
//!   padding), the pseudo-header from the flow's addresses.
//!
//! Not modelled: ClientHello verdicts (`HELLO_VERDICTS`, installed by userspace from a JA4) and so the flow
//! blocks they cause; capture and events; LRU eviction (the maps are far larger than a run's flows); the
//! handshake-ACK-only and no-checksum config flags.
//! - the address mapping of `detector_common::addr`: IPv4 lives IPv4-mapped (`::ffff:a.b.c.d`) in one 128-bit
//!   space, so an IPv6 source `::ffff:a.b.c.d` *is* the IPv4 source `a.b.c.d` for every rule and limiter, and
//!   an IPv6 prefix covering `::ffff:0:0/96` covers IPv4 sources.
//!
//! etherparse reads the headers whose checks are exactly the contract's: Ethernet II, one VLAN tag, the IPv4
//! header (it checks version, IHL ≥ 5 and that the options are in the slice, and — like the program — ignores
//! the total length) and the fixed IPv6 header. The rest is read by hand, because etherparse's slices demand
//! whole headers where the contract needs a few bytes: TCP (etherparse wants `data_offset * 4` bytes; ports need
//! 4), and the IPv6 extension headers ([`ipv6_transport`]). The whole-packet slicers (`SlicedPacket`,
//! `LaxSlicedPacket`) are not used: they treat 0x9100 as a VLAN tag, follow more than two tags, check the IP
//! length fields against the frame, and stop at their own extension-header limit — none of which the program
//! does.
//!
//! Frames must be shorter than 2048 bytes, the program's bound on any header offset (`MAX_OFFSET` in
//! `parse.rs`); below it the bound never decides anything, so the model ignores it.

use std::{
    collections::HashMap,
    net::{IpAddr, Ipv6Addr},
};

use detector_common::{Action, Bucket, MAX_EXPIRED_PREFIX_STEPS, RateClass, Reason, capacity};
use detector_user::fingerprint::syn::parse_ip_tcp;
use etherparse::{
    EtherType, Ethernet2HeaderSlice, IpNumber, Ipv4HeaderSlice, Ipv6HeaderSlice, SingleVlanHeaderSlice,
};
use ipnet::IpNet;

/// IPv6 extension headers the parser follows; the header after the last of them is still recognised.
pub const MAX_IPV6_EXT_HEADERS: usize = 8;
/// The largest frame the model is valid for (see the module docs).
pub const MAX_FRAME_LEN: usize = 2048;

const TCP: u8 = 6;
const UDP: u8 = 17;

/// What the parser made of a frame.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Parsed {
    NotIp,
    Malformed,
    Ip {
        /// The source address, IPv4-mapped sources folded to IPv4 (see the module docs).
        src: IpAddr,
        transport: Transport,
        /// An IP fragment, first or later: IPv4 MF or a fragment offset; an IPv6 fragment header that is not
        /// atomic (RFC 6946), among the extension headers walked.
        fragment: bool,
    },
}

/// What the verdict needs from the transport layer.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Transport {
    Ports {
        dst_port: u16,
        /// TCP (not UDP).
        is_tcp: bool,
        /// A TCP SYN without ACK (or a TCP header cut off before its flags): a new connection.
        new_connection: bool,
        /// TCP with its whole 20-byte header in the frame: what the TCP program sees.
        tcp: Option<Tcp>,
    },
    NoPorts {
        /// The transport protocol; `None` when the parser could not tell (an IPv6 extension chain cut off or
        /// longer than [`MAX_IPV6_EXT_HEADERS`], or a non-first fragment whose fragment header names another
        /// extension header).
        proto: Option<u8>,
    },
}

impl Transport {
    /// Whether the rate limits apply, given the protected ports.
    fn limited(&self, protected_ports: &[u16]) -> bool {
        match *self {
            Self::Ports { dst_port, .. } => protected_ports.contains(&dst_port),
            // The program marks "unknown" with protocol number 0 (`PROTO_UNKNOWN`), so an IPv4 packet naming
            // protocol 0 (HOPOPT, meaningless in IPv4) counts as unknown too: modelled as the program does it
            // (a conservative reading, and such packets are bogus anyway).
            Self::NoPorts { proto } => matches!(proto, None | Some(0) | Some(TCP) | Some(UDP)),
        }
    }

    fn new_connection(&self) -> bool {
        matches!(
            self,
            Self::Ports {
                new_connection: true,
                ..
            }
        )
    }
}

/// A TCP packet as the TCP program sees it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Tcp {
    pub flags: u8,
    pub seq: u32,
    pub ack: u32,
    /// Payload bytes up to the IP length (never Ethernet padding).
    pub payload_len: u32,
    /// A hash of those payload bytes (FNV-1a), for the ClientHello keys the reference knows.
    pub payload_hash: u64,
    /// The TCP checksum over the segment up to the IP length (pseudo-header from the flow's addresses) is
    /// right: what `csum.rs` computes.
    pub checksum_ok: bool,
    /// The flow: source, destination (IPv4-mapped in the one key space), source and destination port.
    pub flow: (u128, u128, u16, u16),
    /// The SYN signature's key, when userspace's parser reads the packet.
    pub syn_key: Option<u64>,
}

/// Parses a frame the way the contract of `detector-ebpf/src/parse.rs` says.
pub fn parse(frame: &[u8]) -> Parsed {
    assert!(
        frame.len() < MAX_FRAME_LEN,
        "the model covers frames below {MAX_FRAME_LEN} bytes"
    );
    let Ok(eth) = Ethernet2HeaderSlice::from_slice(frame) else {
        return Parsed::NotIp;
    };
    let mut ether_type = eth.ether_type();
    let mut rest = &frame[eth.slice().len()..];
    for _ in 0..2 {
        if ether_type != EtherType::VLAN_TAGGED_FRAME && ether_type != EtherType::PROVIDER_BRIDGING {
            break;
        }
        // A tag announced but cut off is a truncated header, like a cut-off IP header.
        let Ok(tag) = SingleVlanHeaderSlice::from_slice(rest) else {
            return Parsed::Malformed;
        };
        ether_type = tag.ether_type();
        rest = &rest[tag.slice().len()..];
    }
    match ether_type {
        EtherType::IPV4 => ipv4(rest),
        EtherType::IPV6 => ipv6(rest),
        _ => Parsed::NotIp,
    }
}

fn ipv4(packet: &[u8]) -> Parsed {
    let Ok(ip) = Ipv4HeaderSlice::from_slice(packet) else {
        return Parsed::Malformed;
    };
    let src = IpAddr::V4(ip.source_addr());
    let proto = ip.protocol().0;
    // Only the first fragment (offset 0; the MF flag does not matter) carries the transport header.
    let mut transport = if ip.fragments_offset().value() == 0 {
        transport(proto, &packet[ip.slice().len()..])
    } else {
        Transport::NoPorts { proto: Some(proto) }
    };
    let ip_end = (ip.total_len() as usize).min(packet.len());
    with_tcp_flow(
        &mut transport,
        packet,
        ip.slice().len(),
        ip_end,
        key_of(src),
        key_of(IpAddr::V4(ip.destination_addr())),
    );
    let fragment = ip.more_fragments() || ip.fragments_offset().value() != 0;
    Parsed::Ip {
        src,
        transport,
        fragment,
    }
}

fn ipv6(packet: &[u8]) -> Parsed {
    // Checks exactly: 40 bytes present, version 6; the payload length field is not looked at.
    let Ok(ip) = Ipv6HeaderSlice::from_slice(packet) else {
        return Parsed::Malformed;
    };
    let (mut transport, l4, fragment) = ipv6_transport(ip.next_header().0, &packet[ip.slice().len()..]);
    let (src, dst) = (
        fold_v4_mapped(ip.source_addr()),
        fold_v4_mapped(ip.destination_addr()),
    );
    let ip_end = (40 + ip.payload_length() as usize).min(packet.len());
    with_tcp_flow(&mut transport, packet, 40 + l4, ip_end, key_of(src), key_of(dst));
    Parsed::Ip {
        src,
        transport,
        fragment,
    }
}

fn is_ipv6_ext(proto: u8) -> bool {
    let p = IpNumber(proto);
    p == IpNumber::IPV6_HEADER_HOP_BY_HOP
        || p == IpNumber::IPV6_ROUTE_HEADER
        || p == IpNumber::IPV6_DESTINATION_OPTIONS
        || p == IpNumber::IPV6_FRAGMENTATION_HEADER
        || p == IpNumber::AUTHENTICATION_HEADER
}

/// Follows the extension headers after the fixed IPv6 header (`rest` starts right after it).
///
/// A header is followed once the fields that lead on are in the frame — next header and length (2 bytes), for
/// the fragment header also its offset (4 bytes) — whether or not the rest of it is: what would come after a
/// cut-off header lies past the end of the frame, so only the protocol it names is learnt. etherparse's
/// extension-header slices demand the whole header and so would lose that protocol.
///
/// Also returns where the transport header starts in `rest` and whether a fragment header that is not atomic
/// was walked (the ninth and later extension headers are not: the transport is unknown then anyway).
fn ipv6_transport(first: u8, rest: &[u8]) -> (Transport, usize, bool) {
    let mut fragment = false;
    let unknown = |fragment| (Transport::NoPorts { proto: None }, 0, fragment);
    let mut next = first;
    let mut at = 0usize;
    let mut followed = 0;
    while is_ipv6_ext(next) {
        if followed == MAX_IPV6_EXT_HEADERS {
            return unknown(fragment);
        }
        followed += 1;
        let field = |i: usize| rest.get(at + i).copied();
        let (Some(next_header), Some(len)) = (field(0), field(1)) else {
            return unknown(fragment);
        };
        let header_len = match IpNumber(next) {
            IpNumber::AUTHENTICATION_HEADER => (len as usize + 2) * 4,
            IpNumber::IPV6_FRAGMENTATION_HEADER => {
                let (Some(hi), Some(lo)) = (field(2), field(3)) else {
                    return unknown(fragment);
                };
                fragment |= u16::from_be_bytes([hi, lo]) & 0xfff9 != 0;
                if u16::from_be_bytes([hi, lo]) >> 3 != 0 {
                    // A non-first fragment: what follows its fragment header is the middle of the original
                    // payload, whatever it looks like. The protocol is the one the fragment header names,
                    // unless that is another extension header (of the fragmentable part): then unknown.
                    let transport = Transport::NoPorts {
                        proto: (!is_ipv6_ext(next_header)).then_some(next_header),
                    };
                    return (transport, 0, fragment);
                }
                8
            }
            _ => (len as usize + 1) * 8,
        };
        next = next_header;
        at += header_len;
    }
    (transport(next, rest.get(at..).unwrap_or(&[])), at, fragment)
}

/// The transport of a first (or unfragmented) packet whose transport header, of protocol `proto`, starts `l4`.
fn transport(proto: u8, l4: &[u8]) -> Transport {
    let no_ports = Transport::NoPorts { proto: Some(proto) };
    match proto {
        TCP => {
            let Some(ports) = l4.get(..4) else {
                return no_ports;
            };
            let new_connection = match l4.get(13) {
                Some(flags) => flags & 0x02 != 0 && flags & 0x10 == 0,
                None => true,
            };
            let tcp = (l4.len() >= 20).then(|| Tcp {
                flags: l4[13],
                seq: u32::from_be_bytes([l4[4], l4[5], l4[6], l4[7]]),
                ack: u32::from_be_bytes([l4[8], l4[9], l4[10], l4[11]]),
                payload_len: 0,
                payload_hash: 0,
                checksum_ok: false,
                flow: (0, 0, u16::from_be_bytes([ports[0], ports[1]]), 0),
                syn_key: None,
            });
            Transport::Ports {
                dst_port: u16::from_be_bytes([ports[2], ports[3]]),
                is_tcp: true,
                new_connection,
                tcp,
            }
        }
        // Ports only from a complete UDP header.
        UDP => match l4.get(..8) {
            Some(udp) => Transport::Ports {
                dst_port: u16::from_be_bytes([udp[2], udp[3]]),
                is_tcp: false,
                new_connection: false,
                tcp: None,
            },
            None => no_ports,
        },
        _ => no_ports,
    }
}

/// Completes a whole TCP header's flow (addresses, destination port), its payload and checksum, and for a
/// SYN its signature key. The TCP header starts at `l4` of `ip_packet`, the IP packet (by its length field,
/// cut to the frame) ends at `ip_end`.
fn with_tcp_flow(
    transport: &mut Transport,
    ip_packet: &[u8],
    l4: usize,
    ip_end: usize,
    src: u128,
    dst: u128,
) {
    if let Transport::Ports {
        dst_port,
        tcp: Some(tcp),
        ..
    } = transport
    {
        tcp.flow = (src, dst, tcp.flow.2, *dst_port);
        if tcp.flags & 0x12 == 0x02 {
            tcp.syn_key = parse_ip_tcp(ip_packet).ok().map(|t| t.signature.key());
        }
        let segment = ip_packet.get(l4..ip_end.max(l4)).unwrap_or(&[]);
        tcp.checksum_ok = segment.len() >= 20 && tcp_checksum_ok(src, dst, segment);
        let data_offset = ((ip_packet[l4 + 12] >> 4) as usize * 4).max(20);
        let payload = ip_packet.get(l4 + data_offset..ip_end).unwrap_or(&[]);
        tcp.payload_len = payload.len() as u32;
        tcp.payload_hash = fnv1a(payload);
    }
}

/// RFC 1071 over the pseudo-header (both 16-byte keys: an IPv4-mapped key's extra words do not change a
/// ones'-complement sum) and the segment; right when the sum folds to 0xffff.
fn tcp_checksum_ok(src: u128, dst: u128, segment: &[u8]) -> bool {
    let mut sum: u64 = 0;
    for addr in [src, dst] {
        for word in addr.to_be_bytes().chunks(2) {
            sum += u16::from_be_bytes([word[0], word[1]]) as u64;
        }
    }
    sum += TCP as u64 + segment.len() as u64;
    for word in segment.chunks(2) {
        sum += u16::from_be_bytes([word[0], *word.get(1).unwrap_or(&0)]) as u64;
    }
    while sum > 0xffff {
        sum = (sum & 0xffff) + (sum >> 16);
    }
    sum == 0xffff
}

/// FNV-1a, 64-bit.
pub fn fnv1a(bytes: &[u8]) -> u64 {
    bytes.iter().fold(0xcbf2_9ce4_8422_2325, |h, &b| {
        (h ^ b as u64).wrapping_mul(0x0000_0100_0000_01b3)
    })
}

/// `::ffff:a.b.c.d` is `a.b.c.d` (one key space, see the module docs).
fn fold_v4_mapped(addr: Ipv6Addr) -> IpAddr {
    match addr.to_ipv4_mapped() {
        Some(v4) => IpAddr::V4(v4),
        None => IpAddr::V6(addr),
    }
}

/// An address or prefix in the one 128-bit key space: (bits, prefix length).
fn key_space(net: IpNet) -> (u128, u32) {
    match net {
        IpNet::V4(n) => (
            u128::from(n.network().to_ipv6_mapped()),
            96 + n.prefix_len() as u32,
        ),
        IpNet::V6(n) => (u128::from(n.network()), n.prefix_len() as u32),
    }
}

fn key_of(addr: IpAddr) -> u128 {
    match addr {
        IpAddr::V4(a) => u128::from(a.to_ipv6_mapped()),
        IpAddr::V6(a) => u128::from(a),
    }
}

fn net_contains(net: IpNet, addr: IpAddr) -> bool {
    let (bits, len) = key_space(net);
    let mask = if len == 0 { 0 } else { u128::MAX << (128 - len) };
    key_of(addr) & mask == bits
}

/// Whether `net` is a single address.
fn is_host(net: IpNet) -> bool {
    net.prefix_len() == net.max_prefix_len()
}

/// The allowlist or the denylist.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ListKind {
    Allow,
    Deny,
}

/// A list hit: on the exact address, or on a prefix containing it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum ListHit {
    Exact,
    Prefix,
}

/// A decision as the model stores it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct RefDecision {
    /// An [`Action`] value; anything else is a decision that does nothing (but still wins over a less specific
    /// one, because it exists).
    pub action: u8,
    pub rate_class: u8,
    pub expires_ns: u64,
}

/// The whole state the verdict depends on, and the verdict.
#[derive(Clone, Debug)]
pub struct Reference {
    now: u64,
    /// The management networks (never expire): passed ahead of every rule.
    management: Vec<IpNet>,
    /// `(net, expires_ns)`; single addresses are /32 or /128 entries. One entry per net.
    allow: Vec<(IpNet, u64)>,
    deny: Vec<(IpNet, u64)>,
    /// Keyed by a single address or a /24 (IPv4) or /64 (IPv6).
    decisions: Vec<(IpNet, RefDecision)>,
    rate_classes: Vec<RateClass>,
    protected_ports: Vec<u16>,
    buckets: HashMap<IpAddr, Bucket>,
    /// Shared buckets of prefixes throttled at prefix scope, by /24 or /64.
    prefix_buckets: HashMap<IpNet, Bucket>,
    /// Buckets of addresses throttled by an exact decision (`EXACT_BUCKETS`).
    exact_buckets: HashMap<IpAddr, Bucket>,
    /// Verdicts by SYN signature key.
    syn_verdicts: HashMap<u64, RefDecision>,
    /// SYNs that passed, their handshake not complete (`HALF_OPEN`).
    half_open: HashMap<FlowKey, HalfOpenRef>,
    /// Verified flows (`FLOWS`).
    flows: HashMap<FlowKey, FlowRef>,
    /// `CONFIG_FLAG_PASS_TCP_FRAGMENTS`.
    pass_tcp_fragments: bool,
    /// ClientHello records the reference can key (the kernel key of a whole one-segment ClientHello), by the
    /// payload's [`fnv1a`]. Any other payload is not a keyable ClientHello.
    hello_keys: HashMap<u64, u64>,
}

/// A flow: source, destination (IPv4-mapped in the one key space), source and destination port.
pub type FlowKey = (u128, u128, u16, u16);

/// A `HALF_OPEN` entry as the reference keeps it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
struct HalfOpenRef {
    client_isn: u32,
    /// Learnt from the server's SYN-ACK (`aqd_egress`).
    server_isn: Option<u32>,
    /// The SYN verdict's throttle: (action, rate class), or (0, 0).
    verdict: (u8, u8),
}

/// A `FLOWS` entry: what the verdicts and the flow rules depend on.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct FlowRef {
    pub action: u8,
    pub rate_class: u8,
    pub isn: u32,
    pub next_seq: u32,
    pub fin_seen: bool,
    pub hello_seen: bool,
    pub hello_key: u64,
    pub suspect: bool,
}

/// Whose bucket a limit charges: the source's own, its exact throttle decision's, or its prefix's (a throttle
/// decision on the /24 or /64).
#[derive(Clone, Copy)]
enum LimitKey {
    Source(IpAddr),
    Exact(IpAddr),
    Prefix(IpNet),
}

impl LimitKey {
    /// A throttle decision's budget (not the source's own).
    fn is_decision(self) -> bool {
        !matches!(self, LimitKey::Source(_))
    }
}

fn live(expires_ns: u64, now: u64) -> bool {
    expires_ns == 0 || expires_ns > now
}

impl Reference {
    pub fn new(now_ns: u64) -> Self {
        Self {
            now: now_ns,
            management: Vec::new(),
            allow: Vec::new(),
            deny: Vec::new(),
            decisions: Vec::new(),
            rate_classes: vec![RateClass::UNLIMITED; capacity::RATE_CLASSES as usize],
            protected_ports: Vec::new(),
            buckets: HashMap::new(),
            prefix_buckets: HashMap::new(),
            exact_buckets: HashMap::new(),
            syn_verdicts: HashMap::new(),
            half_open: HashMap::new(),
            flows: HashMap::new(),
            pass_tcp_fragments: false,
            hello_keys: HashMap::new(),
        }
    }

    pub fn set_now(&mut self, now_ns: u64) {
        self.now = now_ns;
    }

    pub fn now(&self) -> u64 {
        self.now
    }

    /// Replaces the management networks (what `KernelMaps::management_sync` does to the kernel).
    pub fn management_sync(&mut self, nets: &[IpNet]) {
        self.management = nets.iter().map(IpNet::trunc).collect();
    }

    fn list_mut(&mut self, list: ListKind) -> &mut Vec<(IpNet, u64)> {
        match list {
            ListKind::Allow => &mut self.allow,
            ListKind::Deny => &mut self.deny,
        }
    }

    /// Adds or replaces `net` (host bits must be clear) with an absolute expiry (0 = never).
    pub fn list_put(&mut self, list: ListKind, net: IpNet, expires_ns: u64) {
        assert_eq!(net, net.trunc(), "list entries have no host bits");
        let entries = self.list_mut(list);
        match entries.iter_mut().find(|(n, _)| *n == net) {
            Some(entry) => entry.1 = expires_ns,
            None => entries.push((net, expires_ns)),
        }
    }

    pub fn list_remove(&mut self, list: ListKind, net: IpNet) {
        self.list_mut(list).retain(|(n, _)| *n != net);
    }

    /// Adds or replaces the decision on a single address or on a /24 (IPv4) or /64 (IPv6).
    pub fn decision_put(&mut self, net: IpNet, decision: RefDecision) {
        assert_eq!(net, net.trunc(), "decision scopes have no host bits");
        let scope_ok = is_host(net)
            || matches!(net, IpNet::V4(n) if n.prefix_len() == 24)
            || matches!(net, IpNet::V6(n) if n.prefix_len() == 64);
        assert!(scope_ok, "{net} is not a decision scope");
        match self.decisions.iter_mut().find(|(n, _)| *n == net) {
            Some(entry) => entry.1 = decision,
            None => self.decisions.push((net, decision)),
        }
    }

    pub fn decision_remove(&mut self, net: IpNet) {
        self.decisions.retain(|(n, _)| *n != net);
    }

    pub fn set_rate_class(&mut self, class: u32, limits: RateClass) {
        self.rate_classes[class as usize] = limits;
    }

    pub fn set_protected_ports(&mut self, ports: &[u16]) {
        self.protected_ports = ports.to_vec();
    }

    /// Adds or replaces the verdict for a SYN signature key.
    pub fn syn_verdict_put(&mut self, key: u64, decision: RefDecision) {
        self.syn_verdicts.insert(key, decision);
    }

    /// Flows being tracked.
    pub fn flow_count(&self) -> usize {
        self.flows.len()
    }

    /// Half-open entries.
    pub fn half_open_count(&self) -> usize {
        self.half_open.len()
    }

    /// The verified flow `flow`, if tracked.
    pub fn flow(&self, flow: FlowKey) -> Option<FlowRef> {
        self.flows.get(&flow).copied()
    }

    /// Passes TCP fragments to protected ports (`CONFIG_FLAG_PASS_TCP_FRAGMENTS`) or drops them.
    pub fn set_pass_tcp_fragments(&mut self, pass: bool) {
        self.pass_tcp_fragments = pass;
    }

    /// A ClientHello record (the whole payload of a segment) and its kernel key.
    pub fn know_client_hello(&mut self, record: &[u8], key: u64) {
        self.hello_keys.insert(fnv1a(record), key);
    }

    /// `aqd_egress` seeing `frame` leave: a server's SYN-ACK from a protected port records the server's ISN
    /// (and the client ISN it acknowledges) in the half-open entry, making one if there is none.
    pub fn egress(&mut self, frame: &[u8]) {
        let be16 = |at: usize| frame.get(at..at + 2).map(|b| u16::from_be_bytes([b[0], b[1]]));
        let Some(mut ether_type) = be16(12) else {
            return;
        };
        let mut l3 = 14;
        if ether_type == 0x8100 {
            let Some(inner) = be16(16) else {
                return;
            };
            ether_type = inner;
            l3 += 4;
        }
        let (server, client, l4) = match ether_type {
            0x0800 => {
                let Some(ip) = frame.get(l3..l3 + 20) else {
                    return;
                };
                let fragment = u16::from_be_bytes([ip[6], ip[7]]) & 0x3fff;
                if ip[0] >> 4 != 4 || ip[9] != TCP || fragment != 0 {
                    return;
                }
                let v4 = |o: usize| {
                    u128::from(
                        std::net::Ipv4Addr::new(ip[o], ip[o + 1], ip[o + 2], ip[o + 3]).to_ipv6_mapped(),
                    )
                };
                (v4(12), v4(16), l3 + (ip[0] & 0x0f) as usize * 4)
            }
            0x86DD => {
                let Some(ip) = frame.get(l3..l3 + 40) else {
                    return;
                };
                if ip[6] != TCP {
                    return;
                }
                let v6 = |o: usize| u128::from_be_bytes(ip[o..o + 16].try_into().expect("16 bytes"));
                (v6(8), v6(24), l3 + 40)
            }
            _ => return,
        };
        if l4 > 128 {
            return;
        }
        let Some(tcp) = frame.get(l4..l4 + 14) else {
            return;
        };
        if tcp[13] & 0x12 != 0x12 {
            return;
        }
        let server_port = u16::from_be_bytes([tcp[0], tcp[1]]);
        if !self.protected_ports.contains(&server_port) {
            return;
        }
        let key = (client, server, u16::from_be_bytes([tcp[2], tcp[3]]), server_port);
        let seq = u32::from_be_bytes([tcp[4], tcp[5], tcp[6], tcp[7]]);
        let ack = u32::from_be_bytes([tcp[8], tcp[9], tcp[10], tcp[11]]);
        let entry = self.half_open.entry(key).or_insert(HalfOpenRef {
            client_isn: 0,
            server_isn: None,
            verdict: (0, 0),
        });
        entry.client_isn = ack.wrapping_sub(1);
        entry.server_isn = Some(seq);
    }

    /// The reason the program must give for `frame` at the current time; updates the limiter state.
    pub fn classify(&mut self, frame: &[u8]) -> Reason {
        let (src, transport, fragment) = match parse(frame) {
            Parsed::NotIp => return Reason::PassNotIp,
            Parsed::Malformed => return Reason::PassMalformed,
            Parsed::Ip {
                src,
                transport,
                fragment,
            } => (src, transport, fragment),
        };
        if self.management.iter().any(|&m| net_contains(m, src)) {
            return Reason::PassManagement;
        }
        match self.list_hit(ListKind::Allow, src) {
            Some(ListHit::Exact) => return Reason::PassAllowExact,
            Some(ListHit::Prefix) => return Reason::PassAllowPrefix,
            None => {}
        }
        match self.list_hit(ListKind::Deny, src) {
            Some(ListHit::Exact) => return Reason::DropDenyExact,
            Some(ListHit::Prefix) => return Reason::DropDenyPrefix,
            None => {}
        }

        // The most specific live decision: the address itself, else its /24 or /64.
        let host = IpNet::from(src);
        let scope = match src {
            IpAddr::V4(_) => IpNet::new(src, 24),
            IpAddr::V6(_) => IpNet::new(src, 64),
        }
        .expect("valid scope length")
        .trunc();
        let (decision, exact) = match self.live_decision(host) {
            Some(d) => (Some(d), true),
            None => (self.live_decision(scope), false),
        };
        let (class, pass_reason) = match decision.map(|d| (Action::from_u8(d.action), d.rate_class)) {
            Some((Some(Action::Block), _)) if exact => return Reason::DropBlockExact,
            Some((Some(Action::Block), _)) => return Reason::DropBlockPrefix,
            Some((Some(Action::Throttle), class)) => (class as usize, Reason::PassThrottled),
            Some((Some(Action::Monitor), _)) => (0, Reason::PassMonitor),
            Some((None, _)) | None => (0, Reason::PassDefault),
        };
        // A throttle on the /24 or /64 is one budget for the whole prefix; one on the address its own.
        let limit_key = match decision.map(|d| Action::from_u8(d.action)) {
            Some(Some(Action::Throttle)) if !exact => LimitKey::Prefix(scope),
            Some(Some(Action::Throttle)) => LimitKey::Exact(src),
            _ => LimitKey::Source(src),
        };

        // Limits, by the source's class (0 unless throttled), for the traffic they apply to.
        if !transport.limited(&self.protected_ports) {
            return pass_reason;
        }
        // No honest TLS client fragments TCP at the IP layer (unless configured to pass them).
        let is_tcp = matches!(
            transport,
            Transport::Ports { is_tcp: true, .. } | Transport::NoPorts { proto: Some(TCP) }
        );
        if fragment && is_tcp && !self.pass_tcp_fragments {
            return Reason::DropTcpFragment;
        }
        if let Transport::Ports { tcp: Some(tcp), .. } = transport {
            return self.tcp(limit_key, tcp, class, pass_reason);
        }
        self.limit(limit_key, class, transport.new_connection())
            .unwrap_or(pass_reason)
    }

    /// The limits of `class` (none for a class past the table).
    fn limit(&mut self, key: LimitKey, class: usize, new_connection: bool) -> Option<Reason> {
        let limits = self.rate_classes.get(class).copied()?;
        self.rate_limit(key, limits, new_connection)
    }

    /// The TCP program: SYN-signature verdicts, flows and the limits.
    fn tcp(&mut self, src: LimitKey, tcp: Tcp, class: usize, pass: Reason) -> Reason {
        let throttled = |r: Reason| match r {
            Reason::PassDefault | Reason::PassMonitor => Reason::PassThrottled,
            other => other,
        };
        let mut class = class;
        let mut reason = pass;
        if tcp.flags & 0x12 == 0x02 {
            let verdict = tcp
                .syn_key
                .and_then(|k| self.syn_verdicts.get(&k).copied())
                .filter(|d| live(d.expires_ns, self.now));
            let mut throttle = false;
            if let Some(d) = verdict {
                match Action::from_u8(d.action) {
                    Some(Action::Block) => reason = Reason::DropSynFingerprint,
                    Some(Action::Throttle) => {
                        if class == 0 {
                            class = d.rate_class as usize;
                        }
                        reason = throttled(reason);
                        throttle = true;
                    }
                    Some(Action::Monitor) if reason == Reason::PassDefault => reason = Reason::PassMonitor,
                    _ => {}
                }
            }
            if reason.verdict() == detector_common::Verdict::Pass
                && let Some(drop) = self.limit(src, class, true)
            {
                reason = drop;
            }
            if reason.verdict() == detector_common::Verdict::Pass {
                // A SYN only makes a half-open entry, and never replaces one (nor touches FLOWS).
                let verdict = if throttle {
                    (Action::Throttle as u8, class as u8)
                } else {
                    (0, 0)
                };
                self.half_open.entry(tcp.flow).or_insert(HalfOpenRef {
                    client_isn: tcp.seq,
                    server_isn: None,
                    verdict,
                });
            }
            return reason;
        }
        // The ACK that completes a handshake: the SYN's ISN + 1, acknowledging the server's ISN (learnt by
        // egress), ACK without RST, and a valid checksum; a bad checksum with the right numbers is counted as
        // such before any limit.
        if !self.flows.contains_key(&tcp.flow)
            && let Some(h) = self.half_open.get(&tcp.flow).copied()
            && tcp.flags & 0x14 == 0x10
            && tcp.seq == h.client_isn.wrapping_add(1)
            && h.server_isn.is_some_and(|isn| tcp.ack == isn.wrapping_add(1))
        {
            if !tcp.checksum_ok {
                return anomaly(pass, Reason::PassBadChecksum);
            }
            self.half_open.remove(&tcp.flow);
            self.flows.insert(
                tcp.flow,
                FlowRef {
                    action: h.verdict.0,
                    rate_class: h.verdict.1,
                    isn: h.client_isn,
                    next_seq: tcp.seq,
                    fin_seen: false,
                    hello_seen: false,
                    hello_key: 0,
                    suspect: false,
                },
            );
        }
        let Some(mut f) = self.flows.get(&tcp.flow).copied() else {
            // No verified flow: dropped under a throttle decision (nothing anyone can forge spends its
            // budget); else the limits, nothing recorded (a ClientHello verdict is not modelled).
            if src.is_decision() {
                return Reason::DropUnverifiedThrottled;
            }
            return self.limit(src, class, false).unwrap_or(pass);
        };
        match Action::from_u8(f.action) {
            Some(Action::Block) => return Reason::DropFlowFingerprint,
            Some(Action::Throttle) => {
                if class == 0 {
                    class = f.rate_class as usize;
                }
                reason = throttled(reason);
            }
            _ => {}
        }
        if let Some(drop) = self.limit(src, class, false) {
            return drop;
        }
        let reason = self.track_flow(&mut f, tcp, reason);
        if let Some(entry) = self.flows.get_mut(&tcp.flow) {
            *entry = f;
        }
        reason
    }

    /// The flow rules of a verified flow (`track_flow`): checksum, sequence numbers, FIN/RST, the ClientHello
    /// at stream offset 0. Removes the flow on an accepted RST; the caller stores `f` back otherwise.
    fn track_flow(&mut self, f: &mut FlowRef, tcp: Tcp, reason: Reason) -> Reason {
        let closes = tcp.flags & 0x05 != 0;
        let rst = tcp.flags & 0x04 != 0;
        if !tcp.checksum_ok {
            return anomaly(reason, Reason::PassBadChecksum);
        }
        let rel = tcp.seq.wrapping_sub(f.next_seq) as i32;
        if closes && rel != 0 {
            return anomaly(reason, Reason::PassCloseIgnored);
        }
        if f.fin_seen {
            if rst {
                self.flows.remove(&tcp.flow);
            }
            return reason;
        }
        let len = tcp.payload_len as i64;
        if len > 0 && rel <= 0 && rel as i64 + len > 0 {
            f.next_seq = f.next_seq.wrapping_add((rel as i64 + len) as u32);
        }
        if closes {
            if rst {
                self.flows.remove(&tcp.flow);
                return reason;
            }
            f.next_seq = f.next_seq.wrapping_add(1);
            f.fin_seen = true;
        }
        if len > 0 && tcp.seq.wrapping_sub(f.isn).wrapping_sub(1) == 0 {
            // `aqd_hello`: the first segment at offset 0 sets the key; another one that disagrees (keyed or
            // not, or another key) marks the flow suspect.
            let key = self.hello_keys.get(&tcp.payload_hash).copied();
            if !f.hello_seen {
                f.hello_seen = true;
                if let Some(k) = key {
                    f.hello_key = k;
                }
            } else {
                let was_keyed = f.hello_key != 0;
                if was_keyed != key.is_some() || key.is_some_and(|k| k != f.hello_key) {
                    f.suspect = true;
                }
            }
        }
        reason
    }

    fn list_hit(&self, list: ListKind, src: IpAddr) -> Option<ListHit> {
        let entries = match list {
            ListKind::Allow => &self.allow,
            ListKind::Deny => &self.deny,
        };
        let live_exact = entries
            .iter()
            .any(|&(net, expires_ns)| is_host(net) && net_contains(net, src) && live(expires_ns, self.now));
        if live_exact {
            return Some(ListHit::Exact);
        }
        // The covering prefixes, longest first; the first live one among the first few decides.
        let mut covering: Vec<(u32, u64)> = entries
            .iter()
            .filter(|&&(net, _)| !is_host(net) && net_contains(net, src))
            .map(|&(net, expires_ns)| (key_space(net).1, expires_ns))
            .collect();
        covering.sort_unstable_by_key(|&(len, _)| std::cmp::Reverse(len));
        covering
            .iter()
            .take(MAX_EXPIRED_PREFIX_STEPS)
            .any(|&(_, expires_ns)| live(expires_ns, self.now))
            .then_some(ListHit::Prefix)
    }

    fn live_decision(&self, net: IpNet) -> Option<RefDecision> {
        self.decisions
            .iter()
            .find(|(n, d)| *n == net && live(d.expires_ns, self.now))
            .map(|(_, d)| *d)
    }

    /// GCRA on the source's state; the drop reason when over a limit. The state moves only when the packet
    /// conforms to every limit that applies.
    fn rate_limit(&mut self, key: LimitKey, limits: RateClass, new_connection: bool) -> Option<Reason> {
        let limit_conns = new_connection && limits.conn_interval_ns != 0;
        // A decision's SYN answers to the connection limit alone when there is one.
        let limit_packets = limits.packet_interval_ns != 0 && !(key.is_decision() && limit_conns);
        if !limit_packets && !limit_conns {
            return None;
        }
        let now = self.now;
        let fresh = Bucket {
            packet_tat_ns: now,
            conn_tat_ns: now,
        };
        let bucket = match key {
            LimitKey::Source(src) => self.buckets.entry(src).or_insert(fresh),
            LimitKey::Exact(src) => self.exact_buckets.entry(src).or_insert(fresh),
            LimitKey::Prefix(net) => self.prefix_buckets.entry(net).or_insert(fresh),
        };
        let mut next = *bucket;
        if limit_packets {
            match gcra_step(
                bucket.packet_tat_ns,
                now,
                limits.packet_interval_ns,
                limits.packet_tolerance_ns,
            ) {
                Some(tat) => next.packet_tat_ns = tat,
                None => return Some(Reason::DropRatePackets),
            }
        }
        if limit_conns {
            match gcra_step(
                bucket.conn_tat_ns,
                now,
                limits.conn_interval_ns,
                limits.conn_tolerance_ns,
            ) {
                Some(tat) => next.conn_tat_ns = tat,
                None => return Some(Reason::DropRateConnections),
            }
        }
        *bucket = next;
        None
    }
}

impl Reference {
    /// The limiter state of `src`, if a limit ever applied to it.
    pub fn bucket(&self, src: IpAddr) -> Option<Bucket> {
        self.buckets.get(&src).copied()
    }

    /// The limiter state of `src` under an exact throttle decision, if one ever limited it.
    pub fn exact_bucket(&self, src: IpAddr) -> Option<Bucket> {
        self.exact_buckets.get(&src).copied()
    }

    /// The shared limiter state of `src`'s /24 or /64, if a prefix throttle ever limited it.
    pub fn prefix_bucket(&self, src: IpAddr) -> Option<Bucket> {
        let len = if src.is_ipv4() { 24 } else { 64 };
        let scope = IpNet::new(src, len).expect("valid scope length").trunc();
        self.prefix_buckets.get(&scope).copied()
    }

    /// The state that bears on `src`'s verdict (matching list entries, decisions, limiter), for mismatch reports.
    pub fn rules_for(&self, src: IpAddr) -> String {
        let src = match src {
            IpAddr::V6(a) => fold_v4_mapped(a),
            v4 => v4,
        };
        let state = |expires_ns: u64| {
            let liveness = if live(expires_ns, self.now) {
                "live"
            } else {
                "expired"
            };
            format!("expires {expires_ns} ({liveness})")
        };
        let mut out = Vec::new();
        for (name, entries) in [("allow", &self.allow), ("deny", &self.deny)] {
            for &(net, expires_ns) in entries.iter().filter(|(net, _)| net_contains(*net, src)) {
                out.push(format!("  {name} {net}: {}", state(expires_ns)));
            }
        }
        for (net, d) in self.decisions.iter().filter(|(net, _)| net_contains(*net, src)) {
            out.push(format!(
                "  decision {net}: action {} class {}, {}",
                d.action,
                d.rate_class,
                state(d.expires_ns)
            ));
        }
        if let Some(b) = self.buckets.get(&src) {
            out.push(format!(
                "  bucket: packet TAT {} conn TAT {}",
                b.packet_tat_ns, b.conn_tat_ns
            ));
        }
        if let Some(b) = self.exact_buckets.get(&src) {
            out.push(format!(
                "  exact decision bucket: packet TAT {} conn TAT {}",
                b.packet_tat_ns, b.conn_tat_ns
            ));
        }
        if out.is_empty() {
            out.push("  (no entries, no bucket)".into());
        }
        out.join("\n")
    }
}

/// A packet that changes nothing because of what it is (bad checksum, ignored close) counts as that anomaly
/// instead of a pass.
fn anomaly(pass: Reason, anomaly: Reason) -> Reason {
    if pass.verdict() == detector_common::Verdict::Pass {
        anomaly
    } else {
        pass
    }
}

/// One GCRA step: the new theoretical arrival time if a packet at `now` conforms, `None` if it is too early.
fn gcra_step(tat: u64, now: u64, interval: u64, tolerance: u64) -> Option<u64> {
    let tat = tat.max(now);
    (tat - now <= tolerance).then_some(tat + interval)
}

/// A one-line account of a parse, for mismatch reports.
pub fn describe(parsed: &Parsed) -> String {
    match *parsed {
        Parsed::NotIp => "not IP".into(),
        Parsed::Malformed => "malformed".into(),
        Parsed::Ip {
            src,
            transport: Transport::NoPorts { proto: None },
            ..
        } => format!("src {src}, no ports, transport unknown"),
        Parsed::Ip {
            src,
            transport: Transport::NoPorts { proto: Some(p) },
            ..
        } => format!("src {src}, no ports, protocol {p}"),
        Parsed::Ip {
            src,
            transport:
                Transport::Ports {
                    dst_port,
                    new_connection,
                    tcp,
                    ..
                },
            fragment,
        } => format!(
            "src {src}, dst port {dst_port}{}{}{}",
            if new_connection { ", new connection" } else { "" },
            if fragment { ", fragment" } else { "" },
            match tcp {
                Some(t) => format!(
                    ", TCP flags {:#04x}, seq {} ack {}, {} payload bytes, checksum {}, SYN key {:?}",
                    t.flags,
                    t.seq,
                    t.ack,
                    t.payload_len,
                    if t.checksum_ok { "ok" } else { "bad" },
                    t.syn_key
                ),
                None => String::new(),
            }
        ),
    }
}
