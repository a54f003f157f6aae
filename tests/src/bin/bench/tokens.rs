//! `cargo xtask bench tokens`: token verification through the cache, on 1 and 2 threads,
//! written to target/bench/tokens.json and printed as ratios.
//!
//! Subjects, each around its own copy of the same Exchange validator and the same tokens:
//! - `ewsgate`: the library's `TokenCache` (quick_cache's sharded cache, no lock held across
//!   a signature check);
//! - `moka`: the same semantics on moka's sync cache, the other candidate;
//! - `mutex-hashmap`: the earlier design, kept here as the reference: two hand-written
//!   HashMaps behind one `Mutex` that the proxy held across the RSA check.
//!
//! Workloads: `hit`, every token already verified (a keep-alive client resending its token);
//! `miss`, every token new (a fresh cache each round, so each lookup costs an RSA check);
//! `hit_beside_miss`, the hit rate of one thread while a second verifies new tokens (what a
//! keep-alive client sees while another client's new token is being checked: with one lock
//! held across the RSA check it waits, without it it does not). Rounds alternate the
//! subjects; the median of each is kept. Ratios, not seconds, are what carries from one
//! machine to another; the load average at the start is recorded beside them.

use std::{
    collections::HashMap,
    fs,
    path::Path,
    sync::{
        atomic::{AtomicBool, Ordering},
        Arc, Mutex,
    },
    thread,
    time::Instant,
};

use ewsgate::{
    identity::token_cache::TokenCache,
    identity::tokens::{testkit, TokenError, Validator, Verified},
};
use serde_json::{json, Value};

const ROUNDS: usize = 7;
/// Distinct tokens each thread cycles through in `hit`.
const HOT_TOKENS: usize = 256;
/// Lookups per thread per `hit` round.
const HIT_LOOKUPS: usize = 200_000;
/// Distinct new tokens each thread verifies per `miss` round.
const MISS_TOKENS: usize = 600;
const CAPACITY: usize = 100_000;

/// What every subject offers: `verify_for_ews` on a shared reference.
trait Verifier: Send + Sync {
    fn verify(&self, token: &str, now: u64) -> Result<Verified, TokenError>;
}

impl Verifier for TokenCache {
    fn verify(&self, token: &str, now: u64) -> Result<Verified, TokenError> {
        self.verify_for_ews(token, now)
    }
}

/// The earlier design: one lock around the whole cache and the validator behind it.
struct MutexHashMap(Mutex<before::TokenCache>);

impl Verifier for MutexHashMap {
    fn verify(&self, token: &str, now: u64) -> Result<Verified, TokenError> {
        self.0.lock().expect("lock").verify_for_ews(token, now)
    }
}

/// The same semantics as ewsgate's cache, on moka, the other candidate: each entry expires
/// at its own time through moka's `Expiry`, and `until` is checked on each hit.
struct MokaCache {
    validator: Validator,
    verified: moka::sync::Cache<[u8; 32], Arc<(Verified, u64)>>,
    refused: moka::sync::Cache<[u8; 32], Arc<(TokenError, u64)>>,
}

struct UntilItsTime;

impl<T> moka::Expiry<[u8; 32], Arc<(T, u64)>> for UntilItsTime {
    fn expire_after_create(
        &self,
        _: &[u8; 32],
        e: &Arc<(T, u64)>,
        _: Instant,
    ) -> Option<std::time::Duration> {
        Some(std::time::Duration::from_secs(
            e.1.saturating_sub(testkit::NOW),
        ))
    }
}

fn moka_half<T: Send + Sync + 'static>() -> moka::sync::Cache<[u8; 32], Arc<(T, u64)>> {
    moka::sync::Cache::builder()
        .max_capacity(CAPACITY as u64)
        .expire_after(UntilItsTime)
        .build()
}

impl Verifier for MokaCache {
    fn verify(&self, token: &str, now: u64) -> Result<Verified, TokenError> {
        let key = hash(token);
        if let Some(e) = self.verified.get(&key) {
            if now <= e.1 {
                return Ok(e.0.clone());
            }
            self.verified.invalidate(&key);
        }
        if let Some(e) = self.refused.get(&key) {
            if now < e.1 {
                return Err(e.0.clone());
            }
            self.refused.invalidate(&key);
        }
        let result = self.validator.verify_for_ews(token, now);
        match &result {
            Ok(v) => self.verified.insert(
                key,
                Arc::new((v.clone(), v.expires + self.validator.expect.leeway)),
            ),
            Err(TokenError::UnknownKey(_)) => {}
            Err(e) => self.refused.insert(key, Arc::new((e.clone(), now + 10))),
        }
        result
    }
}

