//! Loads the embedded XDP program and reuses or creates its pinned maps.
//!
//! Restarts and upgrades leave no gap: maps are pinned in bpffs and the XDP attachment belongs to the
//! interface (see [`crate::attach`]), so the kernel keeps enforcing while no daemon runs. A new daemon loads its
//! program against the *same* pinned maps and swaps it in atomically.
//!
//! # Minimum kernel: 5.18
//!
//! [`load`] first checks the running kernel's release ([`check_kernel`]) against [`KERNEL_FEATURES`], the
//! kernel features the programs use and the release that introduced each; the newest is `bpf_xdp_load_bytes`
//! (5.18), which `aqd_tcp` and `aqd_hello` use to read TCP options and the ClientHello. An older kernel is
//! refused with the missing features named, instead of a verifier log about an unknown helper.
//! Distribution kernels that backport these features (RHEL 9's 5.14, for example) can skip the check with
//! `AQD_SKIP_KERNEL_CHECK=1`; the verifier still has the last word. `cargo xtask kernels` runs the kernel
//! tests on Debian's 6.1 and 6.12 kernels and the running one.

use std::{
    ffi::CString,
    fs, io,
    path::{Path, PathBuf},
};

use aya::{
    Ebpf, EbpfLoader,
    maps::{MapInfo, ProgramArray},
    programs::{SchedClassifier, Xdp},
};
use detector_common::{
    EGRESS_PROGRAM_NAME, HELLO_PROGRAM_NAME, PROG_INDEX_HELLO, PROG_INDEX_TCP, PROGRAM_NAME,
    TCP_PROGRAM_NAME, TEST_CLOCK_GLOBAL, map_names,
};
use thiserror::Error;

use crate::paths;

/// The XDP program object, built by build.rs.
pub static PROGRAM_OBJECT: &[u8] = aya::include_bytes_aligned!(concat!(env!("OUT_DIR"), "/detector-ebpf"));

const BPF_FS_MAGIC: i64 = 0xcafe4a11;

#[derive(Debug, Error)]
pub enum LoadError {
    #[error("bpffs is not mounted at {path} and mounting it failed: {source}")]
    MountBpffs {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    #[error("cannot create pin directory {path}: {source}")]
    PinDir {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    #[error("cannot parse the embedded XDP program object: {0}")]
    Object(#[from] aya_obj::ParseError),
    #[error(
        "pinned map {path} has a different layout than this aqd expects ({found}, expected {expected}); it was \
         made by another aqd build with the same layout version. Stop the other daemon and run `aqd detach` \
         to remove the old state, or pass a different --pin-root"
    )]
    LayoutMismatch {
        path: PathBuf,
        found: String,
        expected: String,
    },
    #[error("cannot read pinned map {path}: {source}")]
    PinnedMap {
        path: PathBuf,
        #[source]
        source: aya::maps::MapError,
    },
    #[error("loading the XDP program failed: {0}")]
    Ebpf(#[from] aya::EbpfError),
    #[error("the XDP program {0} is missing from the object")]
    MissingProgram(&'static str),
    #[error("cannot duplicate a program's file descriptor: {0}")]
    ProgramFd(io::Error),
    #[error("cannot fill the tail-call table: {0}")]
    TailCalls(#[from] aya::maps::MapError),
    #[error("XDP program error: {0}")]
    Program(#[from] aya::programs::ProgramError),
    #[error(
        "kernel {release} is older than {MIN_KERNEL}: aqd needs {missing} \
         (set AQD_SKIP_KERNEL_CHECK=1 if your distribution backported them)"
    )]
    KernelTooOld { release: String, missing: String },
}

/// A kernel release as `major.minor` (the patch level does not add BPF features).
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub struct KernelVersion {
    pub major: u32,
    pub minor: u32,
}

impl KernelVersion {
    pub const fn new(major: u32, minor: u32) -> Self {
        Self { major, minor }
    }

    /// Parses the start of a release string as `uname -r` prints it: `6.1.0-57-amd64`, `5.18.0`,
    /// `6.18.44-fc-v857`, `5.14.0-427.el9.x86_64`. `None` when it does not start with `MAJOR.MINOR`.
    pub fn parse(release: &str) -> Option<Self> {
        let mut parts = release.trim().split(['.', '-', '+', '_']);
        let major = parts.next()?.parse().ok()?;
        let minor = parts.next()?.parse().ok()?;
        Some(Self { major, minor })
    }
}

impl std::fmt::Display for KernelVersion {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}.{}", self.major, self.minor)
    }
}

/// The kernel features the programs use, with the release that introduced each (upstream; checked against
/// the helpers' introducing commits and docs.ebpf.io), newest first. A TC program would add clsact (4.5).
pub const KERNEL_FEATURES: &[(KernelVersion, &str)] = &[
    (KernelVersion::new(5, 18), "bpf_xdp_load_bytes (5.18)"),
    (KernelVersion::new(5, 11), "bpf_ktime_get_coarse_ns (5.11)"),
    (KernelVersion::new(5, 8), "the BPF ring buffer (5.8)"),
    (KernelVersion::new(5, 3), "bounded loops (5.3)"),
    (KernelVersion::new(5, 2), "read-only global data (5.2)"),
    (KernelVersion::new(4, 11), "LPM trie maps (4.11)"),
    (KernelVersion::new(4, 10), "LRU hash maps (4.10)"),
    (KernelVersion::new(4, 8), "XDP (4.8)"),
];

/// The oldest kernel aqd loads on: the newest of [`KERNEL_FEATURES`].
pub const MIN_KERNEL: KernelVersion = KERNEL_FEATURES[0].0;

/// The features of [`KERNEL_FEATURES`] that kernel `version` lacks, newest first.
pub fn missing_features(version: KernelVersion) -> Vec<&'static str> {
    KERNEL_FEATURES
        .iter()
        .filter(|(since, _)| version < *since)
        .map(|(_, what)| *what)
        .collect()
}

