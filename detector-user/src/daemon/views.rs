//! The daemon's typed views (status, fingerprints, the model's scores and explanations) and the figures a
//! metrics scrape reads under the state lock.

use super::*;
use crate::fingerprint::live::SourceSet;

impl DaemonState {
    /// `aqd top --by score`.
    pub(super) fn score_top(&self, kind: crate::model::Kind, limit: usize) -> ScoreTopView {
        ScoreTopView {
            dry_run: self.model.dry_run,
            rows: self.model.model.top(kind, limit, clock::monotonic_ns()),
        }
    }

    /// `aqd explain ADDR|PREFIX|FP`: the model's view plus what the kernel holds and what the stage did.
    pub(super) fn explain(&self, target: &ExplainTarget) -> Result<ExplainView, ControlError> {
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

    /// The `fp list` view: every fingerprint seen, and every live verdict on one not seen (yet), busiest first.
    pub fn fp_list(&self) -> Vec<FpRow> {
        let now = clock::monotonic_ns();
        let verdicts = &self.enforcer.fp;
        let hello_keys =
            |keys: &mut dyn Iterator<Item = u64>| keys.map(|k| format!("hello:{k:#018x}")).collect();
        // A row of the fingerprint table: its traffic (connections, dropped, sources, first and last seen).
        let counted =
            |row: FpRow, (connections, dropped, sources, first, last): (u64, u64, &SourceSet, f64, f64)| {
                FpRow {
                    connections,
                    dropped,
                    sources: sources.count(),
                    sources_estimated: sources.estimated(),
                    first_seen: Some(first as u64),
                    last_seen: Some(last as u64),
                    ..row
                }
            };
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
            rows.push(counted(
                FpRow {
                    ja4_r: Some(e.ja4_r.clone()),
                    kernel_keys: hello_keys(&mut keys),
                    verdict: v.map(FpVerdictView::from),
                    ..FpRow::unseen(FpKind::Ja4, e.ja4.clone())
                },
                (e.connections, e.dropped, &e.sources, e.first_seen, e.last_seen),
            ));
            shown.insert(id);
        }
        for e in self.live.table.syn.values() {
            let id = format!("syn:{:#018x}", e.key);
            let v = verdicts.get_live(&id, now);
            rows.push(counted(
                FpRow {
                    key: Some(id.clone()),
                    label: e.label.clone(),
                    verdict: v.map(FpVerdictView::from),
                    ..FpRow::unseen(FpKind::Syn, e.text.clone())
                },
                (e.connections, e.dropped, &e.sources, e.first_seen, e.last_seen),
            ));
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
                verdict: Some(FpVerdictView::from(v)),
                ..FpRow::unseen(kind, fingerprint)
            });
        }
        rows.sort_by_key(|r| std::cmp::Reverse(r.connections));
        rows
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

    pub(super) fn flow_table_view(
        &self,
        counters: &crate::maps::CounterTotals,
    ) -> std::io::Result<FlowTableView> {
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
    pub(super) fn fingerprint_status(&self) -> FingerprintStatus {
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
        let maps = self.enforcer.maps();
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
                    events_read: control::handler::by_event_kind(|k| {
                        self.events.read[k as usize].load(Ordering::Relaxed)
                    }),
                    events_undecodable: self.events.undecodable.load(Ordering::Relaxed),
                    reloads_ok: self.reloads.ok.load(Ordering::Relaxed),
                    reloads_failed: self.reloads.failed.load(Ordering::Relaxed),
                }),
            },
            pinned_state: None,
            attachments: attach::attachments(),
            kernel: Some(control::handler::kernel_status(maps, &counters)),
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

/// What a metrics scrape reads under the state lock (in-memory figures only; the kernel part is walked after).
impl metrics::Figures for DaemonState {
    fn register(&self, registry: &mut prometheus_client::registry::Registry) -> metrics::KernelInputs {
        metrics::register_reloads(
            self.reloads.ok.load(Ordering::Relaxed),
            self.reloads.failed.load(Ordering::Relaxed),
            registry,
        );
        metrics::register_fingerprints(&self.live, self.enforcer.fp_stats, registry);
        metrics::register_model(&self.model, registry);
        metrics::register_servers(&self.servers, registry);
        metrics::KernelInputs {
            events: Arc::clone(&self.events),
            baseline: self.flow_baseline,
            aging: Arc::clone(&self.aging),
        }
    }
}
