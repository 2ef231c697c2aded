//! Regenerates the seed corpora in `fuzz/seeds/<target>/`:
//!
//! ```sh
//! cargo +nightly run --manifest-path fuzz/Cargo.toml --example make_seeds [-- PCAP_DIR]
//! ```
//!
//! - `client_hello`: the client segments (with the SYN's ISN) of every distinct ClientHello (by JA4; at most 4 per capture) in the
//!   JA4 test captures (`PCAP_DIR`, by default `../shared/testdata/ja4/pcap`), up to the segment that completes
//!   it, plus one non-TLS flow start; and synthetic ones from `ja4::build` (split, reordered, wrapping sequence
//!   numbers, a second ClientHello after ChangeCipherSpec, TLS 1.2 without extensions).
//! - `event_decode`: hand-made records of every event kind, and short and unknown ones.

use std::{
    collections::{HashMap, HashSet},
    fs,
    net::IpAddr,
    path::{Path, PathBuf},
};

use anyhow::Context as _;
use aqd_fuzz::{Flow, MAX_SEGMENTS};
use detector_common::{AddrKey, ConnEvent, DropEvent, EventHeader, FlowTuple, Reason};
use detector_user::fingerprint::{
    ja4::{
        build::{HelloBuilder, chrome_like},
        ja4_from_stream,
    },
    offline::read_tcp_segments,
    reassembly::{Scan, StreamBuffer, first_client_hello},
};

const TCP_SYN: u8 = 0x02;
const TCP_ACK: u8 = 0x10;
/// Most ClientHello seeds taken from one capture.
const PER_CAPTURE: usize = 4;

fn main() -> anyhow::Result<()> {
    let fuzz_dir = Path::new(env!("CARGO_MANIFEST_DIR"));
    let mut seeds = Seeds::new(fuzz_dir.join("seeds/client_hello"))?;
    // Segments cut from captures only when a capture directory is given: no capture data is checked in
    // (`make_seeds ../shared/testdata/ja4/pcap` writes local, untracked extra seeds for a longer run).
    if let Some(pcap_dir) = std::env::args_os().nth(1).map(PathBuf::from) {
        pcap_seeds(&pcap_dir, &mut seeds)?;
    }
    synthetic_hello_seeds(&mut seeds)?;
    let mut events = Seeds::new(fuzz_dir.join("seeds/event_decode"))?;
    event_seeds(&mut events)?;
    Ok(())
}

/// A seed directory, emptied first.
struct Seeds {
    dir: PathBuf,
    count: usize,
}

impl Seeds {
    fn new(dir: PathBuf) -> anyhow::Result<Self> {
        if dir.exists() {
            fs::remove_dir_all(&dir)?;
        }
        fs::create_dir_all(&dir)?;
        Ok(Seeds { dir, count: 0 })
    }

    fn write(&mut self, name: &str, bytes: &[u8]) -> anyhow::Result<()> {
        let path = self.dir.join(name);
        fs::write(&path, bytes)?;
        println!("{} ({} bytes)", path.display(), bytes.len());
        self.count += 1;
        Ok(())
    }
}

/// One direction of a flow, until its first handshake message is decided (as `aqd fingerprint` does it).
#[derive(Default)]
struct Direction {
    isn: Option<u32>,
    segments: Vec<(u32, Vec<u8>)>,
    buffer: StreamBuffer,
    done: bool,
}

fn pcap_seeds(pcap_dir: &Path, seeds: &mut Seeds) -> anyhow::Result<()> {
    let mut files: Vec<PathBuf> = fs::read_dir(pcap_dir)
        .with_context(|| format!("reading {}", pcap_dir.display()))?
        .map(|e| e.map(|e| e.path()))
        .collect::<Result<_, _>>()?;
    files.sort();
    let mut seen_ja4 = HashSet::new();
    let mut non_tls = false;
    for file in files {
        let stem = file
            .file_stem()
            .unwrap_or_default()
            .to_string_lossy()
            .into_owned();
        let mut flows: HashMap<(IpAddr, u16, IpAddr, u16), Direction> = HashMap::new();
        let mut found: Vec<(String, Vec<u8>)> = Vec::new();
        read_tcp_segments(&file, |seg| {
            let dir = flows
                .entry((seg.src, seg.src_port, seg.dst, seg.dst_port))
                .or_default();
            if seg.flags & (TCP_SYN | TCP_ACK) == TCP_SYN && dir.isn.is_none() {
                dir.isn = Some(seg.seq);
                dir.buffer.set_isn(seg.seq);
            }
            if seg.payload.is_empty() || dir.done {
                return;
            }
            let seq = if seg.flags & TCP_SYN != 0 {
                seg.seq.wrapping_add(1)
            } else {
                seg.seq
            };
            dir.segments.push((seq, seg.payload.to_vec()));
            dir.buffer.push(seq, seg.payload);
            let scan = first_client_hello(dir.buffer.contiguous());
            if scan == Scan::NeedMore && dir.segments.len() < MAX_SEGMENTS {
                return;
            }
            dir.done = true;
            let segments: Vec<(u32, &[u8])> = dir.segments.iter().map(|(s, p)| (*s, p.as_slice())).collect();
            let input = Flow::encode(dir.isn, &segments);
            match scan {
                Scan::Hello(_) => {
                    if let Ok((_, fp)) = ja4_from_stream(dir.buffer.contiguous())
                        && found.len() < PER_CAPTURE
                        && seen_ja4.insert(fp.ja4)
                    {
                        found.push((format!("pcap-{stem}-{}", found.len()), input));
                    }
                }
                // One non-TLS client start (the server's side of a TLS flow starts with 0x16 too).
                Scan::Rejected(_) if !non_tls && dir.buffer.contiguous().first() != Some(&0x16) => {
                    non_tls = true;
                    found.push((format!("pcap-{stem}-not-tls"), input));
                }
                _ => {}
            }
        })?;
        for (name, input) in found {
            seeds.write(&name, &input)?;
        }
    }
    Ok(())
}

