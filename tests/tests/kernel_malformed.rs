//! Malformed, truncated, tiny, huge and random frames through the real XDP program (`BPF_PROG_TEST_RUN`).
//!
//! The contract under test (parse.rs, main.rs):
//! - the program never returns `XDP_ABORTED`; every frame moves exactly one reason counter, by one (the harness's
//!   `classify` checks that);
//! - a frame whose IP header cannot be read or is invalid (version, IHL < 5, options past the end) is
//!   `PassMalformed`; a frame with a valid IP header gets the address rules whatever follows it (a denied source
//!   is dropped);
//! - TCP ports are read as soon as the first 4 bytes of the TCP header are there (no 20-byte minimum, the data
//!   offset is not looked at); the flags byte (offset 13) when it is there too, otherwise the segment counts as a
//!   SYN, a new connection. UDP ports need the whole 8-byte header. A non-first fragment has no ports;
//! - IPv6: up to [`MAX_IPV6_EXT_HEADERS`] (8) extension headers are followed and the header after the 8th is
//!   still recognised. A longer chain — or an extension header whose first bytes (2; 4 of a fragment header)
//!   cannot be read — leaves the protocol unknown (0) and the packet without ports. A non-first fragment header
//!   ends the walk (what follows is payload): the protocol is the one it names, unknown when that is another
//!   extension header or the fragment header is the 9th;
//! - no read starts past byte [`PARSE_BOUND`] (2048) of the frame (`MAX_OFFSET` in parse.rs): a header starting
//!   there is as absent as one past the end of the frame;
//! - a packet with ports reaches the limiter when its destination port is protected; a packet without ports
//!   when its protocol is TCP, UDP or unknown (non-first fragments, over-long or cut-off extension chains,
//!   TCP headers of < 4 bytes, UDP headers of < 8 bytes, transport headers past the parse bound), so that none
//!   of these is a way around the limits. ICMP and other protocols without ports never reach it.
//!
//! Limits of `BPF_PROG_TEST_RUN` for this (non-frags) XDP program, measured on the 6.18 kernel here and pinned by
//! [`test_run_refuses_frames_shorter_than_the_ethernet_header`] and [`jumbo_frames_up_to_the_test_run_limit`]:
//! - frames shorter than `ETH_HLEN` (14 bytes) are refused with `EINVAL` before the program runs, so frames of
//!   0..=13 bytes cannot be tested here (the parser treats them as not IP: the Ethernet type is unreadable);
//! - the linear part of the test frame is at most 4096 − 256 (`XDP_PACKET_HEADROOM`) − 320 (aligned
//!   `skb_shared_info`) = 3520 bytes; longer frames are accepted anyway, the rest going to up to
//!   `MAX_SKB_FRAGS` (17) page fragments, so the largest accepted frame is 3520 + 17 × 4096 = 73152 bytes and
//!   73153 fails with `ENOMEM`. The program sees only the linear 3520 bytes (`data_end − data`).
//!
//! What reached the limiter is observed through the source's bucket: every rate class in use here allows
//! 1 packet/s and 1 new connection/s with bursts no test exhausts, so a packet that reaches the limiter moves its
//! source's packet TAT by one second — and its connection TAT too when it counts as a new connection (TCP, SYN
//! without ACK) — and still passes. See [`Limiter`].
//! Needs root.

use std::net::IpAddr;

use aqd_tests::{
    kernel::{KernelUnderTest, XDP_ABORTED},
    packet::{
        ETH_P_8021AD, ETH_P_8021Q, ETH_P_ARP, ETH_P_IPV4, ETH_P_IPV6, Frame, IPPROTO_ICMPV6, IPPROTO_TCP,
        IPPROTO_UDP, Ipv6Ext, Transport, ethernet, ipv4_checksum, ipv4_nop_options,
    },
};
use detector_common::{Action, Origin, Reason};
use detector_user::maps::{List, rate_class_limits};
use rand::{Rng, SeedableRng, rngs::SmallRng};

const T0: u64 = 1_000_000_000_000;
/// The one protected port.
const PORT: u16 = 443;
/// A port that is not protected: a packet whose ports are read and go here is never limited.
const OTHER_PORT: u16 = 8080;
const V4_DST: &str = "198.51.100.1";
const V6_DST: &str = "2001:db8:ff::1";

/// Test sources: under a monitor decision (a decision applies; limits observable, never dropped), denied, and
/// one without rules. Not a throttle decision: its budget is kept apart from the source's bucket, and its TCP
/// packets of no verified flow are dropped (`limits::Budget` in the kernel; kernel_fixtures and the
/// differential test cover that), while this suite is about what the parser reads.
const V4_MONITORED: &str = "192.0.2.5";
const V4_DENIED: &str = "192.0.2.66";
const V4_PLAIN: &str = "192.0.2.1";
const V6_MONITORED: &str = "2001:db8::5";
const V6_DENIED: &str = "2001:db8::66";
const V6_PLAIN: &str = "2001:db8::1";

/// IPv6 extension headers the parser follows (`MAX_IPV6_EXT_HEADERS` in parse.rs).
const MAX_IPV6_EXT_HEADERS: usize = 8;
/// No read starts at a frame offset past this (`MAX_OFFSET` in parse.rs); a read starting at it may extend past it.
const PARSE_BOUND: usize = 2048;
const IPPROTO_ICMP: u8 = 1;
/// The protocol of a packet whose IPv6 extension chain was not followed to its end (`PROTO_UNKNOWN` in main.rs).
const PROTO_UNKNOWN: u8 = 0;

/// Loads the program with the rules every test here uses (see the module doc).
fn load() -> KernelUnderTest {
    let mut k = KernelUnderTest::load(T0).expect("loading the XDP program (kernel tests need root)");
    // This suite tests how fragments are parsed and limited; their default drop is tested in kernel_adversarial.
    k.pass_tcp_fragments().unwrap();
    k.maps.set_protected_ports(&[PORT]).unwrap();
    // Class 0 (everyone, the monitored sources too) and class 1 alike: see the module doc.
    for class in [0, 1] {
        k.maps
            .set_rate_class(class, rate_class_limits(1, 1_000_000, 1, 1_000_000))
            .unwrap();
    }
    for src in [V4_MONITORED, V6_MONITORED] {
        k.maps
            .decision_insert(ip(src).into(), Action::Monitor, 1, 0, Origin::Cli, None)
            .unwrap();
    }
    for src in [V4_DENIED, V6_DENIED] {
        k.maps.list_put(List::Deny, ip(src).into(), 0).unwrap();
    }
    k
}

fn ip(s: &str) -> IpAddr {
    s.parse().expect("valid address")
}

