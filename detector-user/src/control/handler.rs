//! The one request handler: every [`Request`] → [`Enforcer`] mapping, written once and used by the daemon
//! (behind the socket) and by the CLI when the daemon is down ([`Offline`], on the pinned maps, with the same
//! lockout guard, audit log, state store and error kinds).
//!
//! What only a running daemon holds (the fingerprint table, the model, its config) is behind [`Backend`];
//! [`Offline`] answers those with [`ErrorKind::NotRunning`].

use std::time::{Duration, Instant};

use detector_common::{Action, Origin, Reason, Verdict, event::EventKind};
use ipnet::IpNet;

use super::{
    proto::{ControlError, ErrorKind, ExplainTarget, ImportInto, ListWhat, Request},
    views::{
        DaemonView, DecidedView, ExplainView, FpRemovedView, FpRow, FpSetView, ImportView, KernelStatus,
        ListEditView, ListView, MapFill, ReloadView, RemovedView, Response, ScoreTopView, StatusView,
    },
};
use crate::{
    attach,
    enforce::{DecisionRequest, Enforcer},
    fingerprint::live::FpAction,
    maps::{CounterTotals, KernelMaps, List, MapsError},
    model::Kind,
};

/// A verdict by fingerprint as asked (the fingerprint still text: resolving it needs the daemon's table).
#[derive(Clone, Debug)]
pub struct FpSetArgs {
    pub fp: String,
    pub action: FpAction,
    pub class: Option<String>,
    /// None = the configured default.
    pub ttl: Option<Duration>,
    pub permanent: bool,
    pub reason: String,
}

/// What answers requests: the enforcer (every policy write) and the parts only the daemon has.
pub trait Backend {
    fn enforcer(&mut self) -> &mut Enforcer;
    fn status(&mut self) -> Result<StatusView, ControlError>;
    fn fp_list(&mut self) -> Result<Vec<FpRow>, ControlError>;
    fn fp_set(&mut self, args: FpSetArgs) -> Result<FpSetView, ControlError>;
    fn fp_remove(&mut self, fp: &str) -> Result<FpRemovedView, ControlError>;
    fn score_top(&mut self, kind: Kind, limit: usize) -> Result<ScoreTopView, ControlError>;
    fn explain(&mut self, target: &ExplainTarget) -> Result<ExplainView, ControlError>;
    fn reload(&mut self) -> Result<(), ControlError>;
}

impl Request {
    /// Whether the CLI can answer it on the pinned maps when the daemon is down.
    pub fn works_offline(&self) -> bool {
        matches!(
            self,
            Self::Status {}
                | Self::List { .. }
                | Self::Decide { .. }
                | Self::Remove { .. }
                | Self::ListAdd { .. }
                | Self::ListRemove { .. }
                | Self::Import { .. }
        )
    }

    /// Whether it changes policy (and so needs the audit log and the state store).
    pub fn writes(&self) -> bool {
        !matches!(
            self,
            Self::Status {}
                | Self::List { .. }
                | Self::FpList {}
                | Self::ScoreTop { .. }
                | Self::Explain { .. }
        )
    }
}

