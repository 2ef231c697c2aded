//! Durable state under the state directory (`/var/lib/aqd`): what must survive a reboot, a restart after hours
//! and a `LAYOUT_VERSION` change, none of which the bpffs pins or `/run` survive.
//!
//! Kept: decisions (target, action, rate class, reason, origin, force, absolute expiry in wall-clock time), the
//! operator's list edits (allow/deny entries added from the CLI or an import; a removal deletes the entry),
//! verdicts by fingerprint, and the model's strikes. Expiries are wall-clock (Unix ms): the kernel's monotonic
//! clock restarts at boot, so a monotonic expiry means nothing after a reboot.
//!
//! Format: a snapshot (`state.json`) plus an append-only journal (`journal.jsonl`). Why a journal and not one
//! atomically replaced file: the daemon takes thousands of decisions a second and imports 100,000 at once, and
//! rewriting a 100,000-entry file per decision is out of the question; appending one line per change is a
//! single `write(2)`, which a killed daemon never loses (the page cache keeps it). The journal is flushed to the
//! disk (`fdatasync`) at most once a second ([`Store::sync`]), so a power cut loses at most that second, and it
//! is folded into a new snapshot when it has grown ([`Store::compact_due`]): temp file + fsync + rename + fsync
//! of the directory, the previous snapshot and journal kept as `state.prev.json` / `journal.prev.jsonl`.
//!
//! Every line (journal records and the snapshot) is `<crc32 hex> <json>`: a torn or damaged line is detected,
//! reported with its file and line and skipped; everything else still loads. Records carry a sequence number,
//! so the snapshot's own sequence says which journal records it already holds (a compaction interrupted at any
//! step loads to the same state). A damaged snapshot falls back to the previous one plus both journals.

use std::{
    collections::BTreeMap,
    fs::{self, File, OpenOptions},
    io::{self, Read as _, Seek as _, Write as _},
    net::IpAddr,
    path::{Path, PathBuf},
    time::{Duration, SystemTime, UNIX_EPOCH},
};

use detector_common::{Action, Origin};
use ipnet::IpNet;
use serde::{Deserialize, Serialize};
use thiserror::Error;

use crate::{fingerprint::live::FpVerdict, maps::List, model};

/// Version of the files' layout (not the kernel's `LAYOUT_VERSION`: the store outlives those).
pub const FORMAT: u32 = 1;
/// The snapshot and journal in a state directory.
const SNAPSHOT: &str = "state.json";
const SNAPSHOT_PREV: &str = "state.prev.json";
const JOURNAL: &str = "journal.jsonl";
const JOURNAL_PREV: &str = "journal.prev.jsonl";
/// The journal is compacted once it is larger than this and than twice the snapshot.
const COMPACT_MIN_BYTES: u64 = 4 << 20;

/// Wall-clock milliseconds since the Unix epoch.
pub type UnixMs = u64;

/// Now, in wall-clock ms.
pub fn now_unix_ms() -> UnixMs {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_millis() as u64)
        .unwrap_or(0)
}

/// The absolute wall-clock expiry of a TTL starting at `now`; `None` (permanent) stays `None`.
pub fn expiry_after(ttl: Option<Duration>, now: UnixMs) -> Option<UnixMs> {
    ttl.map(|t| now.saturating_add(t.as_millis().min(u64::MAX as u128) as u64))
}

/// What is left of a stored expiry at `now`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Remaining {
    Permanent,
    Left(Duration),
    Expired,
}

/// The time left before `expires` (None = permanent) at `now`.
pub fn remaining(expires: Option<UnixMs>, now: UnixMs) -> Remaining {
    match expires {
        None => Remaining::Permanent,
        Some(e) if e > now => Remaining::Left(Duration::from_millis(e - now)),
        Some(_) => Remaining::Expired,
    }
}

#[derive(Debug, Error)]
pub enum StoreError {
    #[error("state store {path}: {source}")]
    Io {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    #[error("another aqd run (pid {pid}) holds {path}; stop it first (nothing was changed)")]
    Locked { path: PathBuf, pid: String },
}

/// A damaged line found while loading (the rest of the file still loads).
#[derive(Debug, Error)]
pub enum Corruption {
    #[error("{path} line {line}: no checksum (torn write?)")]
    NoChecksum { path: PathBuf, line: usize },
    #[error("{path} line {line}: checksum {found:08x}, the line's is {computed:08x} (torn or damaged)")]
    Checksum {
        path: PathBuf,
        line: usize,
        found: u32,
        computed: u32,
    },
    #[error("{path} line {line}: not a state record: {source}")]
    Json {
        path: PathBuf,
        line: usize,
        #[source]
        source: serde_json::Error,
    },
    #[error("{path}: format {found}; this aqd reads format {FORMAT}")]
    Format { path: PathBuf, found: u32 },
    #[error("{path} line {line}: sequence number {seq} is beyond any this store writes (damaged or crafted)")]
    Sequence { path: PathBuf, line: usize, seq: u64 },
}

/// The highest record sequence number accepted at load. A store writes one number per change, so no real
/// one gets near it; a damaged or crafted file claiming more is skipped, or the next write's `seq + 1` would
/// overflow.
const MAX_SEQ: u64 = 1 << 62;

fn io_err(path: &Path) -> impl FnOnce(io::Error) -> StoreError + '_ {
    move |source| StoreError::Io {
        path: path.to_path_buf(),
        source,
    }
}

