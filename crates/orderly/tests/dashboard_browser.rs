//! The operations dashboard in a real headless Chromium, driven over
//! WebDriver (chromedriver) against the real application on port 0 with
//! traffic: sign in as ops, watch the order counts change, replay and
//! discard dead letters with a click, submit manual adjustments (a refused
//! one shows the problem's detail) and see the manual-adjustment alert, run
//! reconciliation with a click and read its report (a stock drift planted in
//! the inventory store while the engine was stopped, repaired), then sign in
//! as a viewer and find every mutating control gone. Screenshots are saved
//! as test artifacts.
//!
//! Needs Debian's `chromium` and `chromedriver` (`bash .ci/chromium.sh`).
//! Without them the test prints a loud SKIP, except under `CI=true`, where it
//! fails. It never downloads a browser.

use anyhow::{Context, Result, anyhow, bail, ensure};
use fantoccini::{Client, ClientBuilder, Locator};
use orderly::{Application, RunOptions};
use orderly_domain::allocation::{Location, LocationKind};
use orderly_domain::event::{Envelope, EventType};
use orderly_domain::{Money, OrderId, Priority, Sku, Zone};
use orderly_engine::app::{Customer, Engine, LineRequest, OrderRequest, ShipTo};
use orderly_engine::config::{ApiKey, Settings};
use orderly_engine::ports::{Batch, Row};
use orderly_engine::runtime::{DEAD_LETTERS, DeadLetter};
use orderly_store_sqlite::Durability;
use serde_json::{Value, json};
use std::collections::BTreeMap;
use std::future::Future;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::Arc;
use std::time::{Duration, Instant};

/// Longest wait for any one condition in the browser or the engine.
const WAIT_MAX: Duration = Duration::from_secs(30);
/// How often a condition is checked again while waiting.
const RECHECK_EVERY: Duration = Duration::from_millis(100);
/// The flags every Chromium run gets: headless, sandbox-free for containers,
/// and quiet (no network calls of its own).
const CHROMIUM_FLAGS: &[&str] = &[
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-background-networking",
    "--disable-component-update",
    "--no-first-run",
    "--disable-sync",
    "--disable-quic",
    "--disable-dev-shm-usage",
    "--window-size=1400,2000",
];

const SKU: &str = "MUG-BLUE";
const RARE_SKU: &str = "LAMP-RARE";
/// Stock whose on-hand count is changed in the store behind the engine's back.
const DRIFT_SKU: &str = "VASE-DRIFT";
const WAREHOUSE: &str = "WH-EU-1";

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn the_dashboard_shows_live_state_and_drives_operations() -> Result<()> {
    let Some(tools) = browser_tools()? else {
        return Ok(());
    };
    let world = World::start().await?;
    let driver = ChromeDriver::spawn(&tools, world.data.path())?;
    let browser = driver.session(&tools, world.data.path()).await?;
    // Everything after this point ends the browser session, pass or fail.
    let outcome = drive(&browser, &world).await;
    if let Err(e) = save_screenshot(&browser, "dashboard-final.png").await {
        eprintln!("could not save the final screenshot: {e:#}");
    }
    let _ = browser.close().await;
    drop(driver);
    world.stop().await?;
    outcome
}

