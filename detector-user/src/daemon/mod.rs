//! `aqd run`: load, attach, apply the config, serve the control socket and metrics, read events, and exit
//! leaving the kernel enforcing (maps pinned, XDP attached).
//!
//! By job:
//! - this file: the daemon's state, startup and the select loop (events, timers, signals, servers);
//! - [`reload`]: config → kernel (settings and lists through the enforcer, fingerprint rules);
//! - [`stages`]: events → the fingerprint stage (reassembly, JA4, verdicts per flow, escalation) and the
//!   model's tick;
//! - [`upkeep`]: the connection-table ager, the purger of expired entries, the state store's upkeep;
//! - [`views`]: the typed status/fingerprint/model views and the metrics figures;
//! - [`handler`]: the daemon behind `control::handler` (what only the daemon can answer).
//!
//! Signals: SIGHUP reopens the audit log and reloads the config (a bad file is rejected, the running config
//! kept); SIGINT/SIGTERM exit.
//!
//! Durability: `aqd run` holds an exclusive lock in its state directory for its lifetime (a second one exits,
//! naming the first's PID, before touching anything), restores the state store into the maps before the program
//! is attached, and skips ring events stamped before it started.

mod handler;
mod reload;
mod stages;
mod upkeep;
mod views;

use reload::load_config_entries;
use upkeep::{spawn_ager, spawn_purger};

use std::{
    collections::BTreeSet,
    os::fd::AsFd as _,
    path::PathBuf,
    sync::{
        Arc, Mutex,
        atomic::{AtomicU64, Ordering},
    },
    time::{Duration, Instant},
};

use anyhow::Context as _;
use aya::maps::RingBuf;
use detector_common::{Action, Origin, Reason, Verdict, map_names};
use ipnet::IpNet;

use crate::{
    aging::{Ager, AgingStats, Baseline, FlowFigures, FlowTables},
    attach::{self, Attached},
    clock,
    config::Config,
    control::{
        self, ControlError, ErrorKind, ExplainTarget, Handler, Request, Response,
        handler::{Backend, FpSetArgs},
        views::{
            AgingView, DaemonDetails, DaemonView, ExplainView, FingerprintStatus, FlowTableView, FlowsView,
            FpKind, FpRemovedView, FpRow, FpSetView, FpVerdictView, HalfOpenView, LatencyView, ModelStatus,
            ScoreTopView, StatusView, StoreView,
        },
    },
    enforce::{AuditLog, DecisionRequest, Enforcer, FpRequest},
    events::{Event, EventReader, EventStats},
    fingerprint::live::{self, Capture, FpAction, FpTarget, HelloSeen, LiveState, parse_fp},
    loader::{self, LoadOptions},
    maps::KernelMaps,
    metrics,
    model_stage::ModelStage,
    paths,
    serve::{self, Servers},
    store::{self, InstanceLock, Store, StoredStrike},
};

/// Reload outcomes, for status and metrics.
#[derive(Debug, Default)]
pub struct ReloadStats {
    pub ok: AtomicU64,
    pub failed: AtomicU64,
}

/// Everything the control socket and metrics see.
pub struct DaemonState {
    pub enforcer: Enforcer,
    pub config_path: Option<PathBuf>,
    /// Command-line overrides re-applied on every reload.
    pub overrides: Overrides,
    pub started: Instant,
    pub program_id: u32,
    pub events: Arc<EventStats>,
    pub reloads: Arc<ReloadStats>,
    /// List entries written from the config, so a reload or restart can remove the ones no longer there.
    config_entries: BTreeSet<(bool, IpNet)>,
    /// Where `config_entries` is kept between daemon runs (it lives as long as the pins: until reboot).
    config_entries_path: PathBuf,
    /// The fingerprint pipeline: reassembly, JA4, p0f labels, the fingerprint table, escalation.
    pub live: LiveState,
    /// Events → observations → the behavioural model → decisions (origin `model`).
    pub model: ModelStage,
    /// `FLOWS` and `HALF_OPEN`, for the flow-table figures (the ager has its own handles).
    pub flow_tables: FlowTables,
    /// What the connection-table ager removed, and its policy.
    pub aging: Arc<AgingStats>,
    /// The tables and counters when this daemon started, to derive LRU evictions from.
    pub flow_baseline: Baseline,
    /// The control and metrics servers' connection figures.
    pub servers: Servers,
    /// Store upkeep ticks (the model's strikes are saved every [`STRIKES_EVERY_TICKS`]).
    store_ticks: u64,
    /// From the start of `aqd run` to the programs loaded (the verifier's time), and to the stored state back in
    /// the maps (which happens before the program is attached).
    restored_after: (Duration, Duration),
}

