//! Prometheus endpoint (`GET /metrics`, OpenMetrics text via prometheus-client).
//!
//! The numbers live in the kernel maps, so each scrape builds a fresh registry from one snapshot instead of
//! keeping counters in step. Only the daemon's in-memory figures are read under its state lock; the kernel maps
//! are walked on the endpoint's own handles without it, so a scrape never stalls event draining. Connections
//! go through `serve` (cap `daemon.metrics_max_connections`, deadlines, an accept loop that never ends).
//! The HTTP side is a minimal responder for one route: a web framework would be most of the daemon's
//! dependency tree for a single GET.

use std::{
    collections::BTreeMap,
    sync::{Arc, Mutex, atomic::Ordering},
    time::{Duration, Instant},
};

use detector_common::{Reason, event::EventKind};
use prometheus_client::{
    encoding::text::encode,
    metrics::{counter::Counter, family::Family, gauge::Gauge},
    registry::Registry,
};
use tokio::{
    io::{AsyncReadExt as _, AsyncWriteExt as _},
    net::TcpListener,
};

use crate::{
    aging::{AgingStats, Baseline, FlowFigures, FlowTables},
    enforce::FpWriteStats,
    events::EventStats,
    fingerprint::live::LiveState,
    maps::KernelMaps,
    model_stage::ModelStage,
    serve::{self, Limiter, ServeStats, Servers, Slot},
};

type Labels = Vec<(String, String)>;

fn labels(pairs: &[(&str, &str)]) -> Labels {
    pairs
        .iter()
        .map(|(k, v)| (k.to_string(), v.to_string()))
        .collect()
}

/// The metrics server's own handles on the kernel maps, so a scrape walks them without the daemon's state lock
/// (event draining and the control socket go on meanwhile).
pub struct KernelView {
    pub maps: KernelMaps,
    pub flow_tables: FlowTables,
}

/// What a scrape reads from the daemon under its state lock: the in-memory figures only (no syscalls). The
/// daemon implements it, so this module does not know the daemon's state (no import cycle).
pub trait Figures: Send + 'static {
    /// Registers the in-memory figures and hands back what the kernel part reads once the lock is released.
    fn register(&self, registry: &mut Registry) -> KernelInputs;
}

/// The daemon's handles the kernel part of a scrape needs (shared counters, the start-of-run baseline).
pub struct KernelInputs {
    pub events: Arc<EventStats>,
    pub baseline: Baseline,
    pub aging: Arc<AgingStats>,
}