/// Refuses a kernel older than [`MIN_KERNEL`], by its release (`/proc/sys/kernel/osrelease`, what `uname -r`
/// prints). An unreadable or unparseable release is let through: the verifier will say what is missing.
pub fn check_kernel() -> Result<(), LoadError> {
    if std::env::var_os("AQD_SKIP_KERNEL_CHECK").is_some_and(|v| v == "1") {
        return Ok(());
    }
    match fs::read_to_string("/proc/sys/kernel/osrelease") {
        Ok(release) => check_release(release.trim()),
        Err(_) => Ok(()),
    }
}

/// [`check_kernel`] for a given release string.
pub fn check_release(release: &str) -> Result<(), LoadError> {
    let Some(version) = KernelVersion::parse(release) else {
        return Ok(());
    };
    let missing = missing_features(version);
    if missing.is_empty() {
        return Ok(());
    }
    Err(LoadError::KernelTooOld {
        release: release.to_string(),
        missing: missing.join(", "),
    })
}

/// Options for [`load`].
#[derive(Clone, Debug, Default)]
pub struct LoadOptions {
    /// Versioned pin directory: maps are reused from / pinned to it. `None` = private, unpinned maps (tests).
    pub pin_dir: Option<PathBuf>,
    /// Take "now" from `Config::test_now_ns` (tests only).
    pub test_clock: bool,
}

/// Loads the program (not yet attached). With a pin directory, existing pinned maps are checked against the
/// object's layout and reused; missing ones are created and pinned.
pub fn load(options: &LoadOptions) -> Result<Ebpf, LoadError> {
    load_resized(options, &[])
}

