//! Per-source and per-group (fingerprint cluster, /24 or /64 prefix) state, and the feature vectors computed from it.
//!
//! All state is fixed-size and updated in O(1) per observation. Rates are exponentially decayed counters (one
//! shared timestamp per entity), request sizes go into a 32-bucket third-of-an-octave histogram, inter-arrival
//! regularity is an EWMA mean/variance pair, the duty cycle is a rolling 24-bit hour bitmap, and cluster
//! synchrony is measured on 1-second slots (how many distinct member sources are active in the same slot, and
//! how many of its cluster's sources a source sees in the slot where it becomes active).
//!
//! Feature values are plain `f32`s in fixed positions; [`SOURCE_FEATURES`] and [`GROUP_FEATURES`] name them.

use super::policy::PolicyState;
use super::table::Aged;

/// Fast and slow decay time constants of the rate counters (seconds).
pub const FAST_TAU_S: f32 = 10.0;
pub const SLOW_TAU_S: f32 = 600.0;
/// Synchrony slot length and the EWMA weight of one slot in the per-slot distinct-source statistics.
pub const SLOT_NS: u64 = 1_000_000_000;
const SLOT_ALPHA: f32 = 1.0 / 60.0;
/// Distinct-source counting epoch (slots).
const EPOCH_SLOTS: u32 = 30;
/// Gaps longer than this are session breaks, not inter-arrival samples (seconds).
const MAX_GAP_S: f32 = 600.0;
pub const SIZE_BUCKETS: usize = 32;
/// The share of its requests a source with diverse sizes has in a cluster's top two buckets by chance.
const TEMPLATE_PRIOR: f32 = 0.25;
/// The sustained rate is counted over at least this long (a burst of a minute is not sustained volume).
const SUSTAIN_MIN_S: f32 = 120.0;
/// A gap at least this long is idle time between bursts; one shorter than `DENSE_GAP_S` is inside a burst.
const IDLE_GAP_S: f32 = 60.0;
const DENSE_GAP_S: f32 = 5.0;
/// A source is judged a scheduled burster only after this long (persistence: a new source has no rhythm yet).
const SCHEDULED_MIN_AGE_S: f32 = 120.0;

/// Names of the source features, in vector order.
pub const SOURCE_FEATURES: [&str; 15] = [
    "rate",                // ln(1 + requests/s), 10 s horizon
    "volume",              // ln(1 + client kB/s), 10 min horizon
    "concurrency",         // ln(1 + open connections)
    "size_repetition",     // share of the top two size buckets (shrunk towards 0.3 for few requests)
    "size_entropy",        // normalised entropy of the size histogram
    "regularity",          // 1 - CV/2 of inter-arrival gaps (0.5 = Poisson, 1 = metronome)
    "duty_cycle",          // share of the last 24 hours with activity
    "coactivity",          // ln((others of its cluster active in its slot + 1) / (expected + 1)), EWMA
    "template_match",      // share of its requests in its cluster's top two size buckets
    "fp_cluster",          // its fingerprint cluster's score × how much it looks like that cluster
    "prefix_cluster",      // its prefix's score × the same likeness
    "templated_rate",      // rate × size_repetition: many requests of the same few sizes
    "sustained_rate",      // ln(1 + requests/s over 10 min, counted over at least 2 min): volume that lasts
    "sustained_templated", // sustained_rate × size_repetition × regularity above Poisson: a tool, not a person
    "scheduled_bursts", // dense bursts between long idle gaps (CI runners, cron): discounts the synchrony evidence
];
pub const NS: usize = SOURCE_FEATURES.len();
/// Position of `sustained_templated` (the single-source tool rule reads it).
pub const SUSTAINED_TEMPLATED: usize = 13;
const _: () = assert!(NS == 15);

/// Names of the group features (fingerprint clusters and prefixes), in vector order.
pub const GROUP_FEATURES: [&str; 11] = [
    "sources",           // ln(1 + distinct active sources over ~30-60 s)
    "sync",              // ln(max(1, dispersion of distinct active sources per 1 s slot))
    "size_repetition",   // top-two size bucket share of the group's histogram
    "size_entropy",      // normalised entropy of the group's size histogram
    "member_regularity", // EWMA of the members' regularity
    "rate_per_source",   // ln(1 + requests/s per active source)
    "novelty",           // exp(-age / 1 h) for groups first seen after warm-up, else 0
    "release_growth", // ln of (rate since release / rate before), clamped to [0, 5], within 24 h of release
    "duty_cycle",     // share of the last 24 hours with activity
    "member_coactivity", // EWMA of the members' coactivity samples
    "templated_mass", // sources × size_repetition: many sources sending the same few sizes
];
pub const NG: usize = GROUP_FEATURES.len();

