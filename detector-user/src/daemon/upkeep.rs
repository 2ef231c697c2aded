//! Upkeep off the event path: the connection-table ager and the purger of expired entries (own threads), and
//! the state store's tick (journal flush, strikes, compaction).

use super::*;

/// Entries of each connection table the ager reads per second: a full 262k-entry table is walked in about 16 s,
/// in batches of some ms, with no daemon lock held.
const AGING_ENTRIES_PER_SECOND: usize = 16_384;

/// Starts the connection-table ager (its own thread: its syscalls never hold up the event loop or the
/// control socket). It ends with the process.
pub(super) fn spawn_ager(mut ager: Ager, stats: Arc<AgingStats>) -> anyhow::Result<()> {
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
pub(super) fn spawn_purger(walker: KernelMaps, state: Arc<Mutex<DaemonState>>) -> anyhow::Result<()> {
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
pub(super) fn purge_step_by_step(walker: &KernelMaps, state: &Mutex<DaemonState>) {
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
            match state.enforcer.purge_if_expired(entry, now) {
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

impl DaemonState {
    /// Store upkeep, once a second: the journal flushed to the disk, the strikes saved once a minute, the
    /// journal compacted when it has grown.
    pub(super) fn store_tick(&mut self) {
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
    pub(super) fn save_strikes(&mut self) {
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
    pub(super) fn restore_strikes(&mut self) -> usize {
        let Some(store) = self.enforcer.store() else {
            return 0;
        };
        let now = store::now_unix_ms();
        let records: Vec<crate::model::Strikes> =
            store.state().strikes.iter().map(|s| s.to_model(now)).collect();
        self.model.model.restore_strikes(&records, clock::monotonic_ns())
    }
}