/// Renders the current state as OpenMetrics text: the daemon's in-memory figures are registered under the state
/// lock (no syscalls: quick), then the kernel maps are read and walked with `kernel`'s handles, lock released.
pub fn render<S: Figures>(state: &Mutex<S>, kernel: &KernelView) -> Result<String, String> {
    let mut registry = Registry::with_prefix("aqd");
    let KernelInputs {
        events,
        baseline,
        aging,
    } = {
        let started = Instant::now();
        let taken = serve::lock(state).register(&mut registry);
        tracing::debug!(
            held_us = started.elapsed().as_micros() as u64,
            "metrics: in-memory figures taken under the state lock"
        );
        taken
    };
    let walk_started = Instant::now();
    let maps = &kernel.maps;
    let counters = maps.counters().map_err(|e| e.to_string())?;

    let packets = Family::<Labels, Counter>::default();
    for reason in Reason::ALL {
        let verdict = match reason.verdict() {
            detector_common::Verdict::Pass => "pass",
            detector_common::Verdict::Drop => "drop",
        };
        packets
            .get_or_create(&labels(&[("reason", reason.name()), ("verdict", verdict)]))
            .inc_by(counters.by_reason[reason as usize]);
    }
    registry.register(
        "packets",
        "Packets seen by the XDP program, by verdict and reason",
        packets,
    );

    let events_sent = Family::<Labels, Counter>::default();
    let events_lost = Family::<Labels, Counter>::default();
    let events_read = Family::<Labels, Counter>::default();
    for kind in EventKind::ALL {
        let l = labels(&[("kind", kind.name())]);
        events_sent
            .get_or_create(&l)
            .inc_by(counters.events_sent[kind as usize]);
        events_lost
            .get_or_create(&l)
            .inc_by(counters.events_lost[kind as usize]);
        events_read
            .get_or_create(&l)
            .inc_by(events.read[kind as usize].load(Ordering::Relaxed));
    }
    registry.register(
        "ringbuf_events_sent",
        "Events the kernel wrote to the ring buffer",
        events_sent,
    );
    registry.register(
        "ringbuf_events_lost",
        "Events lost because the ring buffer was full",
        events_lost,
    );
    registry.register(
        "events_read",
        "Events the daemon read from the ring buffer",
        events_read,
    );

    let map_entries = Family::<Labels, Gauge>::default();
    let map_capacity = Family::<Labels, Gauge>::default();
    for (name, used, capacity) in maps.fill_levels() {
        map_entries
            .get_or_create(&labels(&[("map", name)]))
            .set(used as i64);
        map_capacity
            .get_or_create(&labels(&[("map", name)]))
            .set(capacity as i64);
    }
    registry.register("map_entries", "Entries in each kernel map", map_entries);
    registry.register("map_capacity", "Capacity of each kernel map", map_capacity);

    // The connection tables: entries now, and what left them by which way (evictions derived, see `aging`).
    let entries = kernel.flow_tables.entries().map_err(|e| e.to_string())?;
    let figures = FlowFigures::derive(&baseline, &counters, &aging, entries);
    let table_entries = Family::<Labels, Gauge>::default();
    table_entries
        .get_or_create(&labels(&[("table", "flows")]))
        .set(figures.flows_entries as i64);
    table_entries
        .get_or_create(&labels(&[("table", "half_open")]))
        .set(figures.half_open_entries as i64);
    registry.register(
        "flow_table_entries",
        "Entries in the connection tables (FLOWS: verified flows; HALF_OPEN: SYNs)",
        table_entries,
    );
    let removed = Family::<Labels, Counter>::default();
    for (table, how, n) in [
        ("flows", "reset", figures.reset),
        ("flows", "aged_idle", figures.aged_idle),
        ("flows", "aged_closed", figures.aged_closed),
        ("flows", "evicted", figures.evicted),
        ("half_open", "aged", figures.half_open_aged),
        ("half_open", "evicted", figures.half_open_evicted),
    ] {
        removed
            .get_or_create(&labels(&[("table", table), ("how", how)]))
            .inc_by(n);
    }
    registry.register(
        "flow_table_removed",
        "Connection-table entries removed, by how (resets: kernel counter; ageing: since the daemon started; \
         evicted: derived since the daemon started, a lower bound for half_open)",
        removed,
    );
    let established = Counter::<u64>::default();
    established.inc_by(figures.established);
    registry.register(
        "flows_established",
        "Verified handshakes: flows inserted into FLOWS",
        established,
    );

    let decisions = Family::<Labels, Gauge>::default();
    let mut by_kind: BTreeMap<(&str, &str), i64> = BTreeMap::new();
    for d in maps.decisions().map_err(|e| e.to_string())? {
        if d.remaining_secs != Some(0) {
            let action = d.action.map_or("unknown", |a| a.name());
            let origin = d.origin.map_or("unknown", |o| o.name());
            *by_kind.entry((action, origin)).or_default() += 1;
        }
    }
    for ((action, origin), n) in by_kind {
        decisions
            .get_or_create(&labels(&[("action", action), ("origin", origin)]))
            .set(n);
    }
    registry.register("decisions", "Live decisions by action and origin", decisions);

    tracing::debug!(
        walked_us = walk_started.elapsed().as_micros() as u64,
        "metrics: kernel maps read without the state lock"
    );
    let mut out = String::new();
    encode(&mut out, &registry).map_err(|e| e.to_string())?;
    Ok(out)
}

/// A scraper that sends no request line for this long is dropped.
const READ_TIMEOUT: Duration = Duration::from_secs(5);
/// A scraper that does not take the answer for this long is dropped.
const WRITE_TIMEOUT: Duration = Duration::from_secs(10);