pub(crate) fn size_bucket(bytes: u32) -> usize {
    // 3 buckets per octave from 128 B (bucket 0) to ~165 KB (bucket 31): round(3·log2 bytes) − 21, from the
    // exponent and the mantissa's position against 2^(1/6), 2^(1/2) and 2^(5/6) (no logarithm per request).
    let bits = (bytes.max(1) as f32).to_bits();
    let e = ((bits >> 23) & 0xff) as i32 - 127;
    let m = f32::from_bits((bits & 0x007f_ffff) | 0x3f80_0000);
    let b =
        3 * e + (m >= 1.122_462) as i32 + (m >= std::f32::consts::SQRT_2) as i32 + (m >= 1.781_797_4) as i32
            - 21;
    (b.max(0) as usize).min(SIZE_BUCKETS - 1)
}

/// e^x for x ≤ 0, to ~2e-5 relative (a degree-6 Taylor polynomial of 2^f of the fraction and the exponent bits): the decayed
/// counters are updated on every observation and libm's `expf` was a visible share of the per-event cost.
#[inline]
pub(crate) fn exp_neg(x: f32) -> f32 {
    if x < -80.0 {
        return 0.0;
    }
    if x >= 0.0 {
        return 1.0;
    }
    let y = x * std::f32::consts::LOG2_E;
    let i = y.floor();
    let f = y - i;
    let p = 1.0
        + f * (std::f32::consts::LN_2
            + f * (0.240_226_5
                + f * (0.055_504_11 + f * (0.009_618_129 + f * (0.001_333_355_8 + f * 0.000_154_035_3)))));
    f32::from_bits(((i as i32 + 127) as u32) << 23) * p
}

#[inline]
fn decay(dt_s: f32, tau: f32) -> f32 {
    exp_neg(-dt_s / tau)
}

/// c·log2(c) for c = 0..=255 (the entropy of a u8 histogram without a logarithm per bucket).
static CLOGC: std::sync::LazyLock<[f32; 256]> = std::sync::LazyLock::new(|| {
    let mut t = [0.0f32; 256];
    for (c, v) in t.iter_mut().enumerate().skip(1) {
        *v = c as f32 * (c as f32).log2();
    }
    t
});

/// (top-two share, normalised entropy, total) of a source's u8 histogram: entropy = log2 n − Σ c·log2 c / n.
fn hist_stats_u8(h: &[u8; SIZE_BUCKETS]) -> (f32, f32, f32) {
    let t = &*CLOGC;
    let (mut n, mut s) = (0u32, 0.0f32);
    let (mut t1, mut t2) = (0u32, 0u32);
    for &c in h {
        let c = c as u32;
        n += c;
        s += t[c as usize];
        if c > t1 {
            t2 = t1;
            t1 = c;
        } else if c > t2 {
            t2 = c;
        }
    }
    if n == 0 {
        return (0.0, 0.0, 0.0);
    }
    let nf = n as f32;
    let ent = (nf.log2() - s / nf).max(0.0);
    ((t1 + t2) as f32 / nf, ent / 5.0, nf)
}

/// Rate from a decayed counter, corrected for an entity younger than the time constant.
#[inline]
fn rate(v: f32, tau: f32, age_s: f32) -> f32 {
    let age = age_s.max(1.0);
    v / (tau * (1.0 - (-age / tau).exp()))
}

/// (top-two share, normalised entropy, total) of a histogram.
fn hist_stats<T: Copy + Into<u32>>(h: &[T; SIZE_BUCKETS]) -> (f32, f32, f32) {
    let mut n = 0u32;
    let (mut t1, mut t2) = (0u32, 0u32);
    for &c in h {
        let c: u32 = c.into();
        n += c;
        if c > t1 {
            t2 = t1;
            t1 = c;
        } else if c > t2 {
            t2 = c;
        }
    }
    if n == 0 {
        return (0.0, 0.0, 0.0);
    }
    let nf = n as f32;
    let mut ent = 0.0f32;
    for &c in h {
        let c: u32 = c.into();
        if c > 0 {
            let p = c as f32 / nf;
            ent -= p * p.log2();
        }
    }
    ((t1 + t2) as f32 / nf, ent / 5.0, nf)
}

