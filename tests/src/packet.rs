//! Crafted test frames. IP and transport headers (with correct lengths and checksums) come from etherparse;
//! Ethernet and VLAN tags are prepended here so any tag stack can be built.

use std::net::IpAddr;

use etherparse::PacketBuilder;

pub const ETH_P_IPV4: u16 = 0x0800;
pub const ETH_P_IPV6: u16 = 0x86DD;
pub const ETH_P_8021Q: u16 = 0x8100;
pub const ETH_P_8021AD: u16 = 0x88A8;
pub const ETH_P_ARP: u16 = 0x0806;

/// Transport of a test frame.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Transport {
    /// TCP SYN (no ACK): a new connection.
    TcpSyn,
    /// TCP ACK (established-flow data).
    TcpAck,
    Udp,
    /// ICMP echo request (ICMPv6 for IPv6): no ports.
    Icmp,
}

/// A frame to build. Source and destination must be of the same family.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Frame {
    pub src: IpAddr,
    pub dst: IpAddr,
    pub src_port: u16,
    pub dst_port: u16,
    pub transport: Transport,
    /// VLAN tags, outermost first: (TPID, VLAN id). Use `ETH_P_8021AD` outer + `ETH_P_8021Q` inner for QinQ.
    pub vlans: Vec<(u16, u16)>,
    pub payload: Vec<u8>,
}

impl Frame {
    pub fn new(src: &str, dst: &str, transport: Transport, dst_port: u16) -> Self {
        Self {
            src: src.parse().expect("valid source address"),
            dst: dst.parse().expect("valid destination address"),
            src_port: 40000,
            dst_port,
            transport,
            vlans: Vec::new(),
            payload: Vec::new(),
        }
    }

    pub fn tcp_syn(src: &str, dst: &str, dst_port: u16) -> Self {
        Self::new(src, dst, Transport::TcpSyn, dst_port)
    }

    pub fn tcp_ack(src: &str, dst: &str, dst_port: u16) -> Self {
        Self::new(src, dst, Transport::TcpAck, dst_port)
    }

    pub fn udp(src: &str, dst: &str, dst_port: u16) -> Self {
        Self::new(src, dst, Transport::Udp, dst_port)
    }

    pub fn with_vlans(mut self, vlans: &[(u16, u16)]) -> Self {
        self.vlans = vlans.to_vec();
        self
    }

    pub fn with_payload(mut self, len: usize) -> Self {
        self.payload = vec![0xab; len];
        self
    }

    /// The IP packet (IP header + transport + payload), without the link layer.
    pub fn ip_packet(&self) -> Vec<u8> {
        let ip = match (self.src, self.dst) {
            (IpAddr::V4(s), IpAddr::V4(d)) => PacketBuilder::ipv4(s.octets(), d.octets(), 64),
            (IpAddr::V6(s), IpAddr::V6(d)) => PacketBuilder::ipv6(s.octets(), d.octets(), 64),
            _ => panic!("source and destination must be of the same family"),
        };
        let mut out = Vec::new();
        let result = match self.transport {
            Transport::TcpSyn => ip
                .tcp(self.src_port, self.dst_port, 1000, 64240)
                .syn()
                .write(&mut out, &self.payload),
            Transport::TcpAck => ip
                .tcp(self.src_port, self.dst_port, 1000, 64240)
                .ack(1)
                .write(&mut out, &self.payload),
            Transport::Udp => ip
                .udp(self.src_port, self.dst_port)
                .write(&mut out, &self.payload),
            Transport::Icmp => match self.src {
                IpAddr::V4(_) => ip.icmpv4_echo_request(1, 1).write(&mut out, &self.payload),
                IpAddr::V6(_) => ip.icmpv6_echo_request(1, 1).write(&mut out, &self.payload),
            },
        };
        result.expect("etherparse builds the packet");
        out
    }

    /// The whole Ethernet frame.
    pub fn build(&self) -> Vec<u8> {
        let ether_type = if self.src.is_ipv4() {
            ETH_P_IPV4
        } else {
            ETH_P_IPV6
        };
        ethernet(&self.vlans, ether_type, &self.ip_packet())
    }
}