/// Serves `GET /metrics` until the task is dropped; never ends on its own (accept errors are retried,
/// connections over the cap closed: see `serve`).
pub async fn serve<S: Figures>(
    listener: TcpListener,
    state: Arc<Mutex<S>>,
    kernel: KernelView,
    limiter: Arc<Limiter>,
    stats: Arc<ServeStats>,
) {
    let per_connection = Arc::clone(&stats);
    // One scrape walks the maps at a time; scrapes never wait on the state lock for that.
    let kernel = Arc::new(Mutex::new(kernel));
    serve::accept_loop("metrics", listener, limiter, stats, move |stream, slot| {
        let state = Arc::clone(&state);
        let kernel = Arc::clone(&kernel);
        let stats = Arc::clone(&per_connection);
        async move {
            if let Err(e) = serve_one(stream, state, kernel, &slot).await {
                if e.kind() == std::io::ErrorKind::TimedOut {
                    stats.timed_out.fetch_add(1, Ordering::Relaxed);
                }
                tracing::debug!(error = %e, "metrics connection ended with an error");
            }
        }
    })
    .await
}

async fn serve_one<S: Figures>(
    mut stream: tokio::net::TcpStream,
    state: Arc<Mutex<S>>,
    kernel: Arc<Mutex<KernelView>>,
    slot: &Slot,
) -> std::io::Result<()> {
    let mut head = vec![0u8; 4096];
    let n = tokio::select! {
        n = serve::within("reading the request", READ_TIMEOUT, stream.read(&mut head)) => n?,
        // At the connection cap, a client that has not sent its request yet makes room for a newer one.
        () = slot.evicted() => return Ok(()),
    };
    slot.busy();
    let request_line = String::from_utf8_lossy(&head[..n]);
    let (status, content_type, body) = if request_line.starts_with("GET /metrics ") {
        let rendered = tokio::task::spawn_blocking(move || render(&state, &serve::lock(&kernel)))
            .await
            .unwrap_or_else(|e| Err(format!("rendering the metrics failed: {e}")));
        match rendered {
            Ok(body) => (
                "200 OK",
                "application/openmetrics-text; version=1.0.0; charset=utf-8",
                body,
            ),
            Err(e) => ("500 Internal Server Error", "text/plain", e),
        }
    } else {
        ("404 Not Found", "text/plain", "try GET /metrics\n".to_string())
    };
    let response = format!(
        "HTTP/1.1 {status}\r\nContent-Type: {content_type}\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
        body.len()
    );
    serve::within(
        "writing the reply",
        WRITE_TIMEOUT,
        stream.write_all(response.as_bytes()),
    )
    .await
}

/// Config reloads by result.
pub fn register_reloads(ok: u64, failed: u64, registry: &mut Registry) {
    let reloads = Family::<Labels, Counter>::default();
    reloads.get_or_create(&labels(&[("result", "ok")])).inc_by(ok);
    reloads
        .get_or_create(&labels(&[("result", "failed")]))
        .inc_by(failed);
    registry.register("config_reloads", "Config reloads by result", reloads);
}