fn top_two<T: Copy + Into<u32>>(h: &[T; SIZE_BUCKETS]) -> (u8, u8) {
    let (mut b1, mut b2) = (0usize, 0usize);
    let (mut c1, mut c2) = (0u32, 0u32);
    for (i, &c) in h.iter().enumerate() {
        let c: u32 = c.into();
        if c > c1 {
            (b2, c2) = (b1, c1);
            (b1, c1) = (i, c);
        } else if c > c2 {
            (b2, c2) = (i, c);
        }
    }
    (b1 as u8, b2 as u8)
}

/// Shrinks `v` (estimated from `n` samples) towards `prior` with the weight of `k` pseudo-samples.
#[inline]
fn shrink(v: f32, n: f32, prior: f32, k: f32) -> f32 {
    (v * n + prior * k) / (n + k)
}

/// Rolling 24-hour activity bitmap: bit `h % 24` is set when absolute hour `h` had activity in the last day.
#[inline]
fn touch_hours(bits: &mut u32, last_hour: &mut u32, hour: u32) {
    if hour > *last_hour {
        let gap = hour - *last_hour;
        if gap >= 24 {
            *bits = 0;
        } else {
            for h in (*last_hour + 1)..hour {
                *bits &= !(1 << (h % 24));
            }
            *bits &= !(1 << (hour % 24));
        }
        *last_hour = hour;
    }
    *bits |= 1 << (hour % 24);
}

fn duty(bits: u32, last_hour: u32, now_hour: u32) -> f32 {
    let mut b = bits;
    if now_hour > last_hour {
        let k = now_hour - last_hour;
        if k >= 24 {
            return 0.0;
        }
        for j in 1..=k {
            b &= !(1 << ((last_hour + j) % 24));
        }
    }
    b.count_ones() as f32 / 24.0
}

/// Per-source state: 152 bytes, fixed (168 with its key in the table's slot).
#[derive(Clone, Debug, Default)]
#[repr(C)]
pub(crate) struct SourceState {
    pub fp: u64,
    pub last_ns: u64,
    pub last_req_ns: u64,
    pub req_fast: f32,
    pub req_slow: f32,
    pub bytes_slow: f32,
    pub ia_m1: f32,
    pub ia_m2: f32,
    pub coact: f32,
    pub score: f32,
    pub first_s: u32,
    pub last_slot: u32,
    pub last_hour: u32,
    pub hours: u32,
    pub nreq: u32,
    pub ia_n: u16,
    pub coact_n: u16,
    pub open: u16,
    /// Sum of `hist` (kept so that template matching is O(1) per request).
    pub hist_n: u16,
    /// Inter-arrival gaps counted (all lengths), those inside a burst (< `DENSE_GAP_S`) and the idle ones
    /// (≥ `IDLE_GAP_S`); halved together when `gaps_n` saturates.
    pub gaps_n: u16,
    pub dense_n: u16,
    pub idle_n: u16,
    /// Seconds spent in idle gaps (≥ `IDLE_GAP_S`, including session breaks).
    pub idle_s: f32,
    pub flags: u8,
    pub policy: PolicyState,
    pub hist: [u8; SIZE_BUCKETS],
}

pub(crate) const WATCHED: u8 = 1;

impl Aged for SourceState {
    fn last_ns(&self) -> u64 {
        self.last_ns
    }
    fn pinned(&self, now_ns: u64) -> bool {
        self.policy.active(now_ns)
    }
}

/// What a source's features need from its groups (read at event time; group scores are refreshed every tick).
#[derive(Clone, Copy, Debug, Default)]
pub(crate) struct GroupView {
    pub score: f32,
    pub top: (u8, u8),
    pub sources: f32,
}

impl SourceState {
    pub(crate) fn new(now_ns: u64, fp: u64) -> Self {
        SourceState {
            fp,
            last_ns: now_ns,
            first_s: (now_ns / 1_000_000_000) as u32,
            last_slot: u32::MAX,
            ..Default::default()
        }
    }