/// The scenario, step by step, against a signed-out dashboard.
async fn drive(browser: &Client, world: &World) -> Result<()> {
    let engine = &world.engine;
    browser.goto(&world.url).await.context("open the dashboard")?;
    ensure!(browser.title().await? == "Orderly operations", "page title");
    sign_in(browser, &world.ops_key).await?;
    ensure!(role_badge(browser).await? == "ops", "the ops key is shown as ops");

    // Orders per state match the engine, and follow new orders.
    let shown = wait_for("orders per state to match the engine", || async {
        let shown = shown_states(browser).await?;
        let actual = engine_states(engine).await?;
        Ok((shown == actual && total(&shown) >= 5).then_some(shown))
    })
    .await?;
    ensure!(shown.get("backordered").copied().unwrap_or(0) >= 2, "backordered orders are counted: {shown:?}");
    let before = total(&shown);
    for n in 0..3 {
        place(engine, 100 + n, SKU, 1).await?;
    }
    wait_for("the total to grow by 3", || async {
        let total_text = text(browser, "#orders-total").await?;
        Ok((total_text.parse::<u64>().ok() == Some(before + 3)).then_some(()))
    })
    .await?;
    wait_for("a backordered order to be listed", || async {
        Ok(browser.find_all(Locator::Css("#backorders tbody tr[data-order]")).await?.len().ge(&2).then_some(()))
    })
    .await?;
    wait_for("the dead-letter alert", || async {
        Ok(browser.find_all(Locator::Css("#alerts li[data-alert='dead_letters']")).await?.len().eq(&1).then_some(()))
    })
    .await?;

    replay_with_a_click(browser, world).await?;
    adjust_with_the_form(browser, engine).await?;
    wait_for("the manual-adjustment alert", || async {
        let css = "#alerts li[data-alert='manual_adjustment_ratio']";
        Ok((!browser.find_all(Locator::Css(css)).await?.is_empty()).then_some(()))
    })
    .await?;
    ensure!(
        !browser.find_all(Locator::Css("#alerts li[data-alert='dead_letters']")).await?.is_empty(),
        "the dead-letter alert is still listed beside it"
    );
    reconcile_with_a_click(browser, engine).await?;
    save_screenshot(browser, "dashboard-ops.png").await?;

    // A viewer sees the data but no control that changes anything.
    click(browser, "#logout").await?;
    sign_in(browser, &world.viewer_key).await?;
    viewer_has_no_controls(browser, world).await?;
    save_screenshot(browser, "dashboard-viewer.png").await?;

    // Back as ops, the poison event is discarded with a click.
    click(browser, "#logout").await?;
    sign_in(browser, &world.ops_key).await?;
    click_dead_letter(browser, &world.poison_id, "discard").await?;
    wait_for("the discarded letter to leave the engine", || async {
        Ok(engine.dead_letters(100).await?.is_empty().then_some(()))
    })
    .await?;
    wait_for("the dead-letter table to be empty", || async {
        Ok(browser.find_all(Locator::Css("#dead-letters tbody tr[data-dead-letter]")).await?.is_empty().then_some(()))
    })
    .await
}

/// Replays the planted dead letter with its button: the row goes, and the
/// engine no longer holds it.
async fn replay_with_a_click(browser: &Client, world: &World) -> Result<()> {
    let engine = &world.engine;
    wait_for("both dead letters to be listed", || async {
        let rows = browser.find_all(Locator::Css("#dead-letters tbody tr[data-dead-letter]")).await?;
        Ok((rows.len() == 2).then_some(()))
    })
    .await?;
    click_dead_letter(browser, &world.replayable_id, "replay").await?;
    wait_for("the replayed row to disappear", || async {
        let css = format!("#dead-letters tr[data-dead-letter='{}']", world.replayable_id);
        Ok(browser.find_all(Locator::Css(&css)).await?.is_empty().then_some(()))
    })
    .await?;
    let message = text(browser, "#dead-letters-message").await?;
    ensure!(message.contains("Replayed"), "replay message: {message:?}");
    let left: Vec<String> = engine.dead_letters(100).await?.into_iter().map(|d| d.id).collect();
    ensure!(left == vec![world.poison_id.clone()], "the API still lists {left:?}");
    Ok(())
}