fn dst_for(src: &str) -> &'static str {
    if src.contains(':') { V6_DST } else { V4_DST }
}

/// Whether a parsed frame from `src` gets past the address rules of [`load`] (a denied source is dropped first).
fn passes_address_rules(src: &str) -> bool {
    parsed_reason(src) != Reason::DropDenyExact
}

/// `limiter`, or [`Limiter::Bypassed`] when `src` is dropped by an address rule before the limiter.
fn for_source(src: &str, limiter: Limiter) -> Limiter {
    if passes_address_rules(src) {
        limiter
    } else {
        Limiter::Bypassed
    }
}

/// The reason a parseable frame from `src` gets under [`load`]'s rules.
fn parsed_reason(src: &str) -> Reason {
    match src {
        V4_MONITORED | V6_MONITORED => Reason::PassMonitor,
        V4_DENIED | V6_DENIED => Reason::DropDenyExact,
        _ => Reason::PassDefault,
    }
}

fn tat(k: &KernelUnderTest, src: &str) -> Option<u64> {
    k.maps.bucket(ip(src)).map(|b| b.packet_tat_ns)
}

/// What the limiter made of one packet, as seen in its source's bucket.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Limiter {
    /// Not reached: not aimed at a protected port (see the module doc), or dropped by an address rule first.
    Bypassed,
    /// Counted as a packet.
    Packet,
    /// Counted as a packet and a new connection (TCP, SYN without ACK, or flags not readable).
    NewConnection,
}

/// What the parser got out of a frame with a valid IP header, as far as the limiter is concerned.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
struct L4 {
    /// The transport protocol, [`PROTO_UNKNOWN`] when an IPv6 extension chain was not followed to its end.
    proto: u8,
    /// The destination port, when the ports were read.
    dst_port: Option<u16>,
    /// TCP with ports: SYN without ACK, or the flags byte not readable.
    new_connection: bool,
}

impl L4 {
    fn without_ports(proto: u8) -> Self {
        Self {
            proto,
            dst_port: None,
            new_connection: false,
        }
    }
}

/// The outcome the contract gives a frame from `src` that parsed to `parsed` (`None`: IP header unreadable).
fn expected(src: &str, parsed: Option<L4>) -> (Reason, Limiter) {
    let Some(l4) = parsed else {
        return (Reason::PassMalformed, Limiter::Bypassed);
    };
    let protected = match l4.dst_port {
        Some(port) => port == PORT,
        None => matches!(l4.proto, IPPROTO_TCP | IPPROTO_UDP | PROTO_UNKNOWN),
    };
    let limiter = if !protected || !passes_address_rules(src) {
        Limiter::Bypassed
    } else if l4.proto == IPPROTO_TCP && l4.new_connection {
        Limiter::NewConnection
    } else {
        Limiter::Packet
    };
    (parsed_reason(src), limiter)
}

/// Whether the parser may read `size` bytes at frame offset `at` of a `len`-byte frame.
fn readable(at: usize, size: usize, len: usize) -> bool {
    at <= PARSE_BOUND && at + size <= len
}

/// What the parser reads from a transport header of protocol `proto` at frame offset `at` of a `len`-byte frame,
/// built with destination port `dst_port` and, for TCP, as a SYN without ACK or not (`syn`).
fn read_transport(proto: u8, at: usize, len: usize, dst_port: u16, syn: bool) -> L4 {
    let with_ports = |new_connection| L4 {
        proto,
        dst_port: Some(dst_port),
        new_connection,
    };
    match proto {
        IPPROTO_TCP if readable(at, 4, len) => with_ports(syn || !readable(at + 13, 1, len)),
        IPPROTO_UDP if readable(at, 8, len) => with_ports(false),
        _ => L4::without_ports(proto),
    }
}

/// Runs `frame`: never `XDP_ABORTED`, exactly one reason counter moved by one, the action is the reason's verdict.
#[track_caller]
fn classify(k: &mut KernelUnderTest, frame: &[u8]) -> Reason {
    let out = k
        .classify(frame)
        .unwrap_or_else(|e| panic!("{e:#} for {}", hex(frame)));
    assert_ne!(out.action, XDP_ABORTED, "XDP_ABORTED for {}", hex(frame));
    assert_eq!(
        out.action,
        out.reason.verdict().xdp_action(),
        "{:?} for {}",
        out.reason,
        hex(frame)
    );
    out.reason
}

/// Runs `frame` from `src`; the reason and what the limiter made of it.
#[track_caller]
fn classify_observed(k: &mut KernelUnderTest, frame: &[u8], src: &str) -> (Reason, Limiter) {
    let before = k.maps.bucket(ip(src));
    let reason = classify(k, frame);
    let after = k.maps.bucket(ip(src));
    let limiter = match after {
        Some(after) if before.map(|b| b.packet_tat_ns) != Some(after.packet_tat_ns) => {
            // A new source starts with both TATs at 0 ("any time before now": a full burst).
            let conn_before = before.map_or(0, |b| b.conn_tat_ns);
            if after.conn_tat_ns != conn_before {
                Limiter::NewConnection
            } else {
                Limiter::Packet
            }
        }
        _ => {
            assert_eq!(
                before,
                after,
                "the bucket changed without a packet: {}",
                hex(frame)
            );
            Limiter::Bypassed
        }
    };
    (reason, limiter)
}

fn hex(frame: &[u8]) -> String {
    let shown: String = frame.iter().take(96).map(|b| format!("{b:02x}")).collect();
    format!(
        "{}-byte frame {shown}{}",
        frame.len(),
        if frame.len() > 96 { "…" } else { "" }
    )
}

// ---------------------------------------------------------------------------------------------------------------
// Well-formed frames and their structure
// ---------------------------------------------------------------------------------------------------------------

/// A well-formed frame and where its headers are, so the parse of any prefix of it can be worked out.
struct Template {
    name: String,
    frame: Vec<u8>,
    /// Frames at least this long have a complete, valid IP header (options included): they are parsed.
    ip_end: usize,
    /// The IPv6 extension headers, in order.
    exts: Vec<ExtHeader>,
    /// The transport protocol and where its header starts.
    proto: u8,
    l4: usize,
    /// IPv4: the fragment offset is 0 (the transport header is in this packet).
    ipv4_first_fragment: bool,
    /// As built: the destination port and whether TCP is a SYN without ACK.
    dst_port: u16,
    syn: bool,
}

/// An IPv6 extension header of a template, as the parser reads it.
struct ExtHeader {
    /// Where it starts and how much of it the parser reads: next header and length (2 bytes); of a fragment
    /// header also the fragment offset (4 bytes).
    at: usize,
    size: usize,
    /// A fragment header with a non-zero offset: what follows it is the middle of the payload.
    non_first_fragment: bool,
    /// The header that follows (its next-header field).
    next: u8,
}