/// One decision as kept.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct StoredDecision {
    pub target: IpNet,
    pub action: Action,
    /// The kernel rate class id (throttle).
    pub rate_class: u8,
    pub reason: String,
    pub origin: Origin,
    /// Made with `--force` (kept for the record; a restore checks only the management networks).
    pub force: bool,
    pub set_unix_ms: UnixMs,
    /// None = permanent.
    pub expires_unix_ms: Option<UnixMs>,
}

/// One allow/deny entry the operator added (CLI or import; the config's entries come from the config).
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct StoredListEntry {
    pub list: List,
    pub target: IpNet,
    pub origin: Origin,
    pub force: bool,
    pub set_unix_ms: UnixMs,
    pub expires_unix_ms: Option<UnixMs>,
}

/// A verdict by fingerprint; its `expires_ns` (monotonic) is recomputed from `expires_unix_ms` at restore.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct StoredFp {
    pub verdict: FpVerdict,
    pub expires_unix_ms: Option<UnixMs>,
}

/// The model's memory of one offender (see `model::Strikes`), in wall-clock time.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct StoredStrike {
    pub scope: model::StrikeScope,
    pub strikes: u8,
    pub last_strike_unix_ms: UnixMs,
    /// The tier in force and until when (a restored tier is not counted as a new offence).
    pub tier: Option<model::Action>,
    pub tier_until_unix_ms: UnixMs,
}

/// Slack when comparing strike times: the model counts in whole seconds and the export converts to wall-clock
/// ms at the moment of saving, so an unchanged record drifts by up to a second between two exports.
const STRIKE_TIME_SLACK_MS: u64 = 2_000;

/// Whether two exports hold the same strikes (in any order; times within [`STRIKE_TIME_SLACK_MS`]): an
/// unchanged model writes nothing.
fn same_strikes(old: &[StoredStrike], new: &[StoredStrike]) -> bool {
    if old.len() != new.len() {
        return false;
    }
    let by_scope: std::collections::HashMap<&model::StrikeScope, &StoredStrike> =
        old.iter().map(|s| (&s.scope, s)).collect();
    new.iter()
        .all(|n| by_scope.get(&n.scope).is_some_and(|o| o.same_as(n)))
}

impl StoredStrike {
    fn same_as(&self, other: &Self) -> bool {
        self.strikes == other.strikes
            && self.tier == other.tier
            && self.last_strike_unix_ms.abs_diff(other.last_strike_unix_ms) <= STRIKE_TIME_SLACK_MS
            && self.tier_until_unix_ms.abs_diff(other.tier_until_unix_ms) <= STRIKE_TIME_SLACK_MS
    }

    /// From the model's export at wall-clock `now`.
    pub fn from_model(s: &model::Strikes, now: UnixMs) -> Self {
        Self {
            scope: s.scope.clone(),
            strikes: s.strikes,
            last_strike_unix_ms: now.saturating_sub(s.since_last_strike.as_millis() as u64),
            tier: s.tier,
            tier_until_unix_ms: now.saturating_add(s.tier_left.as_millis() as u64),
        }
    }

    /// Back into the model's form at wall-clock `now`.
    pub fn to_model(&self, now: UnixMs) -> model::Strikes {
        model::Strikes {
            scope: self.scope.clone(),
            strikes: self.strikes,
            since_last_strike: Duration::from_millis(now.saturating_sub(self.last_strike_unix_ms)),
            tier: self.tier,
            tier_left: Duration::from_millis(self.tier_until_unix_ms.saturating_sub(now)),
        }
    }
}

/// Everything kept.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct State {
    pub decisions: BTreeMap<IpNet, StoredDecision>,
    pub allow: BTreeMap<IpNet, StoredListEntry>,
    pub deny: BTreeMap<IpNet, StoredListEntry>,
    pub fingerprints: BTreeMap<String, StoredFp>,
    pub strikes: Vec<StoredStrike>,
}

impl State {
    fn list_mut(&mut self, list: List) -> &mut BTreeMap<IpNet, StoredListEntry> {
        match list {
            List::Allow => &mut self.allow,
            List::Deny => &mut self.deny,
        }
    }

    fn apply(&mut self, op: Op) {
        match op {
            Op::Decision(d) => {
                self.decisions.insert(d.target, d);
            }
            Op::Undecide { target } => {
                self.decisions.remove(&target);
            }
            Op::ListAdd(e) => {
                self.list_mut(e.list).insert(e.target, e);
            }
            Op::ListRemove { list, target } => {
                self.list_mut(list).remove(&target);
            }
            Op::Fp(f) => {
                self.fingerprints.insert(f.verdict.id.clone(), f);
            }
            Op::FpRemove { id } => {
                self.fingerprints.remove(&id);
            }
            Op::Strikes { strikes } => self.strikes = strikes,
        }
    }