/// The fingerprint pipeline's numbers (`verdict_writes`: the enforcer's writes of verdicts by fingerprint).
pub fn register_fingerprints(live: &LiveState, verdict_writes: FpWriteStats, registry: &mut Registry) {
    let stats = &live.reassembler.stats;
    let tracked = Family::<Labels, Gauge>::default();
    tracked
        .get_or_create(&labels(&[("kind", "ja4")]))
        .set(live.table.ja4.len() as i64);
    tracked
        .get_or_create(&labels(&[("kind", "syn")]))
        .set(live.table.syn.len() as i64);
    registry.register(
        "fingerprints_tracked",
        "Fingerprints in the table, by kind",
        tracked,
    );
    let memory = Gauge::<i64>::default();
    memory.set((live.table.memory() + live.reassembler.memory()) as i64);
    registry.register(
        "fingerprint_memory_bytes",
        "Approximate memory held by the fingerprint table and reassembly",
        memory,
    );
    let computed = Counter::<u64>::default();
    computed.inc_by(stats.ja4_computed);
    registry.register(
        "ja4_computed",
        "ClientHellos fingerprinted (one per flow)",
        computed,
    );
    let failed = Family::<Labels, Counter>::default();
    for (reason, n) in &stats.ja4_failed {
        failed.get_or_create(&labels(&[("reason", reason)])).inc_by(*n);
    }
    failed
        .get_or_create(&labels(&[("reason", "not_tls")]))
        .inc_by(stats.not_tls);
    registry.register(
        "ja4_failed",
        "Flows whose first bytes gave no JA4, by why",
        failed,
    );
    let writes = Family::<Labels, Counter>::default();
    let w = verdict_writes;
    for (op, n) in [
        ("install", w.verdict_installs),
        ("remove", w.verdict_removals),
        ("flow", w.flow_actions),
        ("flow_missed", w.flow_actions_missed),
    ] {
        writes.get_or_create(&labels(&[("op", op)])).inc_by(n);
    }
    registry.register(
        "fingerprint_verdict_writes",
        "Writes of verdicts by fingerprint into the kernel (SYN/ClientHello keys, flows)",
        writes,
    );
    let escalations = Counter::<u64>::default();
    escalations.inc_by(live.escalation.escalations);
    registry.register(
        "fingerprint_escalations",
        "Sources blocked after repeated hits of a blocked fingerprint",
        escalations,
    );
    // ClientHello → flow verdict latency, as cumulative buckets (seconds) with count, sum and max.
    let h = &live.latency;
    let buckets = Family::<Labels, Gauge>::default();
    let mut cumulative = 0u64;
    for (i, bound) in crate::fingerprint::live::LATENCY_BUCKETS_US.iter().enumerate() {
        cumulative += h.counts[i];
        let le = format!("{}", *bound as f64 / 1e6);
        buckets
            .get_or_create(&labels(&[("le", &le)]))
            .set(cumulative as i64);
    }
    buckets
        .get_or_create(&labels(&[("le", "+Inf")]))
        .set(h.count as i64);
    registry.register(
        "hello_flow_verdict_latency_bucket",
        "ClientHello arrival (kernel time) to its flow verdict in FLOWS: samples at or below le seconds",
        buckets,
    );
    let count = Gauge::<i64>::default();
    count.set(h.count as i64);
    registry.register(
        "hello_flow_verdict_latency_count",
        "Samples of that latency",
        count,
    );
    let sum = Gauge::<f64, std::sync::atomic::AtomicU64>::default();
    sum.set(h.sum_us as f64 / 1e6);
    registry.register(
        "hello_flow_verdict_latency_sum_seconds",
        "Sum of that latency",
        sum,
    );
    let max = Gauge::<f64, std::sync::atomic::AtomicU64>::default();
    max.set(h.max_us as f64 / 1e6);
    registry.register(
        "hello_flow_verdict_latency_max_seconds",
        "Largest such latency",
        max,
    );
}