fn is_ipv6_ext(proto: u8) -> bool {
    matches!(proto, 0 | 43 | 44 | 51 | 60)
}

impl Template {
    /// What the parser makes of the first `len` bytes of the frame.
    fn parse(&self, len: usize) -> Option<L4> {
        assert!(len <= self.frame.len() && self.frame.len() <= PARSE_BOUND);
        if len < self.ip_end {
            return None;
        }
        // The walk: up to 8 extension headers and the header after them; a header it cannot read ends it with
        // the protocol unknown, and so does a 9th extension header.
        for (i, ext) in self.exts.iter().enumerate().take(MAX_IPV6_EXT_HEADERS + 1) {
            if !readable(ext.at, ext.size, len) {
                return Some(L4::without_ports(PROTO_UNKNOWN));
            }
            if ext.non_first_fragment {
                // The walk stops: the protocol is the one named here, unless that is another extension header or
                // this header was one too many.
                let known = i < MAX_IPV6_EXT_HEADERS && !is_ipv6_ext(ext.next);
                return Some(L4::without_ports(if known { ext.next } else { PROTO_UNKNOWN }));
            }
        }
        Some(if self.exts.len() > MAX_IPV6_EXT_HEADERS {
            L4::without_ports(PROTO_UNKNOWN)
        } else if !self.ipv4_first_fragment {
            L4::without_ports(self.proto)
        } else {
            read_transport(self.proto, self.l4, len, self.dst_port, self.syn)
        })
    }
}

/// How a template's IP layer is built.
#[derive(Clone, Debug)]
enum Shape {
    Plain,
    /// 12 bytes of IPv4 options.
    Ipv4Options,
    Ipv4Fragment {
        offset8: u16,
        more: bool,
    },
    Ipv6Ext(Vec<Ipv6Ext>),
}

const TAG_STACKS: [&[(u16, u16)]; 3] = [
    &[],
    &[(ETH_P_8021Q, 10)],
    &[(ETH_P_8021AD, 10), (ETH_P_8021Q, 20)],
];

/// An IPv6 chain with every kind of extension header the parser follows: 8 + 16 + 8 + 24 + 8 = 64 bytes.
fn full_ext_chain() -> Vec<Ipv6Ext> {
    vec![
        Ipv6Ext::HopByHop { len8: 0 },
        Ipv6Ext::Routing { len8: 1 },
        Ipv6Ext::Fragment {
            offset8: 0,
            more: true,
        },
        Ipv6Ext::Ah,
        Ipv6Ext::DestOpts { len8: 0 },
    ]
}

/// The protocol number `transport` is built with in the family of `src`.
fn proto_of(transport: Transport, src: &str) -> u8 {
    match transport {
        Transport::TcpSyn | Transport::TcpAck => IPPROTO_TCP,
        Transport::Udp => IPPROTO_UDP,
        Transport::Icmp if src.contains(':') => IPPROTO_ICMPV6,
        Transport::Icmp => IPPROTO_ICMP,
    }
}

/// A template from `src` to `dst_port` with 3 bytes of payload.
fn template(src: &str, tags: &[(u16, u16)], transport: Transport, dst_port: u16, shape: Shape) -> Template {
    let l3 = 14 + 4 * tags.len();
    let built = Frame::new(src, dst_for(src), transport, dst_port)
        .with_vlans(tags)
        .with_payload(3);
    let proto = proto_of(transport, src);
    let mut ext_headers = Vec::new();
    let mut ipv4_first_fragment = true;
    let (frame, ip_end, l4) = match &shape {
        Shape::Plain => {
            let ip_len = if src.contains(':') { 40 } else { 20 };
            (built.build(), l3 + ip_len, l3 + ip_len)
        }
        Shape::Ipv4Options => (
            built.build_with_ipv4_options(&ipv4_nop_options(3)),
            l3 + 32,
            l3 + 32,
        ),
        Shape::Ipv4Fragment { offset8, more } => {
            ipv4_first_fragment = *offset8 == 0;
            (built.build_ipv4_fragment(*offset8, *more), l3 + 20, l3 + 20)
        }
        Shape::Ipv6Ext(exts) => {
            let mut at = l3 + 40;
            for (i, ext) in exts.iter().enumerate() {
                let fragment_offset = match ext {
                    Ipv6Ext::Fragment { offset8, .. } => Some(*offset8),
                    _ => None,
                };
                ext_headers.push(ExtHeader {
                    at,
                    size: if fragment_offset.is_some() { 4 } else { 2 },
                    non_first_fragment: fragment_offset.is_some_and(|o| o != 0),
                    next: exts.get(i + 1).map_or(proto, Ipv6Ext::proto),
                });
                at += ext.bytes(0).len();
            }
            (built.build_with_ipv6_ext(exts), l3 + 40, at)
        }
    };
    if transport != Transport::Icmp {
        assert_eq!(
            frame[l4 + 2..l4 + 4],
            dst_port.to_be_bytes(),
            "transport header at {l4}"
        );
    }
    Template {
        name: format!("{transport:?} to {dst_port}, {shape:?}, tags {tags:?}"),
        frame,
        ip_end,
        exts: ext_headers,
        proto,
        l4,
        ipv4_first_fragment,
        dst_port,
        syn: transport == Transport::TcpSyn,
    }
}

/// Every well-formed frame shape from `src`: IPv4/IPv6 × TCP SYN/TCP ACK/UDP/ICMP × 0/1/2 VLAN tags, to the
/// protected port and another, plain, with IPv4 options or IPv6 extension headers, and as fragments (IPv4 first
/// fragments; non-first fragments of both).
fn templates(src: &str) -> Vec<Template> {
    let v4 = !src.contains(':');
    let mut shapes = vec![Shape::Plain];
    if v4 {
        shapes.push(Shape::Ipv4Options);
        shapes.push(Shape::Ipv4Fragment {
            offset8: 0,
            more: true,
        });
        shapes.push(Shape::Ipv4Fragment {
            offset8: 10,
            more: true,
        });
    } else {
        shapes.push(Shape::Ipv6Ext(full_ext_chain()));
        shapes.push(Shape::Ipv6Ext(vec![
            Ipv6Ext::HopByHop { len8: 0 },
            Ipv6Ext::Fragment {
                offset8: 10,
                more: false,
            },
        ]));
    }
    let mut out = Vec::new();
    for tags in TAG_STACKS {
        for shape in &shapes {
            for (transport, port) in [
                (Transport::TcpSyn, PORT),
                (Transport::TcpAck, PORT),
                (Transport::TcpSyn, OTHER_PORT),
                (Transport::Udp, PORT),
                (Transport::Udp, OTHER_PORT),
                (Transport::Icmp, PORT),
            ] {
                out.push(template(src, tags, transport, port, shape.clone()));
            }
        }
    }
    out
}

