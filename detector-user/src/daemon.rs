//! `aqd run`: load, attach, apply the config, serve the control socket and metrics, read events, and exit
//! leaving the kernel enforcing (maps pinned, XDP attached).
//!
//! Signals: SIGHUP reopens the audit log and reloads the config (a bad file is rejected, the running config
//! kept); SIGINT/SIGTERM exit.
//!
//! Durability: `aqd run` holds an exclusive lock in its state directory for its lifetime (a second one exits,
//! naming the first's PID, before touching anything), restores the state store into the maps before the program
//! is attached, and skips ring events stamped before it started.

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
use detector_common::{
    Action, CONFIG_FLAG_CAPTURE, CONFIG_FLAG_CONN_EVENTS, CONFIG_FLAG_REQUEST_EVENTS,
    Config as ProgramConfig, Origin, Reason, Verdict, event::EVENT_KIND_COUNT, map_names,
};
use ipnet::IpNet;

use crate::{
    aging::{Ager, AgingStats, Baseline, FlowFigures, FlowTables},
    attach::{self, Attached},
    clock,
    config::Config,
    control::{
        self, ControlError, ErrorKind, ExplainTarget, Handler, Request, Response,
        handler::{self, Backend, FpSetArgs},
        views::{
            AgingView, DaemonDetails, DaemonView, ExplainView, FingerprintStatus, FlowTableView, FlowsView,
            FpKind, FpRemovedView, FpRow, FpSetView, FpVerdictView, HalfOpenView, LatencyView, ModelStatus,
            ScoreTopView, StatusView, StoreView,
        },
    },
    enforce::{AuditLog, DecisionRequest, Enforcer, FpRequest},
    events::{Event, EventReader},
    fingerprint::live::{self, Capture, FpAction, FpTarget, HelloSeen, LiveState, parse_fp},
    loader::{self, LoadOptions},
    maps::{KernelMaps, List, rate_class_limits},
    metrics,
    model_stage::ModelStage,
    paths,
    serve::{self, Limiter, ServeStats},
    store::{self, InstanceLock, Store, StoredStrike},
};

/// Event-reader statistics shared with the status and metrics views.
#[derive(Debug, Default)]
pub struct EventStats {
    pub read: [AtomicU64; EVENT_KIND_COUNT],
    pub undecodable: AtomicU64,
}

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

/// The connection caps and figures of the daemon's two servers.
#[derive(Debug)]
pub struct Servers {
    pub control: (Arc<Limiter>, Arc<ServeStats>),
    pub metrics: (Arc<Limiter>, Arc<ServeStats>),
}