/// A refused adjustment shows the problem's detail; a valid one shows the
/// new stock, which the engine confirms.
async fn adjust_with_the_form(browser: &Client, engine: &Engine) -> Result<()> {
    wait_for("locations in the adjustment form", || async {
        let css = format!("#adjust-location option[value='{WAREHOUSE}']");
        Ok((!browser.find_all(Locator::Css(&css)).await?.is_empty()).then_some(()))
    })
    .await?;
    let on_hand_before = on_hand(engine, SKU).await?;
    fill(browser, "#adjust-sku", SKU).await?;
    browser.find(Locator::Css("#adjust-location")).await?.select_by_value(WAREHOUSE).await?;
    fill(browser, "#adjust-delta", "0").await?;
    fill(browser, "#adjust-reason", "found a damaged carton").await?;
    click(browser, "#adjust-submit").await?;
    let refused = wait_for("the refusal's detail", || async {
        let shown = text(browser, "#adjust-error").await?;
        Ok((!shown.is_empty()).then_some(shown))
    })
    .await?;
    ensure!(refused.contains("delta must not be 0"), "the problem detail is shown: {refused:?}");

    fill(browser, "#adjust-delta", "7").await?;
    click(browser, "#adjust-submit").await?;
    let expected = on_hand_before + 7;
    let shown = wait_for("the new stock", || async {
        let shown = text(browser, "#adjust-result").await?;
        Ok(shown.contains(&format!("on hand {expected}")).then_some(shown))
    })
    .await?;
    ensure!(text(browser, "#adjust-error").await?.is_empty(), "the old error is cleared");
    ensure!(on_hand(engine, SKU).await? == expected, "the API confirms on hand {expected} ({shown})");
    Ok(())
}

/// Runs reconciliation with its button: the panel shows the report with the
/// planted drift, repaired, and the engine's books agree.
async fn reconcile_with_a_click(browser: &Client, engine: &Engine) -> Result<()> {
    let before = text(browser, "#reconcile-summary").await?;
    ensure!(before.contains("No reconciliation"), "no report before the first run: {before:?}");
    click(browser, "#reconcile-run").await?;
    let row = wait_for("the drift in the reconciliation report", || async {
        let css = "#reconcile tbody tr[data-kind='stock_drift']";
        let rows = browser.find_all(Locator::Css(css)).await?;
        match rows.first() {
            Some(r) => Ok(Some(r.text().await?)),
            None => Ok(None),
        }
    })
    .await?;
    ensure!(row.contains(DRIFT_SKU) && row.contains("repaired"), "report row: {row:?}");
    let summary = text(browser, "#reconcile-summary").await?;
    ensure!(summary.contains("1 discrepancy, 1 repaired"), "report summary: {summary:?}");
    let report = engine.last_reconcile().context("the engine kept the report")?;
    ensure!(report.discrepancies.len() == 1 && report.repaired == 1, "{report:?}");
    ensure!(on_hand(engine, DRIFT_SKU).await? == 7, "on hand stays as counted, now on the books");
    Ok(())
}

/// A viewer sees the dead letter but has no button, and no adjustment form.
async fn viewer_has_no_controls(browser: &Client, world: &World) -> Result<()> {
    ensure!(role_badge(browser).await? == "viewer", "the viewer is shown as read-only");
    ensure!(displayed(browser, "#read-only-note").await?, "the read-only note is shown");
    let css = format!("#dead-letters tr[data-dead-letter='{}']", world.poison_id);
    wait_for("the viewer to see the dead letter", || async {
        Ok((!browser.find_all(Locator::Css(&css)).await?.is_empty()).then_some(()))
    })
    .await?;
    let report = text(browser, "#reconcile-summary").await?;
    ensure!(report.contains("1 repaired"), "the viewer sees the last reconciliation report: {report:?}");
    let buttons = browser.find_all(Locator::Css("#dead-letters button, #adjust-form button, #reconcile-run")).await?;
    for button in buttons {
        ensure!(!button.is_displayed().await?, "a mutating button is visible to a viewer");
        ensure!(!button.is_enabled().await?, "a mutating button is enabled for a viewer");
    }
    ensure!(!displayed(browser, "#adjust-panel").await?, "the adjustment form is hidden from a viewer");
    ensure!(
        browser.find_all(Locator::Css("#dead-letters button[data-action]")).await?.is_empty(),
        "no replay or discard button is rendered for a viewer"
    );
    Ok(())
}

// ---- the application under test ---------------------------------------------

/// The running application, its keys and the dead letters planted in it.
struct World {
    data: tempfile::TempDir,
    engine: Arc<Engine>,
    url: String,
    ops_key: String,
    viewer_key: String,
    replayable_id: String,
    poison_id: String,
    stop: tokio::sync::oneshot::Sender<()>,
    server: tokio::task::JoinHandle<Result<()>>,
}