    /// Brings the decayed counters to `now_ns`.
    #[inline]
    pub(crate) fn advance(&mut self, now_ns: u64) {
        if now_ns > self.last_ns {
            let dt = (now_ns - self.last_ns) as f32 * 1e-9;
            self.req_fast *= decay(dt, FAST_TAU_S);
            let ds = decay(dt, SLOW_TAU_S);
            self.req_slow *= ds;
            self.bytes_slow *= ds;
            self.last_ns = now_ns;
        }
    }

    /// Records one request; returns whether this is the source's first activity in the current slot, and in
    /// the current distinct-counting epoch.
    #[inline]
    pub(crate) fn request(&mut self, now_ns: u64, bytes: u32, hour: u32) -> (bool, bool) {
        self.advance(now_ns);
        self.req_fast += 1.0;
        self.req_slow += 1.0;
        self.bytes_slow += bytes as f32;
        self.nreq = self.nreq.saturating_add(1);
        let b = size_bucket(bytes);
        if self.hist[b] == u8::MAX {
            self.hist_n = 0;
            for c in &mut self.hist {
                *c /= 2;
                self.hist_n += *c as u16;
            }
        }
        self.hist[b] += 1;
        self.hist_n += 1;
        if self.last_req_ns != 0 && now_ns > self.last_req_ns {
            let gap = (now_ns - self.last_req_ns) as f32 * 1e-9;
            if self.gaps_n == u16::MAX {
                self.gaps_n /= 2;
                self.dense_n /= 2;
                self.idle_n /= 2;
            }
            self.gaps_n += 1;
            if gap < DENSE_GAP_S {
                self.dense_n += 1;
            } else if gap >= IDLE_GAP_S {
                self.idle_n = self.idle_n.saturating_add(1);
                self.idle_s += gap;
            }
            if gap < MAX_GAP_S {
                self.ia_n = self.ia_n.saturating_add(1);
                let a = (1.0 / self.ia_n as f32).max(1.0 / 32.0);
                self.ia_m1 += a * (gap - self.ia_m1);
                self.ia_m2 += a * (gap * gap - self.ia_m2);
            }
        }
        self.last_req_ns = now_ns;
        touch_hours(&mut self.hours, &mut self.last_hour, hour);
        let slot = (now_ns / SLOT_NS) as u32;
        let first = self.last_slot != slot;
        let first_epoch = self.last_slot == u32::MAX || self.last_slot / EPOCH_SLOTS != slot / EPOCH_SLOTS;
        self.last_slot = slot;
        (first, first_epoch)
    }

    #[inline]
    pub(crate) fn coact_sample(&mut self, sample: f32) {
        self.coact_n = self.coact_n.saturating_add(1);
        let a = (1.0 / self.coact_n as f32).max(1.0 / 8.0);
        self.coact += a * (sample - self.coact);
    }

    pub(crate) fn regularity(&self) -> f32 {
        if self.ia_n < 2 || self.ia_m1 <= 0.0 {
            return 0.5;
        }
        let var = (self.ia_m2 - self.ia_m1 * self.ia_m1).max(0.0);
        let cv = var.sqrt() / self.ia_m1;
        let r = 1.0 - cv.min(2.0) / 2.0;
        shrink(r, self.ia_n as f32, 0.5, 3.0)
    }

    /// Likeness to its fingerprint cluster: matching the cluster's templated sizes or firing in its bursts.
    pub(crate) fn likeness(&self, fp: &GroupView) -> f32 {
        let tm = self.template_match(fp);
        let co = (self.coact_shrunk() / 2.0).clamp(0.0, 1.0);
        tm.max(co)
    }

    /// How much the source looks like a scheduled job (a CI runner, a cron batch): persistent (seen for ≥ 2 min),
    /// back after at least one idle gap, most of its lifetime idle (share of time in gaps ≥ 60 s: 0 at
    /// ≤ 50 %, 1 from 75 %) and its requests packed in dense bursts (share of gaps < 5 s: 0 at ≤ 60 %, 1 from
    /// 90 %). Such sources fire together with the others of their schedule by design; a hydra moves together
    /// continuously (no idle majority) and a slow campaign's gaps are not dense. 0 to 1.
    pub(crate) fn scheduled_bursts(&self, age_s: f32) -> f32 {
        if age_s < SCHEDULED_MIN_AGE_S || self.idle_n < 1 || self.gaps_n < 8 {
            return 0.0;
        }
        let idle = (self.idle_s / age_s).min(1.0);
        let dense = self.dense_n as f32 / self.gaps_n as f32;
        let a = ((idle - 0.5) / 0.25).clamp(0.0, 1.0);
        let b = ((dense - 0.6) / 0.3).clamp(0.0, 1.0);
        a * b
    }