/// Ethernet header (fixed test MACs) + VLAN tags + `payload`.
pub fn ethernet(vlans: &[(u16, u16)], ether_type: u16, payload: &[u8]) -> Vec<u8> {
    let mut out = Vec::with_capacity(14 + 4 * vlans.len() + payload.len());
    out.extend_from_slice(&[0x02, 0, 0, 0, 0, 0x02]); // destination
    out.extend_from_slice(&[0x02, 0, 0, 0, 0, 0x01]); // source
    for (tpid, vid) in vlans {
        out.extend_from_slice(&tpid.to_be_bytes());
        out.extend_from_slice(&(vid & 0x0fff).to_be_bytes());
    }
    out.extend_from_slice(&ether_type.to_be_bytes());
    out.extend_from_slice(payload);
    out
}

// ---- Raw header surgery: IPv4 options and fragments, IPv6 extension headers ----
//
// etherparse builds a well-formed IP packet; these helpers splice extra headers into it (fixing the lengths, the
// next-header chain and the IPv4 header checksum) so the transport header stays exactly what etherparse wrote.

/// IP protocol numbers used by the extension-header builders.
pub const IPPROTO_HOPOPTS: u8 = 0;
pub const IPPROTO_TCP: u8 = 6;
pub const IPPROTO_UDP: u8 = 17;
pub const IPPROTO_ROUTING: u8 = 43;
pub const IPPROTO_FRAGMENT: u8 = 44;
pub const IPPROTO_AH: u8 = 51;
pub const IPPROTO_ICMPV6: u8 = 58;
pub const IPPROTO_DSTOPTS: u8 = 60;

/// One IPv6 extension header for [`with_ipv6_ext_headers`]. Its next-header byte is filled in by the builder.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Ipv6Ext {
    /// Hop-by-hop options, `(len8 + 1) * 8` bytes, padded with a PadN option.
    HopByHop { len8: u8 },
    /// Routing header (type 4, segments left 0), `(len8 + 1) * 8` bytes.
    Routing { len8: u8 },
    /// Destination options, `(len8 + 1) * 8` bytes, padded with a PadN option.
    DestOpts { len8: u8 },
    /// Fragment header (8 bytes); `offset8` is the fragment offset in 8-byte units.
    Fragment { offset8: u16, more: bool },
    /// Authentication header with a 12-byte ICV: 24 bytes, payload-length field 4 (`(4 + 2) * 4`).
    Ah,
    /// Any bytes under any protocol number (byte 0 is overwritten with the next header); for malformed chains.
    Raw { proto: u8, bytes: Vec<u8> },
}

impl Ipv6Ext {
    /// The protocol number announcing this header.
    pub fn proto(&self) -> u8 {
        match self {
            Self::HopByHop { .. } => IPPROTO_HOPOPTS,
            Self::Routing { .. } => IPPROTO_ROUTING,
            Self::DestOpts { .. } => IPPROTO_DSTOPTS,
            Self::Fragment { .. } => IPPROTO_FRAGMENT,
            Self::Ah => IPPROTO_AH,
            Self::Raw { proto, .. } => *proto,
        }
    }

