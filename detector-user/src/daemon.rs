//! `aqd run`: load, attach, apply settings, read events, report counters, exit leaving the kernel enforcing.

use std::{os::fd::AsFd as _, path::PathBuf, time::Duration};

use anyhow::Context as _;
use aya::maps::RingBuf;
use detector_common::{CONFIG_FLAG_CONN_EVENTS, Config, Reason, event::EVENT_KIND_COUNT, map_names};

use crate::{
    attach::{self, AttachMode, Attached},
    events::{Event, EventReader},
    loader::{self, LoadOptions},
    maps::{CounterTotals, KernelMaps, rate_class_limits},
};

/// Limits of a rate class as an operator writes them.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct RateLimits {
    pub packets_per_s: u32,
    pub packet_burst: u32,
    pub conns_per_s: u32,
    pub conn_burst: u32,
}

/// Everything `aqd run` needs.
#[derive(Clone, Debug)]
pub struct DaemonSettings {
    pub interfaces: Vec<String>,
    pub mode: AttachMode,
    pub pin_dir: PathBuf,
    pub protected_ports: Vec<u16>,
    /// Class 0 applies to every source without a throttle decision; others to throttled sources.
    pub rate_classes: Vec<(u32, RateLimits)>,
    pub drop_sample_every: u32,
    pub stats_interval: Duration,
}

/// Runs until SIGINT/SIGTERM. The XDP links and maps stay pinned: enforcement continues without the daemon.
pub async fn run(settings: DaemonSettings) -> anyhow::Result<()> {
    let mut ebpf = loader::load(&LoadOptions {
        pin_dir: Some(settings.pin_dir.clone()),
        test_clock: false,
    })
    .context("loading the XDP program")?;
    let mut maps = KernelMaps::from_ebpf(&mut ebpf)?;
    apply_settings(&mut maps, &settings)?;
    let program = loader::program_mut(&mut ebpf)?;
    let program_id = program.info()?.id();
    let program_fd = program.fd()?.as_fd();
    for iface in &settings.interfaces {
        match attach::attach(program_fd, iface, settings.mode)? {
            Attached::New => tracing::info!(iface, mode = %settings.mode, program_id, "attached"),
            Attached::Replaced { old_program_id } => tracing::info!(
                iface,
                mode = %settings.mode,
                program_id,
                old_program_id,
                "replaced the running aqd program atomically (no gap)"
            ),
        }
    }
    let ring = RingBuf::try_from(ebpf.take_map(map_names::EVENTS).context("EVENTS map missing")?)?;
    let mut reader = EventReader::new(ring)?;

    let mut sigterm = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())?;
    let mut stats = tokio::time::interval(settings.stats_interval);
    let mut events_by_kind = [0u64; EVENT_KIND_COUNT];
    let mut last = maps.counters()?;
    loop {
        tokio::select! {
            batch = reader.next_batch(|event| {
                match &event {
                    Event::Conn { flow, .. } => {
                        events_by_kind[0] += 1;
                        tracing::debug!(src = %flow.src, sport = flow.src_port, dport = flow.dst_port, "new connection");
                    }
                    Event::Drop { flow, reason, .. } => {
                        events_by_kind[1] += 1;
                        tracing::debug!(src = %flow.src, reason = reason.map(|r| r.name()), "drop sample");
                    }
                }
            }) => { batch.context("reading the event ring buffer")?; }
            _ = stats.tick() => {
                let now = maps.counters()?;
                log_counters(&last, &now, &events_by_kind, reader.undecodable);
                last = now;
            }
            _ = tokio::signal::ctrl_c() => break,
            _ = sigterm.recv() => break,
        }
    }
    tracing::info!("exiting; the XDP program stays attached and keeps enforcing (`aqd detach` removes it)");
    Ok(())
}

/// Writes protected ports, rate classes and program config into the maps.
pub fn apply_settings(maps: &mut KernelMaps, settings: &DaemonSettings) -> anyhow::Result<()> {
    maps.set_protected_ports(&settings.protected_ports)?;
    for &(class, l) in &settings.rate_classes {
        maps.set_rate_class(
            class,
            rate_class_limits(l.packets_per_s, l.packet_burst, l.conns_per_s, l.conn_burst),
        )?;
    }
    maps.set_config(Config {
        drop_sample_every: settings.drop_sample_every,
        flags: CONFIG_FLAG_CONN_EVENTS,
        test_now_ns: 0,
    })?;
    Ok(())
}

fn log_counters(last: &CounterTotals, now: &CounterTotals, events_read: &[u64], undecodable: u64) {
    let delta = |i: usize| now.by_reason[i].saturating_sub(last.by_reason[i]);
    let packets: u64 = (0..now.by_reason.len()).map(delta).sum();
    let dropped: u64 = Reason::ALL
        .iter()
        .filter(|r| r.verdict() == detector_common::Verdict::Drop)
        .map(|r| delta(*r as usize))
        .sum();
    let top: Vec<String> = Reason::ALL
        .iter()
        .filter(|r| delta(**r as usize) > 0)
        .map(|r| format!("{}={}", r.name(), delta(*r as usize)))
        .collect();
    tracing::info!(
        packets,
        dropped,
        reasons = %top.join(" "),
        events_read = ?events_read,
        events_lost = ?now.events_lost,
        undecodable,
        "counters since last report"
    );
}
