//! aqd — adversarial query detection on the load balancer.
//!
//! Data flows one way:
//! ```text
//! packets → kernel (detector-ebpf) → events → features → model → decisions → kernel maps
//! ```
//! - [`loader`]: loads the embedded XDP program and pins its maps;
//! - [`attach`]: attaches it to interfaces (netlink), replacing atomically on restart;
//! - [`maps`]: typed access to the kernel maps (the only user of `aya::maps` besides the event reader);
//! - [`events`]: decodes ring-buffer records;
//! - [`daemon`]: `aqd run`;
//! - [`serve`]: the accept loop, connection caps and deadlines the control socket and metrics share;
//! - [`fleet`]: decisions shared across load-balancer hosts through Redis (not wired to the daemon yet);
//! - [`store`]: durable state under `/var/lib/aqd` (decisions, list edits, fingerprint verdicts, strikes);
//! - [`paths`], [`clock`]: names and time shared by all of the above.

pub mod aging;
pub mod attach;
mod bpf_sys;
pub mod clock;
pub mod config;
pub mod control;
pub mod daemon;
pub mod enforce;
pub mod events;
pub mod fingerprint;
pub mod fleet;
pub mod listfile;
pub mod loader;
pub mod lockout;
pub mod maps;
pub mod metrics;
pub mod model;
pub mod model_stage;
pub mod observe;
pub mod paths;
pub mod serve;
pub mod store;