    /// The header's bytes with `next` as its next header.
    pub fn bytes(&self, next: u8) -> Vec<u8> {
        let options = |len8: u8| {
            let total = (len8 as usize + 1) * 8;
            let mut out = vec![next, len8];
            // PadN options (type 1, length, zeros; at most 257 bytes each) covering the rest of the header.
            while out.len() < total {
                let n = (total - out.len()).min(257);
                if n == 1 {
                    out.push(0); // Pad1
                } else {
                    out.push(1);
                    out.push((n - 2) as u8);
                    out.resize(out.len() + n - 2, 0);
                }
            }
            out
        };
        match self {
            Self::HopByHop { len8 } | Self::DestOpts { len8 } => options(*len8),
            Self::Routing { len8 } => {
                let mut out = vec![next, *len8, 4, 0];
                out.resize((*len8 as usize + 1) * 8, 0);
                out
            }
            Self::Fragment { offset8, more } => {
                let field = (offset8 << 3) | u16::from(*more);
                let mut out = vec![next, 0];
                out.extend_from_slice(&field.to_be_bytes());
                out.extend_from_slice(&0x1234_5678u32.to_be_bytes());
                out
            }
            Self::Ah => {
                let mut out = vec![next, 4, 0, 0];
                out.extend_from_slice(&0x100u32.to_be_bytes()); // SPI
                out.extend_from_slice(&1u32.to_be_bytes()); // sequence number
                out.extend_from_slice(&[0x5a; 12]); // ICV
                out
            }
            Self::Raw { bytes, .. } => {
                let mut out = bytes.clone();
                if let Some(b) = out.first_mut() {
                    *b = next;
                }
                out
            }
        }
    }
}

/// The IPv4 header checksum of `header` (its checksum field is taken as zero).
pub fn ipv4_checksum(header: &[u8]) -> u16 {
    let mut sum: u32 = 0;
    for (i, pair) in header.chunks(2).enumerate() {
        if i == 5 {
            continue;
        }
        let word = u16::from_be_bytes([pair[0], *pair.get(1).unwrap_or(&0)]);
        sum += word as u32;
    }
    while sum > 0xffff {
        sum = (sum & 0xffff) + (sum >> 16);
    }
    !(sum as u16)
}

/// Rewrites the IPv4 header checksum of `ip` in place (IHL taken from the header).
fn fix_ipv4_checksum(ip: &mut [u8]) {
    let ihl = ((ip[0] & 0x0f) as usize * 4).min(ip.len());
    let checksum = ipv4_checksum(&ip[..ihl]);
    ip[10..12].copy_from_slice(&checksum.to_be_bytes());
}

/// An IPv4 packet with `options` (a multiple of 4 bytes, at most 40) inserted after the fixed header.
pub fn with_ipv4_options(ip: &[u8], options: &[u8]) -> Vec<u8> {
    assert!(
        options.len().is_multiple_of(4) && options.len() <= 40,
        "IPv4 options: multiple of 4, at most 40 bytes"
    );
    assert_eq!(ip[0], 0x45, "expects an IPv4 packet without options");
    let mut out = Vec::with_capacity(ip.len() + options.len());
    out.extend_from_slice(&ip[..20]);
    out.extend_from_slice(options);
    out.extend_from_slice(&ip[20..]);
    out[0] = 0x40 | (5 + options.len() / 4) as u8;
    let total = out.len() as u16;
    out[2..4].copy_from_slice(&total.to_be_bytes());
    fix_ipv4_checksum(&mut out);
    out
}

/// Options filling `words` 32-bit words: NOPs, then End of Option List.
pub fn ipv4_nop_options(words: usize) -> Vec<u8> {
    let mut out = vec![1u8; words * 4];
    if let Some(last) = out.last_mut() {
        *last = 0;
    }
    out
}

/// The same IPv4 packet marked as a fragment at `offset8` (8-byte units) with the MF flag `more`.
/// The bytes after the header are kept: a non-first fragment that still *looks* like it starts with a transport
/// header checks that the parser does not read one there.
pub fn with_ipv4_fragment(ip: &[u8], offset8: u16, more: bool) -> Vec<u8> {
    let mut out = ip.to_vec();
    let field = (offset8 & 0x1fff) | if more { 0x2000 } else { 0 };
    out[6..8].copy_from_slice(&field.to_be_bytes());
    fix_ipv4_checksum(&mut out);
    out
}

