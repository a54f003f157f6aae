//! The `ewsgate` command: the daemon (`run`) and the CLI that talks to it.

use std::{path::PathBuf, process::ExitCode};

use anyhow::Context as _;
use clap::{CommandFactory, Parser, Subcommand};

use ewsgate::{
    agent::control::{self, Request, Response, Status},
    config,
    model::packet::{DEFAULT_CONTROL_SOCKET, DEFAULT_PIN_DIR},
    ops::explain::ExplainError,
    packet::maps::List,
};

#[derive(Parser)]
#[command(
    name = "ewsgate",
    version,
    about = "EWS firewall filter: XDP packet layer and its control"
)]
struct Cli {
    /// Config file; its control_socket and pin_dir are used by the other commands too.
    #[arg(long, short, global = true)]
    config: Option<PathBuf>,
    /// Control socket (overrides the config's).
    #[arg(long, global = true)]
    socket: Option<PathBuf>,
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// The agent: load, attach and keep the filter, and run the proxy (needs --config).
    Run,
    /// The proxy process, as the agent starts it (not for direct use).
    #[command(hide = true)]
    Proxy {
        /// The agent's proxy socket.
        #[arg(long)]
        agent: PathBuf,
        /// Worker threads; 0 means one per CPU.
        #[arg(long, default_value_t = 0)]
        threads: usize,
    },
    /// Check a config file and exit.
    Check,
    /// Interfaces, mode, entry counts and counters per reason and group.
    Status {
        #[arg(long)]
        json: bool,
    },
    /// Re-read the config file now (as SIGHUP does).
    Reload,
    /// Sources whose packets to the protected endpoints are always dropped.
    Block {
        #[command(subcommand)]
        action: EntryAction,
    },
    /// Temporary allows on top of the source groups.
    Allow {
        #[command(subcommand)]
        action: EntryAction,
    },
    /// Live range feeds (`feed_url` groups).
    Feed {
        #[command(subcommand)]
        action: FeedAction,
    },
    /// The etcd fleet this gate belongs to (`[fleet]`).
    Fleet {
        #[command(subcommand)]
        action: FleetAction,
    },
    /// Stop the daemon and remove the program, its links and maps.
    Detach {
        #[arg(long)]
        pin_dir: Option<PathBuf>,
    },
    /// Summarise audit files: who used EWS from where, for what, what was refused and what
    /// fired. Text on standard output; `-` reads standard input (zcat rotated files into it).
    Report {
        #[arg(required = true)]
        files: Vec<PathBuf>,
        /// Skip lines before this: 2026-12-01, 2026-12-01T08:00, RFC 3339, or 90m, 24h, 7d ago.
        #[arg(long)]
        since: Option<String>,
        /// Also write one self-contained HTML page with charts.
        #[arg(long)]
        html: Option<PathBuf>,
        /// The summary as JSON instead of text.
        #[arg(long)]
        json: bool,
    },
    /// How the gate would judge a request: the packet verdict of the live program, each
    /// rule, the token, the content and the final reason. With --config naming a file the
    /// gate does not run, that file is explained instead (a change under review).
    Explain(ExplainArgs),
    /// Write the man pages (DIR/man8) and shell completions (DIR/completions) generated from
    /// this CLI, as the package installs them.
    #[command(hide = true)]
    Manual { dir: PathBuf },
}

#[derive(clap::Args)]
struct ExplainArgs {
    /// The client's address.
    #[arg(long)]
    source: String,
    /// none, basic, ntlm, negotiate, kerberos, bearer or client-cert.
    #[arg(long)]
    auth: String,
    /// The user the credentials name (for client-cert, the certificate's subject).
    #[arg(long)]
    user: Option<String>,
    /// A file holding the bearer token.
    #[arg(long)]
    token: Option<PathBuf>,
    /// A file holding the SOAP request body.
    #[arg(long)]
    soap: Option<PathBuf>,
    /// Instead of --soap: the EWS operation (FindItem, GetItem, ...).
    #[arg(long)]
    operation: Option<String>,
    /// With --operation: the folder it names (a distinguished name such as inbox, or an ID).
    #[arg(long)]
    folder: Option<String>,
    /// With --operation: the item ID it names.
    #[arg(long)]
    item: Option<String>,
    /// The request path.
    #[arg(long)]
    path: Option<String>,
    /// When (UTC): 2026-12-01T23:00, RFC 3339, or 90m, 24h ago; now by default.
    #[arg(long)]
    time: Option<String>,
    /// One JSON object instead of text.
    #[arg(long)]
    json: bool,
}

