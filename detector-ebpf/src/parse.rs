//! Header parsing with one contract: a cursor offset into the frame, one header per step, every read
//! bounds-checked against `data_end` before it happens.
//!
//! What counts as what:
//! - not IPv4/IPv6 after ≤ 2 VLAN tags → [`ParseError::NotIp`];
//! - IP header truncated or invalid (version, IHL < 5) → [`ParseError::Malformed`];
//! - a valid IP header whose transport ports cannot be read (non-first fragment, extension chain longer than
//!   [`MAX_IPV6_EXT_HEADERS`] or cut short, fewer than 4 bytes of TCP or 8 of UDP) → a [`Packet`] without ports
//!   (protocol 0 = unknown when the IPv6 chain could not be walked to its end): address rules apply,
//!   and the classifier treats TCP/UDP/unknown packets without ports as aimed at a protected port (see main.rs).

use aya_ebpf::programs::XdpContext;
use detector_common::{AddrKey, FlowTuple};

/// IPv6 extension headers followed before giving up on finding the transport header (xdp-tools uses 6).
pub const MAX_IPV6_EXT_HEADERS: usize = 8;
/// Upper bound on any header offset; keeps every pointer computation provably inside the frame for the verifier.
const MAX_OFFSET: usize = 2048;

const ETH_HDR_LEN: usize = 14;
const VLAN_HDR_LEN: usize = 4;
const ETH_P_IPV4: u16 = 0x0800;
const ETH_P_IPV6: u16 = 0x86DD;
const ETH_P_8021Q: u16 = 0x8100;
const ETH_P_8021AD: u16 = 0x88A8;

const IPPROTO_HOPOPTS: u8 = 0;
const IPPROTO_TCP: u8 = 6;
const IPPROTO_UDP: u8 = 17;
const IPPROTO_ROUTING: u8 = 43;
const IPPROTO_FRAGMENT: u8 = 44;
const IPPROTO_AH: u8 = 51;
const IPPROTO_DSTOPTS: u8 = 60;

pub enum ParseError {
    NotIp,
    Malformed,
}

pub struct Packet {
    pub flow: FlowTuple,
    /// The transport ports could be read (the first 4 bytes of TCP, the whole 8-byte UDP header); the ports in
    /// `flow` are valid.
    pub has_ports: bool,
    pub tcp_syn: bool,
    pub tcp_ack: bool,
    /// The whole 20-byte TCP header is in the frame (the TCP program reads it).
    pub tcp_full: bool,
    /// An IP fragment, first or later (IPv4 MF or offset; an IPv6 fragment header).
    pub is_fragment: bool,
    /// Frame offsets of the IP and transport headers.
    pub l3_offset: u16,
    pub l4_offset: u16,
    pub ip_version: u8,
}

/// A pointer to a `T` at `offset` bytes into the frame, if the whole `T` is inside it.
#[inline(always)]
fn ptr_at<T>(ctx: &XdpContext, offset: usize) -> Option<*const T> {
    if offset > MAX_OFFSET {
        return None;
    }
    let start = ctx.data();
    let end = ctx.data_end();
    if start + offset + core::mem::size_of::<T>() > end {
        return None;
    }
    Some((start + offset) as *const T)
}

#[inline(always)]
pub fn read<T: Copy>(ctx: &XdpContext, offset: usize) -> Option<T> {
    // SAFETY: `ptr_at` checked that the whole `T` lies inside the frame; unaligned because frames are.
    ptr_at::<T>(ctx, offset).map(|p| unsafe { core::ptr::read_unaligned(p) })
}

#[inline(always)]
pub fn read_be16(ctx: &XdpContext, offset: usize) -> Option<u16> {
    read::<[u8; 2]>(ctx, offset).map(u16::from_be_bytes)
}