    fn coact_shrunk(&self) -> f32 {
        let n = self.coact_n as f32;
        self.coact * n / (n + 2.0)
    }

    fn template_match(&self, fp: &GroupView) -> f32 {
        if fp.sources < 3.0 {
            return 0.0;
        }
        let n = self.hist_n as u32;
        if n == 0 {
            return 0.0;
        }
        let (a, b) = fp.top;
        let m = self.hist[a as usize] as u32 + if a != b { self.hist[b as usize] as u32 } else { 0 };
        // Shrunk towards the share a source with diverse sizes has in any two buckets by chance, with the weight
        // of 3 requests: two requests that both happen to land in the template are no evidence.
        shrink(m as f32 / n as f32, n as f32, TEMPLATE_PRIOR, 3.0)
    }

    /// The feature vector at `now_ns` (does not modify the state).
    pub(crate) fn features(&self, now_ns: u64, now_hour: u32, fp: &GroupView, px: &GroupView) -> [f32; NS] {
        let dt = now_ns.saturating_sub(self.last_ns) as f32 * 1e-9;
        let age = now_ns as f32 * 1e-9 - self.first_s as f32;
        let req_fast = self.req_fast * decay(dt, FAST_TAU_S);
        let bytes_slow = self.bytes_slow * decay(dt, SLOW_TAU_S);
        let req_slow = self.req_slow * decay(dt, SLOW_TAU_S);
        let (top, ent, n) = hist_stats_u8(&self.hist);
        let sched = self.scheduled_bursts(age);
        // A scheduled burster's synchrony is its schedule, not coordination: it inherits from its clusters and
        // counts its coactivity only in proportion to 1 − scheduled_bursts (it is judged on its own traffic).
        let keep = 1.0 - sched;
        let like = self.likeness(fp) * keep;
        let r = rate(req_fast, FAST_TAU_S, age).ln_1p();
        let rep = shrink(top, n, 0.3, 4.0);
        let reg = self.regularity();
        let sustained = rate(req_slow, SLOW_TAU_S, age.max(SUSTAIN_MIN_S)).ln_1p();
        [
            r,
            (rate(bytes_slow, SLOW_TAU_S, age) / 1000.0).ln_1p(),
            (self.open as f32).ln_1p(),
            rep,
            shrink(ent, n, 0.6, 4.0),
            reg,
            duty(self.hours, self.last_hour, now_hour),
            self.coact_shrunk().max(0.0) * keep,
            self.template_match(fp),
            fp.score * like,
            px.score * like,
            r * rep,
            sustained,
            sustained * rep * ((reg - 0.5) * 2.0).clamp(0.0, 1.0),
            sched,
        ]
    }
}

/// Per-group state (one fingerprint cluster or one prefix).
#[derive(Clone, Debug, Default)]
pub(crate) struct GroupState {
    pub last_ns: u64,
    pub req_fast: f32,
    pub req_slow: f32,
    pub slot_m1: f32,
    pub slot_m2: f32,
    pub member_reg: f32,
    pub member_coact: f32,
    /// Time-decayed (10 s) sums of the per-request likeness and of the requests: the cluster's purity.
    pub like_num: f32,
    pub like_den: f32,
    pub pre_release: f32,
    pub score: f32,
    pub first_s: u32,
    pub slot: u32,
    pub slots_seen: u32,
    pub epoch: u32,
    pub epoch_count: u32,
    pub prev_epoch_count: u32,
    pub post_release: u32,
    pub last_hour: u32,
    pub hours: u32,
    pub slot_count: u16,
    pub hist_n: u16,
    pub top: (u8, u8),
    pub policy: PolicyState,
    pub hist: [u16; SIZE_BUCKETS],
}

impl Aged for GroupState {
    fn last_ns(&self) -> u64 {
        self.last_ns
    }
    fn pinned(&self, now_ns: u64) -> bool {
        self.policy.active(now_ns)
    }
}

impl GroupState {
    pub(crate) fn new(now_ns: u64) -> Self {
        GroupState {
            last_ns: now_ns,
            first_s: (now_ns / 1_000_000_000) as u32,
            slot: (now_ns / SLOT_NS) as u32,
            epoch: (now_ns / SLOT_NS) as u32 / EPOCH_SLOTS,
            ..Default::default()
        }
    }

