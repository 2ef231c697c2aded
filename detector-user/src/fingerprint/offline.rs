//! `aqd fingerprint FILE.pcap|FILE.pcapng [--json]`: JA4 of every TCP ClientHello and the p0f signature (and
//! label) of every client SYN in a capture.
//!
//! Text lines:
//! ```text
//! SRC SRCPORT DST DSTPORT JA4 JA4_R
//! SRC SRCPORT DST DSTPORT syn P0F-SIGNATURE LABEL        (LABEL: the p0f.fp label, `(fuzzy)` appended; `?`)
//! ```
//! `--json`: one [`OfflineRecord`] object per line.
//!
//! - The file format is told by its magic number, not its name (several FoxIO "`.pcapng`" files are pcap).
//!   Link types: Ethernet (with up to two VLAN tags), BSD loopback (NULL/LOOP), raw IP (RAW, IPV4, IPV6),
//!   Linux cooked capture v1 and v2 (SLL, SLL2). Frames of other link types are counted and skipped; a pcap
//!   whose only link type is unsupported is an error.
//! - A record per ClientHello: the first handshake message of each direction of each TCP flow, reassembled by
//!   sequence number from at most the first 16 KiB ([`super::reassembly`]). Only the first ClientHello of a
//!   stream counts; a flow's direction whose first bytes are not a ClientHello (the server side, HTTP, …)
//!   gives nothing. A new SYN with another ISN on the same addresses and ports starts a new stream.
//! - A record per client SYN (SYN without ACK), retransmissions included, as p0f reports them.
//! - QUIC (UDP) ClientHellos are out of scope: UDP flows on port 443 are only counted
//!   ([`CaptureStats::udp_443_flows`]).
//! - A capture cut short ends the reading with what was read so far (a warning is logged), as tcpdump -r does.

use std::collections::{HashMap, HashSet};
use std::fmt;
use std::fs::File;
use std::io::{BufReader, Read};
use std::net::IpAddr;
use std::path::Path;

use anyhow::{Context as _, bail};
use etherparse::{NetSlice, SlicedPacket, TransportSlice};
use pcap_file::pcap::PcapReader;
use pcap_file::pcapng::{Block, PcapNgReader};
use serde::Serialize;

use super::ja4::ja4_from_stream;
use super::p0f::P0fDb;
use super::reassembly::{Scan, StreamBuffer, first_client_hello};
use super::syn::{self, TCP_ACK, TCP_SYN};

/// One line of `aqd fingerprint` output.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
#[serde(tag = "type", rename_all = "snake_case")]
pub enum OfflineRecord {
    ClientHello(ClientHelloRecord),
    Syn(SynRecord),
}

/// The JA4 of a stream's first ClientHello.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct ClientHelloRecord {
    pub src: IpAddr,
    pub srcport: u16,
    pub dst: IpAddr,
    pub dstport: u16,
    pub ja4: String,
    pub ja4_r: String,
    pub ja4_o: String,
    pub ja4_ro: String,
    /// The SNI host name, if any.
    pub sni: Option<String>,
}

/// The p0f signature of a client SYN.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct SynRecord {
    pub src: IpAddr,
    pub srcport: u16,
    pub dst: IpAddr,
    pub dstport: u16,
    /// p0f text form.
    pub signature: String,
    /// The matching p0f.fp label, if a database was given and a signature matched.
    pub label: Option<String>,
    pub fuzzy: bool,
    pub generic: bool,
    /// Hops from the matched signature's initial TTL, or from the guessed one.
    pub distance: u8,
    /// `SynSignature::key()` in hex: the key of the kernel's verdicts-by-fingerprint map.
    pub key: String,
}

impl fmt::Display for OfflineRecord {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            OfflineRecord::ClientHello(r) => {
                write!(
                    f,
                    "{} {} {} {} {} {}",
                    r.src, r.srcport, r.dst, r.dstport, r.ja4, r.ja4_r
                )
            }
            OfflineRecord::Syn(r) => {
                let label = match (&r.label, r.fuzzy) {
                    (Some(label), true) => format!("{label} (fuzzy)"),
                    (Some(label), false) => label.clone(),
                    (None, _) => "?".to_owned(),
                };
                write!(
                    f,
                    "{} {} {} {} syn {} {}",
                    r.src, r.srcport, r.dst, r.dstport, r.signature, label
                )
            }
        }
    }
}