/// An IPv6 packet with `exts` inserted (in order) between the fixed header and the transport header.
pub fn with_ipv6_ext_headers(ip: &[u8], exts: &[Ipv6Ext]) -> Vec<u8> {
    assert_eq!(ip[0] >> 4, 6, "expects an IPv6 packet");
    let transport_proto = ip[6];
    let mut chain = Vec::new();
    for (i, ext) in exts.iter().enumerate() {
        let next = exts.get(i + 1).map_or(transport_proto, Ipv6Ext::proto);
        chain.extend_from_slice(&ext.bytes(next));
    }
    let mut out = Vec::with_capacity(ip.len() + chain.len());
    out.extend_from_slice(&ip[..40]);
    out.extend_from_slice(&chain);
    out.extend_from_slice(&ip[40..]);
    if let Some(first) = exts.first() {
        out[6] = first.proto();
    }
    let payload_len = (out.len() - 40) as u16;
    out[4..6].copy_from_slice(&payload_len.to_be_bytes());
    out
}

impl Frame {
    /// The Ethernet type of this frame's IP version.
    pub fn ether_type(&self) -> u16 {
        if self.src.is_ipv4() {
            ETH_P_IPV4
        } else {
            ETH_P_IPV6
        }
    }

    /// The whole frame with IPv4 `options` (see [`with_ipv4_options`]). IPv4 only.
    pub fn build_with_ipv4_options(&self, options: &[u8]) -> Vec<u8> {
        ethernet(
            &self.vlans,
            ETH_P_IPV4,
            &with_ipv4_options(&self.ip_packet(), options),
        )
    }

    /// The whole frame as an IPv4 fragment (see [`with_ipv4_fragment`]). IPv4 only.
    pub fn build_ipv4_fragment(&self, offset8: u16, more: bool) -> Vec<u8> {
        ethernet(
            &self.vlans,
            ETH_P_IPV4,
            &with_ipv4_fragment(&self.ip_packet(), offset8, more),
        )
    }

    /// The whole frame with IPv6 extension headers (see [`with_ipv6_ext_headers`]). IPv6 only.
    pub fn build_with_ipv6_ext(&self, exts: &[Ipv6Ext]) -> Vec<u8> {
        ethernet(
            &self.vlans,
            ETH_P_IPV6,
            &with_ipv6_ext_headers(&self.ip_packet(), exts),
        )
    }
}

// ---- Hand-made TCP segments: every header field and the raw options under the test's control ----

/// TCP flag bits.
pub mod tcp_flag {
    pub const FIN: u8 = 0x01;
    pub const SYN: u8 = 0x02;
    pub const RST: u8 = 0x04;
    pub const PSH: u8 = 0x08;
    pub const ACK: u8 = 0x10;
    pub const URG: u8 = 0x20;
    pub const ECE: u8 = 0x40;
    pub const CWR: u8 = 0x80;
}

/// A TCP segment built byte by byte (no etherparse: the options are raw bytes, malformed ones included).
/// The IP header is plain (no options); add IPv4 options or IPv6 extension headers with [`with_ipv4_options`]
/// and [`with_ipv6_ext_headers`] on [`Segment::ip_packet`]. The TCP checksum is right (the kernel verifies it
/// on segments that change flow state) unless `bad_checksum` is set.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Segment {
    pub src: IpAddr,
    pub dst: IpAddr,
    pub src_port: u16,
    pub dst_port: u16,
    pub seq: u32,
    pub ack: u32,
    pub flags: u8,
    pub window: u16,
    pub urgent: u16,
    /// Raw options; padded with zero bytes to a multiple of 4 unless `data_offset` is set.
    pub options: Vec<u8>,
    /// The data-offset nibble (32-bit words) when not derived from `options`.
    pub data_offset: Option<u8>,
    pub payload: Vec<u8>,
    pub ttl: u8,
    /// IPv4 TOS / IPv6 traffic class (the low two bits are ECN).
    pub tos: u8,
    /// IPv4 identification.
    pub ip_id: u16,
    /// IPv4 flags: bit 0x4000 DF, 0x8000 reserved.
    pub ip_flags: u16,
    /// IPv6 flow label (20 bits).
    pub flow_label: u32,
    /// Write a wrong TCP checksum (the right one + 1).
    pub bad_checksum: bool,
}

