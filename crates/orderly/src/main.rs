//! The `orderly` command: wires settings, adapters and the engine, and stays
//! short. Every command's work lives in a module of its own.

use anyhow::{Context, Result, bail};
use clap::{Parser, Subcommand};
use orderly::{Application, RunOptions, settings};
use orderly_store_sqlite::Durability;
use std::net::SocketAddr;
use std::path::PathBuf;

/// Orderly: an event-driven order fulfillment engine.
#[derive(Parser)]
#[command(name = "orderly", version, about)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Run the engine and its HTTP API (embedded mode: SQLite files in --data-dir).
    Serve {
        /// Configuration file (default: ./orderly.toml if present).
        #[arg(long, env = "ORDERLY_CONFIG")]
        config: Option<PathBuf>,
        /// Directory of the embedded stores.
        #[arg(long, default_value = "./data", env = "ORDERLY_DATA_DIR")]
        data_dir: PathBuf,
        /// Address to listen on (port 0 picks a free port; the log says which).
        #[arg(long, default_value = "127.0.0.1:8080", env = "ORDERLY_LISTEN")]
        listen: SocketAddr,
        /// State in PostgreSQL instead of --data-dir: `postgres://user@host/db` (one schema per service).
        #[arg(long, env = "ORDERLY_STORE")]
        store: Option<String>,
        /// `full` fsyncs every commit (survives power loss); `normal` survives process crashes only.
        #[arg(long, default_value = "full", env = "ORDERLY_DURABILITY")]
        durability: String,
        /// Events between processes through NATS JetStream: `nats://host:4222` (needs --store postgres://…).
        #[arg(long, env = "ORDERLY_BUS")]
        bus: Option<String>,
        /// Stream and subject prefix on the bus (one deployment per prefix).
        #[arg(long, env = "ORDERLY_BUS_PREFIX")]
        bus_prefix: Option<String>,
        /// Run only these services, comma-separated (orders,inventory,picking,packing,shipping,notifications); needs --bus.
        #[arg(long, env = "ORDERLY_SERVICES")]
        services: Option<String>,
    },
    /// The event bus.
    Bus {
        #[command(subcommand)]
        command: BusCommand,
    },
    /// Start an embedded engine with a sample catalog, a local carrier and simulated shoppers, pickers and carriers.
    Demo {
        /// Address to listen on.
        #[arg(long, default_value = "127.0.0.1:8080")]
        listen: SocketAddr,
        /// Where to keep the demo's data (default: a fresh temporary directory).
        #[arg(long)]
        data_dir: Option<PathBuf>,
        /// Start with this simulated carrier down (repeatable), e.g.
        /// `--carrier-down fastship` to watch labels fall back to slowpost.
        #[arg(long = "carrier-down", value_name = "CARRIER")]
        carriers_down: Vec<String>,
    },
    /// Benchmarks.
    Bench {
        #[command(subcommand)]
        command: BenchCommand,
    },
    /// Carrier rate tables.
    Rates {
        #[command(subcommand)]
        command: RatesCommand,
    },
    /// Manage API keys.
    Keys {
        #[command(subcommand)]
        command: KeysCommand,
    },
    /// Run a local carrier API (labels, tracking, scripted faults) for tests and demos.
    CarrierSim {
        /// Address to listen on (port 0 picks a free port).
        #[arg(long, default_value = "127.0.0.1:9090", env = "ORDERLY_CARRIER_SIM_LISTEN")]
        listen: SocketAddr,
        /// Seed for the simulated faults.
        #[arg(long, default_value_t = 1)]
        seed: u64,
        /// Carrier spec, repeatable: `fastship:latency_ms=20,error_rate=0.1,outage=5000+2000,base_price=4.95`.
        #[arg(long = "carrier")]
        carriers: Vec<String>,
    },
    /// Deterministic simulation with fault injection: the real services, seeded faults, invariants after every step.
    Simulate {
        /// First seed (a seed replays exactly).
        #[arg(long, default_value_t = 1)]
        seed: u64,
        /// How many seeds to run: SEED, SEED+1, …
        #[arg(long, default_value_t = 1)]
        seeds: u64,
        /// Faults to inject: all, none, or a comma-separated list (duplicate, reorder, delay, crash, …).
        #[arg(long, default_value = "all")]
        faults: String,
        /// Steps of each seed's fault phase (a quiet phase follows).
        #[arg(long, default_value_t = orderly_sim::SimConfig::default().steps)]
        steps: u64,
        /// Print one JSON object on the last line.
        #[arg(long)]
        json: bool,
    },
    /// Create or upgrade every service's schema, then exit (serve also does this at startup).
    Migrate {
        /// Directory of the embedded stores.
        #[arg(long, default_value = "./data", env = "ORDERLY_DATA_DIR")]
        data_dir: PathBuf,
        /// A `postgres://` URL instead of --data-dir.
        #[arg(long, env = "ORDERLY_STORE")]
        store: Option<String>,
    },
    /// Reconcile the stores once: report every discrepancy between reservations, picks, orders and stock,
    /// apply compensating adjustments (reason `reconciliation`). Exit code 0: none found; 2: found (see the report).
    Reconcile {
        /// Configuration file (default: ./orderly.toml if present).
        #[arg(long, env = "ORDERLY_CONFIG")]
        config: Option<PathBuf>,
        /// Directory of the embedded stores (the engine must be stopped).
        #[arg(long, default_value = "./data", env = "ORDERLY_DATA_DIR")]
        data_dir: PathBuf,
        /// A `postgres://` URL instead of --data-dir.
        #[arg(long, env = "ORDERLY_STORE")]
        store: Option<String>,
        /// Print one JSON object instead of the readable report.
        #[arg(long)]
        json: bool,
    },
    /// Check a configuration file without starting anything.
    CheckConfig {
        /// The file.
        #[arg(long)]
        config: Option<PathBuf>,
    },
}