impl World {
    async fn start() -> Result<World> {
        let data = tempfile::tempdir()?;
        let mut settings = Settings::default();
        let (ops_key, ops_hash) = orderly_http::auth::generate_key()?;
        let (viewer_key, viewer_hash) = orderly_http::auth::generate_key()?;
        settings.auth.keys.push(ApiKey { name: "ops-console".into(), role: "ops".into(), hash: ops_hash });
        settings.auth.keys.push(ApiKey { name: "wallboard".into(), role: "viewer".into(), hash: viewer_hash });
        let options = RunOptions {
            data_dir: data.path().join("data"),
            listen: "127.0.0.1:0".parse()?,
            store: None,
            durability: Durability::Normal,
        };
        settings.alerts.manual_adjustment_min_count = 1;
        // Stock changed behind the engine's back: counted in the store while stopped.
        let app = Application::build(settings.clone(), &options).await?;
        let engine = app.engine();
        engine.put_location(Location { id: id(WAREHOUSE)?, zone: id("EU")?, kind: LocationKind::Warehouse }).await?;
        engine.receive(id(WAREHOUSE)?, id(DRIFT_SKU)?, 10).await?;
        drop(engine);
        let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
        let first = tokio::spawn(app.run_until(async {
            let _ = stopped.await;
        }));
        let _ = stop.send(());
        tokio::time::timeout(WAIT_MAX, first).await.context("the first run stops")???;
        plant_drift(&options.data_dir.join("inventory.db"), DRIFT_SKU, -3)?;
        let app = Application::build(settings, &options).await?;
        let engine = app.engine();
        let url = format!("http://{}/", app.local_addr());
        let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
        let server = tokio::spawn(app.run_until(async {
            let _ = stopped.await;
        }));
        seed(&engine).await?;
        let replayable_id = plant_replayable_dead_letter(&engine).await?;
        let poison_id = plant_poison_event(&engine).await?;
        Ok(World { data, engine, url, ops_key, viewer_key, replayable_id, poison_id, stop, server })
    }

    async fn stop(self) -> Result<()> {
        let _ = self.stop.send(());
        tokio::time::timeout(WAIT_MAX, self.server).await.context("the server stops")???;
        Ok(())
    }
}

/// A warehouse, plenty of one SKU and one unit of another: five orders, two
/// of them backordered.
async fn seed(engine: &Engine) -> Result<()> {
    engine.put_location(Location { id: id(WAREHOUSE)?, zone: id("EU")?, kind: LocationKind::Warehouse }).await?;
    engine.receive(id(WAREHOUSE)?, id(SKU)?, 200).await?;
    engine.receive(id(WAREHOUSE)?, id(RARE_SKU)?, 1).await?;
    for n in 0..3 {
        place(engine, n, SKU, 2).await?;
    }
    for n in 3..5 {
        place(engine, n, RARE_SKU, 5).await?;
    }
    wait_for("two orders to be backordered", || async {
        let states = engine_states(engine).await?;
        Ok((states.get("backordered").copied().unwrap_or(0) == 2).then_some(()))
    })
    .await
}

async fn place(engine: &Engine, n: u64, sku: &str, qty: u32) -> Result<()> {
    let request = OrderRequest {
        customer: Customer { id: id(&format!("c-{n}"))?, email: format!("customer{n}@example.com") },
        ship_to: ShipTo { zone: id::<Zone>("EU")? },
        priority: Priority::Standard,
        lines: vec![LineRequest {
            sku: id::<Sku>(sku)?,
            qty,
            unit_price: Money::parse("4.00").map_err(|e| anyhow!("{e}"))?,
        }],
        hold_ids: vec![],
        delivery_window: None,
    };
    engine.create_order(request).await?;
    Ok(())
}

