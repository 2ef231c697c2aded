//! The control plane's socket: a versioned JSON-lines protocol over a Unix socket.
//!
//! - [`proto`]: typed requests, envelopes, error kinds and the pure `decode_request`.
//! - [`views`]: the typed answers (status, list, fingerprints, explain, …) the CLI prints and the tests read.
//! - [`handler`]: the one request → enforcer mapping, used by the daemon and by the CLI when the daemon is down.
//! - [`server`]: bind, accept, deadlines, panic-safe dispatch; [`client`]: one request, one typed answer.

pub mod client;
pub mod handler;
pub mod proto;
pub mod server;
pub mod views;

pub use client::{ClientError, call};
pub use proto::{
    ControlError, ErrorKind, ExplainTarget, ImportInto, ListWhat, MAX_REQUEST_BYTES, PROTOCOL_VERSION,
    Request, decode_request, encode_request,
};
pub use server::{Handler, bind, serve_listener};
pub use views::Response;
