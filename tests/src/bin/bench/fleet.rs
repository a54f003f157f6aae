//! `cargo xtask bench fleet`: the fleet over a real three-member etcd cluster (Debian's
//! etcd-server), written to target/bench/fleet.json as rows {"measure", "value", "unit"}.
//!
//! - propagation: a block typed on gate 1 until the first SYN dropped at gate 2, 200 times
//!   (p50, p99, max);
//! - resync: gate 2 cut off while 100,000 entry changes happen (50,000 deletes, 50,000 new
//!   entries, then a compaction); the time from healing until it holds exactly the fleet's
//!   50,000 entries;
//! - scale: 50 watcher processes (`etcdctl watch`, the same watch a gate holds) over 100,000
//!   live entries, and a burst of 10,000 blocks written as a gate writes them (a put each,
//!   on a lease shared by the blocks that lapse within the same 10 s): the etcd write rate
//!   it reached against the 167 puts/s that 10,000 blocks a minute need, and the time until
//!   all 50 watchers saw every block.

use std::{
    fs,
    net::{SocketAddr, TcpStream},
    path::Path,
    process::{Child, Command, Stdio},
    thread,
    time::{Duration, Instant},
};

use anyhow::{bail, Context};
use ewsgate::agent::fleet::etcd_client::{Client, PutOptions};
use serde_json::{json, Value};
use tests::{
    fleet::{Etcd, CLIENT_PORTS},
    gate::{gate4, Gate},
    lab::{stop_pid, Netns},
};

const BLOCKS: usize = 200;
const RESYNC_ENTRIES: usize = 50_000;
const LIVE: usize = 100_000;
const BURST: usize = 10_000;
const WATCHERS: usize = 50;

pub fn run() -> anyhow::Result<()> {
    let mut rows = Vec::new();
    let mut etcd = Etcd::start()?;
    let mut gates = start_gates(&mut etcd)?;
    propagation(&gates, &mut rows)?;
    // Gate 1 has done its part; the resync is gate 2's.
    drop(gates.remove(0));
    resync(&etcd, &gates[0], &mut rows)?;
    drop(gates);
    scale(&etcd, &mut rows)?;
    let out = Path::new(env!("CARGO_MANIFEST_DIR")).join("../target/bench");
    fs::create_dir_all(&out)?;
    fs::write(out.join("fleet.json"), serde_json::to_string_pretty(&rows)?)?;
    println!("\n{:<34} {:>12}  unit", "measure", "value");
    for r in &rows {
        println!(
            "{:<34} {:>12}  {}",
            r["measure"].as_str().unwrap_or(""),
            r["value"].to_string(),
            r["unit"].as_str().unwrap_or("")
        );
    }
    println!("\nwritten to target/bench/fleet.json");
    Ok(())
}

fn row(rows: &mut Vec<Value>, measure: &str, value: f64, unit: &str) {
    let value = (value * 1000.0).round() / 1000.0;
    println!("{measure}: {value} {unit}");
    rows.push(json!({"measure": measure, "value": value, "unit": unit}));
}

struct Member {
    gate: Gate,
    link: String,
}

fn start_gates(etcd: &mut Etcd) -> anyhow::Result<Vec<Member>> {
    let mut out = Vec::new();
    for i in 1..=2 {
        let fleet = format!(
            "\n[fleet]\nendpoints = [{}]\ngate = \"gate-{i}\"\ntimeout_ms = 1000\n",
            Etcd::endpoints()
        );
        let tokens = format!(
            "metadata_urls = [\"{}\"]\n",
            ewsgate::identity::tokens::testkit::AMURL
        );
        let rules = "[[rule]]\nname = \"offices\"\ngroups = [\"offices\"]\naction = \"allow\"\n";
        let gate = Gate::start_edited(5, &tokens, rules, |text, _| text + &fleet);
        let link = etcd.link(&gate.lab.gate)?;
        out.push(Member { gate, link });
    }
    for m in &out {
        wait(Duration::from_secs(30), || fleet(m)["state"] == "connected")
            .context("a gate never joined the fleet")?;
    }
    Ok(out)
}

fn status(m: &Member) -> Value {
    m.gate
        .daemon
        .cli(&["status", "--json"])
        .ok()
        .and_then(|t| serde_json::from_str(&t).ok())
        .unwrap_or(Value::Null)
}

fn fleet(m: &Member) -> Value {
    status(m)["fleet"].clone()
}

fn wait(limit: Duration, mut ok: impl FnMut() -> bool) -> anyhow::Result<()> {
    let deadline = Instant::now() + limit;
    while Instant::now() < deadline {
        if ok() {
            return Ok(());
        }
        thread::sleep(Duration::from_millis(50));
    }
    bail!("not within {limit:?}")
}

