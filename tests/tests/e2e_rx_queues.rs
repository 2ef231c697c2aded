//! Issue 9 item 9: the limiter holds with two receive queues. The lab's veth pair has two receive and two
//! transmit queues on each end (`numrxqueues 2 numtxqueues 2`); XPS maps the client's CPU 0 to transmit queue 0
//! and CPU 1 to queue 1, and a frame sent on the client's queue N arrives on the server's receive queue N, whose
//! NAPI instance runs aqd's XDP program (native mode) on the CPU that sent it. One throttled source sends from
//! two threads, one pinned to each CPU, well above its class rate: the packets the kernel passes stay within the
//! class rate (plus its burst) ±10 %, read from the per-reason counters. Both CPUs' per-CPU counters and both
//! receive queues' XDP statistics must have moved, else the test would show nothing about two queues.
//!
//! Needs root (namespaces, XDP) and two CPUs. Run `cargo build -p detector-user` first.

use std::{
    io,
    net::{IpAddr, SocketAddr, UdpSocket},
    thread,
    time::{Duration, Instant},
};

use anyhow::{Context as _, ensure};
use aqd_tests::netns::{self, CLIENT_IF, Lab, Netns, NsTask, SERVER_IF, UdpSink};
use aya::maps::{Map, MapData, PerCpuArray};
use detector_common::{Counters, Reason, map_names};

/// The throttle class: packets per second and burst.
const RATE: u64 = 1_000;
const BURST: u64 = 50;
const CLASS: &str = "[rate_classes.rxq]\nid = 3\npackets_per_second = 1000\npacket_burst = 50\n";
/// What each of the two senders offers (together 5× the class rate), and for how long.
const OFFERED_PER_SENDER: u64 = 2_500;
const DURATION: Duration = Duration::from_secs(4);
/// Sends at most this many per sender, whatever the pacing does.
const MAX_PER_SENDER: u64 = OFFERED_PER_SENDER * 5;
const CPUS: [usize; 2] = [0, 1];

/// What one sender did.
struct Sent {
    count: u64,
    first: Instant,
    last: Instant,
}

/// Pins the calling thread to `cpu`.
fn pin_to(cpu: usize) -> io::Result<()> {
    // SAFETY: a zeroed cpu_set_t is a valid empty set; CPU_SET and sched_setaffinity get valid arguments, and
    // pid 0 is the calling thread.
    unsafe {
        let mut set: libc::cpu_set_t = std::mem::zeroed();
        libc::CPU_SET(cpu, &mut set);
        if libc::sched_setaffinity(0, std::mem::size_of::<libc::cpu_set_t>(), &set) != 0 {
            return Err(io::Error::last_os_error());
        }
    }
    Ok(())
}

/// Sends UDP datagrams from `from` to `to` on a thread inside `ns` pinned to `cpu`, paced at `pps` (in 2 ms
/// ticks) for `duration` and at most [`MAX_PER_SENDER`]. Datagrams the stack refuses at once (ENOBUFS) are not
/// counted.
fn paced_sender(
    ns: &Netns,
    cpu: usize,
    from: IpAddr,
    to: SocketAddr,
    pps: u64,
    duration: Duration,
) -> NsTask<Sent> {
    ns.spawn(move || {
        pin_to(cpu)?;
        let socket = UdpSocket::bind(SocketAddr::new(from, 0))?;
        let tick = Duration::from_millis(2);
        let per_tick = (pps * 2 / 1000).max(1);
        let start = Instant::now();
        let (mut count, mut first, mut last) = (0u64, None, start);
        let mut ticks = 0u32;
        while start.elapsed() < duration && count < MAX_PER_SENDER {
            for _ in 0..per_tick {
                match socket.send_to(&count.to_be_bytes(), to) {
                    Ok(_) => {
                        count += 1;
                        last = Instant::now();
                        first.get_or_insert(last);
                    }
                    Err(e) if e.raw_os_error() == Some(libc::ENOBUFS) => {}
                    Err(e) => return Err(e),
                }
            }
            ticks += 1;
            if let Some(wait) = (start + tick * ticks).checked_duration_since(Instant::now()) {
                thread::sleep(wait);
            }
        }
        Ok(Sent {
            count,
            first: first.unwrap_or(start),
            last,
        })
    })
}

/// Per CPU: how many packets were counted under `reason`, from the pinned `COUNTERS` map.
fn per_cpu(lab: &Lab, reasons: &[Reason]) -> anyhow::Result<Vec<u64>> {
    let path = detector_user::paths::map_pin(&lab.pin_dir(), map_names::COUNTERS);
    let data = MapData::from_pin(&path).with_context(|| format!("opening {}", path.display()))?;
    let counters: PerCpuArray<MapData, Counters> = PerCpuArray::try_from(Map::PerCpuArray(data))?;
    let values = counters.get(&0, 0)?;
    Ok(values
        .iter()
        .map(|c| reasons.iter().map(|r| c.by_reason[*r as usize]).sum())
        .collect())
}

/// The XDP packet count of each of the server veth's receive queues (`ethtool -S`: `rx_queue_N_xdp_packets`).
fn queue_xdp_packets(lab: &Lab, queues: usize) -> anyhow::Result<Vec<u64>> {
    let mut cmd = lab.server.command("ethtool");
    cmd.args(["-S", SERVER_IF]);
    let out = netns::run_bounded(cmd, Duration::from_secs(10))?.ok()?;
    (0..queues)
        .map(|q| {
            let name = format!("rx_queue_{q}_xdp_packets:");
            out.stdout
                .lines()
                .find_map(|l| l.trim().strip_prefix(name.as_str()))
                .with_context(|| format!("`ethtool -S {SERVER_IF}` has no {name}:\n{}", out.stdout))?
                .trim()
                .parse::<u64>()
                .with_context(|| format!("{name} in `ethtool -S {SERVER_IF}`"))
        })
        .collect()
}

