//! `aqd`: the daemon (`aqd run`) and the sysadmin's CLI.
//!
//! Commands talk to the daemon over its control socket. When the daemon is down, `list`, `status`, `block`,
//! `unblock` and the list edits work on the pinned maps directly (same lockout guard, same audit log) and say so.
//!
//! Exit codes: 0 done; 1 failed; 2 bad input or refused (lockout guard); 3 nothing to do (e.g. no such
//! decision); 4 the daemon is not running (commands that need it: reload).

mod args;
mod output;

use std::{path::PathBuf, process::ExitCode, time::Duration};

use anyhow::Context as _;
use args::{Cli, Command, DecisionArgs, FpCommand};
use clap::{CommandFactory as _, Parser as _};
use detector_common::Action;
use detector_user::{
    attach,
    config::{Config, DEFAULT_CONFIG_PATH},
    control::{
        self, ClientError, ControlError, ErrorKind, Request, Response,
        handler::{self, Offline},
    },
    daemon::{self, Overrides},
    enforce::{AuditLog, Enforcer},
    fingerprint::{self, live::FpAction},
    listfile, loader,
    maps::{KernelMaps, List},
    model::Kind,
    paths,
    store::Store,
};
use serde_json::{Value, json};

fn main() -> ExitCode {
    // Die quietly on a closed pipe (`aqd list | head`), like other Unix tools, instead of panicking.
    // SAFETY: setting a signal disposition to the default before any thread starts.
    unsafe { libc::signal(libc::SIGPIPE, libc::SIG_DFL) };
    let cli = Cli::parse();
    init_tracing(matches!(cli.command, Command::Run(_)));
    match execute(cli) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("aqd: {e:#}");
            ExitCode::from(exit_code(&e))
        }
    }
}

fn exit_code(e: &anyhow::Error) -> u8 {
    for cause in e.chain() {
        if let Some(c) = cause.downcast_ref::<ControlError>() {
            return c.kind.exit_code();
        }
        if let Some(ClientError::Daemon(c)) = cause.downcast_ref::<ClientError>() {
            return c.kind.exit_code();
        }
        if let Some(ClientError::NotRunning { .. }) = cause.downcast_ref::<ClientError>() {
            return 4;
        }
        if cause
            .downcast_ref::<detector_user::config::ConfigError>()
            .is_some()
        {
            return 2;
        }
    }
    1
}

fn init_tracing(daemon: bool) {
    let default = if daemon { "info" } else { "warn" };
    let filter = tracing_subscriber::EnvFilter::try_from_env("AQD_LOG")
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new(default));
    tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .init();
}

/// Where things are, from (in order) the command line, the config file, and the defaults.
struct Context {
    config: Config,
    config_path: Option<PathBuf>,
    pin_dir: PathBuf,
    socket: PathBuf,
}

impl Context {
    fn new(cli: &Cli) -> anyhow::Result<Self> {
        let config_path = cli.config.clone().or_else(|| {
            let default = PathBuf::from(DEFAULT_CONFIG_PATH);
            default.exists().then_some(default)
        });
        let overrides = Overrides {
            pin_root: cli.pin_root.clone(),
            socket: cli.socket.clone(),
            state_dir: cli.state_dir.clone(),
            ..Overrides::default()
        };
        let config = daemon::resolve_config(config_path.as_deref(), &overrides)?;
        Ok(Self {
            pin_dir: paths::versioned_pin_dir(&config.pin_root),
            socket: config.socket.clone(),
            config,
            config_path,
        })
    }

    fn from_overrides(cli: &Cli) -> anyhow::Result<Self> {
        let overrides = Overrides {
            pin_root: cli.pin_root.clone(),
            socket: cli.socket.clone(),
            state_dir: cli.state_dir.clone(),
            ..Overrides::default()
        };
        let config = daemon::resolve_config(None, &overrides)?;
        Ok(Self {
            pin_dir: paths::versioned_pin_dir(&config.pin_root),
            socket: config.socket.clone(),
            config,
            config_path: cli.config.clone(),
        })
    }

    /// Asks the daemon; `Ok(None)` when it is not running.
    fn ask(&self, request: &Request) -> anyhow::Result<Option<Response>> {
        match control::call(&self.socket, request) {
            Ok(v) => Ok(Some(v)),
            Err(ClientError::NotRunning { .. }) => Ok(None),
            Err(e) => Err(e.into()),
        }
    }