    /// Drops what has expired at `now`; returns how many entries went.
    fn drop_expired(&mut self, now: UnixMs) -> usize {
        let live = |e: &Option<UnixMs>| remaining(*e, now) != Remaining::Expired;
        let before = self.len();
        self.decisions.retain(|_, d| live(&d.expires_unix_ms));
        self.allow.retain(|_, e| live(&e.expires_unix_ms));
        self.deny.retain(|_, e| live(&e.expires_unix_ms));
        self.fingerprints.retain(|_, f| live(&f.expires_unix_ms));
        before - self.len()
    }

    /// Entries kept (strikes not counted).
    pub fn len(&self) -> usize {
        self.decisions.len() + self.allow.len() + self.deny.len() + self.fingerprints.len()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0 && self.strikes.is_empty()
    }
}

/// One change, as a journal line.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(tag = "op", rename_all = "snake_case")]
enum Op {
    Decision(StoredDecision),
    Undecide { target: IpNet },
    ListAdd(StoredListEntry),
    ListRemove { list: List, target: IpNet },
    Fp(StoredFp),
    FpRemove { id: String },
    Strikes { strikes: Vec<StoredStrike> },
}

#[derive(Serialize, Deserialize)]
struct Record {
    seq: u64,
    #[serde(flatten)]
    op: Op,
}

#[derive(Serialize, Deserialize)]
struct Snapshot {
    format: u32,
    /// The last journal record this snapshot holds.
    seq: u64,
    saved_unix_ms: UnixMs,
    state: State,
}

/// What loading found.
#[derive(Debug, Default)]
pub struct LoadReport {
    /// Damaged lines or files (skipped; the rest loaded).
    pub problems: Vec<Corruption>,
    /// The snapshot used (`state.json`, or `state.prev.json` when that one was damaged or missing).
    pub snapshot: Option<PathBuf>,
    pub journal_records: usize,
}

/// Counters for status and metrics.
#[derive(Clone, Copy, Debug, Default, Serialize, Deserialize)]
pub struct StoreStats {
    pub records_written: u64,
    pub write_errors: u64,
    pub syncs: u64,
    pub compactions: u64,
    /// Damaged lines found at start.
    pub corrupt_at_load: u64,
}

/// The state store of one aqd instance.
pub struct Store {
    dir: PathBuf,
    journal: File,
    state: State,
    seq: u64,
    journal_bytes: u64,
    snapshot_bytes: u64,
    unsynced: bool,
    pub stats: StoreStats,
}

fn line_for<T: Serialize>(value: &T) -> Vec<u8> {
    let json = serde_json::to_vec(value).expect("state records serialize");
    let mut line = format!("{:08x} ", crc32fast::hash(&json)).into_bytes();
    line.extend_from_slice(&json);
    line.push(b'\n');
    line
}

fn parse_line<T: serde::de::DeserializeOwned>(
    path: &Path,
    line_no: usize,
    line: &str,
) -> Result<T, Corruption> {
    let (crc, json) = line
        .split_once(' ')
        .filter(|(c, _)| c.len() == 8)
        .and_then(|(c, j)| Some((u32::from_str_radix(c, 16).ok()?, j)))
        .ok_or_else(|| Corruption::NoChecksum {
            path: path.to_path_buf(),
            line: line_no,
        })?;
    let computed = crc32fast::hash(json.as_bytes());
    if computed != crc {
        return Err(Corruption::Checksum {
            path: path.to_path_buf(),
            line: line_no,
            found: crc,
            computed,
        });
    }
    serde_json::from_str(json).map_err(|source| Corruption::Json {
        path: path.to_path_buf(),
        line: line_no,
        source,
    })
}

/// Reads a file as text; a missing file is `None`.
fn read_text(path: &Path) -> Result<Option<String>, StoreError> {
    match fs::read(path) {
        Ok(bytes) => Ok(Some(String::from_utf8_lossy(&bytes).into_owned())),
        Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(None),
        Err(e) => Err(io_err(path)(e)),
    }
}

fn read_snapshot(path: &Path, report: &mut LoadReport) -> Result<Option<Snapshot>, StoreError> {
    let Some(text) = read_text(path)? else {
        return Ok(None);
    };
    let line = text.lines().next().unwrap_or("");
    match parse_line::<Snapshot>(path, 1, line) {
        Ok(s) if s.seq > MAX_SEQ => {
            report.problems.push(Corruption::Sequence {
                path: path.to_path_buf(),
                line: 1,
                seq: s.seq,
            });
            Ok(None)
        }
        Ok(s) if s.format == FORMAT => Ok(Some(s)),
        Ok(s) => {
            report.problems.push(Corruption::Format {
                path: path.to_path_buf(),
                found: s.format,
            });
            Ok(None)
        }
        Err(e) => {
            report.problems.push(e);
            Ok(None)
        }
    }
}

