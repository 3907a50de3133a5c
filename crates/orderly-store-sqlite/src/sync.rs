//! Syncs a store's WAL apart from its commits, so the service that commits
//! can decide its next batch while the last one reaches the disk.
//!
//! The writer connection runs with `synchronous=NORMAL`: a commit writes its
//! WAL frames and returns without an fsync. Each commit then takes the next
//! number and asks this syncer for it; the syncer's thread fsyncs the WAL
//! file (its own descriptor; an fsync covers everything written to the file
//! before it) and publishes the last number it covered, so one fsync covers
//! every commit written before it began (group commit). A commit counts as
//! durable, and anything that depends on it may leave the process, only
//! once its number is published ([`orderly_engine::ports::Durable`]).
//!
//! A failed fsync stops the process: the kernel may have dropped the pages
//! it could not write, so nothing written before it can be trusted to be on
//! disk, and the engine's caches are already past it.

use std::fs::File;
use std::os::unix::fs::MetadataExt;
use std::path::PathBuf;
use std::sync::{Arc, Condvar, Mutex};
use tokio::sync::watch;

#[derive(Default)]
struct Wanted {
    /// The highest commit number asked for.
    upto: u64,
    /// The store is closing: sync what was asked, then stop.
    stop: bool,
}

/// The syncer of one store's WAL file.
pub(crate) struct WalSync {
    wanted: Arc<(Mutex<Wanted>, Condvar)>,
    synced: Arc<watch::Sender<u64>>,
    /// Commits written so far (numbered under the writer's lock, so in WAL order).
    written: std::sync::atomic::AtomicU64,
    /// Syncs of the WAL file run, for tests.
    syncs: Arc<std::sync::atomic::AtomicU64>,
    thread: Option<std::thread::JoinHandle<()>>,
}

impl WalSync {
    /// Starts the syncer of the database at `db` (its WAL is `<db>-wal`).
    pub(crate) fn start(db: &std::path::Path) -> std::io::Result<WalSync> {
        let mut wal = db.as_os_str().to_owned();
        wal.push("-wal");
        let wal = PathBuf::from(wal);
        let wanted: Arc<(Mutex<Wanted>, Condvar)> = Arc::default();
        let synced = Arc::new(watch::Sender::new(0u64));
        let syncs: Arc<std::sync::atomic::AtomicU64> = Arc::default();
        let thread = {
            let (wanted, synced, syncs) = (wanted.clone(), synced.clone(), syncs.clone());
            std::thread::Builder::new()
                .name("orderly-wal-sync".into())
                .spawn(move || run(&wal, &wanted, &synced, &syncs))?
        };
        Ok(WalSync { wanted, synced, written: Default::default(), syncs, thread: Some(thread) })
    }

    /// Numbers a commit just written (call under the writer's lock, right
    /// after the commit) and asks for it to be synced; returns its number.
    pub(crate) fn written(&self) -> u64 {
        let seq = self.written.fetch_add(1, std::sync::atomic::Ordering::AcqRel) + 1;
        let (lock, ready) = &*self.wanted;
        let mut wanted = lock.lock().unwrap_or_else(|p| p.into_inner());
        wanted.upto = wanted.upto.max(seq);
        ready.notify_one();
        seq
    }

    /// A receiver of the last commit number synced.
    pub(crate) fn subscribe(&self) -> watch::Receiver<u64> {
        self.synced.subscribe()
    }

    /// Syncs run so far.
    pub(crate) fn syncs(&self) -> u64 {
        self.syncs.load(std::sync::atomic::Ordering::Relaxed)
    }
}

impl Drop for WalSync {
    fn drop(&mut self) {
        {
            let (lock, ready) = &*self.wanted;
            lock.lock().unwrap_or_else(|p| p.into_inner()).stop = true;
            ready.notify_one();
        }
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

fn run(
    wal: &std::path::Path,
    wanted: &(Mutex<Wanted>, Condvar),
    synced: &watch::Sender<u64>,
    syncs: &std::sync::atomic::AtomicU64,
) {
    let mut file: Option<(File, u64)> = None;
    let mut done = 0u64;
    loop {
        let target = {
            let (lock, ready) = wanted;
            let mut w = lock.lock().unwrap_or_else(|p| p.into_inner());
            while w.upto <= done && !w.stop {
                w = ready.wait(w).unwrap_or_else(|p| p.into_inner());
            }
            if w.upto <= done {
                return;
            }
            w.upto
        };
        match sync(wal, &mut file) {
            Ok(true) => {
                syncs.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
            }
            Ok(false) => {}
            Err(e) => {
                tracing::error!(wal = %wal.display(), error = %e, "fsync of the WAL failed: stopping, nothing after it can be acknowledged");
                eprintln!("orderly: fsync of {} failed: {e}; stopping", wal.display());
                std::process::abort();
            }
        }
        done = target;
        synced.send_replace(done);
    }
}

/// Syncs the WAL file's data (true), reopening it if it was replaced. No
/// WAL file means nothing to sync (false): SQLite removes it only after
/// copying it into the database file and syncing that (the last connection
/// closing).
fn sync(wal: &std::path::Path, file: &mut Option<(File, u64)>) -> std::io::Result<bool> {
    let inode = match std::fs::metadata(wal) {
        Ok(m) => m.ino(),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(false),
        Err(e) => return Err(e),
    };
    let f = match file {
        Some((f, ino)) if *ino == inode => f,
        _ => &file.insert((File::open(wal)?, inode)).0,
    };
    f.sync_data()?;
    Ok(true)
}
