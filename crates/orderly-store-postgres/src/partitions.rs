//! Replicas of a service sharing its bus partitions, through PostgreSQL
//! advisory locks on one session of their own:
//!
//! - every live replica holds a *shared* member lock on the service's key,
//!   so the number of holders in `pg_locks` is the number of live replicas;
//! - every 0.5 s a replica counts them and aims at `ceil(partitions / k)`
//!   partitions ([`orderly_engine::partitions::plan`]): it tries the
//!   partition locks it lacks, and gives up its highest ones beyond that,
//!   first ceasing to consume them, then unlocking once the messages it
//!   took from them are committed (or after [`RELEASE_DRAIN`]);
//! - a replica's session ending (exit, crash, network loss) frees all its
//!   locks at once, and the survivors take its partitions within a round.
//!
//! Ownership keeps the replicas from working on the same order at once; it
//! is not what keeps stock right (versions and the inbox are, inside each
//! commit), so a replica that loses its session just stops consuming and
//! joins again.

use crate::error::store_error;
use orderly_engine::partitions::{Ownership, plan};
use orderly_engine::ports::StoreError;
use sqlx::{Connection, PgConnection};
use std::collections::{BTreeMap, BTreeSet};
use std::str::FromStr;
use std::sync::Arc;
use std::time::{Duration, Instant};
use tokio::task::JoinHandle;

/// How often a replica counts the members and rebalances.
pub const MEMBERSHIP_ROUND: Duration = Duration::from_millis(500);

/// Longest a replica waits for its uncommitted work in a partition it gives
/// up before unlocking it anyway (messages it never acknowledged go to the
/// next owner after the bus's `ack_wait`).
pub const RELEASE_DRAIN: Duration = Duration::from_secs(30);

/// The advisory-lock keys of one service's group: (key1 of the shared member
/// lock, key1 of the partition locks); key2 is 0 and the partition number.
fn keys(service: &str) -> (i32, i32) {
    let h = |s: String| (orderly_domain::ids::fnv1a(s.as_bytes()) & 0x7fff_ffff) as i32;
    (h(format!("orderly-members:{service}")), h(format!("orderly-partitions:{service}")))
}

struct Member {
    conn: PgConnection,
    held: BTreeSet<u32>,
    /// Partitions being given up, with when the drain started.
    releasing: BTreeMap<u32, Instant>,
}

impl Member {
    async fn join(url: &str, service: &str) -> Result<Member, StoreError> {
        let options = sqlx::postgres::PgConnectOptions::from_str(url)
            .map_err(|e| StoreError::Unavailable(format!("bad PostgreSQL url: {e}")))?
            .application_name("orderly-members");
        let mut conn = PgConnection::connect_with(&options).await.map_err(store_error)?;
        sqlx::query("SELECT pg_advisory_lock_shared($1, 0)")
            .bind(keys(service).0)
            .execute(&mut conn)
            .await
            .map_err(store_error)?;
        Ok(Member { conn, held: BTreeSet::new(), releasing: BTreeMap::new() })
    }

    async fn members(&mut self, service: &str) -> Result<usize, StoreError> {
        let n: i64 = sqlx::query_scalar(
            "SELECT count(*) FROM pg_locks WHERE locktype = 'advisory' AND granted AND mode = 'ShareLock' \
             AND database = (SELECT oid FROM pg_database WHERE datname = current_database()) \
             AND classid::bigint = $1 AND objid::bigint = 0 AND objsubid = 2",
        )
        .bind(i64::from(keys(service).0))
        .fetch_one(&mut self.conn)
        .await
        .map_err(store_error)?;
        Ok(n.max(1) as usize)
    }

    /// One round: count, plan, take, give up, unlock what has drained.
    async fn round(&mut self, service: &str, partitions: u32, ownership: &Ownership) -> Result<(), StoreError> {
        let members = self.members(service).await?;
        ownership.set_members(members);
        let key = keys(service).1;
        let keeping: BTreeSet<u32> = self.held.difference(&self.releasing.keys().copied().collect()).copied().collect();
        let p = plan(partitions, members, &keeping);
        let mut owned = keeping;
        for give_up in p.release {
            owned.remove(&give_up);
            self.releasing.insert(give_up, Instant::now());
            tracing::info!(service, partition = give_up, members, "giving up a partition");
        }
        let mut want = p.acquire;
        for candidate in 0..partitions {
            if want == 0 {
                break;
            }
            if self.held.contains(&candidate) {
                continue;
            }
            let (got,): (bool,) = sqlx::query_as("SELECT pg_try_advisory_lock($1, $2)")
                .bind(key)
                .bind(candidate as i32)
                .fetch_one(&mut self.conn)
                .await
                .map_err(store_error)?;
            if got {
                self.held.insert(candidate);
                owned.insert(candidate);
                want -= 1;
            }
        }
        ownership.set_owned(owned);
        let drained: Vec<u32> = self
            .releasing
            .iter()
            .filter(|(p, since)| ownership.inflight(**p) == 0 || since.elapsed() >= RELEASE_DRAIN)
            .map(|(p, _)| *p)
            .collect();
        for p in drained {
            sqlx::query("SELECT pg_advisory_unlock($1, $2)")
                .bind(key)
                .bind(p as i32)
                .execute(&mut self.conn)
                .await
                .map_err(store_error)?;
            self.releasing.remove(&p);
            self.held.remove(&p);
        }
        Ok(())
    }
}

/// Joins the replicas of `service` in the database at `url` and keeps this
/// replica's share of `partitions` in `ownership` until the returned task is
/// aborted (its session, and every lock, ends with it). Returns once the
/// member lock is held.
pub async fn share_partitions(
    url: &str,
    service: &'static str,
    partitions: u32,
    ownership: Arc<Ownership>,
) -> Result<JoinHandle<()>, StoreError> {
    let first = Member::join(url, service).await?;
    let url = url.to_owned();
    Ok(tokio::spawn(async move {
        let mut member = Some(first);
        loop {
            let m = match member.as_mut() {
                Some(m) => m,
                None => match Member::join(&url, service).await {
                    Ok(m) => member.insert(m),
                    Err(e) => {
                        tracing::warn!(service, error = %e, "cannot rejoin the replicas; retrying");
                        tokio::time::sleep(MEMBERSHIP_ROUND * 2).await;
                        continue;
                    }
                },
            };
            if let Err(e) = m.round(service, partitions, &ownership).await {
                // The session (and every lock with it) may be gone: consume
                // nothing until this replica has joined again.
                tracing::warn!(service, error = %e, "lost the partition locks; rejoining");
                ownership.set_owned(BTreeSet::new());
                member = None;
            }
            tokio::time::sleep(MEMBERSHIP_ROUND).await;
        }
    }))
}