#[inline(always)]
pub fn parse(ctx: &XdpContext) -> Result<Packet, ParseError> {
    let mut ether_type = read_be16(ctx, 12).ok_or(ParseError::NotIp)?;
    let mut offset = ETH_HDR_LEN;
    // Up to two tags: 802.1Q, or 802.1ad (QinQ) outer + 802.1Q inner. Unrolled; no loop for the verifier.
    if ether_type == ETH_P_8021Q || ether_type == ETH_P_8021AD {
        ether_type = read_be16(ctx, offset + 2).ok_or(ParseError::Malformed)?;
        offset += VLAN_HDR_LEN;
        if ether_type == ETH_P_8021Q || ether_type == ETH_P_8021AD {
            ether_type = read_be16(ctx, offset + 2).ok_or(ParseError::Malformed)?;
            offset += VLAN_HDR_LEN;
        }
    }
    match ether_type {
        ETH_P_IPV4 => parse_ipv4(ctx, offset),
        ETH_P_IPV6 => parse_ipv6(ctx, offset),
        _ => Err(ParseError::NotIp),
    }
}

#[inline(always)]
fn parse_ipv4(ctx: &XdpContext, offset: usize) -> Result<Packet, ParseError> {
    // Fixed part of the IPv4 header: version/IHL, ..., frag, ttl, proto, check, src, dst.
    let header = read::<[u8; 20]>(ctx, offset).ok_or(ParseError::Malformed)?;
    let version = header[0] >> 4;
    let ihl = (header[0] & 0x0f) as usize;
    if version != 4 || ihl < 5 {
        return Err(ParseError::Malformed);
    }
    let header_len = ihl * 4;
    // Options must be inside the frame too.
    if ptr_at::<u8>(ctx, offset + header_len - 1).is_none() {
        return Err(ParseError::Malformed);
    }
    let fragment_word = u16::from_be_bytes([header[6], header[7]]);
    let fragment_offset = fragment_word & 0x1fff;
    let more_fragments = fragment_word & 0x2000 != 0;
    let proto = header[9];
    let flow = FlowTuple {
        src: AddrKey::from_v4([header[12], header[13], header[14], header[15]]),
        dst: AddrKey::from_v4([header[16], header[17], header[18], header[19]]),
        proto,
        ..FlowTuple::default()
    };
    let mut packet = Packet {
        flow,
        has_ports: false,
        tcp_syn: false,
        tcp_ack: false,
        tcp_full: false,
        is_fragment: more_fragments || fragment_offset != 0,
        l3_offset: offset as u16,
        l4_offset: (offset + header_len) as u16,
        ip_version: 4,
    };
    // Only the first fragment carries the transport header.
    if fragment_offset == 0 {
        parse_l4(ctx, offset + header_len, &mut packet);
    }
    Ok(packet)
}

