//! Fixtures of the distributed-mode suites (`distributed.rs`, `e2e_crash.rs`):
//! the real `orderly` binary, one process per group of services, state in
//! PostgreSQL (a database made for each test and dropped after it), events
//! through NATS JetStream (streams under a prefix made for each test and
//! deleted after it), and a private nats-server for tests that stop the broker.
//!
//! Under `CI=true` an unreachable PostgreSQL or NATS fails the test;
//! elsewhere it skips, loudly.

use super::{Api, config_toml};
use orderly_bus_nats::{NatsBus, NatsOptions};
use std::io::{BufRead, BufReader};
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

pub const PG: &str = "127.0.0.1:5432";
pub const NATS: &str = "127.0.0.1:4222";
pub const NATS_SERVER: &str = "/usr/sbin/nats-server";

pub fn unique(tag: &str) -> String {
    let nanos = SystemTime::now().duration_since(UNIX_EPOCH).map(|d| d.as_nanos()).unwrap_or(0);
    format!("{tag}_{}_{}", std::process::id(), nanos % 1_000_000_000_000)
}

pub fn reachable(addr: &str) -> bool {
    std::net::TcpStream::connect_timeout(&addr.parse().expect("address"), Duration::from_secs(1)).is_ok()
}

/// True when PostgreSQL and NATS answer; otherwise fails under CI, skips elsewhere.
pub fn servers_up() -> bool {
    for (name, addr) in [("PostgreSQL", PG), ("NATS", NATS)] {
        if !reachable(addr) {
            assert!(std::env::var("CI").as_deref() != Ok("true"), "{name} at {addr} is required under CI=true");
            eprintln!("\n*** SKIPPED: {name} is not reachable at {addr} (set CI=true to make this a failure) ***\n");
            return false;
        }
    }
    true
}

pub fn psql(db: &str, sql: &str) -> bool {
    Command::new("psql")
        .args(["-q", "-h", "127.0.0.1", "-U", "postgres", "-d", db, "-c", sql])
        .stdout(Stdio::null())
        .status()
        .is_ok_and(|s| s.success())
}

/// A database and a stream prefix for one test, both removed when it goes.
pub struct World {
    pub db: String,
    pub prefix: String,
    pub nats_url: String,
    pub dir: tempfile::TempDir,
}

impl World {
    pub fn new(nats_url: &str) -> World {
        let db = unique("orderly_dist");
        assert!(psql("postgres", &format!("CREATE DATABASE {db}")), "cannot create database {db}");
        let dir = tempfile::tempdir().expect("temp dir");
        World { db, prefix: unique("t"), nats_url: nats_url.to_owned(), dir }
    }

    pub fn store_url(&self) -> String {
        format!("postgres://postgres@{PG}/{}", self.db)
    }

    pub fn config(&self, carrier_url: Option<&str>) -> PathBuf {
        self.config_with(carrier_url, "")
    }

    /// Writes `orderly.toml` with `extra` TOML appended to the test config.
    pub fn config_with(&self, carrier_url: Option<&str>, extra: &str) -> PathBuf {
        let path = self.dir.path().join("orderly.toml");
        std::fs::write(&path, config_toml(carrier_url, extra)).expect("config written");
        path
    }

    pub async fn bus(&self) -> NatsBus {
        NatsBus::connect(NatsOptions::new(&self.nats_url, &self.prefix)).await.expect("bus")
    }

    /// Starts `orderly serve` running `services`.
    pub fn serve(&self, config: &Path, services: &str) -> Proc {
        Proc::start(config, &self.store_url(), &self.nats_url, &self.prefix, services, self.dir.path())
    }

    /// Starts `orderly serve` running `services`, trying again (up to 5
    /// times, a second apart) when PostgreSQL has no connection to spare: the
    /// server's `max_connections` is shared with whatever else runs on it.
    pub fn serve_patiently(&self, config: &Path, services: &str) -> Proc {
        for attempt in 1.. {
            let log_path = self.dir.path().join(format!("{}.log", services.replace(',', "+")));
            let before = std::fs::metadata(&log_path).map_or(0, |m| m.len() as usize);
            match self.spawn(config, services).try_listening(Duration::from_secs(60)) {
                Ok(proc) => return proc,
                Err(log) => {
                    let this_attempt = log.get(before..).unwrap_or(&log);
                    assert!(
                        attempt < 5 && this_attempt.contains("too many clients"),
                        "orderly serve --services {services} never listened; its log:\n{log}"
                    );
                    eprintln!("orderly serve --services {services}: PostgreSQL has no connection to spare; again");
                    std::thread::sleep(Duration::from_secs(1));
                }
            }
        }
        unreachable!("the loop returns or panics")
    }

    /// Starts `orderly serve` running `services`, without waiting for it.
    pub fn spawn(&self, config: &Path, services: &str) -> Starting {
        Proc::spawn(config, &self.store_url(), &self.nats_url, &self.prefix, services, self.dir.path())
    }
}

impl Drop for World {
    fn drop(&mut self) {
        if std::thread::panicking() {
            self.dir.disable_cleanup(true);
            eprintln!("the processes' logs are kept in {}", self.dir.path().display());
        }
        psql("postgres", &format!("DROP DATABASE IF EXISTS {} WITH (FORCE)", self.db));
        let (url, prefix) = (self.nats_url.clone(), self.prefix.clone());
        // Drop cannot await: delete the streams from a runtime of its own.
        let _ = std::thread::spawn(move || {
            let rt = tokio::runtime::Builder::new_current_thread().enable_all().build().expect("runtime");
            rt.block_on(async {
                if let Ok(bus) = NatsBus::connect(NatsOptions::new(&url, &prefix)).await {
                    let _ = tokio::time::timeout(Duration::from_secs(5), bus.delete_streams()).await;
                }
            });
        })
        .join();
    }
}

