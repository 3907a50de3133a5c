//! Digging into seeds while developing the simulator:
//! `cargo run -p orderly-sim --example explore -- FIRST N STEPS [stats]` runs
//! seeds FIRST..FIRST+N one after another and prints each one's outcome and
//! violations with their trace; `TRACE=n` keeps n lines of trace, and
//! `MUT=inbox` or `MUT=safety` switches one of the deliberate bugs on;
//! `LOG=filter` (e.g. `LOG=orderly_engine=info`) prints the engine's logs on
//! stderr, to follow one id through a seed.

fn main() {
    let args: Vec<String> = std::env::args().collect();
    if let Ok(filter) = std::env::var("LOG") {
        tracing_subscriber::fmt()
            .with_env_filter(tracing_subscriber::EnvFilter::new(filter))
            .with_writer(std::io::stderr)
            .without_time()
            .init();
    }
    let seed: u64 = args.get(1).and_then(|s| s.parse().ok()).unwrap_or(1);
    let n: u64 = args.get(2).and_then(|s| s.parse().ok()).unwrap_or(1);
    let steps: u64 = args.get(3).and_then(|s| s.parse().ok()).unwrap_or(300);
    let trace_len = std::env::var("TRACE").ok().and_then(|s| s.parse().ok()).unwrap_or(40);
    let mut cfg = orderly_sim::SimConfig { steps, trace_len, ..Default::default() };
    match std::env::var("MUT").as_deref() {
        Ok("inbox") => cfg.mutations.skip_inbox_check = true,
        Ok("safety") => cfg.mutations.reserve_ignores_safety = true,
        _ => {}
    }
    for s in seed..seed + n {
        let t = std::time::Instant::now();
        let r = orderly_sim::run_seed(&cfg, s);
        println!(
            "seed {s}: {} steps ({} quiet) in {:?} fp {} orders {:?}",
            r.steps,
            r.quiet_steps,
            t.elapsed(),
            r.fingerprint,
            r.orders_by_state
        );
        if args.get(4).is_some() {
            println!("  stats {:?}\n  faults {:?}", r.stats, r.faults_injected);
        }
        for v in &r.violations {
            println!("  VIOLATION {} at step {}: {}", v.invariant, v.step, v.detail);
            for l in &v.trace {
                println!("    {l}");
            }
        }
    }
}