    /// What members read. A group passes its score on in proportion to its mass: nothing below `min_sources`
    /// active sources (a handful of synchronised CI runners is not a hydra; each is judged on its own), all of
    /// it from 4 × `min_sources` on (log-scale smoothstep in between).
    pub(crate) fn view(&self, min_sources: f32) -> GroupView {
        let sources = self.active_sources();
        let lo = min_sources.ln_1p();
        let hi = (4.0 * min_sources).ln_1p();
        let t = ((sources.ln_1p() - lo) / (hi - lo).max(1e-3)).clamp(0.0, 1.0);
        let mass = t * t * (3.0 - 2.0 * t);
        GroupView {
            score: self.score * mass,
            top: self.top,
            sources,
        }
    }

    pub(crate) fn active_sources(&self) -> f32 {
        self.epoch_count.max(self.prev_epoch_count) as f32
    }

    fn advance(&mut self, now_ns: u64) {
        if now_ns > self.last_ns {
            let dt = (now_ns - self.last_ns) as f32 * 1e-9;
            let df = decay(dt, FAST_TAU_S);
            self.req_fast *= df;
            self.like_num *= df;
            self.like_den *= df;
            self.req_slow *= decay(dt, SLOW_TAU_S);
            self.last_ns = now_ns;
        }
        self.roll(now_ns);
    }

    /// Closes finished slots and epochs up to `now_ns`.
    fn roll(&mut self, now_ns: u64) {
        let slot = (now_ns / SLOT_NS) as u32;
        if slot > self.slot {
            self.slots_seen = self.slots_seen.saturating_add(1);
            let a = (1.0 / self.slots_seen as f32).max(SLOT_ALPHA);
            let n = self.slot_count as f32;
            self.slot_m1 += a * (n - self.slot_m1);
            self.slot_m2 += a * (n * n - self.slot_m2);
            let gap = slot - self.slot - 1;
            if gap > 0 {
                let f = (1.0 - SLOT_ALPHA).powi(gap.min(100_000) as i32);
                self.slot_m1 *= f;
                self.slot_m2 *= f;
                self.slots_seen = self.slots_seen.saturating_add(gap);
            }
            self.slot = slot;
            self.slot_count = 0;
        }
        let epoch = slot / EPOCH_SLOTS;
        if epoch > self.epoch {
            self.prev_epoch_count = if epoch == self.epoch + 1 {
                self.epoch_count
            } else {
                0
            };
            self.epoch_count = 0;
            self.epoch = epoch;
        }
    }

    /// Records a member's request. `first_in_slot`: the member's first activity in this slot; `first_in_epoch`:
    /// its first in this epoch. Returns the number of other members already active in this slot.
    #[inline]
    pub(crate) fn request(
        &mut self,
        now_ns: u64,
        bytes: u32,
        hour: u32,
        first_in_slot: bool,
        first_in_epoch: bool,
        after_release: bool,
    ) -> u16 {
        self.advance(now_ns);
        self.req_fast += 1.0;
        self.req_slow += 1.0;
        if after_release {
            self.post_release = self.post_release.saturating_add(1);
        }
        // The histogram covers the last ~2,000-4,000 requests: halved when it reaches 4,096.
        let b = size_bucket(bytes);
        self.hist[b] += 1;
        self.hist_n += 1;
        if self.hist_n >= 4096 {
            self.hist_n = 0;
            for c in &mut self.hist {
                *c /= 2;
                self.hist_n += *c;
            }
        }
        touch_hours(&mut self.hours, &mut self.last_hour, hour);
        let others = self.slot_count;
        if first_in_slot {
            self.slot_count = self.slot_count.saturating_add(1);
        }
        if first_in_epoch {
            self.epoch_count += 1;
        }
        others
    }

    /// Expected number of other members active in a slot when a member arrives (independent members spread
    /// uniformly in the slot see half the slot's mean).
    pub(crate) fn expected_others(&self) -> f32 {
        0.5 * self.slot_m1
    }

    /// Coactivity samples need a baseline: none in a group's first few slots (at model start every group would
    /// otherwise look like hundreds of sources arriving together).
    #[inline]
    pub(crate) fn coact_ready(&self) -> bool {
        self.slots_seen >= 4
    }