/// Counts from one capture.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct CaptureStats {
    pub frames: u64,
    pub tcp_segments: u64,
    /// Frames of a link type this reader does not decode.
    pub unsupported_link: u64,
    /// Frames that were not IP, were fragments, or failed to parse.
    pub skipped: u64,
    /// Distinct UDP flows with port 443 (QUIC candidates, out of scope).
    pub udp_443_flows: usize,
    /// Whether the file ended inside a block or packet.
    pub truncated: bool,
}

/// One TCP segment of a capture.
#[derive(Clone, Copy, Debug)]
pub struct TcpSegment<'a> {
    pub src: IpAddr,
    pub dst: IpAddr,
    pub src_port: u16,
    pub dst_port: u16,
    pub seq: u32,
    /// TCP flags byte.
    pub flags: u8,
    pub payload: &'a [u8],
    /// The whole IP packet (from the IP header on).
    pub ip: &'a [u8],
}

// Link types (tcpdump.org/linktypes.html).
const LINKTYPE_NULL: u32 = 0;
const LINKTYPE_ETHERNET: u32 = 1;
const LINKTYPE_RAW_OPENBSD: u32 = 12;
const LINKTYPE_RAW_BSDOS: u32 = 14;
const LINKTYPE_RAW: u32 = 101;
const LINKTYPE_LOOP: u32 = 108;
const LINKTYPE_LINUX_SLL: u32 = 113;
const LINKTYPE_IPV4: u32 = 228;
const LINKTYPE_IPV6: u32 = 229;
const LINKTYPE_LINUX_SLL2: u32 = 276;

/// Whether `linktype` is one [`strip_link`] decodes.
pub fn link_type_supported(linktype: u32) -> bool {
    matches!(
        linktype,
        LINKTYPE_NULL
            | LINKTYPE_ETHERNET
            | LINKTYPE_RAW_OPENBSD
            | LINKTYPE_RAW_BSDOS
            | LINKTYPE_RAW
            | LINKTYPE_LOOP
            | LINKTYPE_LINUX_SLL
            | LINKTYPE_IPV4
            | LINKTYPE_IPV6
            | LINKTYPE_LINUX_SLL2
    )
}

fn ip_by_ethertype(ethertype: u16, rest: &[u8]) -> Option<&[u8]> {
    matches!(ethertype, 0x0800 | 0x86dd).then_some(rest)
}

fn ip_by_version(rest: &[u8]) -> Option<&[u8]> {
    matches!(rest.first()? >> 4, 4 | 6).then_some(rest)
}

/// The IP packet inside a frame of `linktype`, if it carries IPv4 or IPv6.
pub fn strip_link(linktype: u32, frame: &[u8]) -> Option<&[u8]> {
    match linktype {
        LINKTYPE_ETHERNET => {
            let mut ethertype = u16::from_be_bytes([*frame.get(12)?, *frame.get(13)?]);
            let mut offset = 14;
            for _ in 0..2 {
                if !matches!(ethertype, 0x8100 | 0x88a8 | 0x9100) {
                    break;
                }
                ethertype = u16::from_be_bytes([*frame.get(offset + 2)?, *frame.get(offset + 3)?]);
                offset += 4;
            }
            ip_by_ethertype(ethertype, frame.get(offset..)?)
        }
        // The 4-byte address family is in the capturing host's byte order and its IPv6 value differs
        // between BSDs: the IP version nibble is the reliable signal.
        LINKTYPE_NULL | LINKTYPE_LOOP => ip_by_version(frame.get(4..)?),
        LINKTYPE_RAW | LINKTYPE_RAW_OPENBSD | LINKTYPE_RAW_BSDOS | LINKTYPE_IPV4 | LINKTYPE_IPV6 => {
            ip_by_version(frame)
        }
        LINKTYPE_LINUX_SLL => ip_by_ethertype(
            u16::from_be_bytes([*frame.get(14)?, *frame.get(15)?]),
            frame.get(16..)?,
        ),
        LINKTYPE_LINUX_SLL2 => ip_by_ethertype(
            u16::from_be_bytes([*frame.first()?, *frame.get(1)?]),
            frame.get(20..)?,
        ),
        _ => None,
    }
}