/// Answers one request.
pub fn handle<B: Backend + ?Sized>(backend: &mut B, request: Request) -> Result<Response, ControlError> {
    match request {
        Request::Status {} => backend.status().map(|v| Response::Status(Box::new(v))),
        Request::List { what } => list_view(backend.enforcer().maps(), what)
            .map(Response::List)
            .map_err(ControlError::failed),
        Request::Decide {
            target,
            action,
            class,
            ttl_secs,
            permanent,
            reason,
            force,
        } => {
            let request = DecisionRequest {
                target,
                action,
                class,
                ttl: ttl(ttl_secs)?,
                permanent,
                reason,
                origin: Origin::Cli,
                force,
            };
            let applied = backend.enforcer().decide(&request)?;
            Ok(Response::Decided(DecidedView {
                target,
                action,
                ttl_secs: applied.map(|t| t.as_secs()),
            }))
        }
        Request::Remove { target } => {
            if backend.enforcer().remove_decision(target, Origin::Cli, "")? {
                Ok(Response::Removed(RemovedView {
                    target,
                    removed: true,
                }))
            } else {
                Err(ControlError::new(
                    ErrorKind::NotFound,
                    format!("{target} has no decision"),
                ))
            }
        }
        Request::ListAdd {
            list,
            target,
            ttl_secs,
            force,
        } => {
            backend
                .enforcer()
                .list_add(list, target, ttl(ttl_secs)?, Origin::Cli, force)?;
            Ok(Response::ListEdited(ListEditView {
                target,
                list,
                removed: false,
            }))
        }
        Request::ListRemove { list, target } => {
            if backend.enforcer().list_remove(list, target, Origin::Cli)? {
                Ok(Response::ListEdited(ListEditView {
                    target,
                    list,
                    removed: true,
                }))
            } else {
                Err(ControlError::new(
                    ErrorKind::NotFound,
                    format!("{target} is not in the {}", list.noun()),
                ))
            }
        }
        Request::Import {
            into,
            entries,
            ttl_secs,
            reason,
            force,
        } => {
            import(backend.enforcer(), into, &entries, ttl(ttl_secs)?, reason, force).map(Response::Imported)
        }
        Request::Reload {} => backend
            .reload()
            .map(|()| Response::Reloaded(ReloadView { reloaded: true })),
        Request::FpList {} => backend.fp_list().map(Response::FpList),
        Request::ScoreTop { kind, limit } => backend
            .score_top(kind, limit.unwrap_or(20))
            .map(Response::ScoreTop),
        Request::Explain { target } => backend.explain(&target).map(|v| Response::Explain(Box::new(v))),
        Request::FpSet {
            fp,
            action,
            class,
            ttl_secs,
            permanent,
            reason,
        } => {
            if permanent && ttl_secs.is_some() {
                return Err(ControlError::bad_request(
                    "give either a TTL or permanent, not both",
                ));
            }
            backend
                .fp_set(FpSetArgs {
                    fp,
                    action,
                    class,
                    ttl: ttl(ttl_secs)?,
                    permanent,
                    reason,
                })
                .map(Response::FpSet)
        }
        Request::FpRemove { fp } => backend.fp_remove(&fp).map(Response::FpRemoved),
    }
}

fn ttl(secs: Option<u64>) -> Result<Option<Duration>, ControlError> {
    match secs {
        Some(0) => Err(ControlError::bad_request("ttl_secs must be positive")),
        other => Ok(other.map(Duration::from_secs)),
    }
}

/// Every entry into a list or as block decisions: all checked before any is written (all or nothing).
fn import(
    enforcer: &mut Enforcer,
    into: ImportInto,
    nets: &[IpNet],
    ttl: Option<Duration>,
    reason: String,
    force: bool,
) -> Result<ImportView, ControlError> {
    let started = Instant::now();
    let applied = match into.list() {
        None => {
            let requests: Vec<DecisionRequest> = nets
                .iter()
                .map(|&target| DecisionRequest {
                    target,
                    action: Action::Block,
                    class: None,
                    ttl,
                    permanent: false,
                    reason: reason.clone(),
                    origin: Origin::Import,
                    force,
                })
                .collect();
            enforcer.decide_many(&requests)
        }
        Some(list) => enforcer.list_add_many(list, nets, ttl, Origin::Import, force),
    };
    let imported = applied.map_err(|(i, e)| {
        let mut err = ControlError::from(e);
        err.message = format!(
            "entry {} ({}): {}; nothing imported",
            i + 1,
            nets.get(i).map_or_else(String::new, |n| n.to_string()),
            err.message
        );
        err
    })?;
    Ok(ImportView {
        imported,
        seconds: started.elapsed().as_secs_f64(),
    })
}