/// The model's strikes are written to the store once a minute (and at exit): they change slowly.
const STRIKES_EVERY_TICKS: u64 = 60;
/// At most this many strike records are kept (offenders with strikes or a tier in force).
const MAX_STRIKES: usize = 100_000;

/// Settings given on the command line; they win over the config file.
#[derive(Clone, Debug, Default)]
pub struct Overrides {
    pub interfaces: Vec<String>,
    pub xdp_mode: Option<attach::AttachMode>,
    pub pin_root: Option<PathBuf>,
    pub socket: Option<PathBuf>,
    pub protected_ports: Option<Vec<u16>>,
    pub stats_interval: Option<Duration>,
    pub metrics_address: Option<String>,
    pub audit_log: Option<PathBuf>,
    pub state_dir: Option<PathBuf>,
    pub dry_run: bool,
}

impl Overrides {
    fn apply(&self, mut config: Config) -> anyhow::Result<Config> {
        if !self.interfaces.is_empty() {
            config.interfaces = self.interfaces.clone();
        }
        if let Some(m) = self.xdp_mode {
            config.xdp_mode = m;
        }
        if let Some(p) = &self.pin_root {
            config.pin_root = p.clone();
        }
        if let Some(s) = &self.socket {
            config.socket = s.clone();
        } else if self.pin_root.is_some() && config.socket == std::path::Path::new(paths::DEFAULT_SOCKET) {
            // Another pin root is another aqd instance: give it its own socket unless the config names one.
            config.socket = paths::socket_for_pin_root(&config.pin_root);
        }
        if let Some(p) = &self.protected_ports {
            config.protected_ports = p.clone();
        }
        if let Some(s) = self.stats_interval {
            config.stats_interval = s;
        }
        if let Some(a) = &self.metrics_address {
            config.metrics_address = if a.is_empty() {
                None
            } else {
                Some(
                    a.parse()
                        .with_context(|| format!("--metrics-address '{a}' is not an address:port"))?,
                )
            };
        }
        if let Some(a) = &self.audit_log {
            config.audit_log = a.clone();
        }
        if let Some(d) = &self.state_dir {
            config.state_dir = d.clone();
        } else if self.pin_root.is_some()
            && config.state_dir == std::path::Path::new(paths::DEFAULT_STATE_DIR)
        {
            // Another pin root is another instance: its own state and lock, like its socket.
            config.state_dir = paths::state_dir_for_pin_root(&config.pin_root);
        }
        config.dry_run |= self.dry_run;
        Ok(config)
    }
}

/// Reads the config file (if any) and applies the command-line overrides.
pub fn resolve_config(path: Option<&std::path::Path>, overrides: &Overrides) -> anyhow::Result<Config> {
    let base = match path {
        Some(p) => Config::load(p)?,
        None => Config::default(),
    };
    overrides.apply(base)
}

