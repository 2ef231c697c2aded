//! Helpers shared by the subcommands: the workspace root, running child commands, root checks, building binaries.

use std::{
    env,
    ffi::{OsStr, OsString},
    fmt,
    io::{BufRead as _, BufReader},
    path::{Path, PathBuf},
    process::{Command, Stdio},
};

use anyhow::{Context as _, bail};

/// A child command that ran and exited unsuccessfully; `main` exits with the same code.
#[derive(Debug)]
pub struct CommandFailed {
    pub command: String,
    /// `None` when the child was killed by a signal.
    pub code: Option<i32>,
}

impl fmt::Display for CommandFailed {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self.code {
            Some(code) => write!(f, "`{}` failed with exit code {code}", self.command),
            None => write!(f, "`{}` was killed by a signal", self.command),
        }
    }
}

impl std::error::Error for CommandFailed {}

/// The workspace root (the parent of this crate's directory).
pub fn workspace_root() -> &'static Path {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .expect("xtask lives one level below the workspace root")
}

/// Where `cargo install` puts binaries: `$CARGO_INSTALL_ROOT/bin` or `$CARGO_HOME/bin`, by default
/// `~/.cargo/bin`.
pub fn cargo_bin_dir() -> Option<PathBuf> {
    if let Some(root) = env::var_os("CARGO_INSTALL_ROOT").filter(|r| !r.is_empty()) {
        return Some(PathBuf::from(root).join("bin"));
    }
    match env::var_os("CARGO_HOME") {
        Some(home) if !home.is_empty() => Some(PathBuf::from(home).join("bin")),
        _ => env::var_os("HOME").map(|home| PathBuf::from(home).join(".cargo").join("bin")),
    }
}

/// `PATH` with `dirs` in front (moved there if already on it), for child processes.
pub fn path_with(dirs: &[PathBuf]) -> OsString {
    let current: Vec<PathBuf> = env::var_os("PATH")
        .map(|p| env::split_paths(&p).collect())
        .unwrap_or_default();
    let mut all: Vec<PathBuf> = Vec::new();
    for dir in dirs.iter().chain(&current) {
        if !all.contains(dir) {
            all.push(dir.clone());
        }
    }
    env::join_paths(all).unwrap_or_else(|_| env::var_os("PATH").unwrap_or_default())
}

/// `PATH` for cargo children: also `$CARGO_HOME/bin`, where `bootstrap` installs bpf-linker (aya-build's eBPF
/// build looks for it on `PATH`).
pub fn child_path() -> OsString {
    path_with(&cargo_bin_dir().into_iter().collect::<Vec<_>>())
}

/// The first executable called `name` on `path`.
pub fn find_in_path(name: &str, path: &OsStr) -> Option<PathBuf> {
    env::split_paths(path)
        .map(|dir| dir.join(name))
        .find(|candidate| is_executable(candidate))
}

fn is_executable(path: &Path) -> bool {
    use std::os::unix::fs::PermissionsExt as _;
    path.metadata()
        .map(|m| m.is_file() && m.permissions().mode() & 0o111 != 0)
        .unwrap_or(false)
}

/// Whether this process runs as root (effective uid 0).
pub fn is_root() -> bool {
    // SAFETY: geteuid has no preconditions and cannot fail.
    unsafe { libc::geteuid() == 0 }
}

/// Fails with a message naming `what` when not root.
pub fn require_root(what: &str) -> anyhow::Result<()> {
    if !is_root() {
        bail!(
            "{what} needs root (it loads XDP programs, mounts bpffs and creates network namespaces); \
             run it as root, e.g. `sudo -E env PATH=\"$PATH\" cargo xtask ...`"
        );
    }
    Ok(())
}

/// The cargo that runs this xtask (`$CARGO`), in the workspace root, with [`child_path`].
pub fn cargo() -> Command {
    let mut cmd = Command::new(env::var_os("CARGO").unwrap_or_else(|| "cargo".into()));
    cmd.current_dir(workspace_root()).env("PATH", child_path());
    cmd
}

/// A command line as a user would type it (for headings and error messages).
pub fn display(cmd: &Command) -> String {
    let program = Path::new(cmd.get_program());
    let is_our_cargo = env::var_os("CARGO").is_some_and(|cargo| cargo == program.as_os_str());
    let program = if is_our_cargo || program.starts_with(workspace_root()) || program.is_relative() {
        program.file_name().map(Path::new).unwrap_or(program)
    } else {
        program
    };
    std::iter::once(program.as_os_str())
        .chain(cmd.get_args())
        .map(|a| a.to_string_lossy().into_owned())
        .collect::<Vec<_>>()
        .join(" ")
}