/// The same SHA-256 key ewsgate's cache uses.
fn hash(token: &str) -> [u8; 32] {
    let d = aws_lc_rs::digest::digest(&aws_lc_rs::digest::SHA256, token.as_bytes());
    let mut key = [0u8; 32];
    key.copy_from_slice(d.as_ref());
    key
}

fn subject(name: &str, signer: &testkit::Signer) -> Box<dyn Verifier> {
    let v = testkit::validator(&[signer]);
    match name {
        "ewsgate" => Box::new(TokenCache::new(v, None, CAPACITY)),
        "moka" => Box::new(MokaCache {
            validator: v,
            verified: moka_half(),
            refused: moka_half(),
        }),
        _ => Box::new(MutexHashMap(Mutex::new(before::TokenCache::new(
            v, CAPACITY,
        )))),
    }
}

const SUBJECTS: [&str; 3] = ["ewsgate", "moka", "mutex-hashmap"];

/// `count` distinct callback tokens, valid at `testkit::NOW`.
fn tokens(signer: &testkit::Signer, count: usize, tag: &str) -> Vec<String> {
    (0..count)
        .map(|i| {
            let claims = testkit::with(
                testkit::callback_claims(),
                "nameid",
                json!(format!("{tag}-{i}@example.org")),
            );
            testkit::sign(signer, &claims)
        })
        .collect()
}

/// This thread's CPU time, in nanoseconds.
fn thread_cpu_ns() -> u64 {
    let mut ts = libc::timespec {
        tv_sec: 0,
        tv_nsec: 0,
    };
    // SAFETY: clock_gettime writes into the timespec we own.
    unsafe { libc::clock_gettime(libc::CLOCK_THREAD_CPUTIME_ID, &mut ts) };
    ts.tv_sec as u64 * 1_000_000_000 + ts.tv_nsec as u64
}

/// Verifications per second (wall clock) and CPU nanoseconds per verification, with
/// `threads` threads, thread `t` verifying `work[t]` `repeat` times over.
fn run(v: &dyn Verifier, work: &[Vec<String>], threads: usize, repeat: usize) -> (f64, f64) {
    let started = Instant::now();
    let cpu: u64 = thread::scope(|s| {
        let handles: Vec<_> = work
            .iter()
            .take(threads)
            .map(|list| {
                s.spawn(move || {
                    let before = thread_cpu_ns();
                    for i in 0..repeat * list.len() {
                        let ok = v.verify(&list[i % list.len()], testkit::NOW).is_ok();
                        assert!(ok, "a valid token was refused");
                    }
                    thread_cpu_ns() - before
                })
            })
            .collect();
        handles.into_iter().map(|h| h.join().expect("thread")).sum()
    });
    let ops = (threads * repeat * work[0].len()) as f64;
    (ops / started.elapsed().as_secs_f64(), cpu as f64 / ops)
}

/// Hits per second on `hot` while a second thread verifies every token of `cold` once, and
/// the share of that time the hitting thread was on a CPU (the rest it waited: for a lock,
/// or for a CPU on a busy machine).
fn hit_beside_miss(v: &dyn Verifier, hot: &[String], cold: &[String]) -> (f64, f64) {
    let done = AtomicBool::new(false);
    let mut hits = 0usize;
    let started = Instant::now();
    let cpu_before = thread_cpu_ns();
    thread::scope(|s| {
        s.spawn(|| {
            for t in cold {
                assert!(v.verify(t, testkit::NOW).is_ok());
            }
            done.store(true, Ordering::Release);
        });
        while !done.load(Ordering::Acquire) {
            assert!(v.verify(&hot[hits % hot.len()], testkit::NOW).is_ok());
            hits += 1;
        }
    });
    let wall = started.elapsed();
    let on_cpu = (thread_cpu_ns() - cpu_before) as f64 / wall.as_nanos() as f64;
    (hits as f64 / wall.as_secs_f64(), on_cpu)
}

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(f64::total_cmp);
    v[v.len() / 2]
}

