//! Every path and name aqd uses, defined once.
//!
//! bpffs layout (versioned, so a daemon with a different map layout never reuses these pins):
//! ```text
//! /sys/fs/bpf/aqd/v<LAYOUT_VERSION>/
//!     <MAP_NAME>               one pin per map (detector_common::map_names)
//! ```

use std::path::{Path, PathBuf};

use detector_common::LAYOUT_VERSION;

/// Where bpffs is normally mounted.
pub const BPFFS_DEFAULT_MOUNT: &str = "/sys/fs/bpf";
/// aqd's directory under the bpffs mount; the versioned directory goes below it.
pub const DEFAULT_PIN_ROOT: &str = "/sys/fs/bpf/aqd";

/// The versioned pin directory under a pin root (`<root>/v<N>`).
pub fn versioned_pin_dir(root: &Path) -> PathBuf {
    root.join(format!("v{LAYOUT_VERSION}"))
}

/// Pin path of one map.
pub fn map_pin(pin_dir: &Path, map_name: &str) -> PathBuf {
    pin_dir.join(map_name)
}