/// A dead letter as the runtime records it after `bus.max_attempts`
/// transient failures: a real `inventory.reserved` event the orders service
/// has since applied, so a replay succeeds (as a stale repeat, no effect).
async fn plant_replayable_dead_letter(engine: &Engine) -> Result<String> {
    let inventory = engine.runtime.store("inventory").context("inventory store")?;
    let envelope = inventory
        .outbox_after(0, 1000)
        .await?
        .into_iter()
        .map(|r| r.envelope)
        .find(|e| e.event_type == EventType::InventoryReserved)
        .context("an inventory.reserved event")?;
    let letter = DeadLetter {
        id: envelope.id.clone(),
        consumer: "orders".into(),
        producer: "inventory".into(),
        error: "store unavailable: database is locked (planted by the browser test)".into(),
        attempts: engine.runtime.settings.bus.max_attempts,
        failed_at: envelope.time,
        envelope,
    };
    let row = Row {
        table: DEAD_LETTERS,
        key: letter.id.clone(),
        idx: Some(letter.producer.clone()),
        doc: serde_json::to_vec(&letter)?,
    };
    let orders = engine.runtime.store("orders").context("orders store")?;
    orders.commit(Batch { puts: vec![row], ..Batch::default() }).await?;
    Ok(letter.id)
}

/// A poison event in the inventory service's outbox: `inventory.reserved`
/// for an order that does not exist, with no payload. Consumers see it once
/// inventory next publishes its outbox head (here: a receipt), and the
/// orders service's runtime dead-letters it on its own.
async fn plant_poison_event(engine: &Engine) -> Result<String> {
    let inventory = engine.runtime.store("inventory").context("inventory store")?;
    let now = engine.runtime.now();
    let event_id = engine.runtime.new_id(now);
    let ghost = OrderId::try_from("ord-that-never-existed".to_owned()).map_err(|e| anyhow!("{e}"))?;
    let envelope = Envelope::new(
        event_id.clone(),
        "/orderly/inventory",
        EventType::InventoryReserved,
        ghost.as_str(),
        now,
        1,
        json!({}),
    );
    inventory.commit(Batch { outbox: vec![envelope], ..Batch::default() }).await?;
    engine.receive(id(WAREHOUSE)?, id(SKU)?, 1).await?;
    wait_for("the runtime to dead-letter the poison event", || async {
        let letters = engine.dead_letters(100).await?;
        Ok(letters.iter().any(|d| d.id == event_id).then_some(()))
    })
    .await?;
    Ok(event_id)
}

/// Changes a SKU's on-hand units in the inventory store, as a script run
/// against the database would: no event, nothing on the ledger's books.
fn plant_drift(db: &Path, sku: &str, delta: i64) -> Result<()> {
    let conn = rusqlite::Connection::open(db)?;
    let raw: Vec<u8> =
        conn.query_row("SELECT doc FROM docs WHERE tbl = 'ledgers' AND key = ?1", [sku], |r| r.get(0))?;
    let mut doc: Value = serde_json::from_slice(&raw)?;
    let on_hand = &mut doc["stock"][WAREHOUSE][0]["on_hand"];
    let now = on_hand.as_i64().context("on_hand")?;
    *on_hand = json!(now + delta);
    let changed =
        conn.execute("UPDATE docs SET doc = ?1 WHERE tbl = 'ledgers' AND key = ?2", (serde_json::to_vec(&doc)?, sku))?;
    ensure!(changed == 1, "the ledger of {sku} was not found");
    Ok(())
}

async fn engine_states(engine: &Engine) -> Result<BTreeMap<String, u64>> {
    Ok(engine.orders_by_state().await?.into_iter().filter(|(_, n)| *n > 0).collect())
}

async fn on_hand(engine: &Engine, sku: &str) -> Result<u64> {
    let snapshot = serde_json::to_value(engine.inventory(id(sku)?).await?)?;
    let at = snapshot["locations"]
        .as_array()
        .and_then(|l| l.iter().find(|l| l["location"] == WAREHOUSE))
        .with_context(|| format!("{sku} at {WAREHOUSE}: {snapshot}"))?;
    at["on_hand"].as_u64().context("on_hand")
}