#[derive(Subcommand)]
enum FleetAction {
    /// Store FILE (without [xdp] and [fleet]) as the fleet's next config revision.
    Push { file: PathBuf },
    /// Every gate: the revision it runs or refused, its last contact, its entries.
    Status {
        #[arg(long)]
        json: bool,
    },
}

#[derive(Subcommand)]
enum FeedAction {
    /// Fetch now (one group, or every feed) and print what happened.
    Refresh { group: Option<String> },
}

#[derive(Subcommand)]
enum EntryAction {
    /// Add an address or a CIDR.
    Add {
        /// An address or a CIDR.
        net: String,
        /// Lifetime: 90, 90s, 15m, 2h or 1d. Without it the entry stays until removed.
        #[arg(long)]
        ttl: Option<String>,
        /// Why, as `list` and the status show it.
        #[arg(long)]
        reason: Option<String>,
    },
    /// Remove an entry.
    Del {
        /// The address or CIDR it was added with.
        net: String,
    },
    /// List the entries with their lifetimes and reasons.
    List,
}

fn main() -> ExitCode {
    use std::io::IsTerminal;
    tracing_subscriber::fmt()
        .with_env_filter(
            // rustls warns about each client's odd SNI (an IP address): not the operator's news.
            tracing_subscriber::EnvFilter::try_from_default_env()
                .unwrap_or_else(|_| "info,rustls=error".into()),
        )
        // Colour codes only on a terminal: never in a journal or a log file.
        .with_ansi(std::io::stderr().is_terminal())
        .with_writer(std::io::stderr)
        .init();
    let cli = Cli::parse();
    match run(cli) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("ewsgate: {}", chain(&e));
            // A wrong question (bad address, unknown auth kind, unreadable file) is a usage
            // error, as clap's own are.
            if e.downcast_ref::<ExplainError>().is_some() {
                return ExitCode::from(2);
            }
            ExitCode::FAILURE
        }
    }
}

/// The error and its causes, skipping a cause whose text its parent already shows.
fn chain(e: &anyhow::Error) -> String {
    let mut out = e.to_string();
    for cause in e.chain().skip(1) {
        let text = cause.to_string();
        if !out.contains(&text) {
            out.push_str(": ");
            out.push_str(&text);
        }
    }
    out
}

fn run(cli: Cli) -> anyhow::Result<()> {
    let config_path = cli.config.clone();
    let need_config = || {
        config_path
            .clone()
            .ok_or_else(|| anyhow::anyhow!("--config FILE is required"))
    };
    match cli.command {
        Command::Run => ewsgate::agent::daemon::run(&need_config()?),
        Command::Proxy { ref agent, threads } => ewsgate::proxy::serve(agent.clone(), threads),
        Command::Check => {
            let (c, bundle) = ewsgate::config::load_bundle(&need_config()?)?;
            if c.proxy.is_some() {
                // What the proxy builds from the bundle at start and at each reload: the
                // certificate's names, the upstream's CA, the signing keys.
                ewsgate::proxy::state::State::build(0, 0, &bundle, None)
                    .context("the request layer would refuse this config")?;
            }
            println!(
                "ok: {} source groups, {} prefixes, {} protected addresses",
                c.groups.len(),
                c.prefix_count(),
                c.protect.len()
            );
            let d = &c.ops.detections;
            let engine = ewsgate::ops::detections::Engine::new(d.clone());
            println!(
                "detections: {} of {} on, state at most {:.1} MiB; audit sinks: {}",
                if d.enabled {
                    d.rules.iter().filter(|r| r.enabled).count()
                } else {
                    0
                },
                d.rules.len(),
                engine.memory_bound() as f64 / f64::from(1 << 20),
                c.ops
                    .audit
                    .sinks
                    .iter()
                    .map(|s| s.label())
                    .collect::<Vec<_>>()
                    .join(", ")
            );
            Ok(())
        }
        Command::Status { json } => {
            let status = match ask(&cli, &Request::Status)? {
                Response::Status(s) => s,
                other => anyhow::bail!("unexpected answer: {other:?}"),
            };
            if json {
                println!("{}", serde_json::to_string_pretty(&status)?);
            } else {
                print_status(&status);
            }
            Ok(())
        }
        Command::Reload => print_ok(ask(&cli, &Request::Reload)?),
        Command::Block { ref action } => entries(&cli, List::Block, action),
        Command::Allow { ref action } => entries(&cli, List::Allow, action),
        Command::Feed {
            action: FeedAction::Refresh { ref group },
        } => print_ok(ask(
            &cli,
            &Request::FeedRefresh {
                group: group.clone(),
            },
        )?),
        Command::Fleet { ref action } => {
            use ewsgate::agent::fleet::admin;
            let config = need_config()?;
            let text = match action {
                FleetAction::Push { file } => admin::push_command(&config, file)?,
                FleetAction::Status { json } => admin::status_command(&config, *json)?,
            };
            println!("{}", text.trim_end());
            Ok(())
        }
        Command::Detach { ref pin_dir } => detach(&cli, pin_dir.clone()),
        Command::Report {
            ref files,
            ref since,
            ref html,
            json,
        } => report(files, since.as_deref(), html.as_deref(), json),
        Command::Explain(ref args) => explain(&cli, args),
        Command::Manual { ref dir } => {
            let written = ewsgate::ops::manual::write_all(Cli::command(), dir)?;
            println!("{} files under {}", written.len(), dir.display());
            Ok(())
        }
    }
}