/// What the parser can make of the first `len` bytes of `t`, under [`load`]'s rules for `src`.
fn expected_prefix(t: &Template, len: usize, src: &str) -> (Reason, Limiter) {
    expected(src, t.parse(len))
}
#[test]
fn test_run_refuses_frames_shorter_than_the_ethernet_header() {
    let mut k = load();
    let before = k.counters().unwrap();
    for len in 0..14 {
        let frame = Frame::udp(V4_DENIED, V4_DST, PORT).build();
        let err = k
            .run(&frame[..len])
            .expect_err("a frame shorter than ETH_HLEN was run");
        assert!(format!("{err:#}").contains("os error 22"), "{len} bytes: {err:#}");
    }
    assert_eq!(k.counters().unwrap(), before, "the program never ran");
    // 14 bytes run.
    let frame = Frame::udp(V4_DENIED, V4_DST, PORT).build();
    assert_eq!(classify(&mut k, &frame[..14]), Reason::PassMalformed);
}

#[test]
fn every_prefix_of_every_well_formed_frame_classifies_consistently() {
    let mut k = load();
    let mut runs = 0;
    let mut seen = std::collections::BTreeSet::new();
    for src in [V4_MONITORED, V4_DENIED, V6_MONITORED, V6_DENIED] {
        for t in templates(src) {
            // The whole frame is what the template says it is.
            assert_eq!(
                classify_observed(&mut k, &t.frame, src),
                expected_prefix(&t, t.frame.len(), src),
                "{src}: whole {}",
                t.name
            );
            for len in 14..=t.frame.len() {
                let expected = expected_prefix(&t, len, src);
                let got = classify_observed(&mut k, &t.frame[..len], src);
                assert_eq!(got, expected, "{src}: {} cut to {len} bytes", t.name);
                seen.insert(format!("{expected:?}"));
                runs += 1;
            }
        }
    }
    assert!(runs > 15_000, "{runs} runs");
    // Every outcome came up: malformed, and each limiter outcome for a monitored and a denied source.
    assert_eq!(seen.len(), 5, "{seen:?}");
    // Denied sources never reached the limiter.
    assert!(tat(&k, V4_DENIED).is_none() && tat(&k, V6_DENIED).is_none());
}

#[test]
fn truncated_vlan_tags_are_malformed() {
    let mut k = load();
    for tags in &TAG_STACKS[1..] {
        let frame = Frame::udp(V4_DENIED, V4_DST, PORT).with_vlans(tags).build();
        let l3 = 14 + 4 * tags.len();
        for len in 14..l3 {
            assert_eq!(
                classify(&mut k, &frame[..len]),
                Reason::PassMalformed,
                "{tags:?} cut to {len}"
            );
        }
        // A complete tag stack in front of something that is not IP is not IP.
        let arp = ethernet(tags, ETH_P_ARP, &[0u8; 28]);
        assert_eq!(classify(&mut k, &arp[..l3]), Reason::PassNotIp);
    }
}

// ---------------------------------------------------------------------------------------------------------------
// Bogus header fields
// ---------------------------------------------------------------------------------------------------------------

#[test]
fn ipv4_ihl_below_5_is_malformed() {
    let mut k = load();
    for tags in TAG_STACKS {
        let l3 = 14 + 4 * tags.len();
        for src in [V4_DENIED, V4_MONITORED] {
            let good = Frame::tcp_syn(src, V4_DST, PORT)
                .with_vlans(tags)
                .with_payload(64)
                .build();
            for ihl in 0..5u8 {
                let mut frame = good.clone();
                frame[l3] = 0x40 | ihl;
                // Even a denied source: the kernel's IP input drops such a packet anyway.
                assert_eq!(
                    classify_observed(&mut k, &frame, src),
                    (Reason::PassMalformed, Limiter::Bypassed),
                    "IHL {ihl}"
                );
            }
        }
    }
}

#[test]
fn ipv4_ihl_pointing_past_the_end_is_malformed() {
    let mut k = load();
    // 14 + 20 + 8 (UDP, no payload) = 42 bytes: IHL 6..=15 claims 24..=60 header bytes.
    let good = Frame::udp(V4_DENIED, V4_DST, PORT).build();
    assert_eq!(good.len(), 42);
    for ihl in 6..=15u8 {
        let header_len = ihl as usize * 4;
        let mut frame = good.clone();
        frame[14] = 0x40 | ihl;
        let expected = if 14 + header_len <= frame.len() {
            Reason::DropDenyExact
        } else {
            Reason::PassMalformed
        };
        assert_eq!(classify(&mut k, &frame), expected, "IHL {ihl}");
        // Exactly long enough for the claimed header: parsed (the options are there, the UDP header is not).
        let mut padded = frame.clone();
        padded.resize(14 + header_len, 0);
        assert_eq!(
            classify(&mut k, &padded),
            Reason::DropDenyExact,
            "IHL {ihl}, padded"
        );
        assert_eq!(
            classify(&mut k, &padded[..padded.len() - 1]),
            Reason::PassMalformed,
            "IHL {ihl}, one short"
        );
    }
}

#[test]
fn wrong_ip_version_nibble_is_malformed() {
    let mut k = load();
    let v4 = Frame::udp(V4_DENIED, V4_DST, PORT).with_payload(64).build();
    let v6 = Frame::udp(V6_DENIED, V6_DST, PORT).with_payload(64).build();
    for version in 0..16u8 {
        let mut frame = v4.clone();
        frame[14] = version << 4 | 5;
        let expected = if version == 4 {
            Reason::DropDenyExact
        } else {
            Reason::PassMalformed
        };
        assert_eq!(
            classify(&mut k, &frame),
            expected,
            "IPv4 Ethernet type, version {version}"
        );
        let mut frame = v6.clone();
        frame[14] = version << 4 | (frame[14] & 0x0f);
        let expected = if version == 6 {
            Reason::DropDenyExact
        } else {
            Reason::PassMalformed
        };
        assert_eq!(
            classify(&mut k, &frame),
            expected,
            "IPv6 Ethernet type, version {version}"
        );
    }
    // An IPv4 packet under the IPv6 Ethernet type and the other way round.
    let v4_packet = Frame::udp(V4_DENIED, V4_DST, PORT).with_payload(64).ip_packet();
    let v6_packet = Frame::udp(V6_DENIED, V6_DST, PORT).ip_packet();
    assert_eq!(
        classify(&mut k, &ethernet(&[], ETH_P_IPV6, &v4_packet)),
        Reason::PassMalformed
    );
    assert_eq!(
        classify(&mut k, &ethernet(&[], ETH_P_IPV4, &v6_packet)),
        Reason::PassMalformed
    );
}