#[derive(Subcommand)]
enum BenchCommand {
    /// N orders race for U units of a hot SKU, mixed with regular orders; the naive design runs in the same process for comparison.
    FlashSale {
        /// Flash-sale orders.
        #[arg(long, default_value_t = 20_000)]
        orders: u64,
        /// Units of the hot SKU.
        #[arg(long, default_value_t = 1_000)]
        units: u32,
        /// Regular SKUs.
        #[arg(long, default_value_t = 20)]
        skus: u32,
        /// Through the HTTP API or the service layer.
        #[arg(long, value_enum, default_value = "http")]
        via: orderly::bench::Via,
        /// Orders in flight at once.
        #[arg(long, default_value_t = 256)]
        concurrency: usize,
        /// Skip the comparison run with the same orders over many SKUs.
        #[arg(long)]
        skip_uniform: bool,
        /// Print one JSON object on the last line.
        #[arg(long)]
        json: bool,
        /// Run on a PostgreSQL server (a fresh database per run, dropped after; the url's parameters, e.g. `?sslmode=disable`, are kept): `postgres://user@host:5432/db`.
        #[arg(long)]
        store: Option<String>,
        /// Events through NATS JetStream (fresh streams per run, deleted after): `nats://host:4222`; needs --store.
        #[arg(long)]
        bus: Option<String>,
    },
    /// Steady order load for minutes with carrier faults, cancellations, expiring holds and deliveries; samples RSS and lag, checks the invariants at the end (exit 1 on a violation).
    Soak {
        /// Minutes of load (fractions allowed: 0.5 is 30 s).
        #[arg(long, default_value_t = 10.0)]
        minutes: f64,
        /// Orders per second.
        #[arg(long, default_value_t = 20)]
        rate: u32,
        /// Print one JSON object on the last line.
        #[arg(long)]
        json: bool,
    },
}

#[derive(Subcommand)]
enum BusCommand {
    /// Publish a service's outbox again from a position (after the broker lost events it had acknowledged); consumers deduplicate.
    Republish {
        /// The PostgreSQL database holding the services' schemas.
        #[arg(long, env = "ORDERLY_STORE")]
        store: String,
        /// The NATS server.
        #[arg(long, env = "ORDERLY_BUS")]
        bus: String,
        /// Stream and subject prefix.
        #[arg(long, env = "ORDERLY_BUS_PREFIX", default_value = orderly::DEFAULT_BUS_PREFIX)]
        bus_prefix: String,
        /// The producing service.
        #[arg(long)]
        service: String,
        /// First outbox position to send (1: everything still in the outbox).
        #[arg(long, default_value_t = 1)]
        from: u64,
    },
}

#[derive(Subcommand)]
enum RatesCommand {
    /// Validate a rate table file and print its version and size.
    Check {
        /// The file.
        file: PathBuf,
    },
}

#[derive(Subcommand)]
enum KeysCommand {
    /// Print a fresh random key once, and the config block (its hash) to paste into orderly.toml.
    New {
        /// storefront, warehouse, carrier, ops or viewer.
        #[arg(long)]
        role: String,
        /// Who uses it.
        #[arg(long, default_value = "api-client")]
        name: String,
    },
}

