//! Every path and name aqd uses, defined once.
//!
//! bpffs layout (versioned, so a daemon with a different map layout never reuses these pins):
//! ```text
//! /sys/fs/bpf/aqd/v<LAYOUT_VERSION>/
//!     <MAP_NAME>               one pin per map (detector_common::map_names)
//! ```
//!
//! State directory (durable: survives reboots and layout changes; see `store`):
//! ```text
//! /var/lib/aqd/
//!     state.json, journal.jsonl   the state store (decisions, list edits, fingerprint verdicts, strikes)
//!     aqd.lock                    the single-instance lock of `aqd run` (holds its PID)
//! ```

use std::path::{Path, PathBuf};

use detector_common::LAYOUT_VERSION;

/// Where bpffs is normally mounted.
pub const BPFFS_DEFAULT_MOUNT: &str = "/sys/fs/bpf";
/// aqd's directory under the bpffs mount; the versioned directory goes below it.
pub const DEFAULT_PIN_ROOT: &str = "/sys/fs/bpf/aqd";

/// The control socket of the daemon (root-only unless a group is configured).
pub const DEFAULT_SOCKET: &str = "/run/aqd/aqd.sock";
/// Append-only JSON-lines log of every decision change.
pub const DEFAULT_AUDIT_LOG: &str = "/var/log/aqd/audit.jsonl";

/// The durable state directory (systemd's `StateDirectory=aqd`).
pub const DEFAULT_STATE_DIR: &str = "/var/lib/aqd";

/// FNV-1a of a path: a short stable name for an instance derived from its pin root.
fn path_hash(path: &Path) -> u64 {
    path.as_os_str()
        .as_encoded_bytes()
        .iter()
        .fold(0xcbf2_9ce4_8422_2325u64, |h, b| {
            (h ^ *b as u64).wrapping_mul(0x0100_0000_01b3)
        })
}

/// The state directory of the instance that uses `pin_root`: the default one for the default pin root, and a
/// directory below it named after the pin root otherwise (like [`socket_for_pin_root`]), so instances never
/// share their state or their lock.
pub fn state_dir_for_pin_root(pin_root: &Path) -> PathBuf {
    if pin_root == Path::new(DEFAULT_PIN_ROOT) {
        return PathBuf::from(DEFAULT_STATE_DIR);
    }
    Path::new(DEFAULT_STATE_DIR).join(format!("aqd-{:016x}", path_hash(pin_root)))
}

/// The single-instance lock file in a state directory.
pub fn lock_file(state_dir: &Path) -> PathBuf {
    state_dir.join("aqd.lock")
}

/// The control socket of the daemon that uses `pin_root`: the default socket for the default pin root, and a
/// socket named after the pin root otherwise, so several aqd instances (labs, tests) never share one.
pub fn socket_for_pin_root(pin_root: &Path) -> PathBuf {
    if pin_root == Path::new(DEFAULT_PIN_ROOT) {
        return PathBuf::from(DEFAULT_SOCKET);
    }
    // sun_path is limited to 108 bytes, so the path itself cannot be used.
    PathBuf::from(format!("/run/aqd/aqd-{:016x}.sock", path_hash(pin_root)))
}

/// Where the daemon remembers which list entries came from the config file: beside its control socket (in /run,
/// so it lives as long as the pinned maps: both are gone after a reboot). `aqd detach` removes it.
pub fn config_entries_for_socket(socket: &Path) -> PathBuf {
    socket.with_extension("config-entries.json")
}

/// Where daemons before the state store kept their verdicts by fingerprint (now in the store); `aqd detach`
/// still removes a file left there.
pub fn fp_verdicts_for_socket(socket: &Path) -> PathBuf {
    socket.with_extension("fp-verdicts.json")
}

/// The versioned pin directory under a pin root (`<root>/v<N>`).
pub fn versioned_pin_dir(root: &Path) -> PathBuf {
    root.join(format!("v{LAYOUT_VERSION}"))
}

/// Pin path of one map.
pub fn map_pin(pin_dir: &Path, map_name: &str) -> PathBuf {
    pin_dir.join(map_name)
}