// ---------------------------------------------------------------------------------------------------------------
// IPv6 extension chains, the parse bound, TCP fields, protocols without ports
// ---------------------------------------------------------------------------------------------------------------

/// Transports and destination ports whose outcomes tell "ports read" (and the flags) from "no ports" apart.
const PROBES: [(Transport, u16); 5] = [
    (Transport::TcpSyn, PORT),
    (Transport::TcpAck, PORT),
    (Transport::TcpSyn, OTHER_PORT),
    (Transport::Udp, OTHER_PORT),
    (Transport::Icmp, PORT),
];

#[test]
fn ipv6_extension_chains_of_up_to_8_headers_are_followed() {
    let mut k = load();
    // Every kind of extension header, in turn; and the same header over and over (a "loop" in the chain).
    let kinds = full_ext_chain();
    let mixed = |n: usize| -> Vec<Ipv6Ext> { (0..n).map(|i| kinds[i % kinds.len()].clone()).collect() };
    let same = |n: usize| -> Vec<Ipv6Ext> { (0..n).map(|_| Ipv6Ext::DestOpts { len8: 0 }).collect() };
    for n in (0..=10).chain([50]) {
        for chain in [mixed(n), same(n)] {
            for (transport, port) in PROBES {
                for src in [V6_MONITORED, V6_DENIED, V6_PLAIN] {
                    let frame = Frame::new(src, V6_DST, transport, port)
                        .with_payload(8)
                        .build_with_ipv6_ext(&chain);
                    let limiter = if n > MAX_IPV6_EXT_HEADERS {
                        // Protocol unknown, no ports: limited whatever the transport.
                        Limiter::Packet
                    } else {
                        match (transport, port) {
                            (Transport::TcpSyn, PORT) => Limiter::NewConnection,
                            (Transport::TcpAck, PORT) => Limiter::Packet,
                            _ => Limiter::Bypassed,
                        }
                    };
                    assert_eq!(
                        classify_observed(&mut k, &frame, src),
                        (parsed_reason(src), for_source(src, limiter)),
                        "{src}: {transport:?} to {port} behind {n} headers {chain:?}"
                    );
                }
            }
        }
    }
    // A non-first fragment header ends the walk (what follows it is the middle of the payload): no ports, and the
    // protocol it names — unknown when that is another extension header, or when the fragment header is the 9th.
    for before in 0..=MAX_IPV6_EXT_HEADERS + 1 {
        for after in 0..=2 {
            let mut chain = vec![Ipv6Ext::HopByHop { len8: 0 }; before];
            chain.push(Ipv6Ext::Fragment {
                offset8: 10,
                more: true,
            });
            chain.extend(vec![Ipv6Ext::DestOpts { len8: 0 }; after]);
            let known = before < MAX_IPV6_EXT_HEADERS && after == 0;
            for (transport, port) in PROBES {
                let t = template(V6_MONITORED, &[], transport, port, Shape::Ipv6Ext(chain.clone()));
                let limiter = if known && transport == Transport::Icmp {
                    Limiter::Bypassed
                } else {
                    Limiter::Packet
                };
                let want = (Reason::PassMonitor, limiter);
                assert_eq!(
                    expected_prefix(&t, t.frame.len(), V6_MONITORED),
                    want,
                    "model: {}",
                    t.name
                );
                assert_eq!(
                    classify_observed(&mut k, &t.frame, V6_MONITORED),
                    want,
                    "{}",
                    t.name
                );
            }
        }
    }
}

#[test]
fn ipv6_extension_headers_claiming_bytes_past_the_frame_end() {
    let mut k = load();
    let big_options = |proto: u8, len: u8| Ipv6Ext::Raw {
        proto,
        bytes: vec![0, len, 1, 4, 0, 0, 0, 0],
    };
    // (chain, frame cut to, outcome for TCP SYN to the protected port, for ICMPv6). Where the claimed length
    // points past the end, the transport protocol is still known, its header is not there: TCP without ports
    // (limited, not a new connection: the flags were not read either), ICMPv6 (never limited).
    let cases = [
        // Claims (255 + 1) * 8 = 2048 bytes, has 8: the transport header would start at 54 + 2048 = 2102.
        (
            vec![big_options(0, 255)],
            None,
            Limiter::Packet,
            Limiter::Bypassed,
        ),
        (
            vec![Ipv6Ext::HopByHop { len8: 0 }, big_options(60, 255)],
            None,
            Limiter::Packet,
            Limiter::Bypassed,
        ),
        // 201 * 8 bytes: the transport header would start at 1662, inside the parse bound, past the frame end.
        (
            vec![big_options(43, 200)],
            None,
            Limiter::Packet,
            Limiter::Bypassed,
        ),
        // AH claiming (255 + 2) * 4 bytes.
        (
            vec![Ipv6Ext::Raw {
                proto: 51,
                bytes: vec![0, 255, 0, 0, 0, 0, 1, 0, 0, 0, 0, 1],
            }],
            None,
            Limiter::Packet,
            Limiter::Bypassed,
        ),
        // A fragment header cut to 2 bytes at the end of the frame: the chain ends unread, protocol unknown.
        (
            vec![
                Ipv6Ext::HopByHop { len8: 0 },
                Ipv6Ext::Raw {
                    proto: 44,
                    bytes: vec![0, 0],
                },
            ],
            Some(14 + 40 + 8 + 2),
            Limiter::Packet,
            Limiter::Packet,
        ),
        // Unknown / no-transport next headers end the chain, a protocol without ports: ESP, No Next Header,
        // Mobility.
        (
            vec![Ipv6Ext::Raw {
                proto: 50,
                bytes: vec![0; 8],
            }],
            None,
            Limiter::Bypassed,
            Limiter::Bypassed,
        ),
        (
            vec![Ipv6Ext::Raw {
                proto: 59,
                bytes: vec![0; 8],
            }],
            None,
            Limiter::Bypassed,
            Limiter::Bypassed,
        ),
        (
            vec![Ipv6Ext::Raw {
                proto: 135,
                bytes: vec![0; 8],
            }],
            None,
            Limiter::Bypassed,
            Limiter::Bypassed,
        ),
    ];
    for (chain, cut, tcp, icmp) in &cases {
        for (transport, limiter) in [(Transport::TcpSyn, tcp), (Transport::Icmp, icmp)] {
            for src in [V6_MONITORED, V6_DENIED] {
                let frame = Frame::new(src, V6_DST, transport, PORT).build_with_ipv6_ext(chain);
                let frame = &frame[..cut.unwrap_or(frame.len())];
                assert_eq!(
                    classify_observed(&mut k, frame, src),
                    (parsed_reason(src), for_source(src, *limiter)),
                    "{src}: {transport:?} behind {chain:?}"
                );
            }
        }
    }
}

