//! Events → the pipeline stages: the fingerprint stage (reassembly, JA4, verdicts per flow, escalation to a
//! source block) and the model's once-a-second tick; every decision goes through the enforcer.

use super::*;

impl DaemonState {
    /// Kernel ClientHello keys seen for a JA4.
    pub(super) fn known_keys(&self, target: &FpTarget) -> Vec<u64> {
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

    pub(super) fn on_event(&mut self, event: &Event) {
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
    pub(super) fn on_hello(&mut self, h: HelloSeen) {
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
    pub(super) fn fingerprint_hit(&mut self, source: std::net::IpAddr, fp: String, port: u16) {
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
}