/// The behavioural model: what it tracks, its scores by tier, and what happened to its decisions.
pub fn register_model(model_stage: &ModelStage, registry: &mut Registry) {
    let stage = model_stage.stats();
    let model = &model_stage.model;
    let memory = model.memory_report();
    let tracked = Family::<Labels, Gauge>::default();
    for (kind, n) in [
        ("source", memory.sources),
        ("prefix", memory.prefixes),
        ("fingerprint", memory.fingerprints),
    ] {
        tracked.get_or_create(&labels(&[("kind", kind)])).set(n as i64);
    }
    registry.register(
        "model_tracked",
        "Entities the model keeps state for, by kind",
        tracked,
    );
    let bytes = Gauge::<i64>::default();
    bytes.set(memory.total_bytes as i64);
    registry.register("model_memory_bytes", "Memory held by the model's tables", bytes);
    let observations = Counter::<u64>::default();
    observations.inc_by(model_stage.feed.stats().observations);
    registry.register(
        "model_observations",
        "Observations fed to the model",
        observations,
    );
    let decisions = Family::<Labels, Counter>::default();
    for (tier, n) in [
        ("monitor", stage.monitor),
        ("throttle", stage.throttle),
        ("block", stage.block),
    ] {
        decisions.get_or_create(&labels(&[("tier", tier)])).inc_by(n);
    }
    registry.register(
        "model_decisions",
        "Model decisions applied (or logged in dry run), by tier",
        decisions,
    );
    let outcomes = Family::<Labels, Counter>::default();
    for (outcome, n) in [
        ("applied", stage.applied),
        ("refused", stage.refused),
        ("dry_run", stage.dry_run),
        ("skipped_allowed_fingerprint", stage.skipped_allowed_fingerprint),
    ] {
        outcomes.get_or_create(&labels(&[("outcome", outcome)])).inc_by(n);
    }
    registry.register(
        "model_decision_outcomes",
        "What happened to the model's proposals",
        outcomes,
    );
    // Scores of the tracked sources by the tier they are in (a histogram would need every score; the
    // current tier counts and the highest score are what an alert needs).
    let now = crate::clock::monotonic_ns();
    let by_tier = Family::<Labels, Gauge>::default();
    let top = model.top(crate::model::Kind::Source, usize::MAX, now);
    let mut counts = [0i64; 4];
    let mut max_score = 0.0f64;
    for s in &top {
        max_score = max_score.max(s.score);
        let i = match s.tier {
            None => 0,
            Some(crate::model::Action::Monitor) => 1,
            Some(crate::model::Action::Throttle) => 2,
            Some(crate::model::Action::Block) => 3,
        };
        counts[i] += 1;
    }
    for (tier, n) in ["none", "monitor", "throttle", "block"].iter().zip(counts) {
        by_tier.get_or_create(&labels(&[("tier", tier)])).set(n);
    }
    registry.register(
        "model_sources_by_tier",
        "Tracked sources by the model tier they are in",
        by_tier,
    );
    let top_score = Gauge::<f64, std::sync::atomic::AtomicU64>::default();
    top_score.set(max_score);
    registry.register(
        "model_max_source_score",
        "Highest source score (probability, 0–1)",
        top_score,
    );
}

/// The control and metrics servers: connections by outcome, accept errors, slots in use and the caps.
pub fn register_servers(servers: &Servers, registry: &mut Registry) {
    let connections = Family::<Labels, Counter>::default();
    let accept_errors = Family::<Labels, Counter>::default();
    let active = Family::<Labels, Gauge>::default();
    let cap = Family::<Labels, Gauge>::default();
    for (server, (limiter, stats)) in [("control", &servers.control), ("metrics", &servers.metrics)] {
        for (outcome, counter) in [
            ("accepted", &stats.accepted),
            ("rejected_over_cap", &stats.rejected),
            ("evicted_idle", &stats.evicted),
            ("timed_out", &stats.timed_out),
            ("handler_panicked", &stats.panicked),
        ] {
            connections
                .get_or_create(&labels(&[("server", server), ("outcome", outcome)]))
                .inc_by(counter.load(Ordering::Relaxed));
        }
        accept_errors
            .get_or_create(&labels(&[("server", server)]))
            .inc_by(stats.accept_errors.load(Ordering::Relaxed));
        active
            .get_or_create(&labels(&[("server", server)]))
            .set(limiter.active() as i64);
        cap.get_or_create(&labels(&[("server", server)]))
            .set(limiter.cap() as i64);
    }
    registry.register(
        "server_connections",
        "Connections to the control socket and the metrics endpoint: accepted, and of those closed at once over \
         the cap (rejected_over_cap), closed to make room while idle (evicted_idle), dropped at a read or write \
         deadline (timed_out), whose handler panicked (answered with an error)",
        connections,
    );
    registry.register(
        "server_accept_errors",
        "Failed accept() calls (EMFILE, ENFILE, ...), each retried",
        accept_errors,
    );
    registry.register(
        "server_connections_active",
        "Connections holding a slot now",
        active,
    );
    registry.register(
        "server_connections_cap",
        "The cap on concurrent connections (daemon.*_max_connections)",
        cap,
    );
}