#[test]
fn reads_starting_past_the_2048_byte_parse_bound_fail() {
    let mut k = load();
    // One hop-by-hop header (0 or 1 VLAN tag in front) puts the next header at any offset ≡ 2 (mod 4) from
    // 2030 to 2102. Each read is bounded by where it starts (≤ PARSE_BOUND), not where it ends.
    let place = |src: &str, transport: Transport, port: u16, at: usize, behind: &[Ipv6Ext]| {
        let tags: &[(u16, u16)] = if (at - 54).is_multiple_of(8) {
            &[]
        } else {
            &[(ETH_P_8021Q, 1)]
        };
        let hop_by_hop = at - (14 + 4 * tags.len()) - 40;
        assert!(hop_by_hop.is_multiple_of(8));
        let mut chain = vec![Ipv6Ext::HopByHop {
            len8: (hop_by_hop / 8 - 1) as u8,
        }];
        chain.extend_from_slice(behind);
        Frame::new(src, V6_DST, transport, port)
            .with_vlans(tags)
            .build_with_ipv6_ext(&chain)
    };
    for at in [2030, 2034, 2038, 2042, 2046, 2050, 2054, 2102] {
        for src in [V6_MONITORED, V6_DENIED] {
            // The transport header at `at`. TCP: ports when `at` ≤ 2048, the flags when `at` + 13 ≤ 2048; a SYN
            // otherwise, so an ACK whose header starts at 2036..=2048 counts as a new connection.
            let tcp_ack = if at + 13 <= PARSE_BOUND {
                Limiter::Packet
            } else if at <= PARSE_BOUND {
                Limiter::NewConnection
            } else {
                Limiter::Packet
            };
            let starts_inside = at <= PARSE_BOUND;
            let unprotected = if starts_inside {
                Limiter::Bypassed
            } else {
                Limiter::Packet
            };
            for (transport, port, limiter) in [
                (Transport::TcpAck, PORT, tcp_ack),
                (Transport::TcpSyn, OTHER_PORT, unprotected),
                (Transport::Udp, OTHER_PORT, unprotected),
                (Transport::Icmp, PORT, Limiter::Bypassed),
            ] {
                let frame = place(src, transport, port, at, &[]);
                assert_eq!(
                    classify_observed(&mut k, &frame, src),
                    (parsed_reason(src), for_source(src, limiter)),
                    "{src}: {transport:?} to {port} at {at}"
                );
            }
            // An extension header at `at`: past the bound the chain ends unread, protocol unknown, limited.
            let frame = place(src, Transport::Icmp, PORT, at, &[Ipv6Ext::DestOpts { len8: 0 }]);
            let limiter = if starts_inside {
                Limiter::Bypassed
            } else {
                Limiter::Packet
            };
            assert_eq!(
                classify_observed(&mut k, &frame, src),
                (parsed_reason(src), for_source(src, limiter)),
                "{src}: ICMPv6 behind destination options at {at}"
            );
        }
    }
}

#[test]
fn tcp_data_offset_is_not_checked() {
    let mut k = load();
    for src in [V4_MONITORED, V4_DENIED, V6_MONITORED, V6_DENIED] {
        let l4 = if src.contains(':') { 54 } else { 34 };
        for (transport, limiter) in [
            (Transport::TcpSyn, Limiter::NewConnection),
            (Transport::TcpAck, Limiter::Packet),
        ] {
            let good = Frame::new(src, dst_for(src), transport, PORT)
                .with_payload(40)
                .build();
            for offset in 0..16u8 {
                let mut frame = good.clone();
                frame[l4 + 12] = offset << 4;
                // Ports and flags are read whatever the data offset says, from a header exactly 20 bytes long too.
                for len in [frame.len(), l4 + 20] {
                    assert_eq!(
                        classify_observed(&mut k, &frame[..len], src),
                        (parsed_reason(src), for_source(src, limiter)),
                        "{src}: {transport:?}, data offset {offset}, {len} bytes"
                    );
                }
            }
        }
    }
}

#[test]
fn without_ports_only_tcp_udp_and_unknown_protocols_are_limited() {
    let mut k = load();
    let src_v4 = V4_MONITORED;
    let src_v6 = V6_MONITORED;
    // The bytes of a TCP SYN with 8 bytes of payload follow the IP header whatever the protocol number says: under
    // 6 they are read as TCP, under 17 as UDP (the same ports), under any other number not at all.
    let unfragmented =
        |proto: u8, frame: &[u8], l4: usize, port: u16| read_transport(proto, l4, frame.len(), port, true);
    for proto in 0..=255u8 {
        for port in [PORT, OTHER_PORT] {
            let build = |src| Frame::tcp_syn(src, dst_for(src), port).with_payload(8);
            // IPv4, unfragmented and a non-first fragment.
            let mut frame = build(src_v4).build();
            frame[14 + 9] = proto;
            assert_eq!(
                classify_observed(&mut k, &frame, src_v4),
                expected(src_v4, Some(unfragmented(proto, &frame, 34, port))),
                "IPv4 protocol {proto} to {port}"
            );
            let mut frame = build(src_v4).build_ipv4_fragment(10, false);
            frame[14 + 9] = proto;
            assert_eq!(
                classify_observed(&mut k, &frame, src_v4),
                expected(src_v4, Some(L4::without_ports(proto))),
                "IPv4 non-first fragment, protocol {proto} to {port}"
            );
            // IPv6, a non-first fragment: an extension header named after it is not followed (unknown).
            let mut frame = build(src_v6).build_with_ipv6_ext(&[Ipv6Ext::Fragment {
                offset8: 10,
                more: false,
            }]);
            frame[14 + 40] = proto;
            let named = if is_ipv6_ext(proto) { PROTO_UNKNOWN } else { proto };
            assert_eq!(
                classify_observed(&mut k, &frame, src_v6),
                expected(src_v6, Some(L4::without_ports(named))),
                "IPv6 non-first fragment, next header {proto} to {port}"
            );
            // IPv6 unfragmented: the extension headers have tests of their own.
            if is_ipv6_ext(proto) {
                continue;
            }
            let mut frame = build(src_v6).build();
            frame[14 + 6] = proto;
            assert_eq!(
                classify_observed(&mut k, &frame, src_v6),
                expected(src_v6, Some(unfragmented(proto, &frame, 54, port))),
                "IPv6 next header {proto} to {port}"
            );
        }
    }
    // The model used above, spelled out for packets without ports. IPv4 protocol 0 counts as unknown too: it is
    // the number main.rs uses for an IPv6 chain not followed to its end.
    let expected_limiter = |proto: u8| expected(src_v4, Some(L4::without_ports(proto))).1;
    assert_eq!(expected_limiter(PROTO_UNKNOWN), Limiter::Packet);
    assert_eq!(expected_limiter(IPPROTO_TCP), Limiter::Packet);
    assert_eq!(expected_limiter(IPPROTO_UDP), Limiter::Packet);
    assert_eq!(expected_limiter(IPPROTO_ICMP), Limiter::Bypassed);
    assert_eq!(expected_limiter(47), Limiter::Bypassed);
}