/// The `list` view.
pub fn list_view(maps: &KernelMaps, what: ListWhat) -> Result<ListView, MapsError> {
    let want = |w: ListWhat| what == ListWhat::All || what == w;
    let mut view = ListView::default();
    if want(ListWhat::Allow) {
        view.lists.extend(maps.list_entries(List::Allow)?);
    }
    if want(ListWhat::Deny) {
        view.lists.extend(maps.list_entries(List::Deny)?);
    }
    if want(ListWhat::Decisions) {
        view.decisions = maps.decisions()?;
    }
    Ok(view)
}

/// Event counts by kind name, in the kernel's order.
pub fn by_event_kind(count: impl Fn(EventKind) -> u64) -> std::collections::BTreeMap<String, u64> {
    EventKind::ALL
        .iter()
        .map(|k| (k.name().to_string(), count(*k)))
        .collect()
}

/// The status fields that come from the kernel alone (the daemon's and the offline answer share them).
pub fn kernel_status(maps: &KernelMaps, counters: &CounterTotals) -> KernelStatus {
    let verdict_total = |v: Verdict| -> u64 {
        Reason::ALL
            .iter()
            .filter(|r| r.verdict() == v)
            .map(|r| counters.by_reason[*r as usize])
            .sum()
    };
    KernelStatus {
        packets: counters.packets(),
        passed: verdict_total(Verdict::Pass),
        dropped: verdict_total(Verdict::Drop),
        reasons: Reason::ALL
            .iter()
            .map(|r| (r.name().to_string(), counters.by_reason[*r as usize]))
            .collect(),
        events_sent: by_event_kind(|k| counters.events_sent[k as usize]),
        events_lost: by_event_kind(|k| counters.events_lost[k as usize]),
        maps: maps
            .fill_levels()
            .into_iter()
            .map(|(name, entries, capacity)| MapFill {
                name: name.to_string(),
                entries,
                capacity,
            })
            .collect(),
    }
}

/// `aqd status` with the daemon down and nothing pinned (never run, or fully detached): still an answer.
pub fn nothing_loaded_status() -> StatusView {
    StatusView {
        daemon: DaemonView {
            running: false,
            details: None,
        },
        pinned_state: Some(false),
        attachments: attach::attachments(),
        kernel: None,
        model: None,
        fingerprints: None,
        store: None,
        flow_table: None,
    }
}

/// The CLI's backend while the daemon is down: the pinned maps through an enforcer of their own.
pub struct Offline {
    pub enforcer: Enforcer,
}

fn daemon_only(what: &str) -> ControlError {
    ControlError::new(
        ErrorKind::NotRunning,
        format!("{what} needs the running daemon (start it with `aqd run` or the aqd service)"),
    )
}

impl Backend for Offline {
    fn enforcer(&mut self) -> &mut Enforcer {
        &mut self.enforcer
    }

    fn status(&mut self) -> Result<StatusView, ControlError> {
        let maps = self.enforcer.maps();
        let counters = maps.counters().map_err(ControlError::failed)?;
        Ok(StatusView {
            pinned_state: Some(true),
            kernel: Some(kernel_status(maps, &counters)),
            ..nothing_loaded_status()
        })
    }

    fn fp_list(&mut self) -> Result<Vec<FpRow>, ControlError> {
        Err(daemon_only("the fingerprint table"))
    }

    fn fp_set(&mut self, _: FpSetArgs) -> Result<FpSetView, ControlError> {
        Err(daemon_only("a verdict by fingerprint"))
    }

    fn fp_remove(&mut self, _: &str) -> Result<FpRemovedView, ControlError> {
        Err(daemon_only("a verdict by fingerprint"))
    }

    fn score_top(&mut self, _: Kind, _: usize) -> Result<ScoreTopView, ControlError> {
        Err(daemon_only("the model's scores"))
    }

    fn explain(&mut self, _: &ExplainTarget) -> Result<ExplainView, ControlError> {
        Err(daemon_only("the model's explanation"))
    }

    fn reload(&mut self) -> Result<(), ControlError> {
        Err(daemon_only("reload"))
    }
}