fn synthetic_hello_seeds(seeds: &mut Seeds) -> anyhow::Result<()> {
    let chrome = chrome_like();
    // One segment after the SYN.
    let whole = chrome.records(16384);
    seeds.write(
        "synthetic-chrome-one-segment",
        &Flow::encode(Some(1000), &[(1001, &whole)]),
    )?;
    // Two records over 1448-byte segments, in reverse order, with a retransmission, wrapping the sequence space.
    let stream = chrome.records(1000);
    let isn = u32::MAX - 700;
    let base = isn.wrapping_add(1);
    let mut segments: Vec<(u32, &[u8])> = stream
        .chunks(1448)
        .enumerate()
        .map(|(i, c)| (base.wrapping_add((i * 1448) as u32), c))
        .rev()
        .collect();
    segments.push((base.wrapping_sub(3), &stream[..600]));
    seeds.write(
        "synthetic-chrome-reordered-wrapping",
        &Flow::encode(Some(isn), &segments),
    )?;
    // No SYN seen: the first segment's sequence number is the base.
    let segments: Vec<(u32, &[u8])> = stream
        .chunks(536)
        .enumerate()
        .map(|(i, c)| (77_000 + (i * 536) as u32, c))
        .collect();
    seeds.write("synthetic-chrome-no-syn", &Flow::encode(None, &segments))?;
    // A second ClientHello after ChangeCipherSpec (after a HelloRetryRequest).
    let mut retry = chrome.records(16384);
    retry.extend_from_slice(&[20, 3, 3, 0, 1, 1]);
    retry.extend(chrome.records(700));
    seeds.write("synthetic-hello-retry", &Flow::encode(Some(5), &[(6, &retry)]))?;
    // TLS 1.2 without an extension block, and a truncated one.
    let tls12 = HelloBuilder {
        legacy_version: 0x0303,
        record_version: 0x0301,
        session_id: vec![],
        ciphers: vec![0xc02f, 0xc030, 0x009c, 0x002f],
        extensions: None,
    }
    .records(16384);
    seeds.write(
        "synthetic-tls12-no-extensions",
        &Flow::encode(Some(9), &[(10, &tls12)]),
    )?;
    seeds.write(
        "synthetic-truncated",
        &Flow::encode(Some(9), &[(10, &whole[..700])]),
    )?;
    Ok(())
}

fn bytes_of<T: Copy>(v: &T) -> Vec<u8> {
    // SAFETY: the event types are padding-free #[repr(C)] plain data.
    unsafe { std::slice::from_raw_parts((v as *const T).cast::<u8>(), size_of::<T>()) }.to_vec()
}

fn event_seeds(seeds: &mut Seeds) -> anyhow::Result<()> {
    let header = |kind: u16, len: usize| EventHeader {
        kind,
        len: len as u16,
        ifindex: 3,
        time_ns: 1_234_567_890,
    };
    let v4 = FlowTuple {
        src: AddrKey::from_v4([10, 0, 0, 1]),
        dst: AddrKey::from_v4([10, 0, 0, 2]),
        src_port: 40000,
        dst_port: 443,
        proto: 6,
        _pad: [0; 3],
    };
    let mut v6_src = [0u8; 16];
    v6_src[..4].copy_from_slice(&[0x20, 0x01, 0x0d, 0xb8]);
    v6_src[15] = 1;
    let v6 = FlowTuple {
        src: AddrKey { addr: v6_src },
        dst: AddrKey::from_v4([192, 0, 2, 7]),
        src_port: 51515,
        dst_port: 8443,
        proto: 6,
        _pad: [0; 3],
    };
    let conn = |flow| ConnEvent {
        header: header(0, size_of::<ConnEvent>()),
        flow,
    };
    seeds.write("conn-v4", &bytes_of(&conn(v4)))?;
    seeds.write("conn-v6", &bytes_of(&conn(v6)))?;
    let drop = |reason, flow| DropEvent {
        header: header(1, size_of::<DropEvent>()),
        flow,
        reason,
        frame_len: 1514,
    };
    seeds.write("drop-block", &bytes_of(&drop(Reason::DropBlockExact as u32, v4)))?;
    seeds.write("drop-unknown-reason", &bytes_of(&drop(999, v6)))?;
    let mut short = bytes_of(&drop(Reason::DropRatePackets as u32, v4));
    short.truncate(40);
    seeds.write("drop-short", &short)?;
    seeds.write("unknown-kind", &bytes_of(&header(0x7fff, 16)))?;
    seeds.write("short-header", &[0, 0, 56])?;
    Ok(())
}
