//! The `orderly` command: wires settings, adapters and the engine, and stays
//! short. Every command's work lives in a module of its own.

mod adapters;
mod settings;

use anyhow::{Context, Result};
use clap::{Parser, Subcommand};
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
    /// Check a configuration file without starting anything.
    CheckConfig {
        /// The file.
        #[arg(long)]
        config: Option<PathBuf>,
    },
}

fn main() -> Result<()> {
    let cli = Cli::parse();
    init_tracing();
    let runtime =
        tokio::runtime::Builder::new_multi_thread().enable_all().build().context("cannot start the async runtime")?;
    runtime.block_on(run(cli))
}

async fn run(cli: Cli) -> Result<()> {
    match cli.command {
        Command::CarrierSim { listen, seed, carriers } => carrier_sim(listen, seed, &carriers).await,
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

fn init_tracing() {
    use tracing_subscriber::EnvFilter;
    let filter = EnvFilter::try_from_env("ORDERLY_LOG").unwrap_or_else(|_| EnvFilter::new("info"));
    let json = std::env::var("ORDERLY_LOG_FORMAT").is_ok_and(|v| v == "json");
    let builder = tracing_subscriber::fmt().with_env_filter(filter).with_writer(std::io::stderr);
    if json {
        builder.json().init();
    } else {
        builder.init();
    }
}
