//! The typed answers of the control protocol: the daemon (or the CLI's offline handler) builds them, the CLI
//! prints them (`bin/aqd/output.rs`) and the tests read them. `--json` prints them as they travel.
//!
//! Each request has one answer type; [`Response::decode`] reads an answer back by the request it answers (the
//! wire form carries no tag, so the JSON stays what operators and scripts already read).

use std::{collections::BTreeMap, path::PathBuf};

use detector_common::{Action, Origin};
use ipnet::IpNet;
use serde::{Deserialize, Serialize};
use serde_json::Value;
use thiserror::Error;

use super::proto::Request;
use crate::{
    aging::Baseline,
    attach::Attachment,
    clock,
    enforce::{FpWriteStats, RestoreReport},
    fingerprint::live::{FpAction, FpVerdict, LatencyHistogram},
    maps::{DecisionRow, List, ListRow},
    model::{Explanation, MemoryReport, ModelStats, Scored},
    model_stage::{Handled, StageStats},
    observe::FeedStats,
    store::StoreStats,
};

/// One answer, by request.
#[derive(Clone, Debug, Serialize)]
#[serde(untagged)]
pub enum Response {
    Status(Box<StatusView>),
    List(ListView),
    Decided(DecidedView),
    Removed(RemovedView),
    ListEdited(ListEditView),
    Imported(ImportView),
    Reloaded(ReloadView),
    FpList(Vec<FpRow>),
    ScoreTop(ScoreTopView),
    Explain(Box<ExplainView>),
    FpSet(FpSetView),
    FpRemoved(FpRemovedView),
}

/// An answer of another type than the request's (a daemon from another release, or a bug).
#[derive(Debug, Error)]
#[error("the daemon answered with a {got} view where a {wanted} view was expected")]
pub struct UnexpectedAnswer {
    pub wanted: &'static str,
    pub got: &'static str,
}

/// `Response::into_status()` and friends: the one view a request's answer must be.
macro_rules! into_view {
    ($($fn:ident => $variant:ident($ty:ty), $name:literal;)*) => {
        impl Response {
            $(
                pub fn $fn(self) -> Result<$ty, UnexpectedAnswer> {
                    match self {
                        Self::$variant(v) => Ok(v),
                        other => Err(UnexpectedAnswer { wanted: $name, got: other.name() }),
                    }
                }
            )*
        }
    };
}

into_view! {
    into_status => Status(Box<StatusView>), "status";
    into_list => List(ListView), "list";
    into_decided => Decided(DecidedView), "decided";
    into_removed => Removed(RemovedView), "removed";
    into_list_edited => ListEdited(ListEditView), "list_edited";
    into_imported => Imported(ImportView), "imported";
    into_reloaded => Reloaded(ReloadView), "reloaded";
    into_fp_list => FpList(Vec<FpRow>), "fp_list";
    into_score_top => ScoreTop(ScoreTopView), "score_top";
    into_explain => Explain(Box<ExplainView>), "explain";
    into_fp_set => FpSet(FpSetView), "fp_set";
    into_fp_removed => FpRemoved(FpRemovedView), "fp_removed";
}

impl Response {
    /// Reads the `result` of an answer to `request`.
    pub fn decode(request: &Request, value: Value) -> Result<Self, serde_json::Error> {
        use serde_json::from_value as v;
        Ok(match request {
            Request::Status {} => Self::Status(v(value)?),
            Request::List { .. } => Self::List(v(value)?),
            Request::Decide { .. } => Self::Decided(v(value)?),
            Request::Remove { .. } => Self::Removed(v(value)?),
            Request::ListAdd { .. } | Request::ListRemove { .. } => Self::ListEdited(v(value)?),
            Request::Import { .. } => Self::Imported(v(value)?),
            Request::Reload {} => Self::Reloaded(v(value)?),
            Request::FpList {} => Self::FpList(v(value)?),
            Request::ScoreTop { .. } => Self::ScoreTop(v(value)?),
            Request::Explain { .. } => Self::Explain(v(value)?),
            Request::FpSet { .. } => Self::FpSet(v(value)?),
            Request::FpRemove { .. } => Self::FpRemoved(v(value)?),
        })
    }

    /// The name of the answer, for "unexpected answer" errors.
    pub fn name(&self) -> &'static str {
        match self {
            Self::Status(_) => "status",
            Self::List(_) => "list",
            Self::Decided(_) => "decided",
            Self::Removed(_) => "removed",
            Self::ListEdited(_) => "list_edited",
            Self::Imported(_) => "imported",
            Self::Reloaded(_) => "reloaded",
            Self::FpList(_) => "fp_list",
            Self::ScoreTop(_) => "score_top",
            Self::Explain(_) => "explain",
            Self::FpSet(_) => "fp_set",
            Self::FpRemoved(_) => "fp_removed",
        }
    }
}

