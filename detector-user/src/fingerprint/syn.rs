//! The SYN signature from raw IPv4/IPv6 + TCP bytes into [`detector_common::SynSignature`], and its p0f text
//! form `ver:ittl:olen:mss:wsize,scale:olayout:quirks:pclass`.
//!
//! The kernel (`detector-ebpf/src/tcp.rs`) fills the same struct from live SYNs and verdicts are stored under
//! its [`SynSignature::key`], so this parser follows the kernel's reading byte for byte wherever it differs
//! from p0f 3.09b's `process.c`:
//! - `ecn` comes from the IP ECN bits or TCP ECE/CWR; p0f also counts the NS/AE bit (byte 12, bit 0), the
//!   kernel and `detector_common::syn::quirk::ECN` do not.
//! - `ack+` is "ACK number non-zero while ACK is off" as documented; p0f's code tests `ack & 1` (a known p0f
//!   bug: `RD32(tcp->ack) & !(flags & RST)`).
//! - Options: a non-NOP/EOL option needs a length byte `>= 2` that stays inside the options area, else `bad`
//!   and the walk stops. MSS/WS/TS with a length other than 4/3/10 are `bad` and their value is not taken (p0f
//!   takes it and assumes the standard size). Only the first [`SYN_MAX_OPTIONS`] kinds are kept (p0f keeps 24),
//!   and at most [`SYN_MAX_OPTIONS_WALKED`] options are walked (the kernel's loop bound): a 21st option (only
//!   NOP padding gets there) is `bad` and ends the walk.
//! - IPv6 extension headers (hop-by-hop, routing, destination options, fragment, AH) are skipped, as the kernel
//!   does; p0f ignores IPv6 packets with extension headers. Non-first fragments carry no TCP header.
//! - The payload flag (`pclass`) uses the IP length, so Ethernet padding is never payload (as in the kernel).
//!   Bytes present past the IP length (padding) still count as present for the options walk, as in the kernel.
//!
//! The text form follows p0f's `dump_sig`: the TTL as `observed+distance` (`+?` past 35 hops), the window as
//! `mss*N` / `mtu*N` when p0f's `detect_win_multi` finds a multiple, quirks in p0f's order.

use std::fmt::Write as _;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};

use detector_common::syn::{
    SYN_MAX_OPTIONS, SYN_MAX_OPTIONS_WALKED, SynSignature, initial_ttl, ipv4_quirks, ipv6_quirks,
    option_kind, quirk, tcp_quirks,
};

/// p0f's `MAX_DIST`: more hops than this from the guessed initial TTL is implausible.
pub const MAX_DIST: u8 = 35;
const MIN_TCP4: u32 = 40;
const MIN_TCP6: u32 = 60;

pub const TCP_FIN: u8 = 0x01;
pub const TCP_SYN: u8 = 0x02;
pub const TCP_RST: u8 = 0x04;
pub const TCP_PSH: u8 = 0x08;
pub const TCP_ACK: u8 = 0x10;
pub const TCP_URG: u8 = 0x20;

const MAX_IPV6_EXT_HEADERS: usize = 8;

/// Why bytes gave no TCP header.
#[derive(Clone, Copy, Debug, PartialEq, Eq, thiserror::Error)]
pub enum SynError {
    #[error("not IPv4 or IPv6")]
    NotIp,
    #[error("not TCP")]
    NotTcp,
    #[error("not the first fragment")]
    Fragment,
    #[error("truncated header")]
    Truncated,
    #[error("malformed IP header")]
    Malformed,
}

/// One TCP packet's addressing and its signature (meaningful for SYNs).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct TcpSyn {
    pub signature: SynSignature,
    pub src: IpAddr,
    pub dst: IpAddr,
    pub src_port: u16,
    pub dst_port: u16,
    pub seq: u32,
    /// TCP flags byte (FIN … CWR).
    pub flags: u8,
    /// IP header (with options / extension headers) plus TCP header length: p0f's `tot_hdr`.
    pub header_len: u16,
}

impl TcpSyn {
    /// A client's SYN: SYN without ACK.
    pub fn is_client_syn(&self) -> bool {
        self.flags & (TCP_SYN | TCP_ACK) == TCP_SYN
    }
}