/// Runs until SIGINT/SIGTERM.
pub async fn run(config_path: Option<PathBuf>, overrides: Overrides) -> anyhow::Result<()> {
    let started_ns = clock::monotonic_ns();
    let started = Instant::now();
    let config = resolve_config(config_path.as_deref(), &overrides)?;
    if config.interfaces.is_empty() {
        anyhow::bail!("no interface to attach to: give --iface or set daemon.interfaces in the config");
    }
    match serve::raise_nofile_limit() {
        Ok(l) => tracing::info!(
            soft_before = l.soft_before,
            soft = l.soft,
            hard = l.hard,
            "open-files limit (RLIMIT_NOFILE)"
        ),
        Err(e) => tracing::warn!("could not raise the open-files limit: {e}"),
    }
    // First, before anything is loaded, attached or bound: one daemon per instance.
    let _lock = InstanceLock::acquire(&paths::lock_file(&config.state_dir))?;
    tracing::info!(pid = std::process::id(), lock = %paths::lock_file(&config.state_dir).display(), "starting");
    let (store, loaded) = Store::open(&config.state_dir)?;
    for problem in &loaded.problems {
        tracing::error!("state store: {problem}; skipped, the rest is restored");
    }
    let pin_dir = paths::versioned_pin_dir(&config.pin_root);
    let mut ebpf = loader::load(&LoadOptions {
        pin_dir: Some(pin_dir.clone()),
        test_clock: false,
    })
    .context("loading the XDP program")?;
    let loaded_after = started.elapsed();
    tracing::info!(
        after_ms = loaded_after.as_millis() as u64,
        "programs loaded and verified"
    );
    // The kernel programs do not log (aya-log's formatter is a BPF subprogram whose stack adds to the
    // caller's); what they see is counted per reason and sent as events.
    // Handles on the connection tables first: `from_ebpf` takes the maps out of `ebpf`.
    let flow_tables = FlowTables::from_ebpf(&ebpf).context("opening the connection tables")?;
    let ager = Ager::new(flow_tables.try_clone()?);
    let maps = KernelMaps::from_ebpf(&mut ebpf)?;
    let flow_baseline =
        Baseline::take(&flow_tables, &maps.counters()?).context("reading the connection tables")?;
    let aging = Arc::new(AgingStats::new(config.aging));
    let audit = AuditLog::open(&config.audit_log)?;
    let events = Arc::new(EventStats::default());
    let reloads = Arc::new(ReloadStats::default());

    let program = loader::program_mut(&mut ebpf)?;
    let program_id = program.info()?.id();
    let mut state = DaemonState {
        enforcer: Enforcer::new(maps, audit, config.clone()),
        config_path: config_path.clone(),
        overrides,
        started: Instant::now(),
        program_id,
        events: Arc::clone(&events),
        reloads: Arc::clone(&reloads),
        config_entries: load_config_entries(&paths::config_entries_for_socket(&config.socket)),
        config_entries_path: paths::config_entries_for_socket(&config.socket),
        live: LiveState::default(),
        model: ModelStage::new(
            crate::model::ModelConfig {
                wall_offset_ns: clock::realtime_minus_monotonic_ns(),
                ..config.model.clone()
            },
            config.dry_run,
        ),
        flow_tables,
        aging: Arc::clone(&aging),
        flow_baseline,
        servers: Servers::new(config.control_max_connections, config.metrics_max_connections),
        store_ticks: 0,
        restored_after: (Duration::ZERO, Duration::ZERO),
    };
    state.model.not_before_ns = started_ns;
    state.enforcer.set_store(store);
    let fps = state.enforcer.restore_fingerprints()?;
    // Settings and lists go in before the program is attached, so it never runs with stale limits.
    state.apply_config(&config)?;
    let policy = state.enforcer.restore_policy()?;
    let strikes = state.restore_strikes();
    tracing::info!(
        dir = %config.state_dir.display(),
        decisions = policy.decisions,
        list_entries = policy.list_entries,
        fingerprints = fps.fingerprints,
        strikes,
        already_present = policy.already_present + fps.already_present,
        expired = policy.expired + fps.expired,
        refused = policy.refused,
        failed = policy.failed,
        "state restored"
    );
    // A failed compaction (a full disk) keeps the journal as it is: enforcing comes first.
    if let Some(store) = state.enforcer.store_mut()
        && let Err(e) = store.compact(store::now_unix_ms())
    {
        tracing::warn!("state store: compaction at start failed: {e}; the journal is kept");
    }
    state.restored_after = (loaded_after, started.elapsed());
    let reinstalled = state.enforcer.fp_reinstall_all()?;
    if reinstalled > 0 {
        tracing::info!(keys = reinstalled, "fingerprint verdicts reinstalled");
    }

    // The egress program first: SYN-ACKs are learned before the new XDP program looks for them.
    for iface in &config.interfaces {
        attach::attach_egress(loader::egress_program_mut(&mut ebpf)?, iface)?;
    }
    let program = loader::program_mut(&mut ebpf)?;
    let program_fd = program.fd()?.as_fd();
    for iface in &config.interfaces {
        match attach::attach(program_fd, iface, config.xdp_mode)? {
            Attached::New => tracing::info!(iface, mode = %config.xdp_mode, program_id, "attached"),
            Attached::Replaced { old_program_id } => tracing::info!(
                iface,
                mode = %config.xdp_mode,
                program_id,
                old_program_id,
                "replaced the running aqd program atomically (no gap)"
            ),
        }
    }
    let ring = RingBuf::try_from(ebpf.take_map(map_names::EVENTS).context("EVENTS map missing")?)?;
    let mut reader = EventReader::new(ring)?;

    let state = Arc::new(Mutex::new(state));
    let socket_path = config.socket.clone();
    let listener = control::bind(&socket_path, config.socket_group.as_deref())
        .with_context(|| format!("control socket {}", socket_path.display()))?;
    tracing::info!(socket = %socket_path.display(), "control socket ready");
    let (control_limiter, control_stats, metrics_limiter, metrics_stats) = {
        let servers = &serve::lock(&state).servers;
        (
            Arc::clone(&servers.control.0),
            Arc::clone(&servers.control.1),
            Arc::clone(&servers.metrics.0),
            Arc::clone(&servers.metrics.1),
        )
    };
    let control_task = tokio::spawn(control::serve_listener(
        listener,
        Arc::clone(&state),
        control_limiter,
        control_stats,
    ));
    let metrics_task = match config.metrics_address {
        Some(address) => {
            let listener = tokio::net::TcpListener::bind(address)
                .await
                .with_context(|| format!("metrics endpoint {address}"))?;
            tracing::info!(%address, "metrics on /metrics");
            let kernel = metrics::KernelView {
                maps: KernelMaps::from_pins(&pin_dir).context("opening the maps for metrics")?,
                flow_tables: serve::lock(&state).flow_tables.try_clone()?,
            };
            Some(tokio::spawn(metrics::serve(
                listener,
                Arc::clone(&state),
                kernel,
                metrics_limiter,
                metrics_stats,
            )))
        }
        None => None,
    };

    spawn_ager(ager, Arc::clone(&aging))?;
    spawn_purger(
        KernelMaps::from_pins(&pin_dir).context("opening the maps for purging")?,
        Arc::clone(&state),
    )?;

    let mut sigterm = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())?;
    let mut sighup = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::hangup())?;
    let mut stats = tokio::time::interval(config.stats_interval);
    // The kernel wakes the reader only when the ring fills up (wake-ups are costly); drain it regularly too.
    // Short: a ClientHello the kernel could not key waits for this drain before the daemon blocks its flow.
    let mut drain = tokio::time::interval(Duration::from_millis(5));
    drain.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    // Reassembly of ClientHellos that never complete is given up after fingerprints.flow_timeout.
    let mut expire = tokio::time::interval(Duration::from_secs(1));
    let mut last = serve::lock(&state).enforcer.maps().counters()?;
    let mut batch: Vec<Event> = Vec::new();
    loop {
        tokio::select! {
            read = reader.next_batch(|event| batch.push(event)) => {
                read.context("reading the event ring buffer")?;
                events.undecodable.store(reader.undecodable, Ordering::Relaxed);
            }
            _ = drain.tick() => {
                reader.drain(|event| batch.push(event));
                events.undecodable.store(reader.undecodable, Ordering::Relaxed);
            }
            _ = expire.tick() => {
                let mut state = serve::lock(&state);
                let timeout = state.live.settings.flow_timeout;
                state.live.reassembler.expire(clock::monotonic_ns(), timeout);
                state.model_tick();
                state.store_tick();
            }
            _ = stats.tick() => {
                let now = serve::lock(&state).enforcer.maps().counters()?;
                log_counters(&last, &now);
                last = now;
            }
            _ = sighup.recv() => {
                let result = serve::lock(&state).reload();
                if let Err(e) = result {
                    tracing::error!("reload rejected, running config kept: {e:#}");
                }
            }
            _ = tokio::signal::ctrl_c() => break,
            _ = sigterm.recv() => break,
        }
        if !batch.is_empty() {
            for event in &batch {
                record_event(&events, event);
            }
            serve::lock(&state).on_events(&batch);
            batch.clear();
            if batch.capacity() > 65_536 {
                batch.shrink_to(1024);
            }
        }
    }
    control_task.abort();
    if let Some(t) = metrics_task {
        t.abort();
    }
    {
        let mut state = serve::lock(&state);
        state.save_strikes();
        if let Some(Err(e)) = state.enforcer.store_mut().map(|s| s.sync()) {
            tracing::warn!("flushing the state store: {e}");
        }
    }
    let _ = std::fs::remove_file(&socket_path);
    tracing::info!("exiting; the XDP program stays attached and keeps enforcing (`aqd detach` removes it)");
    Ok(())
}