    /// Asks the daemon, or (down) answers on the pinned maps with the same handler when the request allows it;
    /// `notice` says what the offline answer does (`writing`, `editing`, `reading`; None: say nothing).
    fn answer(&self, request: Request, notice: Option<&str>) -> anyhow::Result<Response> {
        if let Some(answer) = self.ask(&request)? {
            return Ok(answer);
        }
        if !request.works_offline() {
            return Err(ClientError::NotRunning {
                path: self.socket.display().to_string(),
            }
            .into());
        }
        if let Some(what) = notice {
            offline_notice(what);
        }
        let enforcer = if request.writes() {
            self.offline_enforcer()?
        } else {
            Enforcer::new(self.maps()?, AuditLog::disabled(), self.config.clone())
        };
        Ok(handler::handle(&mut Offline { enforcer }, request)?)
    }

    fn maps(&self) -> anyhow::Result<KernelMaps> {
        Ok(KernelMaps::from_pins(&self.pin_dir)?)
    }

    /// The offline writer: the pinned maps with the same guard, audit log and state store as the daemon.
    fn offline_enforcer(&self) -> anyhow::Result<Enforcer> {
        let audit = AuditLog::open(&self.config.audit_log).unwrap_or_else(|e| {
            eprintln!("aqd: warning: {e}; this change is not audited");
            AuditLog::disabled()
        });
        let mut enforcer = Enforcer::new(self.maps()?, audit, self.config.clone());
        // The same state store as the daemon's, so an offline change survives a reboot too.
        match Store::open(&self.config.state_dir) {
            Ok((store, _)) => enforcer.set_store(store),
            Err(e) => eprintln!("aqd: warning: {e}; this change is not kept across a reboot"),
        }
        Ok(enforcer)
    }
}

fn offline_notice(what: &str) {
    eprintln!("aqd: the daemon is not running; {what} the pinned maps directly");
}

fn execute(cli: Cli) -> anyhow::Result<()> {
    let ctx = match Context::new(&cli) {
        Ok(ctx) => ctx,
        // A broken config file must not stop the operator from asking the daemon (which keeps its running
        // config) to reload or report status.
        Err(e) if matches!(cli.command, Command::Reload | Command::Status(_)) => {
            eprintln!("aqd: warning: {e:#}; using the command-line options and defaults to find the daemon");
            Context::from_overrides(&cli)?
        }
        Err(e) => return Err(e),
    };
    match cli.command {
        Command::Run(a) => {
            let overrides = Overrides {
                interfaces: a.interfaces,
                xdp_mode: a.xdp_mode,
                pin_root: cli.pin_root,
                socket: cli.socket,
                protected_ports: a.protected_ports,
                stats_interval: a.stats_interval.map(Duration::from_secs),
                metrics_address: a.metrics_address,
                audit_log: a.audit_log,
                state_dir: cli.state_dir,
                dry_run: a.dry_run,
            };
            let runtime = tokio::runtime::Builder::new_multi_thread()
                .worker_threads(2)
                .enable_all()
                .build()?;
            runtime.block_on(daemon::run(ctx.config_path.clone(), overrides))
        }
        Command::Status(a) => {
            let view = match ctx.answer(Request::Status {}, None) {
                Ok(answer) => answer.into_status()?,
                // Nothing loaded (never run, or fully detached): still a valid answer.
                Err(_) if !ctx.pin_dir.exists() => Box::new(handler::nothing_loaded_status()),
                Err(e) => return Err(e),
            };
            output::status(&view, &ctx.pin_dir, a.json);
            Ok(())
        }
        Command::List(a) => {
            let view = ctx
                .answer(Request::List { what: a.what }, Some("reading"))?
                .into_list()?;
            output::list(&view, a.json.json);
            Ok(())
        }
        Command::Top(a) => top(&ctx, &a),
        Command::Block(a) => decide(&ctx, Action::Block, &a, None),
        Command::Monitor(a) => decide(&ctx, Action::Monitor, &a, None),
        Command::Throttle(a) => decide(&ctx, Action::Throttle, &a.decision, Some(a.class)),
        Command::Unblock(t) => {
            let target = t.net()?;
            ctx.answer(Request::Remove { target }, Some("editing"))?
                .into_removed()?;
            println!("removed the decision on {target}");
            Ok(())
        }
        Command::Allow(a) => list_add(&ctx, List::Allow, &a),
        Command::Deny(a) => list_add(&ctx, List::Deny, &a),
        Command::Disallow(t) => list_remove(&ctx, List::Allow, &t),
        Command::Undeny(t) => list_remove(&ctx, List::Deny, &t),
        Command::Import(a) => import(&ctx, a),
        Command::Reload => {
            ctx.answer(Request::Reload {}, None)?.into_reloaded()?;
            println!("config reloaded");
            Ok(())
        }
        Command::CheckConfig => {
            let path = ctx
                .config_path
                .clone()
                .unwrap_or_else(|| PathBuf::from(DEFAULT_CONFIG_PATH));
            let config = Config::load(&path)?;
            config
                .list_file_entries()
                .map_err(|m| ControlError::new(ErrorKind::BadRequest, m))?;
            println!("{}: ok", path.display());
            Ok(())
        }
        Command::Detach(a) => detach(&ctx, a.iface.as_deref()),
        Command::Fingerprint(a) => {
            let db_path = a.p0f_db.clone().or_else(|| {
                let default = PathBuf::from("/etc/aqd/p0f.fp");
                default.exists().then_some(default)
            });
            let db = match &db_path {
                Some(p) => Some(
                    fingerprint::P0fDb::load(p)
                        .map_err(|e| ControlError::new(ErrorKind::BadRequest, format!("{e:#}")))?,
                ),
                None => None,
            };
            let records = fingerprint::fingerprint_file(&a.file, db.as_ref())
                .map_err(|e| ControlError::new(ErrorKind::BadRequest, format!("{e:#}")))?;
            for r in &records {
                if a.json {
                    println!("{}", serde_json::to_string(r)?);
                } else {
                    println!("{r}");
                }
            }
            Ok(())
        }
        Command::Fp(c) => fp(&ctx, c),
        Command::Explain(a) => explain(&ctx, &a),
        Command::Completions(a) => {
            clap_complete::generate(a.shell, &mut Cli::command(), "aqd", &mut std::io::stdout());
            Ok(())
        }
    }
}

