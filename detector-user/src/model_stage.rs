//! The daemon's model stage: kernel events → observations ([`crate::observe`]) → the behavioural model
//! ([`crate::model`]) → decisions with origin `model`, written through the same single writer as the CLI's
//! ([`crate::enforce::Enforcer`]), so the lockout guard, jitter and audit log apply to them too.
//!
//! In dry-run mode (`aqd run --dry-run` or `model.dry_run = true`) decisions are computed, logged and kept for
//! `aqd explain`, never written to the kernel.

use std::{net::IpAddr, sync::Arc, time::Duration};

use ipnet::IpNet;
use serde::Serialize;

use crate::{
    enforce::{DecisionRequest, Enforcer, FpRequest},
    events::{Event, Flow},
    fingerprint::live::{FpAction, FpTarget},
    model::{self, Action, Allowlist, Model, ModelConfig, ProposedDecision, Scope},
};
use detector_common::Origin;

/// The model is ticked (scores refreshed, decisions proposed) this often.
pub const TICK_INTERVAL: Duration = Duration::from_secs(1);

/// Counters for `aqd status` and metrics.
#[derive(Clone, Copy, Debug, Default, Serialize, serde::Deserialize)]
pub struct StageStats {
    pub ticks: u64,
    /// Ring events stamped before this daemon started (sent while no daemon read the ring): not fed to the
    /// model, whose windows would otherwise take a downtime's backlog for a burst happening now.
    pub stale_events: u64,
    pub proposed: u64,
    /// Written to the kernel (new or extended).
    pub applied: u64,
    /// Refused by the writer (allowlisted, management network, …) or failed.
    pub refused: u64,
    /// Not applied because the model runs in dry-run mode.
    pub dry_run: u64,
    /// Skipped because the fingerprint involved has an explicit `allow` verdict.
    pub skipped_allowed_fingerprint: u64,
    pub monitor: u64,
    pub throttle: u64,
    pub block: u64,
}

/// One decision the stage handled, for `aqd explain` and the log.
#[derive(Clone, Debug, Serialize, serde::Deserialize)]
pub struct Handled {
    pub decision: ProposedDecision,
    /// `applied`, `dry_run`, `refused: …`, `skipped: fingerprint allowed`.
    pub outcome: String,
}

pub struct ModelStage {
    pub model: Model,
    pub feed: crate::observe::ObservationFeed,
    pub dry_run: bool,
    stats: StageStats,
    last_tick_ns: u64,
    /// The most recent handled decisions (bounded).
    recent: std::collections::VecDeque<Handled>,
    /// Events stamped before this (kernel monotonic ns; the daemon's start) are stale.
    pub not_before_ns: u64,
}

const RECENT: usize = 1024;

/// The allowlist as the model must see it: the kernel allowlist plus the management networks.
struct Protected(Vec<IpNet>);

impl Allowlist for Protected {
    fn allows(&self, addr: IpAddr) -> bool {
        self.0.as_slice().allows(addr)
    }
    fn allows_any_in(&self, net: &IpNet) -> bool {
        self.0.as_slice().allows_any_in(net)
    }
}

impl ModelStage {
    pub fn new(config: ModelConfig, dry_run: bool) -> Self {
        Self {
            model: Model::new(config),
            feed: Default::default(),
            dry_run,
            stats: StageStats::default(),
            last_tick_ns: 0,
            recent: Default::default(),
            not_before_ns: 0,
        }
    }

    pub fn stats(&self) -> StageStats {
        self.stats
    }

    pub fn recent(&self) -> impl Iterator<Item = &Handled> {
        self.recent.iter()
    }

    pub fn on_event(&mut self, event: &Event) {
        if event.time_ns() < self.not_before_ns {
            self.stats.stale_events += 1;
            return;
        }
        self.feed.on_event(&mut self.model, event);
    }

    /// The fingerprint stage computed a flow's JA4.
    pub fn set_ja4(&mut self, flow: &Flow, ja4: &str) {
        self.feed.set_ja4(&mut self.model, flow, Arc::from(ja4));
    }

    /// Whether a tick is due at `now_ns`.
    pub fn tick_due(&self, now_ns: u64) -> bool {
        now_ns.saturating_sub(self.last_tick_ns) >= TICK_INTERVAL.as_nanos() as u64
    }