pub fn run_suite() -> anyhow::Result<()> {
    eprintln!("tokens: minting keys and tokens");
    let signer = testkit::signer();
    let hot: Vec<Vec<String>> = (0..2)
        .map(|t| tokens(&signer, HOT_TOKENS, &format!("hot{t}")))
        .collect();
    let cold: Vec<Vec<String>> = (0..2)
        .map(|t| tokens(&signer, MISS_TOKENS, &format!("cold{t}")))
        .collect();
    let load = fs::read_to_string("/proc/loadavg").unwrap_or_default();
    let load: f64 = load
        .split(' ')
        .next()
        .and_then(|l| l.parse().ok())
        .unwrap_or(f64::NAN);
    let mut samples: HashMap<(&str, &str, usize), Vec<f64>> = HashMap::new();
    let mut cpu_ns: HashMap<(&str, &str, usize), Vec<f64>> = HashMap::new();
    let mut cpu_share: HashMap<&str, Vec<f64>> = HashMap::new();
    for round in 0..ROUNDS {
        eprintln!("tokens: round {}/{ROUNDS}", round + 1);
        for threads in [1, 2] {
            for name in SUBJECTS {
                // hit: warm the cache with every token first, then only look up.
                let v = subject(name, &signer);
                run(&*v, &hot, 2, 1);
                let (rate, cpu) = run(&*v, &hot, threads, HIT_LOOKUPS / HOT_TOKENS);
                samples
                    .entry((name, "hit", threads))
                    .or_default()
                    .push(rate);
                cpu_ns.entry((name, "hit", threads)).or_default().push(cpu);
                // miss: a fresh cache, every token new.
                let v = subject(name, &signer);
                let (rate, cpu) = run(&*v, &cold, threads, 1);
                samples
                    .entry((name, "miss", threads))
                    .or_default()
                    .push(rate);
                cpu_ns.entry((name, "miss", threads)).or_default().push(cpu);
            }
        }
        for name in SUBJECTS {
            let v = subject(name, &signer);
            run(&*v, &hot, 1, 1);
            let (rate, on_cpu) = hit_beside_miss(&*v, &hot[0], &cold[1]);
            samples
                .entry((name, "hit_beside_miss", 2))
                .or_default()
                .push(rate);
            cpu_share.entry(name).or_default().push(on_cpu);
        }
    }
    let mut rows = vec![json!({"measure": "loadavg_1min_at_start", "value": load})];
    for ((name, workload, threads), v) in &samples {
        rows.push(
            json!({"measure": "verify_per_s", "subject": name, "workload": workload,
                         "threads": threads, "value": median(v.clone()), "unit": "1/s"}),
        );
    }
    for ((name, workload, threads), v) in &cpu_ns {
        rows.push(
            json!({"measure": "cpu_ns_per_verify", "subject": name, "workload": workload,
                         "threads": threads, "value": median(v.clone()), "unit": "ns"}),
        );
    }
    for (name, v) in &cpu_share {
        rows.push(
            json!({"measure": "hit_thread_on_cpu_share", "subject": name,
                         "workload": "hit_beside_miss", "value": median(v.clone())}),
        );
    }
    let value = |name: &str, workload: &str, threads: usize| {
        median(samples[&(name, workload, threads)].clone())
    };
    for name in SUBJECTS {
        for workload in ["hit", "miss", "hit_beside_miss"] {
            rows.push(
                json!({"measure": "of_mutex_hashmap_2_threads", "subject": name,
                "workload": workload,
                "value": value(name, workload, 2) / value("mutex-hashmap", workload, 2)}),
            );
        }
        for workload in ["hit", "miss"] {
            rows.push(json!({"measure": "2_threads_over_1", "subject": name,
                "workload": workload,
                "value": value(name, workload, 2) / value(name, workload, 1)}));
        }
    }
    let out = Path::new(env!("CARGO_MANIFEST_DIR")).join("../target/bench");
    fs::create_dir_all(&out)?;
    fs::write(
        out.join("tokens.json"),
        serde_json::to_string_pretty(&rows)?,
    )?;
    print_table(&rows, load);
    println!("\nwritten to target/bench/tokens.json");
    Ok(())
}