/// `aqd fp …`: verdicts by fingerprint live in the daemon (it maps JA4 values to kernel keys), so these
/// need it running.
fn fp(ctx: &Context, command: FpCommand) -> anyhow::Result<()> {
    let (action, a, class) = match command {
        FpCommand::List(j) => {
            let rows = ctx.answer(Request::FpList {}, None)?.into_fp_list()?;
            output::fp_list(&rows, j.json);
            return Ok(());
        }
        FpCommand::Remove(f) => {
            let removed = ctx
                .answer(Request::FpRemove { fp: f.fp.clone() }, None)?
                .into_fp_removed()?;
            println!("removed the verdict on {}", removed.id);
            return Ok(());
        }
        FpCommand::Block(a) => (FpAction::Block, a, None),
        FpCommand::Monitor(a) => (FpAction::Monitor, a, None),
        FpCommand::Allow(a) => (FpAction::Allow, a, None),
        FpCommand::Throttle(t) => (FpAction::Throttle, t.verdict, Some(t.class)),
    };
    let set = ctx
        .answer(
            Request::FpSet {
                fp: a.fp.fp.clone(),
                action,
                class,
                ttl_secs: a.ttl.map(|t| t.as_secs()),
                permanent: a.permanent,
                reason: a.reason.clone(),
            },
            None,
        )?
        .into_fp_set()?;
    let keys = set.kernel_keys.len();
    let kernel = match (set.in_kernel, keys) {
        (false, _) => String::new(),
        (true, 0) => " (in the kernel)".to_string(),
        (true, n) => format!(
            " (in the kernel under {n} ClientHello key{})",
            if n == 1 { "" } else { "s" }
        ),
    };
    println!(
        "{} {}{}{kernel}",
        action.name(),
        set.id,
        output::for_ttl(set.ttl_secs)
    );
    if let Some(note) = &set.note {
        eprintln!("aqd: note: {note}");
    }
    Ok(())
}

fn decide(ctx: &Context, action: Action, a: &DecisionArgs, class: Option<String>) -> anyhow::Result<()> {
    let request = Request::Decide {
        target: a.target.net()?,
        action,
        class,
        ttl_secs: a.ttl.map(|t| t.as_secs()),
        permanent: a.permanent,
        reason: a.reason.clone(),
        force: a.force,
    };
    let decided = ctx.answer(request, Some("writing"))?.into_decided()?;
    println!("{action} {}{}", decided.target, output::for_ttl(decided.ttl_secs));
    Ok(())
}

fn list_add(ctx: &Context, list: List, a: &args::ListArgs) -> anyhow::Result<()> {
    let request = Request::ListAdd {
        list,
        target: a.target.net()?,
        ttl_secs: a.ttl.map(|t| t.as_secs()),
        force: a.force,
    };
    let added = ctx.answer(request, Some("writing"))?.into_list_edited()?;
    println!("{} added to the {}", added.target, list.noun());
    Ok(())
}

fn list_remove(ctx: &Context, list: List, t: &args::TargetArg) -> anyhow::Result<()> {
    let request = Request::ListRemove {
        list,
        target: t.net()?,
    };
    let removed = ctx.answer(request, Some("editing"))?.into_list_edited()?;
    println!("{} removed from the {}", removed.target, list.noun());
    Ok(())
}