fn read_journal(path: &Path, report: &mut LoadReport) -> Result<Vec<Record>, StoreError> {
    let Some(text) = read_text(path)? else {
        return Ok(Vec::new());
    };
    let mut records = Vec::new();
    for (i, line) in text.lines().enumerate() {
        if line.is_empty() {
            continue;
        }
        match parse_line::<Record>(path, i + 1, line) {
            Ok(r) if r.seq > MAX_SEQ => report.problems.push(Corruption::Sequence {
                path: path.to_path_buf(),
                line: i + 1,
                seq: r.seq,
            }),
            Ok(r) => records.push(r),
            Err(e) => report.problems.push(e),
        }
    }
    Ok(records)
}

fn sync_dir(dir: &Path) -> Result<(), StoreError> {
    File::open(dir).and_then(|d| d.sync_all()).map_err(io_err(dir))
}

impl Store {
    /// Opens (creating) the store in `dir` and loads it. Damaged lines are reported and skipped, never fatal:
    /// the daemon starts with everything that did load. Only I/O errors (an unreadable directory) fail.
    pub fn open(dir: &Path) -> Result<(Self, LoadReport), StoreError> {
        create_private_dir(dir)?;
        let mut report = LoadReport::default();
        let current = read_snapshot(&dir.join(SNAPSHOT), &mut report)?;
        let current_damaged = current.is_none() && dir.join(SNAPSHOT).exists();
        let (snapshot, used) = match current {
            Some(s) => (Some(s), dir.join(SNAPSHOT)),
            None => (
                read_snapshot(&dir.join(SNAPSHOT_PREV), &mut report)?,
                dir.join(SNAPSHOT_PREV),
            ),
        };
        let (mut state, mut seq, snapshot_bytes) = match snapshot {
            Some(s) => {
                report.snapshot = Some(used.clone());
                let bytes = fs::metadata(&used).map(|m| m.len()).unwrap_or(0);
                (s.state, s.seq, bytes)
            }
            None => (State::default(), 0, 0),
        };
        // The previous journal holds what came between the previous snapshot and the current one: needed only
        // when the current snapshot is not the one used; records already in the snapshot are skipped by seq.
        let mut records = read_journal(&dir.join(JOURNAL_PREV), &mut report)?;
        records.extend(read_journal(&dir.join(JOURNAL), &mut report)?);
        records.sort_by_key(|r| r.seq);
        for r in records {
            if r.seq > seq {
                seq = r.seq;
                state.apply(r.op);
                report.journal_records += 1;
            }
        }
        if current_damaged {
            // Keep the damaged file for a post-mortem; the next compaction would replace it.
            let _ = fs::copy(dir.join(SNAPSHOT), dir.join("state.json.damaged"));
        }
        let journal_path = dir.join(JOURNAL);
        let mut journal = OpenOptions::new()
            .create(true)
            .read(true)
            .append(true)
            .open(&journal_path)
            .map_err(io_err(&journal_path))?;
        let journal_bytes = journal.metadata().map_err(io_err(&journal_path))?.len();
        // A torn last line (a write cut short) must not swallow the next record: end it first.
        if journal_bytes > 0 {
            let mut last = [0u8; 1];
            journal
                .seek(io::SeekFrom::End(-1))
                .and_then(|_| journal.read_exact(&mut last))
                .map_err(io_err(&journal_path))?;
            if last[0] != b'\n' {
                journal.write_all(b"\n").map_err(io_err(&journal_path))?;
            }
        }
        let stats = StoreStats {
            corrupt_at_load: report.problems.len() as u64,
            ..Default::default()
        };
        Ok((
            Self {
                dir: dir.to_path_buf(),
                journal,
                state,
                seq,
                journal_bytes,
                snapshot_bytes,
                unsynced: false,
                stats,
            },
            report,
        ))
    }

    pub fn dir(&self) -> &Path {
        &self.dir
    }

    /// What is kept now.
    pub fn state(&self) -> &State {
        &self.state
    }

    fn write(&mut self, ops: Vec<Op>) -> Result<(), StoreError> {
        if ops.is_empty() {
            return Ok(());
        }
        let mut lines = Vec::with_capacity(ops.len() * 200);
        for op in &ops {
            self.seq += 1;
            lines.extend(line_for(&Record {
                seq: self.seq,
                op: op.clone(),
            }));
        }
        let n = ops.len() as u64;
        for op in ops {
            self.state.apply(op);
        }
        let path = self.dir.join(JOURNAL);
        match self.journal.write_all(&lines) {
            Ok(()) => {
                self.journal_bytes += lines.len() as u64;
                self.stats.records_written += n;
                self.unsynced = true;
                Ok(())
            }
            Err(e) => {
                self.stats.write_errors += 1;
                // A short write (ENOSPC, EIO) leaves a torn line: cut back to the last whole record, or the
                // next record would be glued to it and both fail their checksum.
                let _ = self.journal.set_len(self.journal_bytes);
                Err(io_err(&path)(e))
            }
        }
    }