/// One `orderly serve` process.
pub struct Proc {
    pub child: Child,
    pub api: Api,
    pub services: String,
}

/// A started `orderly serve` that has not announced its address yet.
pub struct Starting {
    pub child: Option<Child>,
    pub lines: std::sync::mpsc::Receiver<String>,
    pub services: String,
    pub log_path: PathBuf,
    /// Lines it printed before listening.
    pub seen: Vec<String>,
}

impl Starting {
    /// Waits for its `listening on` line.
    pub fn listening(self, within: Duration) -> Proc {
        let services = self.services.clone();
        self.try_listening(within)
            .unwrap_or_else(|log| panic!("orderly serve --services {services} never listened; its log:\n{log}"))
    }

    /// Waits for its `listening on` line; the process's log if it exits or
    /// does not listen in time.
    pub fn try_listening(mut self, within: Duration) -> Result<Proc, String> {
        let deadline = Instant::now() + within;
        loop {
            let left = deadline.saturating_duration_since(Instant::now());
            match self.lines.recv_timeout(left) {
                Ok(line) => {
                    if let Some(addr) = line.strip_prefix("listening on ") {
                        let addr: SocketAddr = addr.trim().parse().expect("the announced address");
                        let child = self.child.take().expect("the child is still ours");
                        return Ok(Proc { child, api: Api::new(addr), services: self.services.clone() });
                    }
                    self.seen.push(line);
                }
                Err(_) => return Err(std::fs::read_to_string(&self.log_path).unwrap_or_default()),
            }
        }
    }
}

impl Drop for Starting {
    fn drop(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }
}

impl Proc {
    pub fn start(config: &Path, store: &str, bus: &str, prefix: &str, services: &str, dir: &Path) -> Proc {
        Proc::spawn(config, store, bus, prefix, services, dir).listening(Duration::from_secs(60))
    }

    pub fn spawn(config: &Path, store: &str, bus: &str, prefix: &str, services: &str, dir: &Path) -> Starting {
        let log_path = dir.join(format!("{}.log", services.replace(',', "+")));
        let log = std::fs::OpenOptions::new().create(true).append(true).open(&log_path).expect("log file");
        let mut child = Command::new(env!("CARGO_BIN_EXE_orderly"))
            .arg("serve")
            .arg("--config")
            .arg(config)
            .args(["--store", store, "--bus", bus, "--bus-prefix", prefix, "--services", services])
            .args(["--listen", "127.0.0.1:0"])
            .env("ORDERLY_LOG", "warn,orderly_bus_nats=info")
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::from(log))
            .spawn()
            .expect("the orderly binary starts");
        let stdout = child.stdout.take().expect("stdout is piped");
        let (tx, lines) = std::sync::mpsc::channel::<String>();
        std::thread::spawn(move || {
            for line in BufReader::new(stdout).lines().map_while(Result::ok) {
                let _ = tx.send(line);
            }
        });
        Starting { child: Some(child), lines, services: services.to_owned(), log_path, seen: Vec::new() }
    }

    /// SIGKILL.
    pub fn kill(mut self) {
        self.child.kill().expect("kill");
        self.child.wait().expect("reaped");
    }
}

impl Drop for Proc {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl std::ops::Deref for Proc {
    type Target = Api;
    fn deref(&self) -> &Api {
        &self.api
    }
}

/// A private nats-server for tests that stop the broker (never the machine's shared one).
pub struct PrivateNats {
    pub child: Option<Child>,
    pub port: u16,
    pub dir: tempfile::TempDir,
}

impl PrivateNats {
    pub fn start() -> Option<PrivateNats> {
        if !Path::new(NATS_SERVER).exists() {
            assert!(std::env::var("CI").as_deref() != Ok("true"), "{NATS_SERVER} is required under CI=true");
            eprintln!("\n*** SKIPPED: {NATS_SERVER} not installed ***\n");
            return None;
        }
        let port = std::net::TcpListener::bind("127.0.0.1:0").expect("free port").local_addr().expect("addr").port();
        let mut n = PrivateNats { child: None, port, dir: tempfile::tempdir().expect("temp dir") };
        n.up();
        Some(n)
    }

    pub fn url(&self) -> String {
        format!("nats://127.0.0.1:{}", self.port)
    }

    pub fn up(&mut self) {
        let child = Command::new(NATS_SERVER)
            .args(["-a", "127.0.0.1", "-p", &self.port.to_string(), "-js", "-sd"])
            .arg(self.dir.path())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("nats-server starts");
        self.child = Some(child);
        let addr = format!("127.0.0.1:{}", self.port);
        let deadline = Instant::now() + Duration::from_secs(10);
        while !reachable(&addr) {
            assert!(Instant::now() < deadline, "the private nats-server never listened");
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    /// Stops it gracefully (SIGTERM: JetStream flushes its store).
    pub fn down(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = Command::new("kill").args(["-TERM", &child.id().to_string()]).status();
            let deadline = Instant::now() + Duration::from_secs(10);
            while matches!(child.try_wait(), Ok(None)) && Instant::now() < deadline {
                std::thread::sleep(Duration::from_millis(50));
            }
            let _ = child.kill();
            let _ = child.wait();
        }
    }
}

impl Drop for PrivateNats {
    fn drop(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}
