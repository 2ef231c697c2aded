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
//! - `control_request`: one line of every request kind, and malformed, wrong-version and unknown-field ones.
//! - `config_toml`: `packaging/aqd.toml`, the empty config, and small configs with each section and bad values.
//! - `list_file`: plain lists, a FireHOL `.netset`, an `ipset save`, IPv6, and bad lines.
//! - `lockout`: management networks of both families against the targets that must be refused or passed.
//! - `store`: a snapshot and a journal of every record kind, and raw damage.
//! - `capture`: synthetic pcap files of every supported link type (a client SYN and a ClientHello in each) and a
//!   pcapng file (section, interface, enhanced and simple packet blocks), truncated and big-endian ones.
//! - `p0f_db`: `aqd_fuzz::P0F_DB` and small databases with each field form and each kind of refused line.
//! - `syn`: IPv4 and IPv6 SYNs (options, EOL padding, IP options, extension headers, payload, quirks).
//! - `hello_key`: ClientHello messages (`ja4::build`: TLS 1.3 and 1.2, non-alphanumeric ALPN, GREASE, no
//!   signature algorithms) and JA4_r strings.

use std::{
    collections::{HashMap, HashSet},
    fs,
    net::IpAddr,
    path::{Path, PathBuf},
};

use anyhow::Context as _;
use aqd_fuzz::{Flow, MAX_SEGMENTS};
use detector_common::{AddrKey, ConnEvent, DropEvent, EventHeader, FlowTuple, Reason, syn::SynSignature};
use detector_user::fingerprint::{
    ja4::{
        build::{self, HelloBuilder, chrome_like},
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
    control_seeds(&mut Seeds::new(fuzz_dir.join("seeds/control_request"))?)?;
    config_seeds(
        &mut Seeds::new(fuzz_dir.join("seeds/config_toml"))?,
        &fuzz_dir.join("../packaging/aqd.toml"),
    )?;
    list_seeds(&mut Seeds::new(fuzz_dir.join("seeds/list_file"))?)?;
    capture_seeds(&mut Seeds::new(fuzz_dir.join("seeds/capture"))?)?;
    p0f_seeds(&mut Seeds::new(fuzz_dir.join("seeds/p0f_db"))?)?;
    syn_seeds(&mut Seeds::new(fuzz_dir.join("seeds/syn"))?)?;
    hello_key_seeds(&mut Seeds::new(fuzz_dir.join("seeds/hello_key"))?)?;
    lockout_seeds(&mut Seeds::new(fuzz_dir.join("seeds/lockout"))?)?;
    store_seeds(&mut Seeds::new(fuzz_dir.join("seeds/store"))?)?;
    Ok(())
}

/// `store`: a snapshot and a journal of every record kind (checksums added by the target), and raw damage.
fn store_seeds(seeds: &mut Seeds) -> anyhow::Result<()> {
    let snapshot = r#"{"format":1,"seq":2,"saved_unix_ms":5,"state":{"decisions":{"192.0.2.1/32":{"target":"192.0.2.1/32","action":"block","rate_class":0,"reason":"r","origin":"cli","force":false,"set_unix_ms":1,"expires_unix_ms":null}},"allow":{},"deny":{},"fingerprints":{},"strikes":[]}}"#;
    let journal = [
        r#"{"seq":1,"op":"decision","target":"192.0.2.9/32","action":"throttle","rate_class":1,"reason":"old","origin":"model","force":false,"set_unix_ms":1,"expires_unix_ms":0}"#,
        r#"{"seq":3,"op":"list_add","list":"deny","target":"203.0.113.0/24","origin":"import","force":true,"set_unix_ms":1,"expires_unix_ms":10}"#,
        r#"{"seq":4,"op":"undecide","target":"192.0.2.1/32"}"#,
        r#"{"seq":5,"op":"strikes","strikes":[]}"#,
        r#"{"seq":6,"op":"fp_remove","id":"ja4:x"}"#,
        r#"{"seq":7,"op":"list_remove","list":"deny","target":"203.0.113.0/24"}"#,
    ]
    .join("\n");
    let mut checksummed = vec![1u8];
    checksummed.extend_from_slice(snapshot.as_bytes());
    checksummed.push(0);
    checksummed.extend_from_slice(journal.as_bytes());
    seeds.write("checksummed", &checksummed)?;
    seeds.write("raw-damage", b"\0not a snapshot\0deadbeef {\"seq\":1}\n")?;
    Ok(())
}

/// `lockout`: the refusals of issue 10 — a management /24 (also written IPv4-mapped, and an IPv6 one)
/// against itself, a host inside it in both spellings, the networks covering it (`::/8`, `::/0`,
/// `::ffff:0:0/96`, a /16) and neighbours that must pass.
fn lockout_seeds(seeds: &mut Seeds) -> anyhow::Result<()> {
    let nets = |list: &[&str]| -> anyhow::Result<Vec<u8>> {
        let parsed: Vec<ipnet::IpNet> = list.iter().map(|s| s.parse()).collect::<Result<_, _>>()?;
        Ok(aqd_fuzz::encode_nets(&parsed))
    };
    let targets = [
        "198.19.11.0/24",
        "::ffff:198.19.11.1/128",
        "::/8",
        "::/0",
        "::ffff:0:0/96",
        "198.19.0.0/16",
        "198.19.11.77/32",
        "198.19.12.0/24",
        "10.0.0.0/8",
        "2001:db8::/32",
        "2001:db8:aa:1::1/128",
        "0.0.0.0/0",
    ];
    for (name, count, management) in [
        ("v4", 0u8, &["198.19.11.0/24"][..]),
        ("mapped", 0, &["::ffff:198.19.11.0/120"][..]),
        (
            "both-families",
            2,
            &["198.19.11.0/24", "2001:db8:aa::/48", "::ffff:198.19.11.0/120"][..],
        ),
    ] {
        let mut input = vec![count];
        input.extend(nets(management)?);
        input.extend(nets(&targets)?);
        seeds.write(name, &input)?;
    }
    Ok(())
}

/// A seed directory, emptied first except for its `regression-*` inputs (crashes found by fuzzing, kept
/// as checked in).
struct Seeds {
    dir: PathBuf,
    count: usize,
}

impl Seeds {
    fn new(dir: PathBuf) -> anyhow::Result<Self> {
        fs::create_dir_all(&dir)?;
        for entry in fs::read_dir(&dir)? {
            let path = entry?.path();
            let kept = path
                .file_name()
                .is_some_and(|n| n.to_string_lossy().starts_with("regression-"));
            if !kept {
                fs::remove_file(&path).with_context(|| format!("removing {}", path.display()))?;
            }
        }
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
    let tls12 = tls12_without_extensions().records(16384);
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
        syn: SynSignature::default(),
        syn_key: 0x0123_4567_89ab_cdef,
        action: 1,
        dropped: 0,
        _pad: [0; 2],
        isn: 1000,
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

/// Request lines as the CLI writes them (literal JSON, so that the seeds do not depend on the request types).
fn control_seeds(seeds: &mut Seeds) -> anyhow::Result<()> {
    let lines: [(&str, &str); 20] = [
        ("status", r#"{"version":1,"cmd":"status"}"#),
        ("list-all", r#"{"version":1,"cmd":"list","what":"all"}"#),
        (
            "decide-block",
            r#"{"version":1,"cmd":"decide","target":"192.0.2.7","action":"block","ttl_secs":600,"reason":"scraper"}"#,
        ),
        (
            "decide-throttle-v6",
            r#"{"version":1,"cmd":"decide","target":"2001:db8::/48","action":"throttle","class":"throttle","permanent":true,"force":true}"#,
        ),
        (
            "remove",
            r#"{"version":1,"cmd":"remove","target":"198.51.100.0/24"}"#,
        ),
        (
            "list-add",
            r#"{"version":1,"cmd":"list_add","list":"deny","target":"203.0.113.0/24","ttl_secs":60}"#,
        ),
        (
            "list-remove",
            r#"{"version":1,"cmd":"list_remove","list":"allow","target":"10.0.0.1"}"#,
        ),
        (
            "import",
            r#"{"version":1,"cmd":"import","into":"block","entries":["192.0.2.1","2001:db8::/64"],"ttl_secs":3600,"reason":"feed"}"#,
        ),
        ("reload", r#"{"version":1,"cmd":"reload"}"#),
        ("fp-list", r#"{"version":1,"cmd":"fp_list"}"#),
        (
            "score-top",
            r#"{"version":1,"cmd":"score_top","kind":"prefix","limit":20}"#,
        ),
        ("explain", r#"{"version":1,"cmd":"explain","target":"192.0.2.7"}"#),
        (
            "fp-set",
            r#"{"version":1,"cmd":"fp_set","fp":"t13d1516h2_8daaf6152771_d8a2da3f94cd","action":"block","ttl_secs":60}"#,
        ),
        (
            "fp-remove",
            r#"{"version":1,"cmd":"fp_remove","fp":"syn:0x0123456789abcdef"}"#,
        ),
        ("wrong-version", r#"{"version":2,"cmd":"status"}"#),
        ("no-version", r#"{"cmd":"status"}"#),
        ("unknown-field", r#"{"version":1,"cmd":"status","extra":1}"#),
        ("unknown-cmd", r#"{"version":1,"cmd":"format_disk"}"#),
        ("truncated", r#"{"version":1,"cmd":"decide","target":"192.0"#),
        ("not-an-object", r#"[1,{"version":1},"\u00e9",1e400]"#),
    ];
    for (name, line) in lines {
        seeds.write(name, format!("{line}\n").as_bytes())?;
    }
    Ok(())
}

fn config_seeds(seeds: &mut Seeds, packaged: &Path) -> anyhow::Result<()> {
    let text = fs::read(packaged).with_context(|| format!("reading {}", packaged.display()))?;
    seeds.write("packaging-aqd", &text)?;
    let configs: [(&str, &str); 10] = [
        ("empty", ""),
        (
            "daemon",
            "[daemon]\ninterfaces = [\"eth0\", \"eth1\"]\nxdp_mode = \"skb\"\nmetrics_address = \"[::1]:9477\"\nstats_interval = \"1m\"\n",
        ),
        (
            "protection",
            "[protection]\nports = [443, 8443]\nmanagement = [\"192.0.2.0/24\", \"2001:db8::/32\"]\nmin_block_prefix_v4 = 8\nflow_idle_timeout = 3600\n",
        ),
        (
            "rate-classes",
            "[rate_classes.slow]\nid = 3\npackets_per_second = 10\npacket_burst = 20\n[rate_classes.throttle]\nid = 1\n",
        ),
        (
            "lists",
            "[lists]\nallow = [\"198.51.100.10\"]\ndeny = [\"203.0.113.0/24\"]\ndeny_files = [\"/etc/aqd/deny.netset\"]\n",
        ),
        (
            "decisions",
            "[decisions]\ndefault_ttl = \"2h\"\nttl_jitter = 0.25\n[events]\ndrop_sample_every = 8\n",
        ),
        (
            "fingerprints",
            "[fingerprints]\nescalate_after = 5\nflow_timeout = \"30s\"\n[[fingerprint]]\nfp = \"t13d1516h2_8daaf6152771_d8a2da3f94cd\"\n\
             action = \"block\"\nttl = \"1h\"\n[[fingerprint]]\nfp = \"4:64+0:0:1460:65535,6:mss,nop,ws::df:0\"\naction = \"throttle\"\n\
             class = \"throttle\"\n",
        ),
        (
            "model",
            "[model]\nmax_sources = 1000\nwarmup_s = 0\nfingerprint_min_purity = 0.5\n",
        ),
        ("bad-cidr", "[lists]\ndeny = [\"10.0.0.1/8\"]\n"),
        ("bad-syntax", "[daemon\ninterfaces = [\"eth0\"\n"),
    ];
    for (name, text) in configs {
        seeds.write(name, text.as_bytes())?;
    }
    Ok(())
}

fn list_seeds(seeds: &mut Seeds) -> anyhow::Result<()> {
    let lists: [(&str, &str); 5] = [
        ("plain", "192.0.2.0/24\n198.51.100.7\n2001:db8::/48\n"),
        (
            "netset",
            "#\n# firehol_level1\n#\n# Maintainer: example\n#\n0.0.0.0/8\n10.0.0.0/8\n100.64.0.0/10\n192.0.2.0/24 ; doc\n",
        ),
        (
            "ipset-save",
            "create blk hash:net family inet hashsize 1024 maxelem 65536\nadd blk 203.0.113.0/25 timeout 300\nadd blk 198.51.100.1\n",
        ),
        (
            "ipv6",
            "::/0\n::ffff:0:0/96\n::ffff:192.0.2.1\nfe80::1%eth0\n2001:db8:0:0:0:0:0:1/128\n",
        ),
        (
            "bad-lines",
            "10.0.0.1/24\nnot-an-ip\n300.1.1.1\n\u{feff}192.0.2.1\r\nadd blk\n",
        ),
    ];
    for (name, text) in lists {
        seeds.write(name, text.as_bytes())?;
    }
    Ok(())
}

/// A client SYN (IPv4: the macOS SYN of the `syn` unit tests; with options, EOL padding and DF).
fn syn_v4() -> Vec<u8> {
    vec![
        0x45, 0x00, 0x00, 0x40, 0x00, 0x00, 0x40, 0x00, 0x40, 0x06, 0xc5, 0x0d, 0xac, 0x10, 0x05, 0x10, 0xac,
        0x43, 0x18, 0x47, 0xef, 0x7f, 0x01, 0xbb, 0xc6, 0xa2, 0x9c, 0xd2, 0x00, 0x00, 0x00, 0x00, 0xb0, 0xc2,
        0xff, 0xff, 0xd2, 0x28, 0x00, 0x00, 0x02, 0x04, 0x05, 0xb4, 0x01, 0x03, 0x03, 0x06, 0x01, 0x01, 0x08,
        0x0a, 0x78, 0x03, 0x21, 0xb5, 0x00, 0x00, 0x00, 0x00, 0x04, 0x02, 0x00, 0x00,
    ]
}

/// An IPv6 packet around `tcp` (a TCP header and payload), after the extension headers `ext` (each:
/// next header, then its bytes, whose first byte is overwritten with the chain's next value).
fn ipv6(tcp: &[u8], ext: &[(u8, Vec<u8>)], hop_limit: u8, flow_label: u32) -> Vec<u8> {
    let mut chain: Vec<u8> = Vec::new();
    for (i, (_, bytes)) in ext.iter().enumerate() {
        let next = ext.get(i + 1).map_or(6, |(kind, _)| *kind);
        let mut bytes = bytes.clone();
        bytes[0] = next;
        chain.extend(bytes);
    }
    // Version 6, traffic class 0, the 20-bit flow label.
    let mut p = vec![
        0x60,
        (flow_label >> 16) as u8 & 0x0f,
        (flow_label >> 8) as u8,
        flow_label as u8,
    ];
    p.extend_from_slice(&((chain.len() + tcp.len()) as u16).to_be_bytes());
    p.push(ext.first().map_or(6, |(kind, _)| *kind));
    p.push(hop_limit);
    p.extend_from_slice(&[0x20, 0x01, 0x0d, 0xb8, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 1]);
    p.extend_from_slice(&[0x20, 0x01, 0x0d, 0xb8, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 2]);
    p.extend(chain);
    p.extend_from_slice(tcp);
    p
}

/// A TCP header: `flags`, `options` (padded to 4 bytes with EOL), then `payload`.
fn tcp(seq: u32, flags: u8, window: u16, options: &[u8], payload: &[u8]) -> Vec<u8> {
    let mut opts = options.to_vec();
    while opts.len() % 4 != 0 {
        opts.push(0);
    }
    let mut t = vec![0xd4, 0x31, 0x01, 0xbb];
    t.extend_from_slice(&seq.to_be_bytes());
    t.extend_from_slice(&[0; 4]);
    t.push((((20 + opts.len()) / 4) as u8) << 4);
    t.push(flags);
    t.extend_from_slice(&window.to_be_bytes());
    t.extend_from_slice(&[0, 0, 0, 0]);
    t.extend(opts);
    t.extend_from_slice(payload);
    t
}

/// An IPv4 packet around `tcp`, with `ip_options` (a multiple of 4 bytes).
fn ipv4(tcp: &[u8], ip_options: &[u8], ttl: u8, df: bool, id: u16) -> Vec<u8> {
    let ihl = 20 + ip_options.len();
    let total = (ihl + tcp.len()) as u16;
    let mut p = vec![0x40 | (ihl / 4) as u8, 0];
    p.extend_from_slice(&total.to_be_bytes());
    p.extend_from_slice(&id.to_be_bytes());
    p.extend_from_slice(&(if df { 0x4000u16 } else { 0 }).to_be_bytes());
    p.extend_from_slice(&[ttl, 6, 0, 0, 192, 0, 2, 10, 198, 51, 100, 20]);
    p.extend_from_slice(ip_options);
    p.extend_from_slice(tcp);
    p
}

const LINUX_OPTIONS: [u8; 20] = [
    2, 4, 5, 0xb4, 4, 2, 8, 10, 0x12, 0x34, 0x56, 0x78, 0, 0, 0, 0, 1, 3, 3, 7,
];

fn syn_seeds(seeds: &mut Seeds) -> anyhow::Result<()> {
    seeds.write("v4-macos", &syn_v4())?;
    let linux = tcp(0x1000, 0x02, 64240, &LINUX_OPTIONS, &[]);
    seeds.write("v4-linux", &ipv4(&linux, &[], 57, true, 0x1234))?;
    seeds.write("v4-ip-options", &ipv4(&linux, &[0x94, 4, 0, 0], 120, false, 0))?;
    seeds.write(
        "v4-payload-quirks",
        &ipv4(
            &tcp(0, 0x02 | 0x08 | 0x20 | 0x40, 1024, &[2, 4, 1, 9], b"GET /"),
            &[],
            250,
            false,
            7,
        ),
    )?;
    seeds.write(
        "v4-bad-options",
        &ipv4(
            &tcp(5, 0x02, 512, &[2, 4, 5, 0xb4, 3, 9, 1, 0, 0x55, 0x55], &[]),
            &[],
            64,
            true,
            1,
        ),
    )?;
    let mut nops = vec![1u8; 19];
    nops.extend_from_slice(&[2, 4, 5, 0xb4]);
    seeds.write(
        "v4-many-nops",
        &ipv4(&tcp(5, 0x02, 512, &nops, &[]), &[], 64, true, 1),
    )?;
    seeds.write("v6-linux", &ipv6(&linux, &[], 60, 0x12345))?;
    let hop_by_hop = (0u8, vec![0, 0, 1, 4, 0, 0, 0, 0]);
    let fragment_first = (44u8, vec![0, 0, 0, 1, 0, 0, 0, 9]);
    let routing = (43u8, vec![0, 0, 0, 0, 0, 0, 0, 0]);
    seeds.write(
        "v6-extension-headers",
        &ipv6(&linux, &[hop_by_hop, routing, fragment_first], 250, 0),
    )?;
    seeds.write(
        "v6-syn-ack",
        &ipv6(&tcp(9, 0x12, 65535, &[2, 4, 5, 0xa0], &[]), &[], 64, 0),
    )?;
    Ok(())
}

/// The link layer of a frame of `linktype` around an IP packet.
fn frame(linktype: u32, ip: &[u8]) -> Vec<u8> {
    let ethertype: [u8; 2] = if ip[0] >> 4 == 6 {
        [0x86, 0xdd]
    } else {
        [0x08, 0x00]
    };
    let mut f = match linktype {
        // Ethernet with one 802.1Q tag.
        1 => {
            let mut f = vec![2, 0, 0, 0, 0, 1, 2, 0, 0, 0, 0, 2, 0x81, 0x00, 0, 5];
            f.extend_from_slice(&ethertype);
            f
        }
        0 | 108 => vec![2, 0, 0, 0],
        113 => {
            let mut f = vec![0, 0, 0, 1, 0, 6, 2, 0, 0, 0, 0, 1, 0, 0];
            f.extend_from_slice(&ethertype);
            f
        }
        276 => {
            let mut f = ethertype.to_vec();
            f.extend_from_slice(&[0, 0, 0, 0, 0, 2, 0, 1, 0, 6, 2, 0, 0, 0, 0, 1, 0, 0]);
            f
        }
        _ => Vec::new(),
    };
    f.extend_from_slice(ip);
    f
}

/// A pcap file (microsecond magic, little-endian unless `big_endian`) of `frames`.
fn pcap(linktype: u32, frames: &[Vec<u8>], big_endian: bool) -> Vec<u8> {
    let u32b = |v: u32| {
        if big_endian {
            v.to_be_bytes()
        } else {
            v.to_le_bytes()
        }
    };
    let u16b = |v: u16| {
        if big_endian {
            v.to_be_bytes()
        } else {
            v.to_le_bytes()
        }
    };
    let mut out = Vec::new();
    out.extend_from_slice(&u32b(0xa1b2_c3d4));
    out.extend_from_slice(&u16b(2));
    out.extend_from_slice(&u16b(4));
    out.extend_from_slice(&[0; 8]);
    out.extend_from_slice(&u32b(65535));
    out.extend_from_slice(&u32b(linktype));
    for (i, f) in frames.iter().enumerate() {
        out.extend_from_slice(&u32b(1_700_000_000 + i as u32));
        out.extend_from_slice(&u32b(0));
        out.extend_from_slice(&u32b(f.len() as u32));
        out.extend_from_slice(&u32b(f.len() as u32));
        out.extend_from_slice(f);
    }
    out
}

/// A pcapng block: type, total length, body (padded to 4 bytes), total length.
fn block(kind: u32, body: &[u8]) -> Vec<u8> {
    let padded = body.len().div_ceil(4) * 4;
    let total = (12 + padded) as u32;
    let mut out = kind.to_le_bytes().to_vec();
    out.extend_from_slice(&total.to_le_bytes());
    out.extend_from_slice(body);
    out.resize(8 + padded, 0);
    out.extend_from_slice(&total.to_le_bytes());
    out
}

/// A pcapng file: a section with an Ethernet and a raw-IP interface; enhanced packets on both, a simple packet.
fn pcapng(frames: &[Vec<u8>], raw: &[Vec<u8>]) -> Vec<u8> {
    let mut shb = 0x1a2b_3c4du32.to_le_bytes().to_vec();
    shb.extend_from_slice(&1u16.to_le_bytes());
    shb.extend_from_slice(&0u16.to_le_bytes());
    shb.extend_from_slice(&u64::MAX.to_le_bytes());
    let mut out = block(0x0a0d_0d0a, &shb);
    for linktype in [1u16, 101] {
        let mut idb = linktype.to_le_bytes().to_vec();
        idb.extend_from_slice(&[0, 0]);
        idb.extend_from_slice(&65535u32.to_le_bytes());
        out.extend(block(1, &idb));
    }
    let epb = |interface: u32, data: &[u8]| {
        let mut b = interface.to_le_bytes().to_vec();
        b.extend_from_slice(&[0; 8]);
        b.extend_from_slice(&(data.len() as u32).to_le_bytes());
        b.extend_from_slice(&(data.len() as u32).to_le_bytes());
        b.extend_from_slice(data);
        b.resize(20 + data.len().div_ceil(4) * 4, 0);
        block(6, &b)
    };
    for f in frames {
        out.extend(epb(0, f));
    }
    for f in raw {
        out.extend(epb(1, f));
    }
    if let Some(f) = frames.first() {
        let mut spb = (f.len() as u32).to_le_bytes().to_vec();
        spb.extend_from_slice(f);
        out.extend(block(3, &spb));
    }
    out
}

fn capture_seeds(seeds: &mut Seeds) -> anyhow::Result<()> {
    let hello = chrome_like().records(16384);
    let isn = 0x1000u32;
    let syn4 = ipv4(&tcp(isn, 0x02, 64240, &LINUX_OPTIONS, &[]), &[], 64, true, 1);
    let data4 = ipv4(&tcp(isn + 1, 0x18, 502, &[], &hello[..1400]), &[], 64, true, 2);
    let rest4 = ipv4(&tcp(isn + 1401, 0x18, 502, &[], &hello[1400..]), &[], 64, true, 3);
    let syn6 = ipv6(&tcp(isn, 0x02, 64800, &LINUX_OPTIONS, &[]), &[], 64, 0x0abcd);
    let data6 = ipv6(&tcp(isn + 1, 0x18, 502, &[], &hello[..1200]), &[], 64, 0x0abcd);
    let packets = [syn4, data4, rest4, syn6, data6];
    for (name, linktype) in [
        ("ethernet", 1),
        ("null", 0),
        ("raw", 101),
        ("sll", 113),
        ("sll2", 276),
    ] {
        let frames: Vec<Vec<u8>> = packets.iter().map(|p| frame(linktype, p)).collect();
        seeds.write(&format!("pcap-{name}"), &pcap(linktype, &frames, false))?;
    }
    let frames: Vec<Vec<u8>> = packets.iter().map(|p| frame(1, p)).collect();
    seeds.write("pcap-big-endian", &pcap(1, &frames[..2], true))?;
    let mut truncated = pcap(1, &frames, false);
    truncated.truncate(truncated.len() - 100);
    seeds.write("pcap-truncated", &truncated)?;
    seeds.write("pcap-unsupported-link", &pcap(147, &frames[..1], false))?;
    seeds.write("pcapng", &pcapng(&frames[..3], &packets[3..]))?;
    seeds.write("too-short", &[0xd4, 0xc3])?;
    Ok(())
}

fn p0f_seeds(seeds: &mut Seeds) -> anyhow::Result<()> {
    seeds.write("fuzz-db", aqd_fuzz::P0F_DB.as_bytes())?;
    let header = "classes = win,unix,other\n[tcp:request]\n";
    let bodies: [(&str, &str); 6] = [
        (
            "every-form",
            "label = g:unix:Linux:3.x\nsig = *:64+2:0:*:mss*20,10:mss,sok,ts,nop,ws,?30,eol+3:df,id+,ecn:*\n\
             sig = 4:64-:0:1460:%8192,*::ack+:+\nsig = 4:128:0:1460:mtu*2,0:mss,nop,ws::0\n",
        ),
        (
            "tool",
            "label = s:!:nmap:scan\nsys = @unix,@win,Other OS\nsig = *:64-:0:1460:1024,0:mss::0\n",
        ),
        (
            "bad-version",
            "label = s:unix:Linux:3.x\nsig = 5:64:0:*:*,*:mss::0\n",
        ),
        (
            "eol-not-last",
            "label = s:unix:Linux:3.x\nsig = *:64:0:*:*,*:mss,eol+1,nop::0\n",
        ),
        (
            "v6-quirk",
            "label = s:unix:Linux:3.x\nsig = 6:64:0:*:*,*:mss:df:0\n",
        ),
        (
            "sys-missing",
            "label = s:!:nmap:scan\nsig = *:64-:0:1460:1024,0:mss::0\n",
        ),
    ];
    for (name, body) in bodies {
        seeds.write(name, format!("{header}{body}").as_bytes())?;
    }
    seeds.write("unknown-section", b"[tcp:sideways]\nlabel = x\n")?;
    Ok(())
}

/// A TLS 1.2 ClientHello with four ciphers and no extension block (`client_hello` and `hello_key` seeds).
fn tls12_without_extensions() -> HelloBuilder {
    HelloBuilder {
        legacy_version: 0x0303,
        record_version: 0x0301,
        session_id: vec![],
        ciphers: vec![0xc02f, 0xc030, 0x009c, 0x002f],
        extensions: None,
    }
}

fn hello_key_seeds(seeds: &mut Seeds) -> anyhow::Result<()> {
    let chrome = chrome_like();
    seeds.write("chrome-like", &chrome.message())?;
    let tls12 = tls12_without_extensions();
    seeds.write("tls12-no-extensions", &tls12.message())?;
    let odd_alpn = HelloBuilder {
        extensions: Some(vec![
            (0x0010, build::alpn(&[b"\x00h2\xff", b"http/1.1"])),
            (0x000d, build::u16_vector(&[0x0403, 0x1a1a, 0x0804])),
            (0x002b, build::supported_versions(&[0x7a7a, 0x0304, 0x0303])),
            (0x0000, build::sni("example.com")),
            (0x0000, build::sni("again.example.com")),
        ]),
        ..tls12.clone()
    };
    seeds.write("odd-alpn-duplicate-sni", &odd_alpn.message())?;
    let many = HelloBuilder {
        ciphers: (1..=120u16).collect(),
        extensions: Some((0x0100..0x0170u16).map(|e| (e, vec![])).collect()),
        ..tls12
    };
    seeds.write("over-99-ciphers-and-extensions", &many.message())?;
    for (name, text) in [
        (
            "ja4r-chrome",
            "t13d1516h2_002f,0035,009c,009d,1301,1302,1303,c013,c014,c02b,c02c,c02f,c030,cca8,cca9_0005,000a,000b,000d,0012,0017,001b,0023,002b,002d,0033,4469,fe0d,ff01_0403,0804,0401,0503,0805,0501,0806,0601",
        ),
        ("ja4r-no-sigalgs", "t12i040000_002f,009c,c02f,c030_"),
        ("ja4r-bad", "t13d0200h2_1301_"),
    ] {
        seeds.write(name, text.as_bytes())?;
    }
    Ok(())
}