    pub fn put_decisions(&mut self, decisions: Vec<StoredDecision>) -> Result<(), StoreError> {
        self.write(decisions.into_iter().map(Op::Decision).collect())
    }

    pub fn remove_decision(&mut self, target: IpNet) -> Result<(), StoreError> {
        if !self.state.decisions.contains_key(&target) {
            return Ok(());
        }
        self.write(vec![Op::Undecide { target }])
    }

    pub fn put_list_entries(&mut self, entries: Vec<StoredListEntry>) -> Result<(), StoreError> {
        self.write(entries.into_iter().map(Op::ListAdd).collect())
    }

    pub fn remove_list_entry(&mut self, list: List, target: IpNet) -> Result<(), StoreError> {
        if !self.state.list_mut(list).contains_key(&target) {
            return Ok(());
        }
        self.write(vec![Op::ListRemove { list, target }])
    }

    pub fn put_fp(&mut self, fp: StoredFp) -> Result<(), StoreError> {
        if self.state.fingerprints.get(&fp.verdict.id) == Some(&fp) {
            return Ok(());
        }
        self.write(vec![Op::Fp(fp)])
    }

    pub fn remove_fp(&mut self, id: &str) -> Result<(), StoreError> {
        if !self.state.fingerprints.contains_key(id) {
            return Ok(());
        }
        self.write(vec![Op::FpRemove { id: id.to_string() }])
    }

    /// Replaces the model's strikes (written only when they changed).
    pub fn set_strikes(&mut self, strikes: Vec<StoredStrike>) -> Result<(), StoreError> {
        if same_strikes(&self.state.strikes, &strikes) {
            return Ok(());
        }
        self.write(vec![Op::Strikes { strikes }])
    }

    /// Flushes the journal to the disk if anything was written since the last flush.
    pub fn sync(&mut self) -> Result<(), StoreError> {
        if !self.unsynced {
            return Ok(());
        }
        self.journal
            .sync_data()
            .map_err(io_err(&self.dir.join(JOURNAL)))?;
        self.unsynced = false;
        self.stats.syncs += 1;
        Ok(())
    }

    /// Whether the journal has grown enough to be folded into the snapshot.
    pub fn compact_due(&self) -> bool {
        self.journal_bytes > COMPACT_MIN_BYTES.max(2 * self.snapshot_bytes)
    }

    /// Drops what expired before `now`, writes a new snapshot and starts an empty journal. Returns how many
    /// expired entries were dropped. Each step leaves a loadable directory (see the module doc).
    pub fn compact(&mut self, now: UnixMs) -> Result<usize, StoreError> {
        let dropped = self.state.drop_expired(now);
        let line = line_for(&Snapshot {
            format: FORMAT,
            seq: self.seq,
            saved_unix_ms: now,
            state: self.state.clone(),
        });
        let tmp = self.dir.join("state.json.tmp");
        {
            let mut f = File::create(&tmp).map_err(io_err(&tmp))?;
            f.write_all(&line)
                .and_then(|_| f.sync_all())
                .map_err(io_err(&tmp))?;
        }
        let (snap, snap_prev) = (self.dir.join(SNAPSHOT), self.dir.join(SNAPSHOT_PREV));
        let (journal, journal_prev) = (self.dir.join(JOURNAL), self.dir.join(JOURNAL_PREV));
        self.journal.sync_data().map_err(io_err(&journal))?;
        if snap.exists() {
            fs::rename(&snap, &snap_prev).map_err(io_err(&snap))?;
        }
        fs::rename(&tmp, &snap).map_err(io_err(&snap))?;
        fs::rename(&journal, &journal_prev).map_err(io_err(&journal))?;
        self.journal = OpenOptions::new()
            .create(true)
            .read(true)
            .append(true)
            .open(&journal)
            .map_err(io_err(&journal))?;
        sync_dir(&self.dir)?;
        self.snapshot_bytes = line.len() as u64;
        self.journal_bytes = 0;
        self.unsynced = false;
        self.stats.compactions += 1;
        Ok(dropped)
    }
}

fn create_private_dir(dir: &Path) -> Result<(), StoreError> {
    use std::os::unix::fs::DirBuilderExt as _;
    fs::DirBuilder::new()
        .recursive(true)
        .mode(0o700)
        .create(dir)
        .map_err(io_err(dir))
}

/// The single-instance lock of `aqd run`: an exclusive `flock` on a file in the state directory, held for the
/// daemon's lifetime (the kernel drops it when the process ends, however it ends). The file holds the PID.
pub struct InstanceLock {
    _file: File,
    path: PathBuf,
}