/// One SYN from `ns` to the gate: true when it was answered.
fn answered(ns: &Netns) -> bool {
    let to: SocketAddr = gate4();
    ns.run(move || TcpStream::connect_timeout(&to, Duration::from_millis(20)).is_ok())
}

fn propagation(g: &[Member], rows: &mut Vec<Value>) -> anyhow::Result<()> {
    let office = g[1].gate.lab.client("office");
    let mut took = Vec::new();
    for i in 0..BLOCKS {
        g[0].gate
            .daemon
            .cli(&["block", "add", "198.51.100.10", "--ttl", "60"])?;
        let at = Instant::now();
        let deadline = at + Duration::from_secs(10);
        loop {
            if !answered(office) {
                took.push(at.elapsed());
                break;
            }
            if Instant::now() > deadline {
                bail!("block {i} never reached gate 2");
            }
        }
        g[0].gate.daemon.cli(&["block", "del", "198.51.100.10"])?;
        wait(Duration::from_secs(10), || answered(office)).context("unblock never arrived")?;
    }
    took.sort();
    let ms = |q: f64| took[((took.len() - 1) as f64 * q).round() as usize].as_secs_f64() * 1e3;
    row(rows, "propagation_blocks", took.len() as f64, "blocks");
    row(rows, "propagation_p50_ms", ms(0.5), "ms");
    row(rows, "propagation_p99_ms", ms(0.99), "ms");
    row(rows, "propagation_max_ms", ms(1.0), "ms");
    Ok(())
}

/// A client on the first member, from a thread inside etcd's namespace.
fn in_etcd<T: Send + 'static>(
    etcd: &Etcd,
    f: impl FnOnce(
            Client,
        )
            -> std::pin::Pin<Box<dyn std::future::Future<Output = anyhow::Result<T>> + Send>>
        + Send
        + 'static,
) -> anyhow::Result<T> {
    let endpoint = format!("http://127.0.0.1:{}", CLIENT_PORTS[0]);
    etcd.ns.run(move || {
        let rt = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(2)
            .enable_all()
            .build()?;
        rt.block_on(async move {
            let client = Client::connect([endpoint], None).await?;
            f(client).await
        })
    })
}

fn v6(n: usize, set: u16) -> String {
    format!("2001:db8:{set:x}:{:x}::{:x}_128", n >> 16, n & 0xffff)
}

/// Puts `n` block entries of `set` (no lease, an hour's expiry), `parallel` at a time.
async fn load(client: Client, n: usize, set: u16, parallel: usize) -> anyhow::Result<()> {
    let until = ewsgate::agent::fleet::unix_ms() + 3_600_000;
    let value =
        serde_json::to_vec(&json!({"until_ms": until, "reason": "bench", "gate": "bench"}))?;
    let mut tasks = Vec::new();
    for w in 0..parallel {
        let mut c = client.clone();
        let value = value.clone();
        tasks.push(tokio::spawn(async move {
            let mut i = w;
            while i < n {
                c.put(
                    format!("/ewsgate/block/{}", v6(i, set)),
                    value.clone(),
                    None,
                )
                .await?;
                i += parallel;
            }
            anyhow::Ok(())
        }));
    }
    for t in tasks {
        t.await??;
    }
    Ok(())
}

fn resync(etcd: &Etcd, g2: &Member, rows: &mut Vec<Value>) -> anyhow::Result<()> {
    // The first 50,000 entries reach gate 2 by a join (one list), not 50,000 watch events.
    etcd.set_link(&g2.link, false)?;
    wait(Duration::from_secs(20), || {
        fleet(g2)["state"] == "partitioned"
    })?;
    in_etcd(etcd, |c| Box::pin(load(c, RESYNC_ENTRIES, 0xa, 64)))?;
    etcd.set_link(&g2.link, true)?;
    let joined = Instant::now();
    wait(Duration::from_secs(120), || {
        status(g2)["block_entries"].as_u64() == Some(RESYNC_ENTRIES as u64)
    })
    .context("gate 2 never held the first 50,000 entries")?;
    row(
        rows,
        "join_50k_entries_seconds",
        joined.elapsed().as_secs_f64(),
        "s",
    );
    etcd.set_link(&g2.link, false)?;
    wait(Duration::from_secs(20), || {
        fleet(g2)["state"] == "partitioned"
    })?;
    let before = fleet(g2)["resyncs"].as_u64().unwrap_or(0);
    // 100,000 changes while gate 2 is away: every entry deleted, as many new ones.
    etcd.ctl("del --prefix /ewsgate/block/")?;
    in_etcd(etcd, |c| Box::pin(load(c, RESYNC_ENTRIES, 0xb, 64)))?;
    let rev = etcd.revision()?;
    etcd.ctl(&format!("compact {rev}"))?;
    etcd.set_link(&g2.link, true)?;
    let healed = Instant::now();
    wait(Duration::from_secs(120), || {
        let s = status(g2);
        s["fleet"]["resyncs"].as_u64() > Some(before)
            && s["block_entries"].as_u64() == Some(RESYNC_ENTRIES as u64)
    })
    .with_context(|| {
        let log = g2.gate.daemon.log();
        let tail: Vec<&str> = log.lines().rev().take(20).collect();
        format!(
            "gate 2 never resynced: {}\n{}",
            status(g2)["fleet"],
            tail.into_iter().rev().collect::<Vec<_>>().join("\n")
        )
    })?;
    row(rows, "resync_seconds", healed.elapsed().as_secs_f64(), "s");
    row(
        rows,
        "resync_entry_changes",
        2.0 * RESYNC_ENTRIES as f64,
        "changes",
    );
    let list = g2.gate.daemon.cli(&["block", "list"])?;
    let old = list.matches("2001:db8:a:").count();
    let new = list.matches("2001:db8:b:").count();
    if old != 0 || new != RESYNC_ENTRIES {
        bail!("gate 2 is not exact after resync: {old} old, {new} new entries");
    }
    etcd.ctl("del --prefix /ewsgate/block/")?;
    Ok(())
}

