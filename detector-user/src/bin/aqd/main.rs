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
use detector_common::Origin;
use detector_user::{
    attach,
    config::{Config, DEFAULT_CONFIG_PATH},
    control::{self, ClientError, ControlError, ErrorKind, ImportInto, Request},
    daemon::{self, Overrides},
    enforce::{AuditLog, Enforcer},
    fingerprint, listfile, loader,
    maps::{KernelMaps, List},
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
    fn ask(&self, request: &Request) -> anyhow::Result<Option<Value>> {
        match control::call(&self.socket, request) {
            Ok(v) => Ok(Some(v)),
            Err(ClientError::NotRunning { .. }) => Ok(None),
            Err(e) => Err(e.into()),
        }
    }

    fn maps(&self) -> anyhow::Result<KernelMaps> {
        Ok(KernelMaps::from_pins(&self.pin_dir)?)
    }

    /// The offline writer: the pinned maps with the same guard and audit log as the daemon.
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
            let view = match ctx.ask(&Request::Status {})? {
                Some(v) => v,
                None => match ctx.maps() {
                    Ok(maps) => {
                        let mut v = daemon::status_view(&maps, &maps.counters()?, attach::attachments());
                        v["daemon"] = json!({ "running": false });
                        v["pinned_state"] = json!(true);
                        v
                    }
                    // Nothing loaded (never run, or fully detached): still a valid answer.
                    Err(_) if !ctx.pin_dir.exists() => json!({
                        "daemon": { "running": false },
                        "pinned_state": false,
                        "attachments": attach::attachments(),
                    }),
                    Err(e) => return Err(e),
                },
            };
            output::status(&view, &ctx.pin_dir, a.json);
            Ok(())
        }
        Command::List(a) => {
            let view = match ctx.ask(&Request::List { what: a.what })? {
                Some(v) => v,
                None => {
                    offline_notice("reading");
                    daemon::list_view(&ctx.maps()?, a.what)?
                }
            };
            output::list(&view, a.json.json);
            Ok(())
        }
        Command::Top(a) => top(&ctx, &a),
        Command::Block(a) => decide(&ctx, "block", &a, None),
        Command::Monitor(a) => decide(&ctx, "monitor", &a, None),
        Command::Throttle(a) => decide(&ctx, "throttle", &a.decision, Some(a.class)),
        Command::Unblock(t) => {
            let target = t.net()?;
            match ctx.ask(&Request::Remove {
                target: target.to_string(),
            })? {
                Some(_) => println!("removed the decision on {target}"),
                None => {
                    offline_notice("editing");
                    if !ctx.offline_enforcer()?.remove_decision(target, Origin::Cli, "")? {
                        return Err(ControlError::new(
                            ErrorKind::NotFound,
                            format!("{target} has no decision"),
                        )
                        .into());
                    }
                    println!("removed the decision on {target}");
                }
            }
            Ok(())
        }
        Command::Allow(a) => list_add(&ctx, List::Allow, &a),
        Command::Deny(a) => list_add(&ctx, List::Deny, &a),
        Command::Disallow(t) => list_remove(&ctx, List::Allow, &t),
        Command::Undeny(t) => list_remove(&ctx, List::Deny, &t),
        Command::Import(a) => import(&ctx, a),
        Command::Reload => {
            match ctx.ask(&Request::Reload {})? {
                Some(_) => println!("config reloaded"),
                None => {
                    return Err(ClientError::NotRunning {
                        path: ctx.socket.display().to_string(),
                    }
                    .into());
                }
            }
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
    let ask = |request: &Request| -> anyhow::Result<Value> {
        ctx.ask(request)?.ok_or_else(|| {
            ClientError::NotRunning {
                path: ctx.socket.display().to_string(),
            }
            .into()
        })
    };
    let (action, a, class) = match command {
        FpCommand::List(j) => {
            let rows = ask(&Request::FpList {})?;
            output::fp_list(&rows, j.json);
            return Ok(());
        }
        FpCommand::Remove(f) => {
            ask(&Request::FpRemove { fp: f.fp.clone() })?;
            println!("removed the verdict on {}", f.fp);
            return Ok(());
        }
        FpCommand::Block(a) => ("block", a, None),
        FpCommand::Monitor(a) => ("monitor", a, None),
        FpCommand::Allow(a) => ("allow", a, None),
        FpCommand::Throttle(t) => ("throttle", t.verdict, Some(t.class)),
    };
    let result = ask(&Request::FpSet {
        fp: a.fp.fp.clone(),
        action: action.to_string(),
        class,
        ttl_secs: a.ttl.map(|t| t.as_secs()),
        permanent: a.permanent,
        reason: a.reason.clone(),
    })?;
    let ttl = result["ttl_secs"]
        .as_u64()
        .map(|s| format!(" for {}", output::duration(s)))
        .unwrap_or_else(|| " permanently".into());
    let keys = result["kernel_keys"].as_array().map_or(0, Vec::len);
    let kernel = if result["in_kernel"].as_bool() == Some(true) {
        if keys > 0 {
            format!(
                " (in the kernel under {keys} ClientHello key{})",
                if keys == 1 { "" } else { "s" }
            )
        } else {
            " (in the kernel)".to_string()
        }
    } else {
        String::new()
    };
    println!(
        "{action} {}{ttl}{kernel}",
        result["id"].as_str().unwrap_or(&a.fp.fp)
    );
    if let Some(note) = result["note"].as_str() {
        eprintln!("aqd: note: {note}");
    }
    Ok(())
}

