//! `orderly simulate`: the deterministic simulator over seeds `S..S+K`.
//! Seeds run in parallel threads (each seed alone is single-threaded and
//! replays exactly); a terminal gets a progress bar, anything else plain
//! lines on stderr. Standard output carries only what a seed determines: the
//! summary (steps, faults injected by kind, orders by final state, invariant
//! checks, violations with their seed, step and trace) or, with `--json`, one
//! JSON object on the last line. The exit code is 1 when an invariant broke.

use anyhow::{Context, Result, bail};
use indicatif::{ProgressBar, ProgressStyle};
use orderly_sim::{FaultSet, SeedReport, SimConfig, Violation};
use serde::Serialize;
use std::collections::BTreeMap;
use std::io::IsTerminal;
use std::sync::Mutex;
use std::sync::atomic::{AtomicU64, Ordering};

/// Most seeds one invocation runs.
pub const SEEDS_MAX: u64 = 1_000_000;
/// Most fault-phase steps per seed.
pub const STEPS_MAX: u64 = 1_000_000;

/// What `orderly simulate` was asked to do.
#[derive(Debug, Clone)]
pub struct SimulateArgs {
    /// The first seed.
    pub seed: u64,
    /// How many seeds: `seed`, `seed + 1`, …
    pub seeds: u64,
    /// `all`, `none` or a comma-separated list of fault kinds.
    pub faults: String,
    /// Steps of each seed's fault phase.
    pub steps: u64,
    /// Print one JSON object on the last line instead of the summary.
    pub json: bool,
}

/// The outcome of every seed, added up: what `--json` prints.
#[derive(Debug, Clone, Serialize)]
pub struct Summary {
    /// How many seeds ran.
    pub seeds: u64,
    /// The first seed.
    pub seed_start: u64,
    /// Fault kinds enabled.
    pub faults: Vec<String>,
    /// Steps of each seed's fault phase.
    pub steps_per_seed: u64,
    /// Steps run over all seeds (fault and quiet phases).
    pub steps: u64,
    /// Of which quiet-phase steps.
    pub quiet_steps: u64,
    /// Faults injected, by kind.
    pub faults_injected: BTreeMap<String, u64>,
    /// Orders by state at the end of their seed.
    pub orders_by_state: BTreeMap<String, u64>,
    /// How many times each invariant was checked.
    pub invariants_checked: BTreeMap<String, u64>,
    /// Every violation (each seed stops at its first).
    pub violations: Vec<Violation>,
    /// Workload and engine counters.
    pub stats: BTreeMap<String, u64>,
    /// Each seed's final-state fingerprint, folded in seed order.
    pub fingerprint: String,
}

/// Runs the command; returns the process exit code (0 clean, 1 on a violation).
pub async fn run(args: SimulateArgs) -> Result<i32> {
    let faults = FaultSet::parse(&args.faults).context("invalid --faults")?;
    if args.seeds == 0 || args.seeds > SEEDS_MAX {
        bail!("--seeds must be between 1 and {SEEDS_MAX}");
    }
    if args.steps > STEPS_MAX {
        bail!("--steps must be at most {STEPS_MAX}");
    }
    if args.seed.checked_add(args.seeds - 1).is_none() {
        bail!("--seed + --seeds overflows a u64");
    }
    let config = SimConfig { steps: args.steps, faults, ..SimConfig::default() };
    let started = std::time::Instant::now();
    let (seed, seeds) = (args.seed, args.seeds);
    let reports = tokio::task::spawn_blocking(move || run_seeds(&config, seed, seeds)).await?;
    let summary = summarize(&args, &reports);
    eprintln!("simulated {} seeds in {:.1} s", summary.seeds, started.elapsed().as_secs_f64());
    if args.json {
        println!("{}", serde_json::to_string(&summary)?);
    } else {
        print!("{}", render(&summary));
    }
    Ok(if summary.violations.is_empty() { 0 } else { 1 })
}

/// Runs the seeds on as many threads as there are cores; reports in seed order.
fn run_seeds(config: &SimConfig, first: u64, seeds: u64) -> Vec<SeedReport> {
    let threads = std::thread::available_parallelism().map_or(1, |n| n.get()).min(seeds as usize).max(1);
    let next = AtomicU64::new(0);
    let done: Mutex<Vec<SeedReport>> = Mutex::new(Vec::new());
    let progress = Progress::new(seeds);
    std::thread::scope(|scope| {
        for _ in 0..threads {
            scope.spawn(|| {
                loop {
                    let i = next.fetch_add(1, Ordering::SeqCst);
                    if i >= seeds {
                        return;
                    }
                    let report = orderly_sim::run_seed(config, first + i);
                    progress.seed_done(&report);
                    done.lock().unwrap_or_else(|p| p.into_inner()).push(report);
                }
            });
        }
    });
    progress.finish();
    let mut reports = done.into_inner().unwrap_or_else(|p| p.into_inner());
    reports.sort_by_key(|r| r.seed);
    reports
}