fn scale(etcd: &Etcd, rows: &mut Vec<Value>) -> anyhow::Result<()> {
    let started = Instant::now();
    in_etcd(etcd, |c| Box::pin(load(c, LIVE, 0xc, 64)))?;
    row(
        rows,
        "load_100k_entries_per_s",
        LIVE as f64 / started.elapsed().as_secs_f64(),
        "puts/s",
    );
    let dir = etcd.dir.join("watchers");
    fs::create_dir_all(&dir)?;
    let mut watchers: Vec<Child> = Vec::new();
    for i in 0..WATCHERS {
        let out = fs::File::create(dir.join(format!("w{i}")))?;
        let port = CLIENT_PORTS[i % 3];
        watchers.push(
            Command::new("ip")
                .args(["netns", "exec", &etcd.ns.name, "etcdctl"])
                .env("ETCDCTL_API", "3")
                .arg(format!("--endpoints=http://127.0.0.1:{port}"))
                .args(["watch", "--prefix", "/ewsgate/block/burst-"])
                .stdout(out)
                .stderr(Stdio::null())
                .spawn()?,
        );
    }
    thread::sleep(Duration::from_secs(2));
    let burst = Instant::now();
    in_etcd(etcd, |client| {
        Box::pin(async move {
            let until = ewsgate::agent::fleet::unix_ms() + 600_000;
            let value = serde_json::to_vec(
                &json!({"until_ms": until, "reason": "burst", "gate": "bench"}),
            )?;
            let mut tasks = Vec::new();
            for w in 0..16 {
                let mut c = client.clone();
                let value = value.clone();
                tasks.push(tokio::spawn(async move {
                    let mut i = w;
                    // As a gate writes blocks that lapse within the same 10 s: one lease
                    // for them all (here per writer), then a put each.
                    let lease = c.lease_grant(602, None).await?.id();
                    while i < BURST {
                        let opts = PutOptions::new().with_lease(lease);
                        c.put(
                            format!("/ewsgate/block/burst-{i}"),
                            value.clone(),
                            Some(opts),
                        )
                        .await?;
                        i += 16;
                    }
                    anyhow::Ok(())
                }));
            }
            for t in tasks {
                t.await??;
            }
            Ok(())
        })
    })?;
    let wrote = burst.elapsed().as_secs_f64();
    let seen = |i: usize| {
        fs::read_to_string(dir.join(format!("w{i}")))
            .map(|t| t.lines().filter(|l| *l == "PUT").count())
            .unwrap_or(0)
    };
    let all = wait(Duration::from_secs(120), || {
        (0..WATCHERS).all(|i| seen(i) >= BURST)
    });
    let fanout = burst.elapsed().as_secs_f64();
    for w in &watchers {
        stop_pid(w.id());
    }
    for mut w in watchers {
        let _ = w.wait();
    }
    all.context("not every watcher saw every block")?;
    row(rows, "scale_watchers", WATCHERS as f64, "processes");
    row(rows, "scale_live_entries", (LIVE + BURST) as f64, "entries");
    row(rows, "burst_10k_blocks_seconds", wrote, "s");
    row(
        rows,
        "burst_etcd_writes_per_s",
        BURST as f64 / wrote,
        "writes/s",
    );
    row(
        rows,
        "needed_writes_per_s_at_10k_per_min",
        BURST as f64 / 60.0,
        "writes/s",
    );
    row(rows, "burst_seen_by_all_watchers_seconds", fanout, "s");
    let st = etcd.ctl("endpoint status -w json")?;
    let v: Value = serde_json::from_str(&st)?;
    if let Some(db) = v[0]["Status"]["dbSize"].as_f64() {
        row(rows, "etcd_db_mib", db / 1048576.0, "MiB");
    }
    Ok(())
}