/// `ewsgate explain`: the running gate answers, unless --config names a file it does not
/// run; that file is then loaded, validated and explained here.
fn explain(cli: &Cli, args: &ExplainArgs) -> anyhow::Result<()> {
    use ewsgate::ops::explain::{self as ex, Query};
    let bad = |text: String| anyhow::Error::new(ExplainError::BadInput(text));
    let read = |what: &str, path: &std::path::Path| {
        let bytes =
            std::fs::read(path).map_err(|e| bad(format!("{what} {}: {e}", path.display())))?;
        String::from_utf8(bytes).map_err(|_| bad(format!("{what} {}: not UTF-8", path.display())))
    };
    let source = args
        .source
        .trim()
        .parse()
        .map_err(|_| bad(format!("--source {:?}: not an IP address", args.source)))?;
    let now = ewsgate::agent::feeds::unix_now() as i64;
    let time = args
        .time
        .as_deref()
        .map(|t| ewsgate::ops::report::parse_since(t, now))
        .transpose()
        .map_err(|e| bad(format!("--time: {e}")))?;
    let query = Query {
        source: Some(source),
        auth: args.auth.clone(),
        user: args.user.clone(),
        token: match &args.token {
            Some(p) => Some(read("--token", p)?.trim().to_string()),
            None => None,
        },
        soap: args
            .soap
            .as_deref()
            .map(|p| read("--soap", p))
            .transpose()?,
        operation: args.operation.clone(),
        folder: args.folder.clone(),
        item: args.item.clone(),
        path: args.path.clone(),
        time,
    };
    query.check()?;
    let explained = match review_file(cli)? {
        Some(path) => {
            let (config, bundle) =
                config::load_bundle(&path).map_err(|e| bad(format!("--config: {e}")))?;
            let refused = |_: &str| None;
            let inputs = ex::Inputs {
                config: &config,
                bundle: &bundle,
                packet: ex::config_verdict(&config, source),
                refused: &refused,
                against: format!("{} (not running; nothing in force changes)", path.display()),
            };
            ex::explain(&inputs, &query)?
        }
        None => match ask(
            cli,
            &Request::Explain {
                query: Box::new(query),
            },
        )? {
            Response::Explained(e) => *e,
            Response::Error { message } => anyhow::bail!("{message}"),
            other => anyhow::bail!("unexpected answer: {other:?}"),
        },
    };
    if args.json {
        println!("{}", serde_json::to_string(&explained)?);
    } else {
        print!("{}", ex::text(&explained));
    }
    Ok(())
}

/// The --config file, when it is not the config the running gate was started with (or no
/// gate answers): explain then judges that file itself.
fn review_file(cli: &Cli) -> anyhow::Result<Option<PathBuf>> {
    let Some(path) = &cli.config else {
        return Ok(None);
    };
    let socket = match socket_of(cli) {
        Ok(s) => s,
        Err(_) => return Ok(Some(path.clone())),
    };
    let running = match control::request(&socket, &Request::Status) {
        Ok(Response::Status(s)) => PathBuf::from(&s.config),
        _ => return Ok(Some(path.clone())),
    };
    let same = |a: &std::path::Path, b: &std::path::Path| match (a.canonicalize(), b.canonicalize())
    {
        (Ok(a), Ok(b)) => a == b,
        _ => a == b,
    };
    Ok((!same(path, &running)).then(|| path.clone()))
}