fn delta(after: &[u64], before: &[u64]) -> Vec<u64> {
    after.iter().zip(before).map(|(a, b)| a - b).collect()
}

#[test]
fn one_throttled_source_on_two_receive_queues_stays_within_its_class_rate() -> anyhow::Result<()> {
    let cpus = thread::available_parallelism().map_or(1, |n| n.get());
    if cpus < CPUS.len() {
        aqd_tests::skip_or_fail(&format!("needs {} CPUs, this machine has {cpus}", CPUS.len()));
        return Ok(());
    }
    let Some(mut lab) = netns::lab_with_queues_for_test(CPUS.len() as u16) else {
        return Ok(());
    };
    // XPS: what the client sends on CPU n leaves on its transmit queue n.
    for (queue, cpu) in CPUS.iter().enumerate() {
        let mut cmd = lab.client.command("sh");
        cmd.arg("-c").arg(format!(
            "echo {:x} > /sys/class/net/{CLIENT_IF}/queues/tx-{queue}/xps_cpus",
            1u64 << cpu
        ));
        netns::run_bounded(cmd, Duration::from_secs(10))?.ok()?;
    }
    lab.write_config("", CLASS)?;
    // Dry run: the model only suggests, so nothing but the CLI throttle below decides on the source.
    lab.start_daemon_with(&["--dry-run"])?;
    let source = IpAddr::V4(lab.client_v4);
    lab.aqd(&["throttle", &source.to_string(), "--class", "rxq"])?
        .ok()?;

    let to = lab.service(source);
    let sink = UdpSink::bind(&lab.server, to)?;
    sink.set_receive_buffer(8 << 20)?;
    let arrivals = sink.collect_until(Instant::now() + DURATION + Duration::from_secs(2));
    let limited = [Reason::PassThrottled, Reason::DropRatePackets];
    let cpu_before = per_cpu(&lab, &limited)?;
    let passed_before = lab.status()?.reason("pass_throttled");
    let dropped_before = lab.status()?.reason("drop_rate_packets");
    let queues_before = queue_xdp_packets(&lab, CPUS.len())?;

    let senders: Vec<_> = CPUS
        .iter()
        .map(|cpu| paced_sender(&lab.client, *cpu, source, to, OFFERED_PER_SENDER, DURATION))
        .collect();
    let sent: Vec<Sent> = senders.into_iter().map(NsTask::join).collect::<io::Result<_>>()?;
    // Let the last frames through the receive path before reading the counters.
    thread::sleep(Duration::from_millis(300));

    let status = lab.status()?;
    let passed = status.reason("pass_throttled") - passed_before;
    let dropped = status.reason("drop_rate_packets") - dropped_before;
    let per_cpu = delta(&per_cpu(&lab, &limited)?, &cpu_before);
    let per_queue = delta(&queue_xdp_packets(&lab, CPUS.len())?, &queues_before);
    let delivered = arrivals
        .join()
        .map_err(|_| anyhow::anyhow!("the UDP sink panicked"))??
        .len() as u64;
    let total: u64 = sent.iter().map(|s| s.count).sum();
    let first = sent.iter().map(|s| s.first).min().expect("two senders");
    let last = sent.iter().map(|s| s.last).max().expect("two senders");
    let seconds = (last - first).as_secs_f64();
    let expected = BURST as f64 + RATE as f64 * seconds;
    let report = format!(
        "sent {total} ({:?} per sender) in {seconds:.3} s; kernel passed {passed}, dropped {dropped}; \
         delivered {delivered}; expected {expected:.0} ±10 %; per CPU {per_cpu:?}; per receive queue {per_queue:?}",
        sent.iter().map(|s| s.count).collect::<Vec<_>>()
    );
    eprintln!("{report}");

    // The offered load must have been well above the class rate, or the limit was never tested.
    ensure!(
        total as f64 >= 2.0 * expected,
        "the senders offered too little to test the limit: {report}"
    );
    // Every datagram sent reaches the program and is passed or rate-dropped; a veth drops a frame before XDP
    // only when a receive ring is full, which paced senders should not cause (a little slack for a loaded host).
    ensure!(
        passed + dropped <= total && passed + dropped >= total - total / 100,
        "datagrams sent and counted as passed or rate-dropped differ: {report}"
    );
    // Both receive queues carried the source's traffic, and both CPUs ran the program for it.
    for (queue, n) in per_queue.iter().enumerate() {
        ensure!(
            *n >= total / 10,
            "receive queue {queue} ran XDP on {n} of {total} packets: {report}"
        );
    }
    for cpu in CPUS {
        let n = per_cpu.get(cpu).copied().unwrap_or(0);
        ensure!(
            n >= total / 10,
            "CPU {cpu} limited {n} of {total} packets: {report}"
        );
    }
    ensure!(
        (passed as f64 - expected).abs() <= 0.1 * expected,
        "passed {passed}, outside the class rate ±10 %: {report}"
    );
    ensure!(
        delivered <= passed,
        "more arrived than the kernel passed: {report}"
    );
    lab.stop_daemon()?;
    Ok(())
}