fn import(ctx: &Context, a: args::ImportArgs) -> anyhow::Result<()> {
    let entries = listfile::load(&a.file).map_err(|m| ControlError::new(ErrorKind::BadRequest, m))?;
    let request = Request::Import {
        into: a.into,
        entries,
        ttl_secs: a.ttl.map(|t| t.as_secs()),
        reason: a.reason.clone(),
        force: a.force,
    };
    let imported = ctx.answer(request, Some("writing"))?.into_imported()?;
    println!(
        "imported {} entries from {} in {:.2}s",
        imported.imported,
        a.file.display(),
        imported.seconds
    );
    Ok(())
}

fn explain(ctx: &Context, a: &args::ExplainArgs) -> anyhow::Result<()> {
    let target = a
        .target
        .parse()
        .unwrap_or_else(|never: std::convert::Infallible| match never {});
    let view = ctx.answer(Request::Explain { target }, None)?.into_explain()?;
    output::explain(&view, a.json.json);
    Ok(())
}

fn top_by_score(ctx: &Context, a: &args::TopArgs) -> anyhow::Result<()> {
    let (kind, name) = match a.kind {
        args::ScoreKind::Source => (Kind::Source, "source"),
        args::ScoreKind::Prefix => (Kind::Prefix, "prefix"),
        args::ScoreKind::Fingerprint => (Kind::Fingerprint, "fingerprint"),
    };
    let request = Request::ScoreTop {
        kind,
        limit: Some(a.limit),
    };
    let view = ctx.answer(request, None)?.into_score_top()?;
    output::score_top(&view, name, a.json.json);
    Ok(())
}

fn top(ctx: &Context, a: &args::TopArgs) -> anyhow::Result<()> {
    if a.by == args::TopBy::Score {
        return top_by_score(ctx, a);
    }
    let maps = ctx.maps()?;
    let started = detector_user::clock::monotonic_ns();
    let before: std::collections::HashMap<_, _> = maps.sources(0)?.into_iter().collect();
    std::thread::sleep(a.interval);
    let after = maps.sources(started)?;
    let secs = a.interval.as_secs_f64();
    let decisions = maps.decisions()?;
    let mut rows: Vec<Value> = after
        .into_iter()
        .map(|(addr, now)| {
            let was = before.get(&addr).copied().unwrap_or_default();
            let rate = |n: u64, w: u64| n.saturating_sub(w) as f64 / secs;
            let decision = decisions
                .iter()
                .find(|d| d.net.contains(&addr))
                .and_then(|d| d.action)
                .map_or("", |a| a.name());
            json!({
                "source": addr,
                "packets_per_s": rate(now.packets, was.packets),
                "bytes_per_s": rate(now.bytes, was.bytes),
                "conns_per_s": rate(now.conns, was.conns),
                "drops_per_s": rate(now.rate_drops, was.rate_drops),
                "packets": now.packets,
                "decision": decision,
            })
        })
        .collect();
    let key = match a.by {
        args::TopBy::Packets => "packets_per_s",
        args::TopBy::Bytes => "bytes_per_s",
        args::TopBy::Conns => "conns_per_s",
        args::TopBy::Drops => "drops_per_s",
        args::TopBy::Score => unreachable!("handled by top_by_score"),
    };
    rows.sort_by(|x, y| {
        y[key]
            .as_f64()
            .unwrap_or(0.0)
            .total_cmp(&x[key].as_f64().unwrap_or(0.0))
    });
    rows.truncate(a.limit);
    output::top(&rows, a.json.json);
    Ok(())
}

fn detach(ctx: &Context, iface: Option<&str>) -> anyhow::Result<()> {
    match iface {
        Some(iface) => {
            if !attach::detach(iface)? {
                let msg = format!("aqd is not attached to {iface}");
                return Err(ControlError::new(ErrorKind::NotFound, msg).into());
            }
            println!(
                "detached from {iface}; pinned maps kept under {}",
                ctx.pin_dir.display()
            );
        }
        None => {
            let mut detached = Vec::new();
            for a in attach::attachments() {
                attach::detach(&a.iface)?;
                detached.push(a.iface);
            }
            loader::remove_pins(&ctx.pin_dir)
                .with_context(|| format!("removing {}", ctx.pin_dir.display()))?;
            // The config's list entries were in the maps just removed.
            let _ = std::fs::remove_file(paths::config_entries_for_socket(&ctx.socket));
            let _ = std::fs::remove_file(paths::fp_verdicts_for_socket(&ctx.socket));
            println!(
                "detached from [{}]; pinned state under {} removed",
                detached.join(", "),
                ctx.pin_dir.display()
            );
        }
    }
    Ok(())
}