/// Reads the IP and TCP headers at the start of `ip` (no link layer) and computes the SYN signature the way
/// the kernel does. Any TCP packet is accepted; the signature only means something for a SYN.
pub fn parse_ip_tcp(ip: &[u8]) -> Result<TcpSyn, SynError> {
    let mut sig = SynSignature::default();
    let version = ip.first().ok_or(SynError::Truncated)? >> 4;
    let (src, dst, l4, ip_end) = match version {
        4 => {
            let h = ip.get(..20).ok_or(SynError::Truncated)?;
            let ihl = (h[0] & 0x0f) as usize * 4;
            if ihl < 20 {
                return Err(SynError::Malformed);
            }
            if ip.len() < ihl {
                return Err(SynError::Truncated);
            }
            let total = u16::from_be_bytes([h[2], h[3]]) as usize;
            if total < ihl {
                return Err(SynError::Malformed);
            }
            if h[9] != 6 {
                return Err(SynError::NotTcp);
            }
            let frag = u16::from_be_bytes([h[6], h[7]]);
            if frag & 0x1fff != 0 {
                return Err(SynError::Fragment);
            }
            sig.ip_version = 4;
            sig.ttl = h[8];
            sig.ip_opts_len = (ihl - 20) as u8;
            sig.quirks |= ipv4_quirks(h.try_into().expect("20 bytes"));
            let src = Ipv4Addr::new(h[12], h[13], h[14], h[15]);
            let dst = Ipv4Addr::new(h[16], h[17], h[18], h[19]);
            (IpAddr::V4(src), IpAddr::V4(dst), ihl, total.min(ip.len()))
        }
        6 => {
            let h = ip.get(..40).ok_or(SynError::Truncated)?;
            sig.ip_version = 6;
            sig.ttl = h[7];
            sig.quirks |= ipv6_quirks(h[..8].try_into().expect("8 bytes"));
            let payload_len = u16::from_be_bytes([h[4], h[5]]) as usize;
            let mut next = h[6];
            let mut offset = 40usize;
            let mut found = false;
            for _ in 0..=MAX_IPV6_EXT_HEADERS {
                match next {
                    0 | 43 | 60 => {
                        let e = ip.get(offset..offset + 2).ok_or(SynError::Truncated)?;
                        next = e[0];
                        offset += (e[1] as usize + 1) * 8;
                    }
                    51 => {
                        let e = ip.get(offset..offset + 2).ok_or(SynError::Truncated)?;
                        next = e[0];
                        offset += (e[1] as usize + 2) * 4;
                    }
                    44 => {
                        let e = ip.get(offset..offset + 4).ok_or(SynError::Truncated)?;
                        next = e[0];
                        if u16::from_be_bytes([e[2], e[3]]) >> 3 != 0 {
                            return Err(SynError::Fragment);
                        }
                        offset += 8;
                    }
                    _ => {
                        found = true;
                        break;
                    }
                }
            }
            if !found || next != 6 {
                return Err(SynError::NotTcp);
            }
            let mut src = [0u8; 16];
            src.copy_from_slice(&h[8..24]);
            let mut dst = [0u8; 16];
            dst.copy_from_slice(&h[24..40]);
            let src = IpAddr::V6(Ipv6Addr::from(src));
            let dst = IpAddr::V6(Ipv6Addr::from(dst));
            (src, dst, offset, (40 + payload_len).min(ip.len()))
        }
        _ => return Err(SynError::NotIp),
    };

    let t: &[u8; 20] = ip
        .get(l4..l4 + 20)
        .and_then(|t| t.try_into().ok())
        .ok_or(SynError::Truncated)?;
    let seq = u32::from_be_bytes([t[4], t[5], t[6], t[7]]);
    let flags = t[13];
    sig.window = u16::from_be_bytes([t[14], t[15]]);
    sig.quirks |= tcp_quirks(t);
    let header_len = ((t[12] >> 4) as usize * 4).max(20);
    if ip_end > l4 + header_len {
        sig.payload = 1;
    }
    read_options(&ip[l4..], header_len, &mut sig);

    Ok(TcpSyn {
        signature: sig,
        src,
        dst,
        src_port: u16::from_be_bytes([t[0], t[1]]),
        dst_port: u16::from_be_bytes([t[2], t[3]]),
        seq,
        flags,
        header_len: (l4 + header_len).min(u16::MAX as usize) as u16,
    })
}