    #[inline]
    pub(crate) fn member_sample(&mut self, regularity: f32, coact: f32) {
        const A: f32 = 1.0 / 64.0;
        self.member_reg += A * (regularity - self.member_reg);
        self.member_coact += A * (coact - self.member_coact);
    }

    /// How much one request looks like the cluster, judged on the request alone: its size in a bucket holding
    /// ≥ 20 % of the cluster's requests (templated traffic; diverse sizes rarely reach 10 %), or it arrived in a
    /// slot already far busier than the cluster's usual one (`sample`: ln((others + 1) / (expected + 1)),
    /// without a baseline for a brand-new cluster, whose first round is then judged pure).
    #[inline]
    pub(crate) fn purity_sample(&mut self, bucket: usize, sample: f32) {
        let share = self.hist[bucket] as f32 / self.hist_n.max(1) as f32;
        let tm = ((share - 0.08) / 0.12).clamp(0.0, 1.0);
        let co = (sample / 2.0).clamp(0.0, 1.0);
        self.like_num += tm.max(co);
        self.like_den += 1.0;
    }

    /// Share of the last ~10 s of the cluster's requests that looked like the cluster.
    pub(crate) fn purity(&self) -> f32 {
        if self.like_den <= 0.0 {
            return 0.0;
        }
        self.like_num / self.like_den
    }

    /// Refreshes the cached top size buckets (called every tick).
    pub(crate) fn refresh(&mut self, now_ns: u64) {
        self.roll(now_ns);
        self.top = top_two(&self.hist);
    }

    pub(crate) fn dispersion(&self) -> f32 {
        if self.slot_m1 <= 1e-3 {
            return 1.0;
        }
        (self.slot_m2 - self.slot_m1 * self.slot_m1).max(0.0) / self.slot_m1
    }

    /// The feature vector at `now_ns`. `warm_end_s`: groups first seen before this are not novel;
    /// `release`: (release time, seconds since it) when within the release window.
    pub(crate) fn features(
        &self,
        now_ns: u64,
        now_hour: u32,
        warm_end_s: u32,
        release: Option<(u32, f32)>,
    ) -> [f32; NG] {
        let dt = now_ns.saturating_sub(self.last_ns) as f32 * 1e-9;
        let now_s = now_ns as f32 * 1e-9;
        let age = now_s - self.first_s as f32;
        let req_fast = self.req_fast * decay(dt, FAST_TAU_S);
        let src = self.active_sources();
        let (top, ent, n) = hist_stats(&self.hist);
        let novelty = if self.first_s > warm_end_s {
            (-age.max(0.0) / 3600.0).exp()
        } else {
            0.0
        };
        let growth = match release {
            Some((_, since)) => {
                let post = self.post_release as f32 / since.max(60.0);
                ((post + 0.05) / (self.pre_release + 0.05)).ln().clamp(0.0, 5.0)
            }
            None => 0.0,
        };
        let r = rate(req_fast, FAST_TAU_S, age);
        [
            src.ln_1p(),
            self.dispersion().max(1.0).ln(),
            shrink(top, n, 0.3, 8.0),
            shrink(ent, n, 0.6, 8.0),
            if src >= 2.0 { self.member_reg } else { 0.5 },
            (r / src.max(1.0)).ln_1p(),
            novelty,
            growth,
            duty(self.hours, self.last_hour, now_hour),
            // Only the positive side is evidence (members firing together); a negative mean (members avoiding
            // each other's slots, as uniformly random traffic does) is not a signal a linear model should use.
            self.member_coact.max(0.0),
            src.ln_1p() * shrink(top, n, 0.3, 8.0),
        ]
    }

    /// The slow request rate (requests/s), for the pre-release baseline.
    pub(crate) fn slow_rate(&self, now_ns: u64) -> f32 {
        let dt = now_ns.saturating_sub(self.last_ns) as f32 * 1e-9;
        let age = now_ns as f32 * 1e-9 - self.first_s as f32;
        rate(self.req_slow * decay(dt, SLOW_TAU_S), SLOW_TAU_S, age)
    }
}

#[cfg(test)]
pub(crate) fn hist_stats_for_test(h: &[u8; SIZE_BUCKETS]) -> (f32, f32, f32) {
    let fast = hist_stats_u8(h);
    let slow = hist_stats(h);
    assert!((fast.0 - slow.0).abs() < 1e-5 && (fast.1 - slow.1).abs() < 1e-4 && fast.2 == slow.2);
    fast
}