/// With the `mimalloc` feature (the default), mimalloc for Rust's allocations: the service
/// loops allocate on the async workers and free on the commit threads (and
/// the other way round), where glibc's malloc spends about a fifth of the
/// CPU (see `memory.rs`).
#[cfg(feature = "mimalloc")]
#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;

fn main() -> Result<()> {
    let _ = orderly::memory::tune();
    let cli = Cli::parse();
    // Spans go to an OpenTelemetry collector when the served configuration says so.
    let otel = match &cli.command {
        Command::Serve { config, .. } => settings::load(config.as_deref(), std::env::vars())?.otel.endpoint,
        _ => None,
    };
    // Benchmarks log warnings only, so the log does not become the workload;
    // the simulator logs nothing (its faults make the engine warn by design).
    let level = match cli.command {
        Command::Bench { .. } => "warn",
        Command::Simulate { .. } => "off",
        _ => "info",
    };
    let _telemetry = orderly::telemetry::init(level, otel.as_deref())?;
    let runtime =
        tokio::runtime::Builder::new_multi_thread().enable_all().build().context("cannot start the async runtime")?;
    runtime.block_on(run(cli))
}

async fn run(cli: Cli) -> Result<()> {
    match cli.command {
        Command::Serve { config, data_dir, listen, store, durability, bus, bus_prefix, services } => {
            let settings = settings::load(config.as_deref(), std::env::vars())?;
            let options = RunOptions { data_dir, listen, store, durability: parse_durability(&durability)? };
            let dist = orderly::Distributed { bus, bus_prefix, services };
            let app = Application::build_with(settings, &options, &dist).await?;
            app.run_until(shutdown_signal()).await
        }
        Command::Bus { command: BusCommand::Republish { store, bus, bus_prefix, service, from } } => {
            let name = orderly_engine::broker::Topology::parse_services(&service)
                .map_err(|e| anyhow::anyhow!("--service: {e}"))?;
            let name = name.into_iter().next().context("--service names one service")?;
            let location = orderly::adapters::StoreLocation::from_args(Some(&store), std::path::Path::new("."))?;
            let (adapters, _) = location.open(Durability::Full).await?;
            let bus = orderly_bus_nats::NatsBus::connect(orderly_bus_nats::NatsOptions::new(&bus, &bus_prefix)).await?;
            let sent = bus.republish(name, adapters.stores[name].as_ref(), from).await?;
            println!("republished {sent} {name} events from position {from}");
            Ok(())
        }
        Command::Keys { command: KeysCommand::New { role, name } } => {
            let role: orderly_http::Role = role.parse().map_err(|_| {
                anyhow::anyhow!("unknown role {role:?}: use storefront, warehouse, carrier, ops or viewer")
            })?;
            let (key, hash) = orderly_http::auth::generate_key().context("no randomness available")?;
            println!("API key (shown once, store it safely):\n\n    {key}\n");
            println!("Add this to orderly.toml:\n\n{}", orderly_http::auth::render_key_block(&name, role, &hash));
            Ok(())
        }
        Command::Demo { listen, data_dir, carriers_down } => {
            orderly::demo::run(listen, data_dir, &carriers_down, shutdown_signal()).await
        }
        Command::Bench {
            command: BenchCommand::FlashSale { orders, units, skus, via, concurrency, skip_uniform, json, store, bus },
        } => {
            let cfg = orderly::bench::FlashSale { orders, units, skus, via, concurrency, skip_uniform, store, bus };
            let report = orderly::bench::run(&cfg).await?;
            if !json {
                println!("{}", serde_json::to_string_pretty(&report)?);
            }
            println!("{}", serde_json::to_string(&report)?);
            if report.oversold != 0 || !report.invariants_ok {
                eprintln!("FAILED: oversold {} units, invariants ok: {}", report.oversold, report.invariants_ok);
                std::process::exit(1);
            }
            Ok(())
        }
        Command::Bench { command: BenchCommand::Soak { minutes, rate, json } } => {
            let cfg =
                orderly::soak::Soak { duration: std::time::Duration::from_secs_f64(minutes.max(0.0) * 60.0), rate };
            let report = orderly::soak::run(&cfg).await?;
            if !json {
                println!("{}", serde_json::to_string_pretty(&report)?);
            }
            println!("{}", serde_json::to_string(&report)?);
            if !report.violations.is_empty() {
                eprintln!("FAILED: {} invariant violations: {:?}", report.violations.len(), report.violations);
                std::process::exit(1);
            }
            Ok(())
        }
        Command::Rates { command: RatesCommand::Check { file } } => {
            let table = orderly::adapters::read_rates(&file)?;
            println!(
                "{}: valid, version {}, {} brackets, carriers: {}",
                file.display(),
                table.version(),
                table.bracket_count(),
                table.carriers().map(|c| c.to_string()).collect::<Vec<_>>().join(", ")
            );
            Ok(())
        }
        Command::CarrierSim { listen, seed, carriers } => carrier_sim(listen, seed, &carriers).await,
        Command::Simulate { seed, seeds, faults, steps, json } => {
            let args = orderly::simulate::SimulateArgs { seed, seeds, faults, steps, json };
            let code = orderly::simulate::run(args).await?;
            std::process::exit(code);
        }
        Command::Migrate { data_dir, store } => {
            let location = orderly::adapters::StoreLocation::from_args(store.as_deref(), &data_dir)?;
            location.open(Durability::Full).await?;
            println!("every service's store is migrated to the current schema ({location:?})");
            Ok(())
        }
        Command::Reconcile { config, data_dir, store, json } => {
            let settings = settings::load(config.as_deref(), std::env::vars())?;
            let options = RunOptions { data_dir, listen: "127.0.0.1:0".parse()?, store, durability: Durability::Full };
            let report = orderly::reconcile_once(settings, &options, std::time::Duration::from_secs(30)).await?;
            if json {
                println!("{}", serde_json::to_string(&report)?);
            } else {
                print_reconcile_report(&report);
            }
            if !report.clean() {
                std::process::exit(2);
            }
            Ok(())
        }
        Command::CheckConfig { config } => {
            let s = settings::load(config.as_deref(), std::env::vars())?;
            println!(
                "configuration is valid: {} API keys, {} carrier routes",
                s.auth.keys.len(),
                s.carriers.routes.len()
            );
            Ok(())
        }
    }
}