/// The server ISN the test handshakes use ([`Segment::syn_ack`]); [`Segment::data`] acknowledges it.
pub const SERVER_ISN: u32 = 5000;

impl Segment {
    /// A SYN with no options, DF set, a non-zero IP ID and ISN 1000.
    pub fn syn(src: &str, dst: &str, dst_port: u16) -> Self {
        Self {
            src: src.parse().expect("valid source address"),
            dst: dst.parse().expect("valid destination address"),
            src_port: 40000,
            dst_port,
            seq: 1000,
            ack: 0,
            flags: tcp_flag::SYN,
            window: 64240,
            urgent: 0,
            options: Vec::new(),
            data_offset: None,
            payload: Vec::new(),
            ttl: 64,
            tos: 0,
            ip_id: 0x1234,
            ip_flags: 0x4000,
            flow_label: 0,
            bad_checksum: false,
        }
    }

    /// The server's SYN-ACK to this SYN (server → client, ISN [`SERVER_ISN`]), as `aqd_egress` sees it leave.
    pub fn syn_ack(&self) -> Self {
        Self {
            src: self.dst,
            dst: self.src,
            src_port: self.dst_port,
            dst_port: self.src_port,
            seq: SERVER_ISN,
            ack: self.seq.wrapping_add(1),
            flags: tcp_flag::SYN | tcp_flag::ACK,
            options: Vec::new(),
            data_offset: None,
            payload: Vec::new(),
            ..self.clone()
        }
    }

    /// The client's ACK that completes this SYN's handshake.
    pub fn handshake_ack(&self) -> Self {
        self.data(0, &[]).with_flags(tcp_flag::ACK)
    }

    /// The same segment with a wrong TCP checksum.
    pub fn with_bad_checksum(mut self) -> Self {
        self.bad_checksum = true;
        self
    }

    /// The segment of the same flow carrying `payload` at stream offset `offset` (ISN = this SYN's seq).
    pub fn data(&self, offset: u32, payload: &[u8]) -> Self {
        Self {
            seq: self.seq.wrapping_add(1).wrapping_add(offset),
            ack: 5001,
            flags: tcp_flag::ACK | tcp_flag::PSH,
            options: Vec::new(),
            data_offset: None,
            payload: payload.to_vec(),
            ..self.clone()
        }
    }

    pub fn with_options(mut self, options: &[u8]) -> Self {
        self.options = options.to_vec();
        self
    }

    pub fn with_flags(mut self, flags: u8) -> Self {
        self.flags = flags;
        self
    }

    pub fn with_src_port(mut self, port: u16) -> Self {
        self.src_port = port;
        self
    }

    /// The TCP header and payload.
    pub fn tcp_bytes(&self) -> Vec<u8> {
        let mut options = self.options.clone();
        let data_offset = match self.data_offset {
            Some(d) => d,
            None => {
                while !options.len().is_multiple_of(4) {
                    options.push(0);
                }
                assert!(options.len() <= 40, "TCP options are at most 40 bytes");
                (5 + options.len() / 4) as u8
            }
        };
        let mut out = Vec::with_capacity(20 + options.len() + self.payload.len());
        out.extend_from_slice(&self.src_port.to_be_bytes());
        out.extend_from_slice(&self.dst_port.to_be_bytes());
        out.extend_from_slice(&self.seq.to_be_bytes());
        out.extend_from_slice(&self.ack.to_be_bytes());
        out.push(data_offset << 4);
        out.push(self.flags);
        out.extend_from_slice(&self.window.to_be_bytes());
        out.extend_from_slice(&[0, 0]);
        out.extend_from_slice(&self.urgent.to_be_bytes());
        out.extend_from_slice(&options);
        out.extend_from_slice(&self.payload);
        out
    }