#[inline(always)]
fn parse_ipv6(ctx: &XdpContext, offset: usize) -> Result<Packet, ParseError> {
    // Copy the addresses straight from the frame: a 40-byte header copy would cost BPF stack.
    let vtc = read::<u8>(ctx, offset).ok_or(ParseError::Malformed)?;
    let src = read::<[u8; 16]>(ctx, offset + 8).ok_or(ParseError::Malformed)?;
    let dst = read::<[u8; 16]>(ctx, offset + 24).ok_or(ParseError::Malformed)?;
    let mut next = read::<u8>(ctx, offset + 6).ok_or(ParseError::Malformed)?;
    if vtc >> 4 != 6 {
        return Err(ParseError::Malformed);
    }
    let l3_offset = offset;
    let mut offset = offset + 40;
    let mut transport_found = false;
    let mut first_fragment = true;
    let mut is_fragment = false;
    // One pass more than the header limit, so the header after the last allowed extension is still seen.
    for i in 0..=MAX_IPV6_EXT_HEADERS {
        match next {
            IPPROTO_HOPOPTS | IPPROTO_ROUTING | IPPROTO_DSTOPTS => {
                let Some(ext) = read::<[u8; 2]>(ctx, offset) else {
                    break;
                };
                next = ext[0];
                offset += (ext[1] as usize + 1) * 8;
            }
            IPPROTO_AH => {
                let Some(ext) = read::<[u8; 2]>(ctx, offset) else {
                    break;
                };
                next = ext[0];
                offset += (ext[1] as usize + 2) * 4;
            }
            IPPROTO_FRAGMENT => {
                let Some(ext) = read::<[u8; 4]>(ctx, offset) else {
                    break;
                };
                next = ext[0];
                offset += 8;
                // An atomic fragment (offset 0, no more fragments) is a whole packet (RFC 6946).
                let word = u16::from_be_bytes([ext[2], ext[3]]);
                is_fragment |= word & 0xfff9 != 0;
                if u16::from_be_bytes([ext[2], ext[3]]) >> 3 != 0 {
                    // A non-first fragment: what follows is the middle of the payload, not headers. Its protocol
                    // is the one this header names, unless that is another extension header, or this header is
                    // already one too many: then the protocol is unknown.
                    first_fragment = false;
                    transport_found = i < MAX_IPV6_EXT_HEADERS
                        && !matches!(
                            next,
                            IPPROTO_HOPOPTS
                                | IPPROTO_ROUTING
                                | IPPROTO_DSTOPTS
                                | IPPROTO_FRAGMENT
                                | IPPROTO_AH
                        );
                    break;
                }
            }
            _ => {
                transport_found = true;
                break;
            }
        }
    }
    let flow = FlowTuple {
        src: AddrKey::from_v6(src),
        dst: AddrKey::from_v6(dst),
        proto: if transport_found { next } else { 0 },
        ..FlowTuple::default()
    };
    let mut packet = Packet {
        flow,
        has_ports: false,
        tcp_syn: false,
        tcp_ack: false,
        tcp_full: false,
        is_fragment,
        l3_offset: l3_offset as u16,
        l4_offset: offset as u16,
        ip_version: 6,
    };
    if transport_found && first_fragment {
        parse_l4(ctx, offset, &mut packet);
    }
    Ok(packet)
}

/// Fills in ports and TCP flags from the transport header at `offset`.
///
/// Ports are taken as soon as their 4 bytes are present, so a "tiny first fragment" (RFC 1858) cannot hide a
/// connection from the limits; a TCP header too short to hold the flags counts as a new connection (SYN) —
/// the conservative reading for the connection limit. The kernel stack drops such packets anyway.
#[inline(always)]
fn parse_l4(ctx: &XdpContext, offset: usize, packet: &mut Packet) {
    match packet.flow.proto {
        IPPROTO_TCP => {
            let Some(ports) = read::<[u8; 4]>(ctx, offset) else {
                return;
            };
            packet.flow.src_port = u16::from_be_bytes([ports[0], ports[1]]);
            packet.flow.dst_port = u16::from_be_bytes([ports[2], ports[3]]);
            packet.has_ports = true;
            match read::<u8>(ctx, offset + 13) {
                Some(flags) => {
                    packet.tcp_syn = flags & 0x02 != 0;
                    packet.tcp_ack = flags & 0x10 != 0;
                    // Only a header whose flags were read goes on to `aqd_tcp`: one starting just below the
                    // parse bound (flags past it) stays a new connection here, as the contract says.
                    packet.tcp_full = ptr_at::<[u8; 20]>(ctx, offset).is_some();
                }
                None => packet.tcp_syn = true,
            }
        }
        IPPROTO_UDP => {
            let Some(udp) = read::<[u8; 8]>(ctx, offset) else {
                return;
            };
            packet.flow.src_port = u16::from_be_bytes([udp[0], udp[1]]);
            packet.flow.dst_port = u16::from_be_bytes([udp[2], udp[3]]);
            packet.has_ports = true;
        }
        _ => {}
    }
}