    /// Scores, proposes and (unless dry-run) enforces. `fingerprint_allowed` says whether a fingerprint
    /// (`ja4:<JA4>` / `syn:0x<key>`) has an explicit allow verdict: the model never acts on those.
    pub fn tick(
        &mut self,
        now_ns: u64,
        enforcer: &mut Enforcer,
        fingerprint_allowed: &dyn Fn(&str) -> bool,
    ) -> Vec<Handled> {
        self.last_tick_ns = now_ns;
        self.stats.ticks += 1;
        let mut protected = enforcer.allowlist().unwrap_or_default();
        protected.extend(enforcer.guard().management().iter().copied());
        let protected = Protected(protected);
        let proposals = self.model.tick(now_ns, &protected);
        let mut handled = Vec::with_capacity(proposals.len());
        for decision in proposals {
            self.stats.proposed += 1;
            let outcome = self.handle(&decision, enforcer, fingerprint_allowed);
            if outcome == "applied" || outcome == "dry_run" {
                match decision.action {
                    Action::Monitor => self.stats.monitor += 1,
                    Action::Throttle => self.stats.throttle += 1,
                    Action::Block => self.stats.block += 1,
                }
            }
            if !decision.refresh || outcome != "applied" {
                tracing::info!(
                    target: "aqd::model",
                    scope = %decision.scope,
                    action = ?decision.action,
                    score = decision.score,
                    ttl_s = decision.ttl.as_secs(),
                    outcome = %outcome,
                    "{}",
                    decision.reason
                );
            }
            let entry = Handled { decision, outcome };
            if self.recent.len() == RECENT {
                self.recent.pop_front();
            }
            self.recent.push_back(entry.clone());
            handled.push(entry);
        }
        handled
    }

    fn handle(
        &mut self,
        decision: &ProposedDecision,
        enforcer: &mut Enforcer,
        fingerprint_allowed: &dyn Fn(&str) -> bool,
    ) -> String {
        if let Scope::Fingerprint(id) = &decision.scope {
            let ids = fingerprint_ids(id);
            if ids.iter().any(|i| fingerprint_allowed(i)) {
                self.stats.skipped_allowed_fingerprint += 1;
                return "skipped: fingerprint allowed".into();
            }
        }
        if self.dry_run {
            self.stats.dry_run += 1;
            return "dry_run".into();
        }
        // The kernel keeps a short reason code per decision (a small shared table): the scope and tier only;
        // the full reason (score and contributions) is in the log and in `aqd explain`.
        let short_reason = format!(
            "model: {} {}",
            decision.action.name(),
            scope_kind(&decision.scope)
        );
        let ttl = Some(decision.ttl.max(Duration::from_secs(1)));
        let mut decide = |target: IpNet| {
            enforcer
                .decide(&DecisionRequest {
                    target,
                    action: decision.action,
                    class: None,
                    ttl,
                    permanent: false,
                    reason: short_reason.clone(),
                    origin: Origin::Model,
                    force: false,
                })
                .map(|_| ())
        };
        let result = match &decision.scope {
            Scope::Source(addr) => decide(IpNet::from(*addr)),
            Scope::Prefix(net) => decide(*net),
            Scope::Fingerprint(id) => {
                let target = match &id.ja4 {
                    Some(ja4) => FpTarget::Ja4 {
                        ja4: ja4.to_string(),
                        ja4_r: None,
                    },
                    None => FpTarget::Syn {
                        key: id.syn_key,
                        text: None,
                    },
                };
                enforcer
                    .fp_set(&FpRequest {
                        target,
                        action: FpAction::from_kernel(decision.action),
                        class: None,
                        ttl,
                        permanent: false,
                        reason: short_reason,
                        origin: Origin::Model,
                        known_keys: Vec::new(),
                        config_rule: None,
                    })
                    .map(|_| ())
            }
        };
        match result {
            Ok(()) => {
                self.stats.applied += 1;
                "applied".into()
            }
            Err(e) => {
                self.stats.refused += 1;
                format!("refused: {e}")
            }
        }
    }
}

/// The verdict-table ids a model fingerprint is known under.
fn fingerprint_ids(id: &model::FingerprintId) -> Vec<String> {
    let mut ids = vec![format!("syn:{:#018x}", id.syn_key)];
    if let Some(ja4) = &id.ja4 {
        ids.push(format!("ja4:{ja4}"));
    }
    ids
}

fn scope_kind(scope: &Scope) -> &'static str {
    match scope {
        Scope::Source(_) => "source",
        Scope::Prefix(_) => "prefix",
        Scope::Fingerprint(_) => "fingerprint",
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::events::FlowActivity;

    fn established(time_ns: u64, port: u16) -> Event {
        let flow = Flow {
            src: "192.0.2.1".parse().unwrap(),
            dst: "192.0.2.2".parse().unwrap(),
            src_port: port,
            dst_port: 443,
            proto: 6,
        };
        Event::Established(FlowActivity {
            time_ns,
            flow,
            syn_key: 1,
            hello_key: 0,
            start_ns: time_ns,
            end_ns: time_ns,
            bytes: 0,
            response_bytes: 0,
            packets: 1,
            requests: 0,
        })
    }

    #[test]
    fn events_from_before_the_start_are_not_fed_to_the_model() {
        let mut stage = ModelStage::new(model::ModelConfig::default(), false);
        stage.not_before_ns = 10_000_000_000;
        stage.on_event(&established(9_999_999_999, 1000));
        assert_eq!(stage.stats().stale_events, 1);
        assert_eq!(stage.feed.tracked_flows(), 0);
        stage.on_event(&established(10_000_000_000, 1001));
        assert_eq!(stage.stats().stale_events, 1);
        assert_eq!(stage.feed.tracked_flows(), 1);
    }
}