fn decide(ctx: &Context, action: &str, a: &DecisionArgs, class: Option<String>) -> anyhow::Result<()> {
    let target = a.target.net()?;
    let request = Request::Decide {
        target: target.to_string(),
        action: action.to_string(),
        class: class.clone(),
        ttl_secs: a.ttl.map(|t| t.as_secs()),
        permanent: a.permanent,
        reason: a.reason.clone(),
        force: a.force,
    };
    let ttl = match ctx.ask(&request)? {
        Some(v) => v["ttl_secs"].as_u64(),
        None => {
            offline_notice("writing");
            let mut enforcer = ctx.offline_enforcer()?;
            let request = detector_user::enforce::DecisionRequest {
                target,
                action: action
                    .parse()
                    .map_err(|e| ControlError::new(ErrorKind::BadRequest, format!("{e}")))?,
                class,
                ttl: a.ttl,
                permanent: a.permanent,
                reason: a.reason.clone(),
                origin: Origin::Cli,
                force: a.force,
            };
            enforcer.decide(&request).map_err(refusal)?.map(|t| t.as_secs())
        }
    };
    let ttl = ttl
        .map(|s| format!(" for {}", output::duration(s)))
        .unwrap_or_else(|| " permanently".into());
    println!("{action} {target}{ttl}");
    Ok(())
}

/// Lockout refusals and bad values from the offline path exit like the daemon's answers.
fn refusal(e: detector_user::enforce::EnforceError) -> anyhow::Error {
    let kind = if e.is_refusal() {
        ErrorKind::Refused
    } else {
        ErrorKind::Failed
    };
    ControlError::new(kind, e.to_string()).into()
}

fn list_add(ctx: &Context, list: List, a: &args::ListArgs) -> anyhow::Result<()> {
    let target = a.target.net()?;
    let request = Request::ListAdd {
        list,
        target: target.to_string(),
        ttl_secs: a.ttl.map(|t| t.as_secs()),
        force: a.force,
    };
    if ctx.ask(&request)?.is_none() {
        offline_notice("writing");
        ctx.offline_enforcer()?
            .list_add(list, target, a.ttl, Origin::Cli, a.force)
            .map_err(refusal)?;
    }
    println!("{target} added to the {}", output::list_name(list));
    Ok(())
}

fn list_remove(ctx: &Context, list: List, t: &args::TargetArg) -> anyhow::Result<()> {
    let target = t.net()?;
    if ctx
        .ask(&Request::ListRemove {
            list,
            target: target.to_string(),
        })?
        .is_none()
    {
        offline_notice("editing");
        if !ctx
            .offline_enforcer()?
            .list_remove(list, target, Origin::Cli)
            .map_err(refusal)?
        {
            let msg = format!("{target} is not in the {}", output::list_name(list));
            return Err(ControlError::new(ErrorKind::NotFound, msg).into());
        }
    }
    println!("{target} removed from the {}", output::list_name(list));
    Ok(())
}