// ---- status ----

/// `aqd status`: what the kernel holds, and (daemon running) the daemon, the model, fingerprints and flows.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct StatusView {
    pub daemon: DaemonView,
    /// Offline answers only: whether anything is pinned (aqd loaded).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub pinned_state: Option<bool>,
    pub attachments: Vec<Attachment>,
    /// Absent when nothing is pinned.
    #[serde(flatten)]
    pub kernel: Option<KernelStatus>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub model: Option<ModelStatus>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub fingerprints: Option<FingerprintStatus>,
    /// None: the state store is off (or could not be opened).
    #[serde(default)]
    pub store: Option<StoreView>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub flow_table: Option<FlowTableView>,
}

/// Whether the daemon answered, and its figures when it did.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct DaemonView {
    pub running: bool,
    #[serde(flatten)]
    pub details: Option<DaemonDetails>,
}

#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct DaemonDetails {
    pub uptime_secs: u64,
    pub program_id: u32,
    pub config: Option<PathBuf>,
    pub dry_run: bool,
    pub protected_ports: Vec<u16>,
    /// By event kind name.
    pub events_read: BTreeMap<String, u64>,
    pub events_undecodable: u64,
    pub reloads_ok: u64,
    pub reloads_failed: u64,
}

/// The counters and fill levels of the kernel maps (the daemon's and the offline answer share it).
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct KernelStatus {
    pub packets: u64,
    pub passed: u64,
    pub dropped: u64,
    /// Packets by reason name (`pass_default`, `drop_block_exact`, …).
    pub reasons: BTreeMap<String, u64>,
    /// By event kind name.
    pub events_sent: BTreeMap<String, u64>,
    pub events_lost: BTreeMap<String, u64>,
    pub maps: Vec<MapFill>,
}

#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct MapFill {
    pub name: String,
    pub entries: usize,
    pub capacity: u32,
}

#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct ModelStatus {
    pub dry_run: bool,
    pub stage: StageStats,
    pub feed: FeedStats,
    pub flows_tracked: usize,
    pub memory: MemoryReport,
    pub stats: ModelStats,
}

/// The fingerprint pipeline: tables, reassembly, JA4 outcomes, p0f, escalation, verdicts.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct FingerprintStatus {
    pub ja4_tracked: usize,
    pub syn_tracked: usize,
    pub max_fingerprints: usize,
    pub table_evicted: u64,
    pub memory_bytes: usize,
    pub flows_tracked: usize,
    pub flows_in_progress: usize,
    pub max_flows: usize,
    pub capture_events: u64,
    pub ja4_computed: u64,
    /// By failure name.
    pub ja4_failed: BTreeMap<String, u64>,
    pub not_tls: u64,
    pub flows_evicted: u64,
    pub key_mismatch: u64,
    pub p0f_db: Option<PathBuf>,
    pub p0f_signatures: Option<usize>,
    pub p0f_error: Option<String>,
    pub escalations: u64,
    pub escalation_sources: usize,
    pub hello_to_flow_verdict_latency: LatencyView,
    /// Live verdicts by fingerprint.
    pub verdicts: usize,
    pub writes: FpWriteStats,
}

/// ClientHello → daemon-made flow verdict, in µs (bucket bounds for the quantiles).
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct LatencyView {
    pub count: u64,
    pub mean_us: Option<u64>,
    pub p50_le_us: Option<u64>,
    pub p99_le_us: Option<u64>,
    pub max_us: Option<u64>,
}

impl From<&LatencyHistogram> for LatencyView {
    fn from(h: &LatencyHistogram) -> Self {
        Self {
            count: h.count,
            mean_us: (h.count > 0).then(|| h.sum_us / h.count),
            p50_le_us: h.quantile_le_us(0.5),
            p99_le_us: h.quantile_le_us(0.99),
            max_us: (h.count > 0).then_some(h.max_us),
        }
    }
}

/// The durable state under the state directory.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct StoreView {
    pub dir: PathBuf,
    pub entries: usize,
    pub strikes: usize,
    pub stats: StoreStats,
    pub restored_at_start: RestoreReport,
    pub programs_loaded_after_start_ms: u64,
    pub restored_after_start_ms: u64,
}

/// The connection tables: fill, outcomes, ageing policy (see `aging::FlowFigures`).
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct FlowTableView {
    pub flows: FlowsView,
    pub half_open: HalfOpenView,
    pub aging: AgingView,
    pub since_daemon_start: Baseline,
    pub evicted_is: String,
}