#[test]
fn tiny_frames_of_14_to_20_bytes() {
    let mut k = load();
    for len in 14..=20usize {
        // A tag needs 18 bytes; after it, the fill bytes are the inner Ethernet type (never IP here).
        let tag = if len < 18 {
            Reason::PassMalformed
        } else {
            Reason::PassNotIp
        };
        for (ether_type, expected) in [
            (ETH_P_IPV4, Reason::PassMalformed),
            (ETH_P_IPV6, Reason::PassMalformed),
            (ETH_P_8021Q, tag),
            (ETH_P_8021AD, tag),
            (ETH_P_ARP, Reason::PassNotIp),
            (0x88cc, Reason::PassNotIp),
            (0x0000, Reason::PassNotIp),
            (0xffff, Reason::PassNotIp),
        ] {
            for fill in [0x00u8, 0x45, 0x60, 0xff] {
                let mut frame = ethernet(&[], ether_type, &[]);
                frame.resize(len, fill);
                assert_eq!(
                    classify(&mut k, &frame),
                    expected,
                    "{ether_type:#06x}, {len} bytes of {fill:#04x}"
                );
            }
        }
        // One complete tag (18 bytes) in front of a non-IP type is not IP; in front of IP it is malformed.
        if len >= 18 {
            let mut frame = ethernet(&[(ETH_P_8021Q, 1)], ETH_P_ARP, &[]);
            frame.resize(len, 0);
            assert_eq!(
                classify(&mut k, &frame),
                Reason::PassNotIp,
                "tagged ARP, {len} bytes"
            );
            let mut frame = ethernet(&[(ETH_P_8021Q, 1)], ETH_P_IPV4, &[]);
            frame.resize(len, 0x45);
            assert_eq!(
                classify(&mut k, &frame),
                Reason::PassMalformed,
                "tagged IPv4, {len} bytes"
            );
        }
    }
}

/// The largest linear frame `BPF_PROG_TEST_RUN` gives this program (see the module doc).
const MAX_LINEAR: usize = 3520;
/// The largest frame it accepts at all: the linear part plus 17 page fragments.
const MAX_TEST_RUN_FRAME: usize = MAX_LINEAR + 17 * 4096;

#[test]
fn jumbo_frames_up_to_the_test_run_limit() {
    let mut k = load();
    // Well-formed frames past the linear limit, then one padded to the test-run maximum.
    for src in [V4_MONITORED, V4_DENIED, V6_MONITORED, V6_DENIED] {
        let header = if src.contains(':') {
            14 + 40 + 8
        } else {
            14 + 20 + 8
        };
        for len in [MAX_LINEAR, MAX_LINEAR + 1, 9014, 60_000] {
            let frame = Frame::udp(src, dst_for(src), PORT)
                .with_payload(len - header)
                .build();
            assert_eq!(frame.len(), len);
            let expected = (parsed_reason(src), for_source(src, Limiter::Packet));
            assert_eq!(
                classify_observed(&mut k, &frame, src),
                expected,
                "{src}, {len} bytes"
            );
        }
        let mut frame = Frame::udp(src, dst_for(src), PORT).build();
        frame.resize(MAX_TEST_RUN_FRAME, 0xab);
        let expected = (parsed_reason(src), for_source(src, Limiter::Packet));
        assert_eq!(
            classify_observed(&mut k, &frame, src),
            expected,
            "{src}, {MAX_TEST_RUN_FRAME} bytes"
        );
    }
    // One byte more does not run.
    let mut frame = Frame::udp(V4_PLAIN, V4_DST, PORT).build();
    frame.resize(MAX_TEST_RUN_FRAME + 1, 0);
    let err = k.run(&frame).expect_err("a frame over the test-run maximum ran");
    assert!(format!("{err:#}").contains("os error 12"), "{err:#}");
    // The program sees the linear part only: a source's byte count grows by 3520 for a 9014-byte frame.
    let bytes = |k: &KernelUnderTest| {
        let src = ip(V4_PLAIN);
        k.maps
            .sources(0)
            .unwrap()
            .into_iter()
            .find(|(a, _)| *a == src)
            .map_or(0, |(_, s)| s.bytes)
    };
    let before = bytes(&k);
    let frame = Frame::udp(V4_PLAIN, V4_DST, PORT).with_payload(9014 - 42).build();
    assert_eq!(classify(&mut k, &frame), Reason::PassDefault);
    assert_eq!(bytes(&k) - before, MAX_LINEAR as u64);
}

// ---------------------------------------------------------------------------------------------------------------
// Random input
// ---------------------------------------------------------------------------------------------------------------

/// What the documented contract says the parser makes of a frame, at the level of "not IP / malformed / IP".
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Class {
    NotIp,
    Malformed,
    Ip,
}

fn class_of(f: &[u8]) -> Class {
    let be16 = |o: usize| f.get(o..o + 2).map(|b| u16::from_be_bytes([b[0], b[1]]));
    let Some(mut ether_type) = be16(12) else {
        return Class::NotIp;
    };
    let mut l3 = 14;
    for _ in 0..2 {
        if ether_type != ETH_P_8021Q && ether_type != ETH_P_8021AD {
            break;
        }
        let Some(inner) = be16(l3 + 2) else {
            return Class::Malformed;
        };
        ether_type = inner;
        l3 += 4;
    }
    match ether_type {
        ETH_P_IPV4 => {
            let Some(header) = f.get(l3..l3 + 20) else {
                return Class::Malformed;
            };
            let ihl = (header[0] & 0x0f) as usize;
            if header[0] >> 4 != 4 || ihl < 5 || f.len() < l3 + ihl * 4 {
                Class::Malformed
            } else {
                Class::Ip
            }
        }
        ETH_P_IPV6 => match f.get(l3..l3 + 40) {
            Some(header) if header[0] >> 4 == 6 => Class::Ip,
            _ => Class::Malformed,
        },
        _ => Class::NotIp,
    }
}