fn print_table(rows: &[Value], load: f64) {
    let find = |measure: &str, name: &str, workload: &str, threads: Option<usize>| {
        rows.iter()
            .find(|r| {
                r["measure"] == measure
                    && r["subject"] == name
                    && r["workload"] == workload
                    && threads.is_none_or(|t| r["threads"] == t)
            })
            .and_then(|r| r["value"].as_f64())
            .unwrap_or(f64::NAN)
    };
    println!(
        "\ntoken verification through the cache, median of {ROUNDS} rounds (hit: {HOT_TOKENS} warm tokens per thread; miss: {MISS_TOKENS} new tokens per thread); load average {load:.2} at the start on {} CPUs",
        thread::available_parallelism().map_or(0, |n| n.get())
    );
    println!(
        "{:<14} {:>9} {:>12} {:>12} {:>14} {:>12} {:>11} {:>11}",
        "subject",
        "workload",
        "1 thread/s",
        "2 threads/s",
        "2 thr over 1",
        "of mutex, 2",
        "CPU ns, 1",
        "CPU ns, 2"
    );
    for workload in ["hit", "miss"] {
        for name in SUBJECTS {
            println!(
                "{name:<14} {workload:>9} {:>12.0} {:>12.0} {:>13.2}× {:>11.2}× {:>11.0} {:>11.0}",
                find("verify_per_s", name, workload, Some(1)),
                find("verify_per_s", name, workload, Some(2)),
                find("2_threads_over_1", name, workload, None),
                find("of_mutex_hashmap_2_threads", name, workload, None),
                find("cpu_ns_per_verify", name, workload, Some(1)),
                find("cpu_ns_per_verify", name, workload, Some(2)),
            );
        }
    }
    println!("\nhits/s of one thread while a second verifies {MISS_TOKENS} new tokens, and the share of that time the hitting thread ran");
    for name in SUBJECTS {
        println!(
            "{name:<14} {:>12.0} {:>11.2}× of mutex-hashmap {:>8.0}% on a CPU",
            find("verify_per_s", name, "hit_beside_miss", Some(2)),
            find("of_mutex_hashmap_2_threads", name, "hit_beside_miss", None),
            100.0 * find("hit_thread_on_cpu_share", name, "hit_beside_miss", None),
        );
    }
}

/// The token cache as it was before the concurrent cache: two HashMaps with hand-written
/// eviction, used behind one `Mutex`. Kept only as the benchmark's reference.
mod before {
    use std::collections::HashMap;

    use ewsgate::identity::tokens::{TokenError, Validator, Verified};

    const NEGATIVE_TTL: u64 = 10;
    type Key = [u8; 32];

    struct Entry<T> {
        value: T,
        until: u64,
        inserted: u64,
    }

    pub struct TokenCache {
        validator: Validator,
        verified: HashMap<Key, Entry<Verified>>,
        refused: HashMap<Key, Entry<TokenError>>,
        capacity: usize,
    }

    impl TokenCache {
        pub fn new(validator: Validator, capacity: usize) -> TokenCache {
            TokenCache {
                validator,
                verified: HashMap::new(),
                refused: HashMap::new(),
                capacity: capacity.max(1),
            }
        }

        pub fn verify_for_ews(&mut self, token: &str, now: u64) -> Result<Verified, TokenError> {
            let key = super::hash(token);
            let leeway = self.validator.expect.leeway;
            if let Some(e) = self.verified.get(&key) {
                if now <= e.value.expires.saturating_add(leeway) {
                    return Ok(e.value.clone());
                }
                self.verified.remove(&key);
            }
            if let Some(e) = self.refused.get(&key) {
                if now < e.until {
                    return Err(e.value.clone());
                }
                self.refused.remove(&key);
            }
            let result = self.validator.verify_for_ews(token, now);
            match &result {
                Ok(v) => {
                    let until = v.expires.saturating_add(leeway);
                    insert(
                        &mut self.verified,
                        self.capacity,
                        key,
                        v.clone(),
                        until,
                        now,
                    );
                }
                Err(TokenError::UnknownKey(_)) => {}
                Err(e) => {
                    let until = now + NEGATIVE_TTL;
                    insert(&mut self.refused, self.capacity, key, e.clone(), until, now);
                }
            }
            result
        }
    }

    fn insert<T>(
        map: &mut HashMap<Key, Entry<T>>,
        capacity: usize,
        key: Key,
        value: T,
        until: u64,
        now: u64,
    ) {
        if map.len() >= capacity && !map.contains_key(&key) {
            map.retain(|_, e| e.until > now);
            if map.len() >= capacity {
                let mut ages: Vec<u64> = map.values().map(|e| e.inserted).collect();
                ages.sort_unstable();
                let cutoff = ages[(ages.len() / 8).min(ages.len() - 1)];
                map.retain(|_, e| e.inserted > cutoff);
            }
        }
        map.insert(
            key,
            Entry {
                value,
                until,
                inserted: now,
            },
        );
    }
}