fn report(
    files: &[PathBuf],
    since: Option<&str>,
    html: Option<&std::path::Path>,
    json: bool,
) -> anyhow::Result<()> {
    use ewsgate::ops::report::{self, Options, Report};
    use std::io::BufReader;
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_secs() as i64);
    let since = since
        .map(|s| report::parse_since(s, now))
        .transpose()
        .map_err(anyhow::Error::msg)?;
    let mut r = Report::new(Options {
        since,
        ..Options::default()
    });
    for f in files {
        let name = f.display().to_string();
        if name == "-" {
            r.read("-", std::io::stdin().lock())?;
            continue;
        }
        let file = std::fs::File::open(f).map_err(|e| anyhow::anyhow!("{name}: {e}"))?;
        r.read(&name, BufReader::with_capacity(256 << 10, file))
            .map_err(|e| anyhow::anyhow!("{name}: {e}"))?;
    }
    let summary = r.summary();
    if json {
        println!("{}", serde_json::to_string_pretty(&summary)?);
    } else {
        print!("{}", report::text(&summary));
    }
    if let Some(path) = html {
        std::fs::write(path, report::html(&summary))
            .map_err(|e| anyhow::anyhow!("{}: {e}", path.display()))?;
    }
    Ok(())
}

/// The control socket: from `--socket`, else the config's `[xdp]` section read on its own,
/// so that `status`, `reload` and `detach` still work when the rest of the file does not
/// parse (that is when an operator most needs to see why a reload was refused).
fn socket_of(cli: &Cli) -> anyhow::Result<PathBuf> {
    if let Some(s) = &cli.socket {
        return Ok(s.clone());
    }
    match &cli.config {
        Some(path) => Ok(config::paths_of(path)?.control_socket),
        None => Ok(DEFAULT_CONTROL_SOCKET.into()),
    }
}

fn ask(cli: &Cli, req: &Request) -> anyhow::Result<Response> {
    Ok(control::request(&socket_of(cli)?, req)?)
}

fn print_ok(r: Response) -> anyhow::Result<()> {
    match r {
        Response::Ok { message } => {
            println!("{message}");
            Ok(())
        }
        Response::Error { message } => anyhow::bail!("{message}"),
        other => anyhow::bail!("unexpected answer: {other:?}"),
    }
}

fn entries(cli: &Cli, list: List, action: &EntryAction) -> anyhow::Result<()> {
    let net = |s: &str| config::parse_cidr(s).map_err(anyhow::Error::msg);
    let req = match action {
        EntryAction::Add {
            net: n,
            ttl,
            reason,
        } => Request::Add {
            list,
            net: net(n)?,
            ttl_secs: ttl.as_deref().map(parse_ttl).transpose()?,
            reason: reason.clone(),
        },
        EntryAction::Del { net: n } => Request::Del { list, net: net(n)? },
        EntryAction::List => Request::List { list },
    };
    match ask(cli, &req)? {
        Response::Entries { entries } => {
            for e in entries {
                let ttl = e
                    .ttl_left
                    .map_or("permanent".to_string(), |s| format!("{s}s left"));
                println!(
                    "{:<45} {:<14} {}",
                    e.net.to_string(),
                    ttl,
                    e.reason.unwrap_or_default()
                );
            }
            Ok(())
        }
        other => print_ok(other),
    }
}

fn parse_ttl(text: &str) -> anyhow::Result<u64> {
    let (digits, unit) = text.split_at(
        text.find(|c: char| !c.is_ascii_digit())
            .unwrap_or(text.len()),
    );
    let scale = match unit {
        "" | "s" => 1,
        "m" => 60,
        "h" => 3600,
        "d" => 86400,
        _ => anyhow::bail!("--ttl {text}: expected a number with s, m, h or d"),
    };
    let n: u64 = digits
        .parse()
        .map_err(|_| anyhow::anyhow!("--ttl {text}: expected a number with s, m, h or d"))?;
    match n.checked_mul(scale) {
        Some(s) if s > 0 && s <= 366 * 86400 => Ok(s),
        _ => anyhow::bail!("--ttl {text}: must be between 1 second and 366 days"),
    }
}