/// A progress bar on a terminal, plain lines otherwise (both on stderr).
struct Progress {
    bar: Option<ProgressBar>,
}

impl Progress {
    fn new(seeds: u64) -> Progress {
        if !std::io::stderr().is_terminal() {
            return Progress { bar: None };
        }
        let bar = ProgressBar::new(seeds);
        if let Ok(style) = ProgressStyle::with_template("{bar:40} {pos}/{len} seeds  {elapsed_precise}  {msg}") {
            bar.set_style(style);
        }
        Progress { bar: Some(bar) }
    }

    fn seed_done(&self, r: &SeedReport) {
        let verdict = match r.violations.first() {
            None => "ok".to_owned(),
            Some(v) => format!("VIOLATION {} at step {}", v.invariant, v.step),
        };
        match &self.bar {
            Some(bar) => {
                bar.inc(1);
                if !r.violations.is_empty() {
                    bar.println(format!("seed {}: {verdict}", r.seed));
                }
            }
            None => eprintln!("seed {}: {} steps, {verdict}, fingerprint {}", r.seed, r.steps, r.fingerprint),
        }
    }

    fn finish(&self) {
        if let Some(bar) = &self.bar {
            bar.finish_and_clear();
        }
    }
}

fn summarize(args: &SimulateArgs, reports: &[SeedReport]) -> Summary {
    let mut s = Summary {
        seeds: reports.len() as u64,
        seed_start: args.seed,
        faults: FaultSet::parse(&args.faults)
            .map(|f| f.kinds().map(|k| k.name().to_owned()).collect())
            .unwrap_or_default(),
        steps_per_seed: args.steps,
        steps: 0,
        quiet_steps: 0,
        faults_injected: BTreeMap::new(),
        orders_by_state: BTreeMap::new(),
        invariants_checked: BTreeMap::new(),
        violations: Vec::new(),
        stats: BTreeMap::new(),
        fingerprint: String::new(),
    };
    let mut fold: u64 = 0xcbf2_9ce4_8422_2325;
    for r in reports {
        s.steps += r.steps;
        s.quiet_steps += r.quiet_steps;
        add_all(&mut s.faults_injected, &r.faults_injected);
        add_all(&mut s.orders_by_state, &r.orders_by_state);
        add_all(&mut s.invariants_checked, &r.invariants_checked);
        add_all(&mut s.stats, &r.stats);
        s.violations.extend(r.violations.iter().cloned());
        for b in r.fingerprint.bytes() {
            fold = (fold ^ u64::from(b)).wrapping_mul(0x0000_0100_0000_01b3);
        }
    }
    s.fingerprint = format!("{fold:016x}");
    s
}

fn add_all(into: &mut BTreeMap<String, u64>, from: &BTreeMap<String, u64>) {
    for (k, v) in from {
        *into.entry(k.clone()).or_insert(0) += v;
    }
}

/// The human summary.
fn render(s: &Summary) -> String {
    use std::fmt::Write;
    let mut out = String::new();
    let last = s.seed_start + s.seeds.saturating_sub(1);
    let _ = writeln!(
        out,
        "orderly simulate: seeds {}..={last} ({} seeds), {} fault steps each",
        s.seed_start, s.seeds, s.steps_per_seed
    );
    let _ = writeln!(out, "steps: {} ({} in quiet phases)", s.steps, s.quiet_steps);
    table(&mut out, "faults injected", &s.faults_injected);
    table(&mut out, "orders by final state", &s.orders_by_state);
    table(&mut out, "invariant checks", &s.invariants_checked);
    table(&mut out, "workload and engine", &s.stats);
    let _ = writeln!(out, "fingerprint: {}", s.fingerprint);
    if s.violations.is_empty() {
        let _ = writeln!(out, "result: 0 violations");
        return out;
    }
    let _ = writeln!(out, "result: {} violations", s.violations.len());
    for v in &s.violations {
        let _ = writeln!(out, "\nVIOLATION seed {} step {}: {}\n  {}", v.seed, v.step, v.invariant, v.detail);
        let _ = writeln!(
            out,
            "  replay: orderly simulate --seed {} --steps {} --faults {}",
            v.seed,
            s.steps_per_seed,
            s.faults.join(",")
        );
        let _ = writeln!(out, "  last steps:");
        for line in &v.trace {
            let _ = writeln!(out, "    {line}");
        }
    }
    out
}

fn table(out: &mut String, title: &str, rows: &BTreeMap<String, u64>) {
    use std::fmt::Write;
    let _ = writeln!(out, "{title}:");
    for (k, v) in rows {
        let _ = writeln!(out, "  {k:<32} {v:>10}");
    }
}