fn record_event(stats: &EventStats, event: &Event) {
    stats.read[event.kind() as usize].fetch_add(1, Ordering::Relaxed);
    match event {
        Event::Conn { flow, .. } => {
            tracing::trace!(src = %flow.src, sport = flow.src_port, dport = flow.dst_port, "new connection");
        }
        Event::Drop { flow, reason, .. } => {
            tracing::debug!(src = %flow.src, reason = reason.map(|r| r.name()), "drop sample");
        }
        _ => {}
    }
}

fn log_counters(last: &crate::maps::CounterTotals, now: &crate::maps::CounterTotals) {
    let delta = |r: &Reason| now.by_reason[*r as usize].saturating_sub(last.by_reason[*r as usize]);
    let packets: u64 = Reason::ALL.iter().map(delta).sum();
    let dropped: u64 = Reason::ALL
        .iter()
        .filter(|r| r.verdict() == Verdict::Drop)
        .map(delta)
        .sum();
    let reasons: Vec<String> = Reason::ALL
        .iter()
        .filter(|r| delta(r) > 0)
        .map(|r| format!("{}={}", r.name(), delta(r)))
        .collect();
    tracing::info!(
        packets,
        dropped,
        reasons = %reasons.join(" "),
        events_lost = ?now.events_lost,
        "counters since last report"
    );
}