async fn carrier_sim(listen: SocketAddr, seed: u64, carriers: &[String]) -> Result<()> {
    let config = orderly_carrier::sim::SimConfig::from_specs(seed, carriers).context("invalid --carrier spec")?;
    let listener = tokio::net::TcpListener::bind(listen).await.with_context(|| format!("cannot listen on {listen}"))?;
    let addr = listener.local_addr()?;
    println!("carrier-sim listening on {addr} (carriers: {})", config.carrier_names().collect::<Vec<_>>().join(", "));
    tracing::info!(%addr, "listening on {addr}");
    orderly_carrier::sim::serve(listener, config, shutdown_signal()).await.context("carrier-sim failed")
}

fn print_reconcile_report(r: &orderly_engine::services::reconcile::Report) {
    println!(
        "reconciliation {}: {} SKUs, {} reservations, {} orders, {} picks checked",
        r.id, r.skus_checked, r.reservations_checked, r.orders_checked, r.picks_checked
    );
    if r.clean() {
        println!("no discrepancy found");
        return;
    }
    println!("{} discrepancies, {} repaired:", r.discrepancies.len(), r.repaired);
    for d in &r.discrepancies {
        let status = match (&d.error, d.repaired) {
            (Some(e), _) => format!("NOT REPAIRED: {e}"),
            (None, true) => "repaired".to_owned(),
            (None, false) if d.action == "none" => "reported".to_owned(),
            (None, false) => "already right".to_owned(),
        };
        println!(
            "- [{}] {} {}: {} -> {} ({status})",
            d.kind,
            d.sku,
            d.location.as_ref().map_or("", |l| l.as_str()),
            d.detail,
            d.action
        );
    }
}

fn parse_durability(s: &str) -> Result<Durability> {
    match s {
        "full" => Ok(Durability::Full),
        "normal" => Ok(Durability::Normal),
        other => bail!("--durability must be full or normal, not {other:?}"),
    }
}

/// Resolves on Ctrl-C or SIGTERM.
async fn shutdown_signal() {
    let ctrl_c = async {
        let _ = tokio::signal::ctrl_c().await;
    };
    #[cfg(unix)]
    let term = async {
        match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
            Ok(mut s) => {
                s.recv().await;
            }
            Err(_) => std::future::pending::<()>().await,
        }
    };
    #[cfg(not(unix))]
    let term = std::future::pending::<()>();
    tokio::select! {
        () = ctrl_c => {},
        () = term => {},
    }
}