impl Servers {
    fn new(config: &Config) -> Self {
        Self {
            control: (Limiter::new(config.control_max_connections), Arc::default()),
            metrics: (Limiter::new(config.metrics_max_connections), Arc::default()),
        }
    }
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
        servers: Servers::new(&config),
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
    let mut last = serve::lock(&state).enforcer.maps.counters()?;
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
                let now = serve::lock(&state).enforcer.maps.counters()?;
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

/// Entries of each connection table the ager reads per second: a full 262k-entry table is walked in about 16 s,
/// in batches of some ms, with no daemon lock held.
const AGING_ENTRIES_PER_SECOND: usize = 16_384;

/// Starts the connection-table ager (its own thread: its syscalls never hold up the event loop or the
/// control socket). It ends with the process.
fn spawn_ager(mut ager: Ager, stats: Arc<AgingStats>) -> anyhow::Result<()> {
    std::thread::Builder::new()
        .name("aqd-aging".into())
        .spawn(move || {
            loop {
                let policy = stats.policy();
                match ager.step(&policy, clock::monotonic_ns(), AGING_ENTRIES_PER_SECOND, &stats) {
                    Ok(r) if r.flows_idle + r.flows_closed + r.half_open > 0 => tracing::debug!(
                        idle = r.flows_idle,
                        closed = r.flows_closed,
                        half_open = r.half_open,
                        "aged out connection-table entries"
                    ),
                    Ok(_) => {}
                    Err(e) => {
                        stats.errors.fetch_add(1, Ordering::Relaxed);
                        tracing::warn!("ageing the connection tables: {e}");
                    }
                }
                std::thread::sleep(Duration::from_secs(1));
            }
        })
        .context("starting the connection-table ager")?;
    Ok(())
}

/// How often expired entries are purged (the kernel already ignores them; purging keeps the maps from filling).
const PURGE_INTERVAL: Duration = Duration::from_secs(300);
/// Expired entries removed per hold of the state lock (two syscalls each: about 2 ms in a debug build, well
/// under in release), so event draining and the control socket wait at most that long.
const PURGE_STEP: usize = 64;
/// The pause between steps: the main loop (draining events every 5 ms) takes the lock in between.
const PURGE_PAUSE: Duration = Duration::from_millis(1);

/// Starts the purger (its own thread): every [`PURGE_INTERVAL`] it walks the list, decision and verdict maps on
/// its own handles without the state lock, then removes what it found expired in steps of [`PURGE_STEP`], each
/// under the lock and re-checked there (an entry rewritten since the walk is kept). It ends with the process.
fn spawn_purger(walker: KernelMaps, state: Arc<Mutex<DaemonState>>) -> anyhow::Result<()> {
    std::thread::Builder::new()
        .name("aqd-purge".into())
        .spawn(move || {
            loop {
                std::thread::sleep(PURGE_INTERVAL);
                purge_step_by_step(&walker, &state);
            }
        })
        .context("starting the purger")?;
    Ok(())
}

/// One purge pass (see [`spawn_purger`]).
fn purge_step_by_step(walker: &KernelMaps, state: &Mutex<DaemonState>) {
    // First the daemon's table of verdicts by fingerprint (in memory, one entry per verdict), which re-syncs
    // their keys; then the maps.
    let fp = serve::lock(state).enforcer.fp_purge_expired();
    match fp {
        Ok(0) => {}
        Ok(n) => tracing::debug!(removed = n, "purged expired fingerprint verdicts"),
        Err(e) => tracing::warn!("purging expired fingerprint verdicts: {e}"),
    }
    let now = clock::monotonic_ns();
    let started = Instant::now();
    let expired = walker.expired_entries(now);
    let walked = started.elapsed();
    let (mut removed, mut errors, mut longest_hold) = (0usize, 0usize, Duration::ZERO);
    for step in expired.chunks(PURGE_STEP) {
        let held = Instant::now();
        let mut state = serve::lock(state);
        for entry in step {
            match state.enforcer.maps.remove_if_expired(entry, now) {
                Ok(true) => removed += 1,
                Ok(false) => {}
                Err(e) => {
                    errors += 1;
                    if errors == 1 {
                        tracing::warn!("purging an expired entry: {e}");
                    }
                }
            }
        }
        drop(state);
        longest_hold = longest_hold.max(held.elapsed());
        // A std mutex is not fair: pausing (not just yielding) lets a waiting event drain or request in.
        std::thread::sleep(PURGE_PAUSE);
    }
    if removed > 0 || errors > 0 {
        tracing::debug!(
            removed,
            errors,
            found = expired.len(),
            walked_ms = walked.as_millis() as u64,
            longest_lock_hold_us = longest_hold.as_micros() as u64,
            "purged expired decisions and list entries"
        );
    }
}

/// The config's list entries as the previous daemon left them (empty if none or unreadable: then a
/// removed entry lingers until the operator removes it, which `list` shows).
fn load_config_entries(path: &std::path::Path) -> BTreeSet<(bool, IpNet)> {
    std::fs::read(path)
        .ok()
        .and_then(|b| serde_json::from_slice(&b).ok())
        .unwrap_or_default()
}

/// Writes the config's list entries atomically (temp file + rename).
fn save_config_entries(path: &std::path::Path, entries: &BTreeSet<(bool, IpNet)>) -> anyhow::Result<()> {
    if let Some(dir) = path.parent() {
        std::fs::create_dir_all(dir)?;
    }
    let tmp = path.with_extension("tmp");
    std::fs::write(&tmp, serde_json::to_vec(entries)?)?;
    std::fs::rename(&tmp, path).with_context(|| format!("saving {}", path.display()))?;
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

impl DaemonState {
    /// Re-reads the config file; on any error the running config stays. The audit log is reopened first
    /// (logrotate's SIGHUP), whatever the config holds.
    pub fn reload(&mut self) -> anyhow::Result<()> {
        if let Err(e) = self.enforcer.reopen_audit() {
            tracing::error!("reopening the audit log: {e}; still writing to the old file");
        }
        let result = resolve_config(self.config_path.as_deref(), &self.overrides).and_then(|new| {
            let old = self.enforcer.config().clone();
            for (what, changed) in [
                ("interfaces", new.interfaces != old.interfaces),
                ("xdp_mode", new.xdp_mode != old.xdp_mode),
                ("pin_root", new.pin_root != old.pin_root),
                ("socket", new.socket != old.socket),
                ("state_dir", new.state_dir != old.state_dir),
                ("metrics_address", new.metrics_address != old.metrics_address),
                (
                    "control_max_connections",
                    new.control_max_connections != old.control_max_connections,
                ),
                (
                    "metrics_max_connections",
                    new.metrics_max_connections != old.metrics_max_connections,
                ),
            ] {
                if changed {
                    tracing::warn!("daemon.{what} changed; it takes effect at the next restart");
                }
            }
            self.apply_config(&new)
        });
        match &result {
            Ok(()) => {
                self.reloads.ok.fetch_add(1, Ordering::Relaxed);
                tracing::info!("config reloaded");
            }
            Err(_) => {
                self.reloads.failed.fetch_add(1, Ordering::Relaxed);
            }
        }
        result
    }

    /// Writes ports, rate classes, program settings and the config's lists into the kernel. Validates all list
    /// files before changing anything, so a bad file leaves the running state untouched.
    fn apply_config(&mut self, config: &Config) -> anyhow::Result<()> {
        let mut wanted: BTreeSet<(bool, IpNet)> = BTreeSet::new();
        for net in &config.allow {
            wanted.insert((true, *net));
        }
        // `lists.deny` was checked against the management networks when the config was parsed.
        for net in &config.deny {
            wanted.insert((false, *net));
        }
        let files = config
            .list_file_entries()
            .map_err(|m| ControlError::new(ErrorKind::BadRequest, m))?;
        wanted.extend(files);
        let maps = &mut self.enforcer.maps;
        // Management networks live in their own map, which the kernel checks before any other rule and which
        // `allow`/`disallow` never touch; new ones written first, so they hold before any list changes, and
        // dropped ones removed only once every step that can fail has succeeded (a failed reload keeps them).
        maps.management_add(&config.management)?;
        maps.set_protected_ports(&config.protected_ports)?;
        for class in 0..detector_common::capacity::RATE_CLASSES {
            let limits = match config.rate_classes.iter().find(|r| r.id as u32 == class) {
                Some(r) => rate_class_limits(
                    r.limits.packets_per_second,
                    r.limits.packet_burst,
                    r.limits.connections_per_second,
                    r.limits.connection_burst,
                ),
                None => detector_common::RateClass::UNLIMITED,
            };
            maps.set_rate_class(class, limits)?;
        }
        maps.set_config(ProgramConfig {
            drop_sample_every: config.drop_sample_every,
            flags: CONFIG_FLAG_CONN_EVENTS
                | CONFIG_FLAG_CAPTURE
                | CONFIG_FLAG_REQUEST_EVENTS
                | if config.pass_tcp_fragments {
                    detector_common::CONFIG_FLAG_PASS_TCP_FRAGMENTS
                } else {
                    0
                }
                | if config.verify_tcp_checksums {
                    0
                } else {
                    detector_common::CONFIG_FLAG_NO_TCP_CHECKSUM
                }
                | if config.handshake_ack_only {
                    detector_common::CONFIG_FLAG_HANDSHAKE_ACK_ONLY
                } else {
                    0
                },
            test_now_ns: 0,
            request_gap_ns: 0,
        })?;
        let removed: Vec<(bool, IpNet)> = self.config_entries.difference(&wanted).copied().collect();
        let added: Vec<(bool, IpNet)> = wanted.difference(&self.config_entries).copied().collect();
        // Audited before they are written (write-ahead, like every other change).
        self.enforcer.audit_config_lists(&added, &removed)?;
        let maps = &mut self.enforcer.maps;
        for (allow, net) in &removed {
            maps.list_remove(if *allow { List::Allow } else { List::Deny }, *net)?;
        }
        for (allow, net) in &wanted {
            maps.list_insert(if *allow { List::Allow } else { List::Deny }, *net, None)?;
        }
        self.config_entries = wanted;
        save_config_entries(&self.config_entries_path, &self.config_entries)?;
        self.enforcer.maps.management_sync(&config.management)?;
        self.aging.set_policy(config.aging);
        self.enforcer.set_config(config.clone());
        self.live.configure(&config.fingerprints);
        self.apply_fingerprint_rules(config)?;
        Ok(())
    }

    /// The config's `[[fingerprint]]` rules: new or changed ones are set (origin config), unchanged ones keep
    /// their expiry, and config verdicts no longer in the file are removed. Verdicts made from the CLI on
    /// other fingerprints are untouched.
    fn apply_fingerprint_rules(&mut self, config: &Config) -> anyhow::Result<()> {
        let mut wanted = BTreeSet::new();
        for rule in &config.fingerprint_rules {
            let target = parse_fp(&rule.fp, |t| self.live.known_syn(t))
                .map_err(|m| ControlError::new(ErrorKind::BadRequest, m))?;
            let id = target.id();
            wanted.insert(id.clone());
            let canonical = rule.canonical();
            if self.enforcer.fp.by_id.get(&id).is_some_and(|v| {
                v.origin == Origin::Config && v.config_rule.as_deref() == Some(canonical.as_str())
            }) {
                continue;
            }
            let known_keys = self.known_keys(&target);
            self.enforcer
                .fp_set(&FpRequest {
                    target,
                    action: rule.action,
                    class: rule.class.clone(),
                    ttl: rule.ttl,
                    permanent: rule.ttl.is_none(),
                    reason: if rule.reason.is_empty() {
                        "config".into()
                    } else {
                        rule.reason.clone()
                    },
                    origin: Origin::Config,
                    known_keys,
                    config_rule: Some(canonical),
                })
                .with_context(|| format!("fingerprint rule {}", rule.fp))?;
        }
        let stale: Vec<String> = self
            .enforcer
            .fp
            .by_id
            .values()
            .filter(|v| v.origin == Origin::Config && !wanted.contains(&v.id))
            .map(|v| v.id.clone())
            .collect();
        for id in stale {
            self.enforcer.fp_remove(&id, Origin::Config)?;
        }
        Ok(())
    }

    /// Store upkeep, once a second: the journal flushed to the disk, the strikes saved once a minute, the
    /// journal compacted when it has grown.
    fn store_tick(&mut self) {
        self.store_ticks += 1;
        if self.store_ticks.is_multiple_of(STRIKES_EVERY_TICKS) {
            self.save_strikes();
        }
        let Some(store) = self.enforcer.store_mut() else {
            return;
        };
        let result = store.sync().and_then(|()| {
            if store.compact_due() {
                store.compact(store::now_unix_ms()).map(|_| ())
            } else {
                Ok(())
            }
        });
        if let Err(e) = result {
            tracing::warn!("state store upkeep: {e}");
        }
    }

    /// The model's strikes into the store.
    fn save_strikes(&mut self) {
        let now = store::now_unix_ms();
        let strikes: Vec<StoredStrike> = self
            .model
            .model
            .strikes(clock::monotonic_ns(), MAX_STRIKES)
            .iter()
            .map(|s| StoredStrike::from_model(s, now))
            .collect();
        if let Some(Err(e)) = self.enforcer.store_mut().map(|st| st.set_strikes(strikes)) {
            tracing::warn!("saving the model's strikes: {e}");
        }
    }

    /// The stored strikes back into the model (daemon start). Returns how many.
    fn restore_strikes(&mut self) -> usize {
        let Some(store) = self.enforcer.store() else {
            return 0;
        };
        let now = store::now_unix_ms();
        let records: Vec<crate::model::Strikes> =
            store.state().strikes.iter().map(|s| s.to_model(now)).collect();
        self.model.model.restore_strikes(&records, clock::monotonic_ns())
    }

    /// Kernel ClientHello keys seen for a JA4.
    fn known_keys(&self, target: &FpTarget) -> Vec<u64> {
        match target {
            FpTarget::Ja4 { ja4, .. } => self
                .live
                .table
                .ja4
                .get(ja4)
                .map(|e| e.kernel_keys.iter().copied().collect())
                .unwrap_or_default(),
            _ => Vec::new(),
        }
    }

    /// `aqd top --by score`.
    fn score_top(&self, kind: crate::model::Kind, limit: usize) -> ScoreTopView {
        ScoreTopView {
            dry_run: self.model.dry_run,
            rows: self.model.model.top(kind, limit, clock::monotonic_ns()),
        }
    }

    /// `aqd explain ADDR|PREFIX|FP`: the model's view plus what the kernel holds and what the stage did.
    fn explain(&self, target: &ExplainTarget) -> Result<ExplainView, ControlError> {
        let now = clock::monotonic_ns();
        let text = target.to_string();
        let mut protected = self.enforcer.allowlist().unwrap_or_default();
        protected.extend(self.enforcer.guard().management().iter().copied());
        let allowlisted = |a: std::net::IpAddr| protected.iter().any(|n| n.contains(&a));
        let model = &self.model.model;
        let handled: Vec<crate::model_stage::Handled> = self
            .model
            .recent()
            .filter(|h| h.decision.scope.to_string().contains(&text))
            .cloned()
            .collect();
        let explanation = match target {
            ExplainTarget::Source(addr) => {
                let mut e = model.explain_source(*addr, now, &protected);
                if allowlisted(*addr)
                    && let Some(e) = e.as_mut()
                {
                    e.why_not_blocked = Some("allowlisted or in a management network: never decided".into());
                }
                e
            }
            ExplainTarget::Prefix(net) => model.explain_prefix(net.network(), now, &protected),
            // A fingerprint: JA4 text or `syn:0x<key>`; match it against the model's fingerprint clusters.
            ExplainTarget::Fingerprint(fp) => model
                .top(crate::model::Kind::Fingerprint, usize::MAX, now)
                .into_iter()
                .find_map(|s| match &s.scope {
                    crate::model::Scope::Fingerprint(id) if s.scope.to_string().contains(fp.as_str()) => {
                        model.explain_fingerprint(id.key(), now)
                    }
                    crate::model::Scope::Fingerprint(id)
                        if fp
                            .strip_prefix("syn:0x")
                            .and_then(|k| u64::from_str_radix(k, 16).ok())
                            == Some(id.syn_key) =>
                    {
                        model.explain_fingerprint(id.key(), now)
                    }
                    _ => None,
                }),
        };
        if explanation.is_none() && handled.is_empty() {
            return Err(ControlError::new(
                ErrorKind::NotFound,
                format!("the model has no record of {text} (not seen, or forgotten after being idle)"),
            ));
        }
        Ok(ExplainView {
            target: text,
            dry_run: self.model.dry_run,
            model: explanation,
            decisions: handled,
        })
    }

    /// Scores and proposes (once a second); model decisions go through the single writer unless dry-run.
    pub fn model_tick(&mut self) {
        let now = clock::monotonic_ns();
        if !self.model.tick_due(now) {
            return;
        }
        self.model.dry_run = self.enforcer.config().dry_run;
        let allowed: Vec<String> = self
            .enforcer
            .fp
            .by_id
            .values()
            .filter(|v| v.action == FpAction::Allow)
            .map(|v| v.id.clone())
            .collect();
        let is_allowed = |id: &str| allowed.iter().any(|a| a == id);
        self.model.tick(now, &mut self.enforcer, &is_allowed);
    }

    /// Whether a fingerprint (JA4, JA4_r, p0f SYN text, `syn:0x…`, `hello:0x…`) is explicitly allowed: the
    /// model must never act on it.
    pub fn is_allowed(&self, fp: &str) -> bool {
        live::is_allowed(&self.enforcer.fp, &self.live.table, fp, clock::monotonic_ns())
    }

    // ---- the fingerprint pipeline ----

    /// Handles a batch of events (under the state lock, once per batch).
    pub fn on_events(&mut self, events: &[Event]) {
        for event in events {
            self.on_event(event);
        }
    }

    fn on_event(&mut self, event: &Event) {
        self.model.on_event(event);
        match event {
            Event::Conn {
                flow,
                syn,
                syn_key,
                action,
                dropped,
                ..
            } => {
                let blocked = *dropped && *action == Action::Block as u8;
                let max = self.live.settings.max_fingerprints;
                // SYN statistics only: a SYN's source address may be forged, so a blocked SYN signature
                // never escalates to a decision on its source (hits on verified flows do, see Payload).
                self.live
                    .table
                    .record_syn(*syn_key, syn, flow.src, blocked, self.live.p0f.as_ref(), max);
            }
            Event::Payload {
                time_ns,
                flow,
                stream_offset,
                hello_key,
                hello_status,
                action,
                data,
                ..
            } => {
                let capture = Capture {
                    time_ns: *time_ns,
                    flow,
                    stream_offset: *stream_offset,
                    hello_key: *hello_key,
                    hello_status: *hello_status,
                    action: *action,
                    data,
                };
                let max_flows = self.live.settings.max_flows;
                let result = self.live.reassembler.on_capture(&capture, max_flows);
                match result.hello {
                    Some(hello) => self.on_hello(hello),
                    None if result.first_event && *action == Action::Block as u8 => {
                        self.fingerprint_hit(flow.src, format!("hello:{hello_key:#018x}"), flow.src_port);
                    }
                    None => {}
                }
            }
            Event::FlowEnd(activity) => self.live.reassembler.flow_end(&activity.flow),
            Event::Request(_) | Event::Established(_) | Event::Drop { .. } => {}
        }
    }

    /// A ClientHello fingerprinted: table, keys learned for its verdict, and — when the kernel did not apply
    /// the verdict itself (a ClientHello it could not key, or a key learned only now) — the flow's action in
    /// FLOWS, timed from the ClientHello's arrival.
    fn on_hello(&mut self, h: HelloSeen) {
        self.model.set_ja4(&h.flow, &h.fp.ja4);
        let now = clock::monotonic_ns();
        let mut keys = vec![h.computed_key];
        keys.extend(h.kernel_key);
        let verdict = self.enforcer.fp.for_ja4(&h.fp.ja4, now).cloned();
        let mut daemon_blocked = false;
        if let Some(v) = &verdict {
            for &k in &keys {
                if let Err(e) = self.enforcer.fp_learn_key(&h.fp.ja4, k) {
                    tracing::warn!("installing a fingerprint verdict: {e}");
                }
            }
            if let Some(action) = v.action.kernel()
                && action != Action::Monitor
                && h.kernel_action < action as u8
            {
                match self
                    .enforcer
                    .fp_flow_action(&h.flow.tuple(), action, v.rate_class)
                {
                    Ok(true) => {
                        let us = clock::monotonic_ns().saturating_sub(h.first_ns) / 1000;
                        self.live.latency.record(us);
                        daemon_blocked = action == Action::Block;
                        tracing::debug!(
                            src = %h.flow.src,
                            ja4 = %h.fp.ja4,
                            kernel_status = h.kernel_status,
                            latency_us = us,
                            "flow given its fingerprint verdict"
                        );
                    }
                    Ok(false) => {
                        tracing::debug!(src = %h.flow.src, "flow gone before its fingerprint verdict")
                    }
                    Err(e) => tracing::debug!("setting a flow's fingerprint verdict: {e}"),
                }
            }
        }
        let kernel_dropped = h.kernel_action == Action::Block as u8;
        let max = self.live.settings.max_fingerprints;
        self.live
            .table
            .record_ja4(&h.fp, h.flow.src, &keys, kernel_dropped || daemon_blocked, max);
        if kernel_dropped || daemon_blocked {
            self.fingerprint_hit(h.flow.src, h.fp.ja4.clone(), h.flow.src_port);
        }
    }

    /// A connection attempt stopped by a fingerprint verdict: counted per source; enough of them block the
    /// source itself (origin model, through the lockout guard).
    fn fingerprint_hit(&mut self, source: std::net::IpAddr, fp: String, port: u16) {
        let now = clock::monotonic_ns();
        let Some(esc) = self
            .live
            .escalation
            .hit(source, &fp, port, now, &self.live.settings)
        else {
            return;
        };
        let reason = format!("fingerprint {} blocked, {} hits", esc.fingerprint, esc.hits);
        if self.enforcer.config().dry_run {
            tracing::info!(%source, %reason, "dry run: would block the source");
            return;
        }
        let request = DecisionRequest {
            target: IpNet::from(source),
            action: Action::Block,
            class: None,
            ttl: Some(self.live.settings.escalate_ttl),
            permanent: false,
            reason: reason.clone(),
            origin: Origin::Model,
            force: false,
        };
        match self.enforcer.decide(&request) {
            Ok(_) => tracing::info!(%source, %reason, "source blocked after repeated fingerprint hits"),
            Err(e) if e.is_refusal() => tracing::info!(%source, "not escalating: {e}"),
            Err(e) => tracing::warn!(%source, "escalating a fingerprint to a source block: {e}"),
        }
    }

    /// The `fp list` view: every fingerprint seen, and every live verdict on one not seen (yet), busiest first.
    pub fn fp_list(&self) -> Vec<FpRow> {
        let now = clock::monotonic_ns();
        let verdicts = &self.enforcer.fp;
        let hello_keys =
            |keys: &mut dyn Iterator<Item = u64>| keys.map(|k| format!("hello:{k:#018x}")).collect();
        let mut rows: Vec<FpRow> = Vec::new();
        let mut shown = std::collections::HashSet::new();
        for e in self.live.table.ja4.values() {
            let id = format!("ja4:{}", e.ja4);
            let v = verdicts.get_live(&id, now);
            let mut keys = e
                .kernel_keys
                .iter()
                .copied()
                .chain(v.into_iter().flat_map(|v| v.hello_keys.iter().copied()));
            rows.push(FpRow {
                kind: FpKind::Ja4,
                fingerprint: e.ja4.clone(),
                ja4_r: Some(e.ja4_r.clone()),
                kernel_keys: hello_keys(&mut keys),
                key: None,
                label: None,
                connections: e.connections,
                dropped: e.dropped,
                sources: e.sources.count(),
                sources_estimated: e.sources.estimated(),
                first_seen: Some(e.first_seen as u64),
                last_seen: Some(e.last_seen as u64),
                verdict: v.map(FpVerdictView::from),
            });
            shown.insert(id);
        }
        for e in self.live.table.syn.values() {
            let id = format!("syn:{:#018x}", e.key);
            let v = verdicts.get_live(&id, now);
            rows.push(FpRow {
                kind: FpKind::Syn,
                fingerprint: e.text.clone(),
                ja4_r: None,
                kernel_keys: Vec::new(),
                key: Some(id.clone()),
                label: e.label.clone(),
                connections: e.connections,
                dropped: e.dropped,
                sources: e.sources.count(),
                sources_estimated: e.sources.estimated(),
                first_seen: Some(e.first_seen as u64),
                last_seen: Some(e.last_seen as u64),
                verdict: v.map(FpVerdictView::from),
            });
            shown.insert(id);
        }
        for v in verdicts
            .by_id
            .values()
            .filter(|v| v.live(now) && !shown.contains(&v.id))
        {
            let (kind, fingerprint, key) = if let Some(ja4) = v.id.strip_prefix("ja4:") {
                (FpKind::Ja4, ja4.to_string(), None)
            } else if v.id.starts_with("syn:") {
                (
                    FpKind::Syn,
                    v.syn_text.clone().unwrap_or_else(|| v.id.clone()),
                    Some(v.id.clone()),
                )
            } else {
                (FpKind::Ja4, v.id.clone(), None)
            };
            rows.push(FpRow {
                kind,
                fingerprint,
                ja4_r: if kind == FpKind::Ja4 {
                    v.ja4_r.clone()
                } else {
                    None
                },
                kernel_keys: if kind == FpKind::Ja4 {
                    hello_keys(&mut v.hello_keys.iter().copied())
                } else {
                    Vec::new()
                },
                key,
                label: None,
                connections: 0,
                dropped: 0,
                sources: 0,
                sources_estimated: false,
                first_seen: None,
                last_seen: None,
                verdict: Some(FpVerdictView::from(v)),
            });
        }
        rows.sort_by_key(|r| std::cmp::Reverse(r.connections));
        rows
    }

    fn fp_set(&mut self, args: FpSetArgs) -> Result<FpSetView, ControlError> {
        let target = parse_fp(&args.fp, |t| self.live.known_syn(t)).map_err(ControlError::bad_request)?;
        let known_keys = self.known_keys(&target);
        let action = args.action;
        let verdict = self.enforcer.fp_set(&FpRequest {
            target: target.clone(),
            action,
            class: args.class,
            ttl: args.ttl,
            permanent: args.permanent,
            reason: args.reason,
            origin: Origin::Cli,
            known_keys,
            config_rule: None,
        })?;
        let in_kernel = match (&target, action) {
            (_, FpAction::Allow) => false,
            (FpTarget::Syn { .. }, _) => true,
            _ => !verdict.hello_keys.is_empty(),
        };
        let note = (matches!(target, FpTarget::Ja4 { .. }) && !in_kernel && action != FpAction::Allow).then(|| {
            "no kernel ClientHello key is known for this JA4 yet: it is installed in the kernel when the first such \
             ClientHello is seen (until then the daemon acts per flow); give the JA4_r to install it now"
                .to_string()
        });
        Ok(FpSetView {
            id: verdict.id.clone(),
            action,
            ttl_secs: (verdict.expires_ns != 0)
                .then(|| clock::remaining(verdict.expires_ns).map_or(0, |d| d.as_secs())),
            kernel_keys: verdict
                .hello_keys
                .iter()
                .map(|k| format!("hello:{k:#018x}"))
                .collect(),
            in_kernel,
            note,
        })
    }

    fn fp_remove(&mut self, fp: &str) -> Result<FpRemovedView, ControlError> {
        let target = parse_fp(fp, |t| self.live.known_syn(t)).map_err(ControlError::bad_request)?;
        let id = target.id();
        match self.enforcer.fp_remove(&id, Origin::Cli)? {
            Some(old) => Ok(FpRemovedView {
                id,
                removed: true,
                action: old.action,
            }),
            None => Err(ControlError::new(
                ErrorKind::NotFound,
                format!("{fp} has no verdict"),
            )),
        }
    }

    /// The flow-table figures (entries walked now; evictions derived, see `FlowFigures`).
    pub fn flow_figures(&self, counters: &crate::maps::CounterTotals) -> std::io::Result<FlowFigures> {
        let entries = self.flow_tables.entries()?;
        Ok(FlowFigures::derive(
            &self.flow_baseline,
            counters,
            &self.aging,
            entries,
        ))
    }

    fn flow_table_view(&self, counters: &crate::maps::CounterTotals) -> std::io::Result<FlowTableView> {
        let f = self.flow_figures(counters)?;
        let policy = self.aging.policy();
        Ok(FlowTableView {
            flows: FlowsView {
                entries: f.flows_entries,
                capacity: f.flows_capacity,
                established: f.established,
                reset: f.reset,
                fin: f.fin,
                aged_idle: f.aged_idle,
                aged_closed: f.aged_closed,
                evicted: f.evicted,
            },
            half_open: HalfOpenView {
                entries: f.half_open_entries,
                capacity: f.half_open_capacity,
                created: f.half_open_created,
                aged: f.half_open_aged,
                evicted_at_least: f.half_open_evicted,
            },
            aging: AgingView {
                flow_idle_timeout_secs: policy.flow_idle.as_secs(),
                flow_fin_timeout_secs: policy.fin_idle.as_secs(),
                half_open_timeout_secs: policy.half_open.as_secs(),
                passes: self.aging.passes.load(Ordering::Relaxed),
                errors: self.aging.errors.load(Ordering::Relaxed),
            },
            since_daemon_start: self.flow_baseline,
            evicted_is:
                "flows at daemon start + established - reset - aged - flows now (since the daemon started; \
                         LRU evictions are not counted by the kernel)"
                    .into(),
        })
    }

    /// The fingerprint pipeline's figures.
    fn fingerprint_status(&self) -> FingerprintStatus {
        let live = &self.live;
        let s = &live.reassembler.stats;
        let now = clock::monotonic_ns();
        FingerprintStatus {
            ja4_tracked: live.table.ja4.len(),
            syn_tracked: live.table.syn.len(),
            max_fingerprints: live.settings.max_fingerprints,
            table_evicted: live.table.evicted,
            memory_bytes: live.table.memory() + live.reassembler.memory(),
            flows_tracked: live.reassembler.flows_tracked(),
            flows_in_progress: live.reassembler.flows_in_progress(),
            max_flows: live.settings.max_flows,
            capture_events: s.capture_events,
            ja4_computed: s.ja4_computed,
            ja4_failed: s.ja4_failed.iter().map(|(k, v)| (k.to_string(), *v)).collect(),
            not_tls: s.not_tls,
            flows_evicted: s.flows_evicted,
            key_mismatch: s.key_mismatch,
            p0f_db: live.p0f_path.clone(),
            p0f_signatures: live.p0f.as_ref().map(|d| d.signatures.len()),
            p0f_error: live.p0f_error.clone(),
            escalations: live.escalation.escalations,
            escalation_sources: live.escalation.tracked(),
            hello_to_flow_verdict_latency: LatencyView::from(&live.latency),
            verdicts: self.enforcer.fp.by_id.values().filter(|v| v.live(now)).count(),
            writes: self.enforcer.fp_stats,
        }
    }

    /// The `status` view.
    pub fn status(&self) -> Result<StatusView, ControlError> {
        let maps = &self.enforcer.maps;
        let counters = maps.counters().map_err(ControlError::failed)?;
        let config = self.enforcer.config();
        Ok(StatusView {
            daemon: DaemonView {
                running: true,
                details: Some(DaemonDetails {
                    uptime_secs: self.started.elapsed().as_secs(),
                    program_id: self.program_id,
                    config: self.config_path.clone(),
                    dry_run: config.dry_run,
                    protected_ports: config.protected_ports.clone(),
                    events_read: handler::by_event_kind(|k| {
                        self.events.read[k as usize].load(Ordering::Relaxed)
                    }),
                    events_undecodable: self.events.undecodable.load(Ordering::Relaxed),
                    reloads_ok: self.reloads.ok.load(Ordering::Relaxed),
                    reloads_failed: self.reloads.failed.load(Ordering::Relaxed),
                }),
            },
            pinned_state: None,
            attachments: attach::attachments(),
            kernel: Some(handler::kernel_status(maps, &counters)),
            model: Some(ModelStatus {
                dry_run: self.model.dry_run,
                stage: self.model.stats(),
                feed: self.model.feed.stats(),
                flows_tracked: self.model.feed.tracked_flows(),
                memory: self.model.model.memory_report(),
                stats: self.model.model.stats().clone(),
            }),
            fingerprints: Some(self.fingerprint_status()),
            store: self.enforcer.store().map(|store| StoreView {
                dir: store.dir().to_path_buf(),
                entries: store.state().len(),
                strikes: store.state().strikes.len(),
                stats: store.stats,
                restored_at_start: self.enforcer.restored,
                programs_loaded_after_start_ms: self.restored_after.0.as_millis() as u64,
                restored_after_start_ms: self.restored_after.1.as_millis() as u64,
            }),
            flow_table: Some(self.flow_table_view(&counters).map_err(ControlError::failed)?),
        })
    }
}

/// The daemon behind the one request handler: the enforcer plus the fingerprint table, the model and the config.
impl Backend for DaemonState {
    fn enforcer(&mut self) -> &mut Enforcer {
        &mut self.enforcer
    }

    fn status(&mut self) -> Result<StatusView, ControlError> {
        DaemonState::status(self)
    }

    fn fp_list(&mut self) -> Result<Vec<FpRow>, ControlError> {
        Ok(DaemonState::fp_list(self))
    }

    fn fp_set(&mut self, args: FpSetArgs) -> Result<FpSetView, ControlError> {
        DaemonState::fp_set(self, args)
    }

    fn fp_remove(&mut self, fp: &str) -> Result<FpRemovedView, ControlError> {
        DaemonState::fp_remove(self, fp)
    }

    fn score_top(&mut self, kind: crate::model::Kind, limit: usize) -> Result<ScoreTopView, ControlError> {
        Ok(DaemonState::score_top(self, kind, limit))
    }

    fn explain(&mut self, target: &ExplainTarget) -> Result<ExplainView, ControlError> {
        DaemonState::explain(self, target)
    }

    fn reload(&mut self) -> Result<(), ControlError> {
        DaemonState::reload(self)
            .map_err(|e| ControlError::bad_request(format!("reload rejected, running config kept: {e:#}")))
    }
}

impl Handler for DaemonState {
    fn handle(&mut self, request: Request) -> Result<Response, ControlError> {
        handler::handle(self, request)
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