impl InstanceLock {
    /// Takes the lock or says who holds it. Creates the state directory; touches nothing else.
    pub fn acquire(path: &Path) -> Result<Self, StoreError> {
        if let Some(dir) = path.parent() {
            create_private_dir(dir)?;
        }
        let mut file = OpenOptions::new()
            .create(true)
            .truncate(false)
            .read(true)
            .write(true)
            .open(path)
            .map_err(io_err(path))?;
        match file.try_lock() {
            Ok(()) => {}
            Err(fs::TryLockError::WouldBlock) => {
                let mut pid = String::new();
                let _ = file.read_to_string(&mut pid);
                let pid = pid.trim();
                return Err(StoreError::Locked {
                    path: path.to_path_buf(),
                    pid: if pid.is_empty() {
                        "unknown".into()
                    } else {
                        pid.to_string()
                    },
                });
            }
            Err(fs::TryLockError::Error(e)) => return Err(io_err(path)(e)),
        }
        file.set_len(0)
            .and_then(|_| file.write_all(format!("{}\n", std::process::id()).as_bytes()))
            .map_err(io_err(path))?;
        Ok(Self {
            _file: file,
            path: path.to_path_buf(),
        })
    }

    pub fn path(&self) -> &Path {
        &self.path
    }
}

/// An address or prefix a strike is kept for (`model::StrikeScope`), shown in logs.
pub fn scope_addr(scope: &model::StrikeScope) -> Option<IpAddr> {
    match scope {
        model::StrikeScope::Source(a) => Some(*a),
        model::StrikeScope::Prefix(n) => Some(n.addr()),
        model::StrikeScope::Fingerprint(_) => None,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn temp_dir(name: &str) -> PathBuf {
        let dir = std::env::temp_dir().join(format!("aqd-store-{name}-{}", std::process::id()));
        let _ = fs::remove_dir_all(&dir);
        dir
    }

    fn net(s: &str) -> IpNet {
        s.parse().unwrap()
    }

    fn decision(target: &str, expires: Option<UnixMs>) -> StoredDecision {
        StoredDecision {
            target: net(target),
            action: Action::Block,
            rate_class: 0,
            reason: "test".into(),
            origin: Origin::Cli,
            force: false,
            set_unix_ms: 1_000,
            expires_unix_ms: expires,
        }
    }

    fn list_entry(list: List, target: &str) -> StoredListEntry {
        StoredListEntry {
            list,
            target: net(target),
            origin: Origin::Import,
            force: true,
            set_unix_ms: 1_000,
            expires_unix_ms: None,
        }
    }

    fn fp(id: &str, expires: Option<UnixMs>) -> StoredFp {
        StoredFp {
            verdict: FpVerdict {
                id: id.into(),
                action: crate::fingerprint::live::FpAction::Block,
                rate_class: 0,
                expires_ns: 5,
                reason: "r".into(),
                origin: Origin::Cli,
                set_at: 1.0,
                ja4_r: None,
                syn_text: None,
                hello_keys: [7u64, 9].into_iter().collect(),
                config_rule: None,
            },
            expires_unix_ms: expires,
        }
    }

    fn strike() -> StoredStrike {
        StoredStrike {
            scope: model::StrikeScope::Source("192.0.2.9".parse().unwrap()),
            strikes: 2,
            last_strike_unix_ms: 500,
            tier: Some(model::Action::Throttle),
            tier_until_unix_ms: 9_000,
        }
    }

    /// Fills a store with one of everything and returns the state it should hold.
    fn fill(store: &mut Store) -> State {
        store
            .put_decisions(vec![
                decision("192.0.2.1/32", Some(10_000)),
                decision("2001:db8::/64", None),
            ])
            .unwrap();
        store
            .put_decisions(vec![decision("192.0.2.3/32", Some(10_000))])
            .unwrap();
        store.remove_decision(net("192.0.2.3/32")).unwrap();
        store
            .put_list_entries(vec![
                list_entry(List::Allow, "198.51.100.0/24"),
                list_entry(List::Deny, "203.0.113.7/32"),
            ])
            .unwrap();
        store
            .put_list_entries(vec![list_entry(List::Deny, "203.0.113.8/32")])
            .unwrap();
        store
            .remove_list_entry(List::Deny, net("203.0.113.8/32"))
            .unwrap();
        store.put_fp(fp("ja4:t13d_x", Some(20_000))).unwrap();
        store.put_fp(fp("syn:0x0000000000000001", None)).unwrap();
        store.remove_fp("syn:0x0000000000000001").unwrap();
        store.set_strikes(vec![strike()]).unwrap();
        store.state().clone()
    }

    #[test]
    fn round_trip_through_the_journal_and_through_a_snapshot() {
        let dir = temp_dir("round-trip");
        let (mut store, report) = Store::open(&dir).unwrap();
        assert!(report.problems.is_empty() && store.state().is_empty());
        let expected = fill(&mut store);
        assert_eq!(expected.decisions.len(), 2);
        assert_eq!((expected.allow.len(), expected.deny.len()), (1, 1));
        assert_eq!(expected.fingerprints.len(), 1);
        store.sync().unwrap();
        drop(store);

        // Journal only.
        let (mut store, report) = Store::open(&dir).unwrap();
        assert!(report.problems.is_empty(), "{:?}", report.problems);
        assert_eq!(report.snapshot, None);
        assert_eq!(store.state(), &expected);

        // Snapshot, then more journal after it.
        assert_eq!(store.compact(1_000).unwrap(), 0);
        store.put_decisions(vec![decision("192.0.2.4/32", None)]).unwrap();
        let expected = store.state().clone();
        drop(store);
        let (store, report) = Store::open(&dir).unwrap();
        assert!(report.problems.is_empty(), "{:?}", report.problems);
        assert_eq!(report.snapshot, Some(dir.join(SNAPSHOT)));
        assert_eq!(report.journal_records, 1);
        assert_eq!(store.state(), &expected);
        fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn torn_journal_line_is_reported_and_the_rest_loads() {
        let dir = temp_dir("torn");
        let (mut store, _) = Store::open(&dir).unwrap();
        let expected = fill(&mut store);
        drop(store);
        // A write cut short: half a record at the end, without its newline.
        let half = line_for(&Record {
            seq: 99,
            op: Op::Undecide {
                target: net("192.0.2.1/32"),
            },
        });
        let mut f = OpenOptions::new().append(true).open(dir.join(JOURNAL)).unwrap();
        f.write_all(&half[..half.len() / 2]).unwrap();
        drop(f);

        let (mut store, report) = Store::open(&dir).unwrap();
        assert_eq!(store.state(), &expected, "the torn record must not apply");
        assert_eq!(report.problems.len(), 1, "{:?}", report.problems);
        let message = report.problems[0].to_string();
        assert!(message.contains("journal.jsonl line 13"), "{message}");
        // A record appended after the torn line still loads.
        store.put_decisions(vec![decision("192.0.2.5/32", None)]).unwrap();
        let expected = store.state().clone();
        drop(store);
        let (store, report) = Store::open(&dir).unwrap();
        assert_eq!(store.state(), &expected);
        assert_eq!(report.problems.len(), 1);
        fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn a_sequence_number_past_the_bound_is_skipped_and_writes_go_on() {
        let dir = temp_dir("seq-bound");
        let (mut store, _) = Store::open(&dir).unwrap();
        store.put_decisions(vec![decision("192.0.2.1/32", None)]).unwrap();
        drop(store);
        // A line with a correct checksum claiming the last sequence number: applied, the next write's
        // `seq + 1` would overflow (and a wrapped 0 would be skipped at the next load).
        let crafted = line_for(&Record {
            seq: u64::MAX,
            op: Op::Decision(decision("192.0.2.2/32", None)),
        });
        let mut f = OpenOptions::new().append(true).open(dir.join(JOURNAL)).unwrap();
        f.write_all(&crafted).unwrap();
        drop(f);
        let (mut store, report) = Store::open(&dir).unwrap();
        assert_eq!(report.problems.len(), 1, "{:?}", report.problems);
        assert!(
            report.problems[0]
                .to_string()
                .contains("line 2: sequence number 18446744073709551615"),
            "{}",
            report.problems[0]
        );
        assert_eq!(store.state().decisions.len(), 1);
        store.put_decisions(vec![decision("192.0.2.3/32", None)]).unwrap();
        let expected = store.state().clone();
        drop(store);
        let (store, _) = Store::open(&dir).unwrap();
        assert_eq!(store.state(), &expected);
        fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn damaged_snapshot_falls_back_to_the_previous_state() {
        let dir = temp_dir("damaged");
        let (mut store, _) = Store::open(&dir).unwrap();
        store.put_decisions(vec![decision("192.0.2.1/32", None)]).unwrap();
        store.compact(1_000).unwrap();
        store.put_decisions(vec![decision("192.0.2.2/32", None)]).unwrap();
        store.compact(1_000).unwrap();
        store.put_decisions(vec![decision("192.0.2.3/32", None)]).unwrap();
        let expected = store.state().clone();
        drop(store);
        // Flip one byte inside the current snapshot's JSON.
        let path = dir.join(SNAPSHOT);
        let mut bytes = fs::read(&path).unwrap();
        let at = bytes.len() - 10;
        bytes[at] ^= 0x01;
        fs::write(&path, &bytes).unwrap();

        let (store, report) = Store::open(&dir).unwrap();
        assert_eq!(report.problems.len(), 1, "{:?}", report.problems);
        let message = report.problems[0].to_string();
        assert!(message.contains("state.json line 1: checksum"), "{message}");
        assert_eq!(report.snapshot, Some(dir.join(SNAPSHOT_PREV)));
        // The previous snapshot plus both journals: nothing lost.
        assert_eq!(store.state(), &expected);
        assert!(dir.join("state.json.damaged").exists());
        fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn garbage_line_is_reported_with_its_place() {
        let dir = temp_dir("garbage");
        let (mut store, _) = Store::open(&dir).unwrap();
        store.put_decisions(vec![decision("192.0.2.1/32", None)]).unwrap();
        drop(store);
        let mut f = OpenOptions::new().append(true).open(dir.join(JOURNAL)).unwrap();
        f.write_all(b"not a record\n").unwrap();
        let bad_json = b"{\"seq\":5,\"op\":\"nonsense\"}";
        f.write_all(format!("{:08x} ", crc32fast::hash(bad_json)).as_bytes())
            .unwrap();
        f.write_all(bad_json).unwrap();
        f.write_all(b"\n").unwrap();
        drop(f);
        let (store, report) = Store::open(&dir).unwrap();
        assert_eq!(store.state().decisions.len(), 1);
        let messages: Vec<String> = report.problems.iter().map(|p| p.to_string()).collect();
        assert_eq!(messages.len(), 2, "{messages:?}");
        assert!(messages[0].contains("line 2: no checksum"), "{messages:?}");
        assert!(messages[1].contains("line 3: not a state record"), "{messages:?}");
        fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn interrupted_compaction_loads_the_same_state() {
        let dir = temp_dir("interrupted");
        let (mut store, _) = Store::open(&dir).unwrap();
        let expected = fill(&mut store);
        store.compact(1_000).unwrap();
        drop(store);
        // As if the compaction had stopped after moving the old snapshot aside (there was none), before the new
        // one was renamed in: no state.json, and the journal not rotated yet.
        fs::rename(dir.join(JOURNAL_PREV), dir.join(JOURNAL)).unwrap();
        fs::remove_file(dir.join(SNAPSHOT)).unwrap();
        let (store, report) = Store::open(&dir).unwrap();
        assert!(report.problems.is_empty(), "{:?}", report.problems);
        assert_eq!(store.state(), &expected);
        // And after the rename of the new snapshot but before the journal was rotated: records already in the
        // snapshot are skipped by sequence number, not applied twice.
        drop(store);
        let (mut store, _) = Store::open(&dir).unwrap();
        store.compact(1_000).unwrap();
        drop(store);
        fs::rename(dir.join(JOURNAL_PREV), dir.join(JOURNAL)).unwrap();
        let (store, report) = Store::open(&dir).unwrap();
        assert!(report.problems.is_empty(), "{:?}", report.problems);
        assert_eq!(store.state(), &expected);
        fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn compaction_drops_expired_entries() {
        let dir = temp_dir("expired");
        let (mut store, _) = Store::open(&dir).unwrap();
        store
            .put_decisions(vec![
                decision("192.0.2.1/32", Some(5_000)),
                decision("192.0.2.2/32", Some(15_000)),
            ])
            .unwrap();
        store.put_fp(fp("ja4:a", Some(4_000))).unwrap();
        assert_eq!(store.compact(10_000).unwrap(), 2);
        assert_eq!(
            store.state().decisions.keys().collect::<Vec<_>>(),
            vec![&net("192.0.2.2/32")]
        );
        assert!(store.state().fingerprints.is_empty());
        fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn ttl_arithmetic() {
        assert_eq!(expiry_after(None, 1_000), None);
        assert_eq!(expiry_after(Some(Duration::from_secs(30)), 1_000), Some(31_000));
        assert_eq!(remaining(None, 5), Remaining::Permanent);
        assert_eq!(
            remaining(Some(31_000), 1_000),
            Remaining::Left(Duration::from_secs(30))
        );
        assert_eq!(
            remaining(Some(31_000), 30_999),
            Remaining::Left(Duration::from_millis(1))
        );
        assert_eq!(remaining(Some(31_000), 31_000), Remaining::Expired);
        assert_eq!(remaining(Some(31_000), u64::MAX), Remaining::Expired);
        // A strike round-trips through wall-clock time with its ages intact.
        let s = model::Strikes {
            scope: model::StrikeScope::Prefix(net("192.0.2.0/24")),
            strikes: 3,
            since_last_strike: Duration::from_secs(100),
            tier: Some(model::Action::Block),
            tier_left: Duration::from_secs(50),
        };
        let stored = StoredStrike::from_model(&s, 1_000_000);
        assert_eq!(stored.last_strike_unix_ms, 900_000);
        assert_eq!(stored.tier_until_unix_ms, 1_050_000);
        // Ten seconds of downtime later.
        let back = stored.to_model(1_010_000);
        assert_eq!(back.since_last_strike, Duration::from_secs(110));
        assert_eq!(back.tier_left, Duration::from_secs(40));
    }

    #[test]
    fn the_lock_is_exclusive_and_names_its_holder() {
        let dir = temp_dir("lock");
        let path = dir.join("aqd.lock");
        let held = InstanceLock::acquire(&path).unwrap();
        let err = InstanceLock::acquire(&path).err().expect("second lock refused");
        let message = err.to_string();
        assert!(
            message.contains(&format!("pid {}", std::process::id())),
            "{message}"
        );
        drop(held);
        InstanceLock::acquire(&path).expect("free again once the holder is gone");
        fs::remove_dir_all(&dir).unwrap();
    }
}