/// The frames random input starts from: the templates of every test source, whole.
fn seed_frames() -> Vec<(Vec<u8>, &'static str)> {
    let mut out = Vec::new();
    for src in [
        V4_MONITORED,
        V4_DENIED,
        V4_PLAIN,
        V6_MONITORED,
        V6_DENIED,
        V6_PLAIN,
    ] {
        for t in templates(src) {
            out.push((t.frame, src));
        }
    }
    out
}

#[test]
fn random_garbage_never_aborts_and_is_classified_by_what_parses() {
    let mut k = load();
    let mut rng = SmallRng::seed_from_u64(0x00a9_d5ee_d001);
    let seeds = seed_frames();
    let mut by_class = [0usize; 3];
    for i in 0..4000 {
        let frame: Vec<u8> = match i % 4 {
            // Pure noise.
            0 => {
                let len = rng.gen_range(14..=160);
                (0..len).map(|_| rng.r#gen()).collect()
            }
            // Noise behind a plausible link layer: an IP or tag Ethernet type, a believable first IP byte.
            1 => {
                let mut f: Vec<u8> = (0..rng.gen_range(14..=200)).map(|_| rng.r#gen()).collect();
                let types = [ETH_P_IPV4, ETH_P_IPV6, ETH_P_8021Q, ETH_P_8021AD];
                let mut at = 12;
                for _ in 0..rng.gen_range(0..=3) {
                    if at + 4 > f.len() {
                        break;
                    }
                    let t = types[rng.gen_range(0..types.len())];
                    f[at..at + 2].copy_from_slice(&t.to_be_bytes());
                    at += 4;
                }
                if let Some(b) = f.get_mut(at - 2) {
                    *b = [0x45u8, 0x46, 0x4f, 0x60, 0x41][rng.gen_range(0..5)];
                }
                f
            }
            // A well-formed frame with a few bytes anywhere changed, maybe cut short.
            _ => {
                let (mut f, _) = seeds[rng.gen_range(0..seeds.len())].clone();
                for _ in 0..rng.gen_range(1..=4) {
                    let at = rng.gen_range(0..f.len().min(120));
                    f[at] = rng.r#gen();
                }
                if rng.gen_bool(0.3) {
                    f.truncate(rng.gen_range(14..=f.len()));
                }
                f
            }
        };
        let reason = classify(&mut k, &frame);
        let class = class_of(&frame);
        by_class[class as usize] += 1;
        let expected_ok = match class {
            Class::NotIp => reason == Reason::PassNotIp,
            Class::Malformed => reason == Reason::PassMalformed,
            Class::Ip => reason != Reason::PassNotIp && reason != Reason::PassMalformed,
        };
        assert!(expected_ok, "{class:?} classified {reason:?}: {}", hex(&frame));
        // Every so often, a well-formed frame: never misclassified among the garbage.
        if i % 7 == 0 {
            let (f, src) = &seeds[rng.gen_range(0..seeds.len())];
            assert_eq!(
                classify(&mut k, f),
                parsed_reason(src),
                "well-formed from {src}: {}",
                hex(f)
            );
        }
    }
    // The generator reached every class.
    assert!(by_class.iter().all(|&n| n > 300), "{by_class:?}");
}

/// Offsets of bytes the parser does not read (or reads without deciding anything), per template shape.
fn ignored_bytes(frame: &[u8], l3: usize, v4: bool, transport: Transport) -> Vec<usize> {
    let mut out = Vec::new();
    let l4 = if v4 {
        // TOS, total length, identification, TTL, checksum, destination address.
        out.extend([1, 2, 3, 4, 5, 8, 10, 11].map(|o| l3 + o));
        out.extend((16..20).map(|o| l3 + o));
        l3 + 20
    } else {
        // Flow label, payload length, hop limit, destination address.
        out.extend([1, 2, 3, 4, 5, 7].map(|o| l3 + o));
        out.extend((24..40).map(|o| l3 + o));
        l3 + 40
    };
    let payload = match transport {
        // Sequence and acknowledgement numbers, data offset, window, checksum, urgent pointer.
        Transport::TcpSyn | Transport::TcpAck => {
            out.extend((4..13).chain(14..20).map(|o| l4 + o));
            l4 + 20
        }
        // Length and checksum.
        Transport::Udp => {
            out.extend((4..8).map(|o| l4 + o));
            l4 + 8
        }
        Transport::Icmp => l4,
    };
    out.extend(payload..frame.len());
    out
}

#[test]
fn fields_the_parser_ignores_never_change_the_verdict() {
    let mut k = load();
    let mut rng = SmallRng::seed_from_u64(0x00a9_d1a7_0001);
    let mut runs = 0;
    for src in [
        V4_MONITORED,
        V4_DENIED,
        V4_PLAIN,
        V6_MONITORED,
        V6_DENIED,
        V6_PLAIN,
    ] {
        let v4 = !src.contains(':');
        for tags in TAG_STACKS {
            let l3 = 14 + 4 * tags.len();
            for transport in [
                Transport::TcpSyn,
                Transport::TcpAck,
                Transport::Udp,
                Transport::Icmp,
            ] {
                let good = Frame::new(src, dst_for(src), transport, PORT)
                    .with_vlans(tags)
                    .with_payload(24)
                    .build();
                let limiter = match transport {
                    Transport::TcpSyn => Limiter::NewConnection,
                    Transport::TcpAck | Transport::Udp => Limiter::Packet,
                    Transport::Icmp => Limiter::Bypassed,
                };
                let expected = (parsed_reason(src), for_source(src, limiter));
                let ignored = ignored_bytes(&good, l3, v4, transport);
                for _ in 0..25 {
                    let mut frame = good.clone();
                    for _ in 0..rng.gen_range(1..=6) {
                        frame[ignored[rng.gen_range(0..ignored.len())]] = rng.r#gen();
                    }
                    assert_eq!(
                        classify_observed(&mut k, &frame, src),
                        expected,
                        "{src}: {}",
                        hex(&frame)
                    );
                    runs += 1;
                }
            }
        }
    }
    assert!(runs >= 1800);
    // The IPv4 header checksum is not verified either: a frame whose checksum was fixed up agrees.
    let mut frame = Frame::udp(V4_DENIED, V4_DST, PORT).build();
    frame[14 + 2..14 + 4].copy_from_slice(&9u16.to_be_bytes());
    let sum = ipv4_checksum(&frame[14..34]);
    frame[14 + 10..14 + 12].copy_from_slice(&sum.to_be_bytes());
    assert_eq!(classify(&mut k, &frame), Reason::DropDenyExact);
}