/// Prints a step heading.
pub fn heading(text: &str) {
    println!("\n==> {text}");
}

/// Runs `cmd` with inherited stdio; an unsuccessful exit is a [`CommandFailed`].
pub fn run(cmd: &mut Command) -> anyhow::Result<()> {
    let status = cmd
        .status()
        .with_context(|| format!("cannot run `{}`", display(cmd)))?;
    if !status.success() {
        return Err(CommandFailed {
            command: display(cmd),
            code: status.code(),
        }
        .into());
    }
    Ok(())
}

/// Runs `cargo build <args>` (diagnostics rendered as usual) and returns the paths of the binaries it built, by
/// target name. Asking cargo avoids guessing the target directory.
pub fn cargo_build(args: &[&str]) -> anyhow::Result<Vec<(String, PathBuf)>> {
    cargo_executables("build", args)
}

/// Runs `cargo <subcommand> <args>` (`build`, or `test --no-run`) with JSON messages and returns the executables
/// it reported, by target name (for `test`, the test binaries).
pub fn cargo_executables(subcommand: &str, args: &[&str]) -> anyhow::Result<Vec<(String, PathBuf)>> {
    let mut cmd = cargo();
    cmd.arg(subcommand)
        .args(args)
        .arg("--message-format=json-render-diagnostics");
    heading(&format!("cargo {subcommand} {}", args.join(" ")));
    let mut child = cmd
        .stdout(Stdio::piped())
        .spawn()
        .with_context(|| format!("cannot run `{}`", display(&cmd)))?;
    let stdout = child.stdout.take().expect("stdout is piped");
    let mut executables = Vec::new();
    for line in BufReader::new(stdout).lines() {
        let line = line.context("reading cargo's output")?;
        if let Some(found) = executable_from_message(&line) {
            executables.push(found);
        }
    }
    let status = child.wait()?;
    if !status.success() {
        return Err(CommandFailed {
            command: display(&cmd),
            code: status.code(),
        }
        .into());
    }
    Ok(executables)
}

/// `(target name, executable)` from one line of cargo's JSON messages, for a `compiler-artifact` with one.
fn executable_from_message(line: &str) -> Option<(String, PathBuf)> {
    let message: serde_json::Value = serde_json::from_str(line).ok()?;
    if message.get("reason")?.as_str()? != "compiler-artifact" {
        return None;
    }
    let executable = message.get("executable")?.as_str()?;
    let name = message.get("target")?.get("name")?.as_str()?;
    Some((name.to_string(), PathBuf::from(executable)))
}

/// The path of binary `name` among [`cargo_build`]'s results.
pub fn find_binary(built: &[(String, PathBuf)], name: &str) -> anyhow::Result<PathBuf> {
    built
        .iter()
        .find(|(n, _)| n == name)
        .map(|(_, p)| p.clone())
        .with_context(|| format!("cargo build did not report a `{name}` binary"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn executable_is_read_from_compiler_artifact_messages() {
        let line = r#"{"reason":"compiler-artifact","target":{"name":"aqd","kind":["bin"]},"executable":"/w/target/debug/aqd","fresh":true}"#;
        assert_eq!(
            executable_from_message(line),
            Some(("aqd".to_string(), PathBuf::from("/w/target/debug/aqd")))
        );
        let lib = r#"{"reason":"compiler-artifact","target":{"name":"detector_user","kind":["lib"]},"executable":null}"#;
        assert_eq!(executable_from_message(lib), None);
        assert_eq!(
            executable_from_message(r#"{"reason":"build-finished","success":true}"#),
            None
        );
        assert_eq!(executable_from_message("not json"), None);
    }

    #[test]
    fn path_with_puts_new_dirs_first_once() {
        let dir = PathBuf::from("/nonexistent/xtask-test-bin");
        let path = path_with(&[dir.clone(), dir.clone()]);
        let dirs: Vec<PathBuf> = env::split_paths(&path).collect();
        assert_eq!(dirs.first(), Some(&dir));
        assert_eq!(dirs.iter().filter(|d| **d == dir).count(), 1);
    }
}