/// [`load`] with the capacities of some maps changed, as `(map name, max entries)`. For tests only (a small
/// `SOURCES`, so that a flood fills it in thousands of packets rather than millions); a daemon never resizes,
/// and the pinned-layout check would refuse maps of another size.
pub fn load_resized(options: &LoadOptions, max_entries: &[(&'static str, u32)]) -> Result<Ebpf, LoadError> {
    check_kernel()?;
    let mut loader = EbpfLoader::new();
    let test_clock: u8 = options.test_clock.into();
    loader.override_global(TEST_CLOCK_GLOBAL, &test_clock, true);
    for (name, size) in max_entries {
        loader.map_max_entries(name, *size);
    }
    let pin_paths: Vec<(&str, PathBuf)> = match &options.pin_dir {
        Some(dir) => {
            prepare_pin_dir(dir)?;
            check_pinned_layouts(dir)?;
            map_names::ALL
                .iter()
                .map(|name| (*name, paths::map_pin(dir, name)))
                .collect()
        }
        None => Vec::new(),
    };
    for (name, path) in &pin_paths {
        loader.map_pin_path(name, path.as_path());
    }
    let mut ebpf = loader.load(PROGRAM_OBJECT)?;
    // The tail-called programs first: the table points at them before the entry program can run.
    for (name, index) in [
        (TCP_PROGRAM_NAME, PROG_INDEX_TCP),
        (HELLO_PROGRAM_NAME, PROG_INDEX_HELLO),
    ] {
        named_program_mut(&mut ebpf, name)?.load()?;
        let fd = named_program_mut(&mut ebpf, name)?
            .fd()?
            .try_clone()
            .map_err(LoadError::ProgramFd)?;
        let table = ebpf
            .map_mut(map_names::PROGRAMS)
            .ok_or(LoadError::MissingProgram(map_names::PROGRAMS))?;
        // A pinned table keeps its entries while no daemon runs; a new daemon swaps in its own programs.
        ProgramArray::try_from(table)?.set(index, &fd, 0)?;
    }
    egress_program_mut(&mut ebpf)?.load()?;
    program_mut(&mut ebpf)?.load()?;
    Ok(ebpf)
}

/// The TC egress program (server ISNs from SYN-ACKs, for handshake verification) inside a loaded [`Ebpf`].
pub fn egress_program_mut(ebpf: &mut Ebpf) -> Result<&mut SchedClassifier, LoadError> {
    let program = ebpf
        .program_mut(EGRESS_PROGRAM_NAME)
        .ok_or(LoadError::MissingProgram(EGRESS_PROGRAM_NAME))?;
    Ok(program.try_into()?)
}

/// The XDP program inside a loaded [`Ebpf`].
pub fn program_mut(ebpf: &mut Ebpf) -> Result<&mut Xdp, LoadError> {
    named_program_mut(ebpf, PROGRAM_NAME)
}

/// A program of the object by name.
pub fn named_program_mut<'a>(ebpf: &'a mut Ebpf, name: &'static str) -> Result<&'a mut Xdp, LoadError> {
    let program = ebpf.program_mut(name).ok_or(LoadError::MissingProgram(name))?;
    Ok(program.try_into()?)
}

/// Mounts bpffs at the default mount point if nothing is mounted there, and creates `pin_dir`.
fn prepare_pin_dir(pin_dir: &Path) -> Result<(), LoadError> {
    let default_mount = Path::new(paths::BPFFS_DEFAULT_MOUNT);
    if pin_dir.starts_with(default_mount) && !is_bpffs(default_mount) {
        mount_bpffs(default_mount).map_err(|source| LoadError::MountBpffs {
            path: default_mount.to_path_buf(),
            source,
        })?;
    }
    fs::create_dir_all(pin_dir).map_err(|source| LoadError::PinDir {
        path: pin_dir.to_path_buf(),
        source,
    })
}

/// Whether `path` is on a bpffs.
pub fn is_bpffs(path: &Path) -> bool {
    let Ok(c_path) = CString::new(path.as_os_str().as_encoded_bytes()) else {
        return false;
    };
    // SAFETY: `st` is a plain C struct the call fills; `c_path` is NUL-terminated.
    let mut st: libc::statfs = unsafe { std::mem::zeroed() };
    let rc = unsafe { libc::statfs(c_path.as_ptr(), &mut st) };
    rc == 0 && st.f_type as i64 == BPF_FS_MAGIC
}

/// Mounts a bpffs at `path` (created if missing).
pub fn mount_bpffs(path: &Path) -> io::Result<()> {
    fs::create_dir_all(path)?;
    let target = CString::new(path.as_os_str().as_encoded_bytes())?;
    let fstype = c"bpf";
    // SAFETY: all pointers are valid NUL-terminated strings; no data argument.
    let rc = unsafe {
        libc::mount(
            fstype.as_ptr(),
            target.as_ptr(),
            fstype.as_ptr(),
            0,
            std::ptr::null(),
        )
    };
    if rc != 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(())
}

/// Refuses pinned maps whose type, key size, value size or capacity differ from the embedded object's.
/// aya reuses a pinned map by name without looking at its layout; this check is what keeps a mismatched pin
/// from being read with the wrong struct.
fn check_pinned_layouts(pin_dir: &Path) -> Result<(), LoadError> {
    let object = aya_obj::Object::parse(PROGRAM_OBJECT)?;
    for (name, map) in &object.maps {
        let path = paths::map_pin(pin_dir, name);
        if !path.exists() {
            continue;
        }
        let info = MapInfo::from_pin(&path).map_err(|source| LoadError::PinnedMap {
            path: path.clone(),
            source,
        })?;
        let found = (info.key_size(), info.value_size(), info.max_entries());
        let expected = (map.key_size(), map.value_size(), map.max_entries());
        let found_type = info.map_type().map(|t| t as u32).unwrap_or(u32::MAX);
        if found != expected || found_type != map.map_type() {
            let describe =
                |t: u32, (k, v, n): (u32, u32, u32)| format!("type {t}, key {k} B, value {v} B, {n} entries");
            return Err(LoadError::LayoutMismatch {
                path,
                found: describe(found_type, found),
                expected: describe(map.map_type(), expected),
            });
        }
    }
    Ok(())
}

/// Removes every pinned map, then the directory. Detach the interfaces first.
pub fn remove_pins(pin_dir: &Path) -> io::Result<()> {
    for name in map_names::ALL {
        match fs::remove_file(paths::map_pin(pin_dir, name)) {
            Ok(()) => {}
            Err(e) if e.kind() == io::ErrorKind::NotFound => {}
            Err(e) => return Err(e),
        }
    }
    match fs::remove_dir(pin_dir) {
        Err(e) if e.kind() != io::ErrorKind::NotFound => return Err(e),
        _ => {}
    }
    // The unversioned pin root too, when nothing else (another layout version) is left in it.
    if let Some(root) = pin_dir.parent() {
        let _ = fs::remove_dir(root);
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn releases_parse_as_major_minor() {
        for (release, expected) in [
            ("6.1.0-57-amd64", (6, 1)),
            ("6.12.117+deb12-amd64", (6, 12)),
            ("6.18.44-fc-v857", (6, 18)),
            ("5.18", (5, 18)),
            ("5.14.0-427.el9.x86_64", (5, 14)),
            ("4.19.0\n", (4, 19)),
        ] {
            assert_eq!(
                KernelVersion::parse(release),
                Some(KernelVersion::new(expected.0, expected.1)),
                "{release}"
            );
        }
        for bad in ["", "6", "six.one", "6.x-1", "-6.1"] {
            assert_eq!(KernelVersion::parse(bad), None, "{bad}");
        }
    }

    #[test]
    fn versions_compare_numerically() {
        // 5.9 < 5.18 < 6.1: minor versions are numbers, not strings.
        assert!(KernelVersion::new(5, 9) < KernelVersion::new(5, 18));
        assert!(KernelVersion::new(5, 18) < KernelVersion::new(6, 1));
        assert_eq!(MIN_KERNEL, KernelVersion::new(5, 18));
    }

    #[test]
    fn old_kernels_are_refused_with_what_is_missing() {
        for ok in [
            "5.18.0",
            "6.1.0-57-amd64",
            "6.12.117+deb12-amd64",
            "7.0",
            "not-a-release",
        ] {
            assert!(check_release(ok).is_ok(), "{ok}");
        }
        let err = check_release("5.10.0-30-amd64").unwrap_err().to_string();
        assert!(
            err.starts_with(
                "kernel 5.10.0-30-amd64 is older than 5.18: aqd needs bpf_xdp_load_bytes (5.18), \
                 bpf_ktime_get_coarse_ns (5.11) (set"
            ),
            "{err}"
        );
        assert_eq!(
            missing_features(KernelVersion::new(5, 17)),
            ["bpf_xdp_load_bytes (5.18)"]
        );
        assert_eq!(
            missing_features(KernelVersion::new(4, 9)).len(),
            KERNEL_FEATURES.len() - 1
        );
    }
}