/// Calls `f` with the link type and bytes of every frame of a pcap or pcapng capture read from `file`;
/// `path` names it in messages.
fn for_each_frame(
    mut file: impl Read,
    path: &Path,
    stats: &mut CaptureStats,
    mut f: impl FnMut(u32, &[u8]),
) -> anyhow::Result<()> {
    let mut magic = [0u8; 4];
    file.read_exact(&mut magic)
        .with_context(|| format!("{}: too short for a capture", path.display()))?;
    let file = std::io::Cursor::new(magic).chain(file);
    let warn_truncated = |stats: &mut CaptureStats, e: &dyn fmt::Display| {
        stats.truncated = true;
        tracing::warn!("{}: stopped reading: {e}", path.display());
    };
    if magic == [0x0a, 0x0d, 0x0d, 0x0a] {
        let mut reader =
            PcapNgReader::new(file).with_context(|| format!("{}: bad pcapng header", path.display()))?;
        // Interface link types of the current section (pcapng numbers interfaces per section).
        let mut interfaces: Vec<u32> = Vec::new();
        while let Some(block) = reader.next_block() {
            let block = match block {
                Ok(b) => b,
                Err(e) => {
                    warn_truncated(stats, &e);
                    break;
                }
            };
            match block {
                Block::SectionHeader(_) => interfaces.clear(),
                Block::InterfaceDescription(idb) => interfaces.push(u32::from(idb.linktype)),
                Block::EnhancedPacket(epb) => {
                    stats.frames += 1;
                    match interfaces.get(epb.interface_id as usize) {
                        Some(&lt) => f(lt, &epb.data),
                        None => stats.skipped += 1,
                    }
                }
                Block::SimplePacket(spb) => {
                    stats.frames += 1;
                    match interfaces.first() {
                        Some(&lt) => f(lt, &spb.data),
                        None => stats.skipped += 1,
                    }
                }
                _ => {}
            }
        }
    } else {
        let mut reader = PcapReader::new(file).with_context(|| {
            format!(
                "{}: neither pcap nor pcapng (magic {:02x?})",
                path.display(),
                magic
            )
        })?;
        let linktype = u32::from(reader.header().datalink);
        if !link_type_supported(linktype) {
            bail!("{}: unsupported link type {linktype}", path.display());
        }
        while let Some(packet) = reader.next_packet() {
            match packet {
                Ok(p) => {
                    stats.frames += 1;
                    f(linktype, &p.data);
                }
                Err(e) => {
                    warn_truncated(stats, &e);
                    break;
                }
            }
        }
    }
    Ok(())
}

fn open(path: &Path) -> anyhow::Result<BufReader<File>> {
    Ok(BufReader::new(
        File::open(path).with_context(|| format!("opening {}", path.display()))?,
    ))
}

