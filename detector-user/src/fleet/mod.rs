//! The fleet: every load-balancer host acts on the decisions all of them make, through Redis (issue 12).
//!
//! **What.** A decision made on one host (operator, model, fingerprint stage, list edit, fleet-level) is
//! published as a typed [`wire::Record`] and reaches every other host within a second, with its absolute
//! wall-clock expiry; an operator unblock removes it everywhere and no stale replay can bring it back. Each host
//! keeps the fleet's view as [`merge::KeyState`]s (pure merge rules, commutative) and converts expiries to its
//! own clock with [`clock`]. [`engine`] is the tokio client: Redis Functions for atomic writes, a stream reader,
//! snapshots, a bounded outbox while Redis is away, epochs to notice an emptied Redis.
//!
//! **Why Redis.** Debian ships `redis-server` 7.0 (Valkey 8 is wire-compatible); it has what the fleet needs in
//! one engine: a resumable log with per-reader cursors (streams, `XREAD BLOCK`), absolute expiry
//! (`PEXPIREAT`), atomic server-side merges (Functions), and later HyperLogLog for shared aggregates. See
//! `../shared/research/fleet.md` for the alternatives weighed (NATS 2.9 lacks per-key TTL, etcd is for metadata).
//!
//! **Key layout** (all names in [`engine::keys`]):
//! ```text
//! dec:<sc>:<k>   HASH  field = origin (op|model|fp|list|fleet) -> p|act|rc|pps|exp|ts|host  or  d|ts|host
//!                      field = unblock -> u|ts|hold|host          PEXPIREAT = the latest time it matters
//! dec:exp        ZSET  member <sc>:<k>, score = that same time (+inf = permanent): snapshot scan, sweep
//! dec:log        STREAM MAXLEN ~N, one entry per accepted write: v sc k org h ts op [act rc pps exp | hold]
//! fleet:epoch    STRING random, SET NX by the first host after Redis starts empty: a change = full resync
//! ```
//! `sc` is `ip`, `p24`, `p64`, `syn` or `hello`. Writes go only through `FCALL aqd_put` / `aqd_del`.
//!
//! **Status:** the daemon is not wired to this module yet (next step); it is tested against a real
//! `redis-server` in `tests/tests/fleet_redis.rs`.

pub mod clock;
pub mod engine;
pub mod merge;
pub mod wire;