fn id<T: TryFrom<String>>(s: &str) -> Result<T>
where
    T::Error: std::fmt::Display,
{
    T::try_from(s.to_owned()).map_err(|e| anyhow!("{s:?}: {e}"))
}

fn total(states: &BTreeMap<String, u64>) -> u64 {
    states.values().sum()
}

// ---- the browser ------------------------------------------------------------

/// Where chromium and chromedriver are.
struct BrowserTools {
    chromium: PathBuf,
    chromedriver: PathBuf,
}

/// The browser tools, or `None` (after a loud SKIP) when they are missing
/// outside CI. Under `CI=true` a missing tool is a failure.
fn browser_tools() -> Result<Option<BrowserTools>> {
    let chromium = which("chromium");
    let chromedriver = which("chromedriver");
    match (chromium, chromedriver) {
        (Some(chromium), Some(chromedriver)) => Ok(Some(BrowserTools { chromium, chromedriver })),
        (chromium, chromedriver) => {
            let missing = [("chromium", chromium.is_none()), ("chromedriver", chromedriver.is_none())]
                .iter()
                .filter(|(_, gone)| *gone)
                .map(|(name, _)| *name)
                .collect::<Vec<_>>()
                .join(" and ");
            if std::env::var("CI").is_ok_and(|v| v == "true") {
                bail!("{missing} not found on PATH under CI=true: run `bash .ci/chromium.sh`");
            }
            eprintln!(
                "\n{bar}\nSKIP dashboard_browser: {missing} not found on PATH.\n     Install with `bash .ci/chromium.sh`; under CI=true this fails.\n{bar}\n",
                bar = "#".repeat(72)
            );
            Ok(None)
        }
    }
}

fn which(program: &str) -> Option<PathBuf> {
    let path = std::env::var_os("PATH")?;
    std::env::split_paths(&path).map(|dir| dir.join(program)).find(|p| p.is_file())
}

/// A chromedriver process on a free local port, killed when dropped.
struct ChromeDriver {
    child: Child,
    url: String,
}

impl ChromeDriver {
    fn spawn(tools: &BrowserTools, scratch: &Path) -> Result<ChromeDriver> {
        let port = std::net::TcpListener::bind("127.0.0.1:0")?.local_addr()?.port();
        let child = Command::new(&tools.chromedriver)
            .arg(format!("--port={port}"))
            .arg(format!("--log-path={}", scratch.join("chromedriver.log").display()))
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .context("start chromedriver")?;
        Ok(ChromeDriver { child, url: format!("http://127.0.0.1:{port}") })
    }

    /// A new browser session with a fresh profile, once chromedriver answers.
    async fn session(&self, tools: &BrowserTools, scratch: &Path) -> Result<Client> {
        let profile = scratch.join("chromium-profile");
        std::fs::create_dir_all(&profile)?;
        let mut args: Vec<String> = CHROMIUM_FLAGS.iter().map(|f| (*f).to_owned()).collect();
        args.push(format!("--user-data-dir={}", profile.display()));
        let capabilities = json!({
            "browserName": "chrome",
            "goog:chromeOptions": { "binary": tools.chromium, "args": args },
        });
        let Value::Object(capabilities) = capabilities else { unreachable!("json! of an object is an object") };
        let connector = hyper_util::client::legacy::connect::HttpConnector::new();
        let url = self.url.clone();
        wait_for("chromedriver to start a session", || {
            let (connector, capabilities, url) = (connector.clone(), capabilities.clone(), url.clone());
            async move {
                let client = ClientBuilder::new(connector).capabilities(capabilities).connect(&url).await;
                match client {
                    Ok(client) => Ok(Some(client)),
                    Err(fantoccini::error::NewSessionError::NotW3C(_))
                    | Err(fantoccini::error::NewSessionError::SessionNotCreated(_)) => Err(anyhow!(
                        "chromedriver refused the session: {}",
                        client.err().map(|e| e.to_string()).unwrap_or_default()
                    )),
                    Err(_) => Ok(None),
                }
            }
        })
        .await
    }
}