/// Calls `f` with every TCP segment of a capture (first fragments and unfragmented packets only).
pub fn read_tcp_segments(path: &Path, f: impl FnMut(&TcpSegment<'_>)) -> anyhow::Result<CaptureStats> {
    read_tcp_segments_from(open(path)?, path, f)
}

/// [`read_tcp_segments`] of a capture read from `reader` (pure: no file is opened); `name` is only used in
/// messages.
pub fn read_tcp_segments_from(
    reader: impl Read,
    name: &Path,
    mut f: impl FnMut(&TcpSegment<'_>),
) -> anyhow::Result<CaptureStats> {
    let mut stats = CaptureStats::default();
    let mut udp_443: HashSet<(IpAddr, u16, IpAddr, u16)> = HashSet::new();
    let mut unsupported = 0u64;
    let mut skipped = 0u64;
    let mut segments = 0u64;
    for_each_frame(reader, name, &mut stats, |linktype, frame| {
        if !link_type_supported(linktype) {
            unsupported += 1;
            return;
        }
        let Some(ip) = strip_link(linktype, frame) else {
            skipped += 1;
            return;
        };
        let Ok(packet) = SlicedPacket::from_ip(ip) else {
            skipped += 1;
            return;
        };
        let (src, dst) = match &packet.net {
            Some(NetSlice::Ipv4(v4)) => (
                IpAddr::V4(v4.header().source_addr()),
                IpAddr::V4(v4.header().destination_addr()),
            ),
            Some(NetSlice::Ipv6(v6)) => (
                IpAddr::V6(v6.header().source_addr()),
                IpAddr::V6(v6.header().destination_addr()),
            ),
            _ => {
                skipped += 1;
                return;
            }
        };
        match &packet.transport {
            Some(TransportSlice::Tcp(tcp)) => {
                segments += 1;
                let header = tcp.header_slice();
                f(&TcpSegment {
                    src,
                    dst,
                    src_port: tcp.source_port(),
                    dst_port: tcp.destination_port(),
                    seq: tcp.sequence_number(),
                    flags: header[13],
                    payload: tcp.payload(),
                    ip,
                });
            }
            Some(TransportSlice::Udp(udp)) => {
                let (sp, dp) = (udp.source_port(), udp.destination_port());
                if sp == 443 || dp == 443 {
                    // One key per flow, whichever direction is seen.
                    let key = if (src, sp) <= (dst, dp) {
                        (src, sp, dst, dp)
                    } else {
                        (dst, dp, src, sp)
                    };
                    udp_443.insert(key);
                }
            }
            _ => skipped += 1,
        }
    })?;
    stats.unsupported_link = unsupported;
    stats.skipped = skipped;
    stats.tcp_segments = segments;
    stats.udp_443_flows = udp_443.len();
    Ok(stats)
}

/// One direction of a TCP flow, until its first handshake message is decided.
#[derive(Default)]
struct Direction {
    isn: Option<u32>,
    buffer: StreamBuffer,
    done: bool,
}

/// Fingerprints every ClientHello and client SYN of a capture (see the module docs).
pub fn fingerprint_file(path: &Path, p0f_db: Option<&P0fDb>) -> anyhow::Result<Vec<OfflineRecord>> {
    Ok(fingerprint_file_with_stats(path, p0f_db)?.0)
}

/// [`fingerprint_file`] with the capture's counts.
pub fn fingerprint_file_with_stats(
    path: &Path,
    p0f_db: Option<&P0fDb>,
) -> anyhow::Result<(Vec<OfflineRecord>, CaptureStats)> {
    fingerprint_reader(open(path)?, path, p0f_db)
}

/// [`fingerprint_file_with_stats`] of a capture read from `reader` (pure: no file is opened, so a fuzz target
/// can feed it bytes); `name` is only used in messages.
pub fn fingerprint_reader(
    reader: impl Read,
    name: &Path,
    p0f_db: Option<&P0fDb>,
) -> anyhow::Result<(Vec<OfflineRecord>, CaptureStats)> {
    let mut records = Vec::new();
    let mut flows: HashMap<(IpAddr, u16, IpAddr, u16), Direction> = HashMap::new();
    let stats = read_tcp_segments_from(reader, name, |seg| {
        let key = (seg.src, seg.src_port, seg.dst, seg.dst_port);
        let is_syn = seg.flags & TCP_SYN != 0;
        if seg.flags & (TCP_SYN | TCP_ACK) == TCP_SYN
            && let Ok(parsed) = syn::parse_ip_tcp(seg.ip)
        {
            records.push(OfflineRecord::Syn(syn_record(&parsed, p0f_db)));
        }
        if is_syn {
            let dir = flows.entry(key).or_default();
            if dir.isn.is_some_and(|isn| isn != seg.seq) {
                // Port reuse: a new connection on the same addresses and ports.
                *dir = Direction::default();
            }
            dir.isn = Some(seg.seq);
            dir.buffer.set_isn(seg.seq);
        }
        if seg.payload.is_empty() {
            return;
        }
        let dir = flows.entry(key).or_default();
        if dir.done {
            return;
        }
        // Data on a SYN (TCP Fast Open) starts one past the ISN.
        let seq = if is_syn { seg.seq.wrapping_add(1) } else { seg.seq };
        if !dir.buffer.push(seq, seg.payload) {
            return;
        }
        match first_client_hello(dir.buffer.contiguous()) {
            Scan::NeedMore if !dir.buffer.is_full() => return,
            Scan::Hello(_) => {
                if let Ok((hello, fp)) = ja4_from_stream(dir.buffer.contiguous()) {
                    records.push(OfflineRecord::ClientHello(ClientHelloRecord {
                        src: seg.src,
                        srcport: seg.src_port,
                        dst: seg.dst,
                        dstport: seg.dst_port,
                        ja4: fp.ja4,
                        ja4_r: fp.ja4_r,
                        ja4_o: fp.ja4_o,
                        ja4_ro: fp.ja4_ro,
                        sni: hello.server_name,
                    }));
                }
            }
            Scan::NeedMore | Scan::Rejected(_) => {}
        }
        dir.done = true;
        dir.buffer = StreamBuffer::new();
    })?;
    if stats.unsupported_link > 0 {
        tracing::warn!(
            "{}: {} frames of unsupported link types skipped",
            name.display(),
            stats.unsupported_link
        );
    }
    Ok((records, stats))
}

fn syn_record(parsed: &syn::TcpSyn, p0f_db: Option<&P0fDb>) -> SynRecord {
    let sig = &parsed.signature;
    let matched = p0f_db.and_then(|db| db.match_syn(sig, Some(parsed.header_len)));
    let guessed = detector_common::syn::initial_ttl(sig.ttl) - sig.ttl;
    SynRecord {
        src: parsed.src,
        srcport: parsed.src_port,
        dst: parsed.dst,
        dstport: parsed.dst_port,
        signature: syn::signature_text(sig, Some(parsed.header_len)),
        label: matched.map(|m| m.label.text.clone()),
        fuzzy: matched.is_some_and(|m| m.fuzzy),
        generic: matched.is_some_and(|m| m.label.generic),
        distance: matched.map_or(guessed, |m| m.distance),
        key: format!("{:016x}", sig.key()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn link_layers() {
        let ip4 = [0x45u8, 0, 0, 20];
        let mut eth = vec![0u8; 12];
        eth.extend_from_slice(&[0x81, 0x00, 0, 1, 0x08, 0x00]);
        eth.extend_from_slice(&ip4);
        assert_eq!(strip_link(LINKTYPE_ETHERNET, &eth), Some(&ip4[..]));
        let mut null = vec![2, 0, 0, 0];
        null.extend_from_slice(&ip4);
        assert_eq!(strip_link(LINKTYPE_NULL, &null), Some(&ip4[..]));
        let mut sll = vec![0u8; 14];
        sll.extend_from_slice(&[0x86, 0xdd]);
        sll.push(0x60);
        assert_eq!(strip_link(LINKTYPE_LINUX_SLL, &sll), Some(&[0x60u8][..]));
        let mut sll2 = vec![0x08, 0x00];
        sll2.extend_from_slice(&[0u8; 18]);
        sll2.extend_from_slice(&ip4);
        assert_eq!(strip_link(LINKTYPE_LINUX_SLL2, &sll2), Some(&ip4[..]));
        assert_eq!(strip_link(LINKTYPE_ETHERNET, &[0u8; 13]), None);
        assert_eq!(strip_link(LINKTYPE_RAW, &[0x20]), None);
        assert_eq!(strip_link(147, &ip4), None);
    }

    #[test]
    fn display_formats() {
        let ip: IpAddr = "2001:db8::1".parse().unwrap();
        let r = OfflineRecord::Syn(SynRecord {
            src: ip,
            srcport: 1,
            dst: ip,
            dstport: 443,
            signature: "6:64+0:0:1440:65535,6:mss::0".into(),
            label: None,
            fuzzy: false,
            generic: false,
            distance: 0,
            key: "00".into(),
        });
        assert_eq!(
            r.to_string(),
            "2001:db8::1 1 2001:db8::1 443 syn 6:64+0:0:1440:65535,6:mss::0 ?"
        );
        let json = serde_json::to_value(&r).unwrap();
        assert_eq!(json["type"], "syn");
        assert_eq!(json["src"], "2001:db8::1");
        assert_eq!(json["dstport"], 443);
    }
}
