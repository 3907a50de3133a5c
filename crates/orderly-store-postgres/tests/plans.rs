//! The batch-wide reads keep their index plans on a table that has never been
//! analyzed. sqlx prepares each statement once per connection and PostgreSQL
//! may then reuse a generic plan; made while a fresh schema's tables were
//! empty, a plain join's generic plan hashed the whole `docs` table after a
//! sequential scan, and kept doing so as the table grew (35-160 ms a
//! statement at 50,000 rows in the distributed bench). These tests force a
//! generic plan on an empty table, the worst case, and read it.

mod common;

use common::TestSchema;
use orderly_store_postgres::{PgStore, sql};
use sqlx::{AssertSqlSafe, Connection, PgConnection};

/// The generic plan of `stmt` (two `text[]` parameters) on `schema`'s empty
/// tables, as `EXPLAIN` prints it.
async fn generic_plan(schema: &TestSchema, stmt: &str) -> String {
    let mut conn = PgConnection::connect(&schema.url).await.expect("connect");
    for setup in [
        format!("SET search_path TO \"{}\"", schema.name),
        "SET plan_cache_mode = force_generic_plan".to_owned(),
        format!("PREPARE probe(text[], text[]) AS {stmt}"),
    ] {
        sqlx::raw_sql(AssertSqlSafe(setup)).execute(&mut conn).await.expect("plan setup");
    }
    let lines: Vec<String> = sqlx::query_scalar("EXPLAIN EXECUTE probe('{things,things}', '{a,b}')")
        .fetch_all(&mut conn)
        .await
        .expect("explain");
    conn.close().await.expect("close");
    lines.join("\n")
}

#[tokio::test]
async fn batch_wide_reads_probe_the_primary_key_even_on_a_never_analyzed_table() {
    let Some(schema) = TestSchema::new("plans").await else { return };
    // Creates and migrates the schema; its tables are empty and unanalyzed.
    let store = PgStore::connect(&schema.url, &schema.name, 2).await.expect("connect");

    for (name, stmt) in [("READ_MANY", sql::READ_MANY), ("LOCK_EXPECTED", sql::LOCK_EXPECTED)] {
        let plan = generic_plan(&schema, stmt).await;
        assert!(plan.contains("Index Scan using docs_pkey on docs"), "{name} probes the primary key:\n{plan}");
        assert!(
            !plan.contains("Seq Scan on docs") && !plan.contains("Hash"),
            "{name} neither scans nor hashes:\n{plan}"
        );
    }

    // The premise: written as a plain join, the same read is planned as a
    // sequential scan here (what the LATERAL form avoids).
    let join = "SELECT d.tbl, d.key, d.version FROM docs d \
                JOIN unnest($1::text[], $2::text[]) AS x(tbl, key) ON d.tbl = x.tbl AND d.key = x.key";
    let plan = generic_plan(&schema, join).await;
    assert!(plan.contains("Seq Scan on docs"), "the plain join's generic plan on an empty table:\n{plan}");
    store.close().await;
}