/// Walks the options area `tcp[20..options_end]` (see the module docs for the rules).
fn read_options(tcp: &[u8], options_end: usize, sig: &mut SynSignature) {
    let byte = |i: usize| tcp.get(i).copied();
    let mut o = 20usize;
    let mut walked = 0usize;
    while o < options_end {
        if walked == SYN_MAX_OPTIONS_WALKED {
            sig.quirks |= quirk::BAD;
            return;
        }
        walked += 1;
        let Some(kind) = byte(o) else {
            sig.quirks |= quirk::BAD;
            return;
        };
        if (sig.option_count as usize) < SYN_MAX_OPTIONS {
            sig.options[sig.option_count as usize] = kind;
            sig.option_count += 1;
        }
        if kind == option_kind::EOL {
            sig.eol_pad = (options_end - o - 1) as u8;
            if (o + 1..options_end).any(|i| byte(i).is_some_and(|b| b != 0)) {
                sig.quirks |= quirk::OPT_PLUS;
            }
            return;
        }
        if kind == option_kind::NOP {
            o += 1;
            continue;
        }
        let Some(len) = byte(o + 1).map(usize::from) else {
            sig.quirks |= quirk::BAD;
            return;
        };
        if len < 2 || o + len > options_end {
            sig.quirks |= quirk::BAD;
            return;
        }
        match (kind, len) {
            (option_kind::MSS, 4) => {
                if let (Some(a), Some(b)) = (byte(o + 2), byte(o + 3)) {
                    sig.mss = u16::from_be_bytes([a, b]);
                }
            }
            (option_kind::WS, 3) => {
                if let Some(v) = byte(o + 2) {
                    sig.wscale = v;
                    if v > 14 {
                        sig.quirks |= quirk::EXWS;
                    }
                }
            }
            (option_kind::TIMESTAMP, 10) => {
                if let Some(v) = tcp.get(o + 2..o + 10) {
                    if v[..4] == [0; 4] {
                        sig.quirks |= quirk::TS1_MINUS;
                    }
                    if v[4..] != [0; 4] {
                        sig.quirks |= quirk::TS2_PLUS;
                    }
                }
            }
            (option_kind::MSS | option_kind::WS | option_kind::TIMESTAMP, _) => sig.quirks |= quirk::BAD,
            _ => {}
        }
        o += len;
    }
}

/// The recorded option kinds.
pub fn options(sig: &SynSignature) -> &[u8] {
    &sig.options[..(sig.option_count as usize).min(SYN_MAX_OPTIONS)]
}

/// Whether the SYN carried a non-zero own timestamp (p0f's `ts1 != 0`).
pub fn has_ts1(sig: &SynSignature) -> bool {
    options(sig).contains(&option_kind::TIMESTAMP) && sig.quirks & quirk::TS1_MINUS == 0
}

/// p0f's `tot_hdr` (IP + TCP header bytes) as well as the signature allows: exact when every option has a
/// fixed size (all real SYNs); SACK and unknown options count their minimum size.
pub fn estimated_header_len(sig: &SynSignature) -> u16 {
    let ip = if sig.ip_version == 6 {
        40
    } else {
        20 + sig.ip_opts_len as u16
    };
    let mut opts: u16 = 0;
    for &kind in options(sig) {
        opts += match kind {
            option_kind::EOL => 1 + sig.eol_pad as u16,
            option_kind::NOP => 1,
            option_kind::MSS => 4,
            option_kind::WS => 3,
            option_kind::SACK_PERMITTED => 2,
            option_kind::SACK => 10,
            option_kind::TIMESTAMP => 10,
            _ => 2,
        };
    }
    ip + 20 + opts.div_ceil(4) * 4
}

/// p0f's `detect_win_multi` for a SYN: `Some((is_mtu, n))` when the window is `n` × MSS (or MTU).
pub fn window_multiple(sig: &SynSignature, header_len: u16) -> Option<(bool, u16)> {
    let win = sig.window as u32;
    let mss = sig.mss as u32;
    if win == 0 || mss < 100 {
        return None;
    }
    let v6 = sig.ip_version == 6;
    let ts1 = has_ts1(sig);
    let candidates: [(bool, u32, bool); 10] = [
        (true, mss, false),
        (ts1, mss - 12, false),
        (true, 1500 - MIN_TCP4, false),
        (true, 1500 - MIN_TCP4 - 12, false),
        (v6, 1500 - MIN_TCP6, false),
        (v6, 1500 - MIN_TCP6 - 12, false),
        (true, mss + MIN_TCP4, true),
        (true, mss + header_len as u32, true),
        (v6, mss + MIN_TCP6, true),
        (true, 1500, true),
    ];
    candidates
        .iter()
        .find(|(on, div, _)| *on && *div != 0 && win.is_multiple_of(*div))
        .map(|&(_, div, mtu)| (mtu, (win / div) as u16))
}

