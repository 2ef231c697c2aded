//! Loads the embedded XDP program and reuses or creates its pinned maps.
//!
//! Restarts and upgrades leave no gap: maps are pinned in bpffs and the XDP attachment belongs to the
//! interface (see [`crate::attach`]), so the kernel keeps enforcing while no daemon runs. A new daemon loads its
//! program against the *same* pinned maps and swaps it in atomically.

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
    let mut loader = EbpfLoader::new();
    let test_clock: u8 = options.test_clock.into();
    loader.override_global(TEST_CLOCK_GLOBAL, &test_clock, true);
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