#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct FlowsView {
    pub entries: u64,
    pub capacity: u32,
    pub established: u64,
    pub reset: u64,
    pub fin: u64,
    pub aged_idle: u64,
    pub aged_closed: u64,
    pub evicted: u64,
}

#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct HalfOpenView {
    pub entries: u64,
    pub capacity: u32,
    pub created: u64,
    pub aged: u64,
    pub evicted_at_least: u64,
}

#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct AgingView {
    pub flow_idle_timeout_secs: u64,
    pub flow_fin_timeout_secs: u64,
    pub half_open_timeout_secs: u64,
    pub passes: u64,
    pub errors: u64,
}

// ---- lists and decisions ----

/// `aqd list`.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct ListView {
    pub lists: Vec<ListRow>,
    pub decisions: Vec<DecisionRow>,
}

/// A decision applied.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct DecidedView {
    pub target: IpNet,
    pub action: Action,
    /// The TTL given (after jitter); None = permanent.
    pub ttl_secs: Option<u64>,
}

/// A decision removed.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct RemovedView {
    pub target: IpNet,
    pub removed: bool,
}

/// A list entry added or removed.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct ListEditView {
    pub target: IpNet,
    pub list: List,
    /// false: added.
    pub removed: bool,
}

/// A bulk import applied (all or nothing).
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct ImportView {
    pub imported: usize,
    pub seconds: f64,
}

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct ReloadView {
    pub reloaded: bool,
}

// ---- fingerprints ----

/// Which table a fingerprint row comes from.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum FpKind {
    Ja4,
    Syn,
}

/// One row of `aqd fp list`: a fingerprint seen, or a live verdict on one not seen (yet).
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct FpRow {
    pub kind: FpKind,
    /// The JA4, or the p0f SYN signature text.
    pub fingerprint: String,
    /// JA4 rows.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub ja4_r: Option<String>,
    /// JA4 rows: `hello:0x…` kernel keys.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub kernel_keys: Vec<String>,
    /// SYN rows: `syn:0x…`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub key: Option<String>,
    /// SYN rows: the p0f label.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub label: Option<String>,
    pub connections: u64,
    pub dropped: u64,
    pub sources: u64,
    pub sources_estimated: bool,
    /// Unix seconds; None for a verdict on a fingerprint not seen.
    pub first_seen: Option<u64>,
    pub last_seen: Option<u64>,
    pub verdict: Option<FpVerdictView>,
}

impl FpRow {
    /// A row with no traffic counted (a verdict on a fingerprint not seen yet); the caller fills in what it knows.
    pub fn unseen(kind: FpKind, fingerprint: String) -> Self {
        Self {
            kind,
            fingerprint,
            ja4_r: None,
            kernel_keys: Vec::new(),
            key: None,
            label: None,
            connections: 0,
            dropped: 0,
            sources: 0,
            sources_estimated: false,
            first_seen: None,
            last_seen: None,
            verdict: None,
        }
    }
}

/// A live verdict by fingerprint, as shown.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct FpVerdictView {
    pub action: FpAction,
    /// None = permanent.
    pub expires_in_secs: Option<u64>,
    pub reason: String,
    pub origin: Origin,
    pub rate_class: u8,
}

impl From<&FpVerdict> for FpVerdictView {
    fn from(v: &FpVerdict) -> Self {
        Self {
            action: v.action,
            expires_in_secs: (v.expires_ns != 0)
                .then(|| clock::remaining(v.expires_ns).map_or(0, |d| d.as_secs())),
            reason: v.reason.clone(),
            origin: v.origin,
            rate_class: v.rate_class,
        }
    }
}

/// A verdict by fingerprint set.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct FpSetView {
    /// `ja4:…`, `syn:0x…` or `hello:0x…`.
    pub id: String,
    pub action: FpAction,
    /// None = permanent.
    pub ttl_secs: Option<u64>,
    pub kernel_keys: Vec<String>,
    /// Whether the kernel applies it itself (else the daemon acts per flow until a key is known).
    pub in_kernel: bool,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub note: Option<String>,
}

/// A verdict by fingerprint removed.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct FpRemovedView {
    pub id: String,
    pub removed: bool,
    /// What it was.
    pub action: FpAction,
}

// ---- the model ----

/// `aqd top --by score`.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct ScoreTopView {
    pub dry_run: bool,
    pub rows: Vec<Scored>,
}

/// `aqd explain`.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct ExplainView {
    pub target: String,
    pub dry_run: bool,
    /// None: the model holds no scores for it now (but the stage handled decisions on it).
    pub model: Option<Explanation>,
    pub decisions: Vec<Handled>,
}