fn import(ctx: &Context, a: args::ImportArgs) -> anyhow::Result<()> {
    let nets = listfile::load(&a.file).map_err(|m| ControlError::new(ErrorKind::BadRequest, m))?;
    let request = Request::Import {
        into: a.into,
        entries: nets.iter().map(|n| n.to_string()).collect(),
        ttl_secs: a.ttl.map(|t| t.as_secs()),
        reason: a.reason.clone(),
        force: a.force,
    };
    let result = match ctx.ask(&request)? {
        Some(v) => v,
        None => {
            offline_notice("writing");
            let started = std::time::Instant::now();
            let mut enforcer = ctx.offline_enforcer()?;
            let n = match a.into {
                ImportInto::Block => {
                    let requests: Vec<_> = nets
                        .iter()
                        .map(|&target| detector_user::enforce::DecisionRequest {
                            target,
                            action: detector_common::Action::Block,
                            class: None,
                            ttl: a.ttl,
                            permanent: false,
                            reason: a.reason.clone(),
                            origin: Origin::Import,
                            force: a.force,
                        })
                        .collect();
                    enforcer
                        .decide_many(&requests)
                        .map_err(|(i, e)| refusal(e).context(format!("entry {}", i + 1)))?
                }
                into => {
                    let list = if into == ImportInto::Allow {
                        List::Allow
                    } else {
                        List::Deny
                    };
                    enforcer
                        .list_add_many(list, &nets, a.ttl, Origin::Import, a.force)
                        .map_err(|(i, e)| refusal(e).context(format!("entry {}; nothing imported", i + 1)))?
                }
            };
            json!({ "imported": n, "seconds": started.elapsed().as_secs_f64() })
        }
    };
    println!(
        "imported {} entries from {} in {:.2}s",
        result["imported"],
        a.file.display(),
        result["seconds"].as_f64().unwrap_or(0.0)
    );
    Ok(())
}

/// Reads the per-source state twice, `interval` apart, and ranks the sources by rate. Reads the pinned maps
/// directly (root), so it works whether or not the daemon runs.
/// Asks the daemon; its absence is an error (the model lives only in the daemon).
fn ask_daemon(ctx: &Context, request: &Request) -> anyhow::Result<Value> {
    ctx.ask(request)?.ok_or_else(|| {
        ClientError::NotRunning {
            path: ctx.socket.display().to_string(),
        }
        .into()
    })
}

fn explain(ctx: &Context, a: &args::ExplainArgs) -> anyhow::Result<()> {
    let reply = ask_daemon(
        ctx,
        &Request::Explain {
            target: a.target.clone(),
        },
    )?;
    if a.json.json {
        println!("{}", serde_json::to_string_pretty(&reply)?);
        return Ok(());
    }
    output::explain(&reply);
    Ok(())
}

fn top_by_score(ctx: &Context, a: &args::TopArgs) -> anyhow::Result<()> {
    let kind = match a.kind {
        args::ScoreKind::Source => "source",
        args::ScoreKind::Prefix => "prefix",
        args::ScoreKind::Fingerprint => "fingerprint",
    };
    let reply = ask_daemon(
        ctx,
        &Request::ScoreTop {
            kind: kind.into(),
            limit: Some(a.limit),
        },
    )?;
    if a.json.json {
        println!("{}", serde_json::to_string_pretty(&reply)?);
        return Ok(());
    }
    if reply["dry_run"].as_bool() == Some(true) {
        println!("(dry run: the model's decisions are logged, not enforced)");
    }
    println!("{:<48} {:>8}  tier", kind, "score");
    for row in reply["rows"].as_array().into_iter().flatten() {
        let scope = &row["scope"]["value"];
        let name = match scope {
            Value::String(s) => s.clone(),
            Value::Object(o) => format!(
                "{}/{}",
                o.get("ja4").and_then(Value::as_str).unwrap_or("-"),
                o.get("syn_key")
                    .and_then(Value::as_u64)
                    .map(|k| format!("syn:{k:#018x}"))
                    .unwrap_or_default()
            ),
            other => other.to_string(),
        };
        println!(
            "{:<48} {:>8.3}  {}",
            name,
            row["score"].as_f64().unwrap_or(0.0),
            row["tier"].as_str().unwrap_or("-")
        );
    }
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