/// The option layout in p0f's notation (`mss,nop,ws,sok,ts,eol+1`, `?N` for other kinds).
pub fn layout_text(sig: &SynSignature) -> String {
    let mut out = String::new();
    for (i, &kind) in options(sig).iter().enumerate() {
        if i > 0 {
            out.push(',');
        }
        match kind {
            option_kind::EOL => {
                let _ = write!(out, "eol+{}", sig.eol_pad);
            }
            option_kind::NOP => out.push_str("nop"),
            option_kind::MSS => out.push_str("mss"),
            option_kind::WS => out.push_str("ws"),
            option_kind::SACK_PERMITTED => out.push_str("sok"),
            option_kind::SACK => out.push_str("sack"),
            option_kind::TIMESTAMP => out.push_str("ts"),
            other => {
                let _ = write!(out, "?{other}");
            }
        }
    }
    out
}

/// The quirks in p0f's notation and order (`df,id+,ecn`).
pub fn quirks_text(quirks: u32) -> String {
    let names: Vec<&str> = quirk::ALL
        .iter()
        .filter(|(bit, _)| quirks & bit != 0)
        .map(|(_, name)| *name)
        .collect();
    names.join(",")
}

/// The p0f text form of a SYN signature, as p0f 3.09b's `dump_sig` writes it for an observed SYN.
/// `header_len`: IP + TCP header bytes if known (only used for p0f's "MTU (actual size)" window check);
/// `None` estimates it from the option layout.
pub fn signature_text(sig: &SynSignature, header_len: Option<u16>) -> String {
    let ittl = initial_ttl(sig.ttl);
    let dist = ittl - sig.ttl;
    let mut out = String::with_capacity(80);
    if dist > MAX_DIST {
        let _ = write!(out, "{}:{}+?:{}:", sig.ip_version, sig.ttl, sig.ip_opts_len);
    } else {
        let _ = write!(
            out,
            "{}:{}+{}:{}:",
            sig.ip_version, sig.ttl, dist, sig.ip_opts_len
        );
    }
    let _ = write!(out, "{}:", sig.mss);
    match window_multiple(sig, header_len.unwrap_or_else(|| estimated_header_len(sig))) {
        Some((true, n)) => {
            let _ = write!(out, "mtu*{n}");
        }
        Some((false, n)) => {
            let _ = write!(out, "mss*{n}");
        }
        None => {
            let _ = write!(out, "{}", sig.window);
        }
    }
    let _ = write!(
        out,
        ",{}:{}:{}:{}",
        sig.wscale,
        layout_text(sig),
        quirks_text(sig.quirks),
        if sig.payload != 0 { "+" } else { "0" }
    );
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    /// macOS SYN from `macos_tcp_flags.pcap` (IPv4 header + TCP header, as tcpdump -x shows it).
    const MACOS_SYN: [u8; 64] = [
        0x45, 0x00, 0x00, 0x40, 0x00, 0x00, 0x40, 0x00, 0x40, 0x06, 0xc5, 0x0d, 0xac, 0x10, 0x05, 0x10, 0xac,
        0x43, 0x18, 0x47, 0xef, 0x7f, 0x01, 0xbb, 0xc6, 0xa2, 0x9c, 0xd2, 0x00, 0x00, 0x00, 0x00, 0xb0, 0xc2,
        0xff, 0xff, 0xd2, 0x28, 0x00, 0x00, 0x02, 0x04, 0x05, 0xb4, 0x01, 0x03, 0x03, 0x06, 0x01, 0x01, 0x08,
        0x0a, 0x78, 0x03, 0x21, 0xb5, 0x00, 0x00, 0x00, 0x00, 0x04, 0x02, 0x00, 0x00,
    ];

    #[test]
    fn macos_syn() {
        let syn = parse_ip_tcp(&MACOS_SYN).unwrap();
        assert!(syn.is_client_syn());
        assert_eq!(syn.src_port, 61311);
        assert_eq!(syn.header_len, 64);
        assert_eq!(estimated_header_len(&syn.signature), 64);
        assert_eq!(
            signature_text(&syn.signature, Some(syn.header_len)),
            "4:64+0:0:1460:65535,6:mss,nop,ws,nop,nop,ts,sok,eol+1:df,ecn:0"
        );
    }

    #[test]
    fn ethernet_padding_is_not_payload() {
        // 40-byte SYN without options, padded to 46 bytes as on Ethernet.
        let mut p = MACOS_SYN[..40].to_vec();
        p[2..4].copy_from_slice(&40u16.to_be_bytes());
        p[32] = 0x50;
        p.extend_from_slice(&[0; 6]);
        let syn = parse_ip_tcp(&p).unwrap();
        assert_eq!(syn.signature.payload, 0);
        assert_eq!(syn.signature.option_count, 0);
        assert_eq!(
            signature_text(&syn.signature, None),
            "4:64+0:0:0:65535,0::df,ecn:0"
        );
    }

    #[test]
    fn window_multiples_and_distance() {
        let sig = SynSignature {
            ip_version: 4,
            ttl: 57,
            mss: 1460,
            window: 64240,
            wscale: 7,
            quirks: quirk::DF | quirk::ID_PLUS,
            option_count: 5,
            options: {
                let mut o = [0u8; SYN_MAX_OPTIONS];
                o[..5].copy_from_slice(&[2, 4, 8, 1, 3]);
                o
            },
            ..Default::default()
        };
        assert_eq!(
            signature_text(&sig, None),
            "4:57+7:0:1460:mss*44,7:mss,sok,ts,nop,ws:df,id+:0"
        );
        let far = SynSignature {
            ttl: 129,
            window: 1234,
            ..sig
        };
        assert_eq!(
            signature_text(&far, None),
            "4:129+?:0:1460:1234,7:mss,sok,ts,nop,ws:df,id+:0"
        );
        let mtu = SynSignature { window: 3000, ..sig };
        assert_eq!(window_multiple(&mtu, 60), Some((true, 2)));
    }

    #[test]
    fn bad_options_and_truncation_never_panic() {
        for cut in 0..MACOS_SYN.len() {
            let _ = parse_ip_tcp(&MACOS_SYN[..cut]);
        }
        // Option length 1: bad.
        let mut p = MACOS_SYN;
        p[41] = 1;
        let syn = parse_ip_tcp(&p).unwrap();
        assert_ne!(syn.signature.quirks & quirk::BAD, 0);
        assert_eq!(layout_text(&syn.signature), "mss");
        // Data offset past the captured bytes: options that are not there are bad, not a panic.
        let mut p = MACOS_SYN;
        p[32] = 0xf0;
        let syn = parse_ip_tcp(&p[..60]).unwrap();
        assert_ne!(syn.signature.quirks & quirk::BAD, 0);
    }

    #[test]
    fn at_most_twenty_options_are_walked() {
        // The macOS SYN's 24-byte options area refilled: `n` NOPs, then MSS when `mss`, then EOL padding.
        let with_nops = |n: usize, mss: bool| {
            let mut p = MACOS_SYN;
            let area = &mut p[40..64];
            area.fill(0);
            area[..n].fill(option_kind::NOP);
            if mss {
                area[n..n + 4].copy_from_slice(&[2, 4, 5, 0xb4]);
            }
            parse_ip_tcp(&p).unwrap().signature
        };
        // 19 NOPs + EOL: 20 options, fine (the EOL ends the walk with 4 bytes of padding).
        let sig = with_nops(19, false);
        assert_eq!(sig.quirks & quirk::BAD, 0);
        assert_eq!(sig.option_count as usize, SYN_MAX_OPTIONS);
        assert_eq!(sig.eol_pad, 4);
        // 19 NOPs + MSS + EOL, 20 NOPs + MSS: the 21st option is past the walk's bound.
        let sig = with_nops(19, true);
        assert_ne!(sig.quirks & quirk::BAD, 0);
        assert_eq!((sig.mss, sig.eol_pad), (1460, 0));
        let sig = with_nops(20, true);
        assert_ne!(sig.quirks & quirk::BAD, 0);
        assert_eq!(sig.mss, 0);
        // 24 NOPs: the same.
        assert_ne!(with_nops(24, false).quirks & quirk::BAD, 0);
        // 16 NOPs + MSS + EOL: 18 options, all walked (16 recorded), the MSS read.
        let sig = with_nops(16, true);
        assert_eq!(sig.quirks & quirk::BAD, 0);
        assert_eq!(sig.mss, 1460);
    }
}