fn detach(cli: &Cli, pin_dir: Option<PathBuf>) -> anyhow::Result<()> {
    let pin_dir = match (pin_dir, &cli.config) {
        (Some(d), _) => d,
        (None, Some(path)) => config::paths_of(path)?.pin_dir,
        (None, None) => DEFAULT_PIN_DIR.into(),
    };
    // Stop a running daemon first, or it would keep the program attached through its fds.
    if let Ok(socket) = socket_of(cli) {
        if let Ok(Response::Ok { .. }) = control::request(&socket, &Request::Shutdown) {
            for _ in 0..50 {
                if !socket.exists() {
                    break;
                }
                std::thread::sleep(std::time::Duration::from_millis(100));
            }
        }
    }
    let detached = ewsgate::packet::xdp::detach(&pin_dir)?;
    println!(
        "detached from {}; pins under {} removed",
        if detached.is_empty() {
            "no interface".into()
        } else {
            detached.join(", ")
        },
        pin_dir.display()
    );
    Ok(())
}

fn print_status(s: &Status) {
    println!("config       {}", s.config);
    println!("pins         {} ({})", s.pin_dir, s.start);
    println!(
        "mode         {}",
        if s.monitor {
            "MONITOR (counting, dropping nothing)"
        } else {
            "enforcing"
        }
    );
    for (iface, mode) in &s.interfaces {
        println!("interface    {iface} ({mode})");
    }
    for p in &s.protected {
        println!("protected    {p}");
    }
    println!(
        "prefixes     {} IPv4, {} IPv6 (generation {})",
        s.prefixes_v4, s.prefixes_v6, s.generation
    );
    println!(
        "dynamic      {} blocked, {} allowed",
        s.block_entries, s.allow_entries
    );
    println!("last reload  {}", s.last_reload);
    println!("counters");
    for (name, n) in &s.counters {
        println!("  {name:<20} {n}");
    }
    println!("groups (packets passed)");
    for (name, n) in &s.groups {
        println!("  {name:<20} {n}");
    }
    print_agent(s);
}

fn print_agent(s: &Status) {
    let now = ewsgate::agent::feeds::unix_now();
    let ago = |t: Option<u64>| {
        t.map_or("never".to_string(), |t| {
            format!("{} ago", span(now.saturating_sub(t)))
        })
    };
    if !s.feeds.is_empty() {
        println!("feeds");
    }
    for f in &s.feeds {
        let state = match (&f.since, &f.why) {
            (Some(since), Some(why)) => format!("{} since {}: {why}", f.state, ago(Some(*since))),
            (None, Some(why)) => format!("{}: {why}", f.state),
            _ => f.state.clone(),
        };
        println!(
            "  {:<20} {} prefixes, copy fetched {}, confirmed {}; {state}",
            f.group,
            f.prefixes,
            ago(f.fetched),
            ago(f.confirmed)
        );
    }
    if let Some(f) = &s.fleet {
        let state = match (f.partitioned_since, &f.why) {
            (Some(since), Some(why)) => format!("partitioned since {}: {why}", ago(Some(since))),
            (Some(since), None) => format!("partitioned since {}", ago(Some(since))),
            _ => f.state.clone(),
        };
        println!(
            "fleet        gate {} {state}; revision {}, {} fleet blocks, {} fleet allows, {} queued, {} resyncs",
            f.gate,
            f.revision.map_or("-".into(), |r| r.to_string()),
            f.fleet_blocks,
            f.fleet_allows,
            f.outbox,
            f.resyncs
        );
        if let Some((rev, why)) = &f.refused {
            println!("fleet        refused revision {rev}: {why}");
        }
    }
    if let Some(c) = &s.crowdsec {
        let state = match &c.why {
            Some(why) => format!("{}: {why}", c.state),
            None => c.state.clone(),
        };
        println!(
            "crowdsec     {} {state}; {} decisions on {} entries, last pull {}",
            c.lapi,
            c.decisions,
            c.entries,
            ago(c.last_pull)
        );
    }
}

/// 42s, 5m, 3h, 2d.
fn span(secs: u64) -> String {
    match secs {
        s if s < 120 => format!("{s}s"),
        s if s < 7200 => format!("{}m", s / 60),
        s if s < 172_800 => format!("{}h", s / 3600),
        s => format!("{}d", s / 86400),
    }
}