    /// The IP packet (plain IPv4 or IPv6 header + TCP).
    pub fn ip_packet(&self) -> Vec<u8> {
        let mut tcp = self.tcp_bytes();
        let mut sum = tcp_checksum(self.src, self.dst, &tcp);
        if self.bad_checksum {
            sum = sum.wrapping_add(1);
        }
        tcp[16..18].copy_from_slice(&sum.to_be_bytes());
        let mut out = Vec::with_capacity(40 + tcp.len());
        match (self.src, self.dst) {
            (IpAddr::V4(s), IpAddr::V4(d)) => {
                out.push(0x45);
                out.push(self.tos);
                out.extend_from_slice(&((20 + tcp.len()) as u16).to_be_bytes());
                out.extend_from_slice(&self.ip_id.to_be_bytes());
                out.extend_from_slice(&self.ip_flags.to_be_bytes());
                out.push(self.ttl);
                out.push(IPPROTO_TCP);
                out.extend_from_slice(&[0, 0]);
                out.extend_from_slice(&s.octets());
                out.extend_from_slice(&d.octets());
                fix_ipv4_checksum(&mut out);
            }
            (IpAddr::V6(s), IpAddr::V6(d)) => {
                let word = (6u32 << 28) | ((self.tos as u32) << 20) | (self.flow_label & 0xf_ffff);
                out.extend_from_slice(&word.to_be_bytes());
                out.extend_from_slice(&(tcp.len() as u16).to_be_bytes());
                out.push(IPPROTO_TCP);
                out.push(self.ttl);
                out.extend_from_slice(&s.octets());
                out.extend_from_slice(&d.octets());
            }
            _ => panic!("source and destination must be of the same family"),
        }
        out.extend_from_slice(&tcp);
        out
    }

    pub fn ether_type(&self) -> u16 {
        if self.src.is_ipv4() {
            ETH_P_IPV4
        } else {
            ETH_P_IPV6
        }
    }

    /// The whole Ethernet frame.
    pub fn build(&self) -> Vec<u8> {
        ethernet(&[], self.ether_type(), &self.ip_packet())
    }

    /// The frame's flow as the kernel keys it (`FLOWS`, events).
    pub fn tuple(&self) -> detector_common::FlowTuple {
        let key = |a: IpAddr| match a {
            IpAddr::V4(v4) => detector_common::AddrKey::from_v4(v4.octets()),
            IpAddr::V6(v6) => detector_common::AddrKey::from_v6(v6.octets()),
        };
        detector_common::FlowTuple {
            src: key(self.src),
            dst: key(self.dst),
            src_port: self.src_port,
            dst_port: self.dst_port,
            proto: IPPROTO_TCP,
            _pad: [0; 3],
        }
    }
}

/// The TCP checksum of `tcp` (header with a zero checksum field, and payload) between `src` and `dst`.
pub fn tcp_checksum(src: IpAddr, dst: IpAddr, tcp: &[u8]) -> u16 {
    let mut pseudo = Vec::with_capacity(40);
    match (src, dst) {
        (IpAddr::V4(s), IpAddr::V4(d)) => {
            pseudo.extend_from_slice(&s.octets());
            pseudo.extend_from_slice(&d.octets());
        }
        (IpAddr::V6(s), IpAddr::V6(d)) => {
            pseudo.extend_from_slice(&s.octets());
            pseudo.extend_from_slice(&d.octets());
        }
        _ => panic!("source and destination must be of the same family"),
    }
    pseudo.extend_from_slice(&[0, IPPROTO_TCP]);
    pseudo.extend_from_slice(&(tcp.len() as u32 as u16).to_be_bytes());
    let mut sum = 0u32;
    for chunk in pseudo.chunks(2).chain(tcp.chunks(2)) {
        let word = u16::from_be_bytes([chunk[0], *chunk.get(1).unwrap_or(&0)]);
        sum += word as u32;
    }
    while sum >> 16 != 0 {
        sum = (sum & 0xffff) + (sum >> 16);
    }
    !(sum as u16)
}

/// `frame` padded with `fill` bytes to at least the 60-byte Ethernet minimum (padding after the IP packet).
pub fn with_ethernet_padding(mut frame: Vec<u8>, fill: u8) -> Vec<u8> {
    if frame.len() < 60 {
        frame.resize(60, fill);
    }
    frame
}