impl Drop for ChromeDriver {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

async fn sign_in(browser: &Client, key: &str) -> Result<()> {
    let input = wait_for("the sign-in box", || async {
        let input = browser.find(Locator::Id("api-key")).await?;
        Ok(input.is_displayed().await?.then_some(input))
    })
    .await?;
    input.clear().await?;
    input.send_keys(key).await?;
    click(browser, "#login-submit").await?;
    wait_for("the dashboard after sign-in", || async {
        let error = text(browser, "#login-error").await?;
        ensure!(error.is_empty(), "sign-in failed: {error}");
        Ok(displayed(browser, "#main").await?.then_some(()))
    })
    .await
}

async fn click_dead_letter(browser: &Client, id: &str, action: &str) -> Result<()> {
    let css = format!("#dead-letters button[data-action='{action}'][data-id='{id}']");
    // A poll may re-render the table between finding and clicking: try again.
    wait_for(&format!("to click {action} on {id}"), || async {
        match browser.find(Locator::Css(&css)).await {
            Ok(button) => Ok(button.click().await.ok()),
            Err(_) => Ok(None),
        }
    })
    .await
}

/// Each `[data-state]` row of the orders table, as state → count.
async fn shown_states(browser: &Client) -> Result<BTreeMap<String, u64>> {
    let script = "return Array.from(document.querySelectorAll('#orders-by-state tbody tr[data-state]'))\
                  .map(r => [r.dataset.state, Number(r.querySelector('.count').textContent)]);";
    let rows: Vec<(String, u64)> = serde_json::from_value(browser.execute(script, vec![]).await?)?;
    Ok(rows.into_iter().filter(|(_, n)| *n > 0).collect())
}

async fn text(browser: &Client, css: &str) -> Result<String> {
    Ok(browser.find(Locator::Css(css)).await.with_context(|| format!("find {css}"))?.text().await?.trim().to_owned())
}

async fn role_badge(browser: &Client) -> Result<String> {
    Ok(browser.find(Locator::Id("role-badge")).await?.attr("data-role").await?.unwrap_or_default())
}

async fn displayed(browser: &Client, css: &str) -> Result<bool> {
    Ok(browser.find(Locator::Css(css)).await?.is_displayed().await?)
}

async fn click(browser: &Client, css: &str) -> Result<()> {
    browser.find(Locator::Css(css)).await.with_context(|| format!("find {css}"))?.click().await?;
    Ok(())
}

async fn fill(browser: &Client, css: &str, value: &str) -> Result<()> {
    let input = browser.find(Locator::Css(css)).await?;
    input.clear().await?;
    input.send_keys(value).await?;
    Ok(())
}

/// Saves a PNG of the page to `$ARTIFACTS_DIR`, or `target/dashboard-artifacts`.
async fn save_screenshot(browser: &Client, name: &str) -> Result<PathBuf> {
    let dir = match std::env::var_os("ARTIFACTS_DIR") {
        Some(dir) => PathBuf::from(dir),
        None => Path::new(env!("CARGO_TARGET_TMPDIR")).parent().context("target dir")?.join("dashboard-artifacts"),
    };
    std::fs::create_dir_all(&dir)?;
    let png = browser.screenshot().await?;
    ensure!(png.starts_with(b"\x89PNG"), "the screenshot is a PNG");
    let path = dir.join(name);
    std::fs::write(&path, png)?;
    eprintln!("dashboard screenshot: {}", path.display());
    Ok(path)
}

/// Checks `probe` until it yields a value, fails, or `WAIT_MAX` passes.
async fn wait_for<T, F, Fut>(what: &str, mut probe: F) -> Result<T>
where
    F: FnMut() -> Fut,
    Fut: Future<Output = Result<Option<T>>>,
{
    let deadline = Instant::now() + WAIT_MAX;
    loop {
        if let Some(value) = probe().await.with_context(|| format!("while waiting for {what}"))? {
            return Ok(value);
        }
        if Instant::now() > deadline {
            bail!("timed out after {WAIT_MAX:?} waiting for {what}");
        }
        tokio::time::sleep(RECHECK_EVERY).await;
    }
}
