//! The batch-wide reads keep their index plans on a table that has never been
//! analyzed. sqlx prepares each statement once per connection and PostgreSQL
//! may then reuse a generic plan; made while a fresh schema's tables were
//! empty, a plain join's generic plan hashed the whole `docs` table after a
//! sequential scan, and kept doing so as the table grew (35-160 ms a
//! statement at 50,000 rows in the distributed bench). These tests force a
//! generic plan on an empty table, the worst case, and read it; and read the
//! inbox check's custom plan on a full inbox that was never analyzed.

mod common;

use common::TestSchema;
use orderly_engine::ports::Store;
use orderly_store_postgres::{PgStore, sql};
use sqlx::{AssertSqlSafe, Connection, PgConnection};

/// The plan of `stmt` (parameters `params`) on `schema`'s tables under
/// `plan_cache_mode = mode`, executed with the literal `args`, as `EXPLAIN`
/// prints it (EXPLAIN takes no bind parameters).
async fn plan(schema: &TestSchema, mode: &str, params: &str, stmt: &str, args: &str) -> String {
    let mut conn = PgConnection::connect(&schema.url).await.expect("connect");
    for setup in [
        format!("SET search_path TO \"{}\"", schema.name),
        format!("SET plan_cache_mode = {mode}"),
        format!("PREPARE probe({params}) AS {stmt}"),
    ] {
        sqlx::raw_sql(AssertSqlSafe(setup)).execute(&mut conn).await.expect("plan setup");
    }
    let explain = format!("EXPLAIN EXECUTE probe({args})");
    let lines: Vec<String> = sqlx::query_scalar(AssertSqlSafe(explain)).fetch_all(&mut conn).await.expect("explain");
    conn.close().await.expect("close");
    lines.join("\n")
}

/// The generic plan of `stmt` (two `text[]` parameters) on `schema`'s empty
/// tables.
async fn generic_plan(schema: &TestSchema, stmt: &str) -> String {
    plan(schema, "force_generic_plan", "text[], text[]", stmt, "'{things,things}', '{a,b}'").await
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

/// The custom plan (the store's sessions plan every statement for its
/// arguments) of `stmt`, with one `text[]` parameter, for `ids`.
async fn custom_plan(schema: &TestSchema, stmt: &str, ids: &[String]) -> String {
    // The ids (letters, digits and dashes) as an array literal.
    assert!(ids.iter().all(|i| i.chars().all(|c| c.is_ascii_alphanumeric() || c == '-')));
    plan(schema, "force_custom_plan", "text[]", stmt, &format!("'{{{}}}'", ids.join(","))).await
}

#[tokio::test]
async fn the_inbox_check_probes_the_primary_key_on_a_full_never_analyzed_inbox() {
    let Some(schema) = TestSchema::new("inbox_plan").await else { return };
    let store = PgStore::connect(&schema.url, &schema.name, 2).await.expect("connect");
    // 60,000 ids, as a flash sale's consumers hold after a few seconds;
    // autovacuum kept off the table so it stays unanalyzed for the test.
    let mut conn = PgConnection::connect(&schema.url).await.expect("connect");
    for setup in [
        format!("SET search_path TO \"{}\"", schema.name),
        "ALTER TABLE inbox SET (autovacuum_enabled = false)".to_owned(),
        "INSERT INTO inbox (id) SELECT 'e-' || n FROM generate_series(1, 60000) AS n".to_owned(),
    ] {
        sqlx::raw_sql(AssertSqlSafe(setup)).execute(&mut conn).await.expect("fill the inbox");
    }
    conn.close().await.expect("close");
    // A poll's ids: some seen, most new.
    let ids: Vec<String> =
        (0..320).map(|n| if n % 10 == 0 { format!("e-{}", n + 1) } else { format!("new-{n}") }).collect();

    let plan = custom_plan(&schema, sql::INBOX_MANY, &ids).await;
    assert!(plan.contains("inbox_pkey on inbox"), "INBOX_MANY probes the primary key:\n{plan}");
    assert!(!plan.contains("Seq Scan on inbox"), "INBOX_MANY does not scan the inbox:\n{plan}");

    // The premise: `id = ANY($1)` is planned as a scan of the whole inbox here.
    let plan = custom_plan(&schema, "SELECT id FROM inbox WHERE id = ANY($1::text[])", &ids).await;
    assert!(plan.contains("Seq Scan on inbox"), "the ANY form's custom plan on an unanalyzed inbox:\n{plan}");

    // And the store's check answers with exactly the ids it holds.
    let refs: Vec<&str> = ids.iter().map(String::as_str).collect();
    let mut found: Vec<String> =
        store.inbox_contains_many(&refs).await.expect("inbox check").expect("a batch answer").into_iter().collect();
    found.sort();
    let mut expected: Vec<String> = ids.iter().filter(|i| i.starts_with("e-")).cloned().collect();
    expected.sort();
    assert_eq!(found, expected);
    store.close().await;
}
