// Orderly operations dashboard: signs in with an API key (kept in this tab's
// sessionStorage), then polls the JSON API and renders each panel. Data is
// only ever written with textContent, never parsed as HTML.
"use strict";
(function () {
  const POLL_MS = 2000;
  const KEY_STORAGE = "orderly.apiKey";
  const DEAD_LETTERS_MAX = 100;
  const BACKORDERS_MAX = 25;
  const STATE_ORDER = ["created", "allocating", "allocated", "backordered", "picking", "picked", "packed",
    "partially_shipped", "shipped", "delivered", "canceled", "return_requested", "returned"];

  const $ = (id) => document.getElementById(id);
  const session = { key: null, canMutate: false, timer: null, generation: 0, rendered: {} };

  // ---- API ------------------------------------------------------------------

  /** A failed API call, with the problem+json detail when the server sent one. */
  class ApiError extends Error {
    constructor(status, detail) { super(detail); this.status = status; }
  }

  function idempotencyKey() {
    const bytes = new Uint8Array(16);
    crypto.getRandomValues(bytes);
    return "dash-" + Array.from(bytes, (b) => b.toString(16).padStart(2, "0")).join("");
  }

  async function api(method, path, body) {
    const headers = { "Authorization": "Bearer " + session.key, "Accept": "application/json, application/problem+json" };
    const init = { method, headers, cache: "no-store", credentials: "omit" };
    if (method !== "GET") {
      headers["Idempotency-Key"] = idempotencyKey();
    }
    if (body !== undefined) {
      headers["Content-Type"] = "application/json";
      init.body = JSON.stringify(body);
    }
    let response;
    try {
      response = await fetch(path, init);
    } catch (e) {
      throw new ApiError(0, "the server cannot be reached (" + e.message + ")");
    }
    const text = await response.text();
    let data = null;
    try { data = text ? JSON.parse(text) : null; } catch (_) { data = null; }
    if (!response.ok) {
      const detail = data && (data.detail || data.title) ? (data.detail || data.title) : response.status + " " + response.statusText;
      throw new ApiError(response.status, detail);
    }
    return data;
  }

  // ---- session --------------------------------------------------------------

  async function signIn(key) {
    session.key = key;
    session.generation += 1;
    await api("GET", "/v1/ops/summary");
    session.canMutate = await probeOps();
    sessionStorage.setItem(KEY_STORAGE, key);
    showDashboard();
    loadLocations();
    poll(session.generation);
  }

  /** True when the key may use ops commands: a discard of a dead letter that
   * cannot exist answers 404 to ops and 403 to every other role. */
  async function probeOps() {
    try {
      await api("POST", "/v1/ops/dead-letters/dashboard-role-probe/discard");
      return true;
    } catch (e) {
      return e.status !== 403 && e.status !== 401;
    }
  }

  function signOut(message) {
    session.key = null;
    session.generation += 1;
    session.rendered = {};
    session.reconcileId = null;
    clearTimeout(session.timer);
    sessionStorage.removeItem(KEY_STORAGE);
    $("main").hidden = true;
    $("session").hidden = true;
    $("login").hidden = false;
    $("api-key").value = "";
    for (const id of ["dead-letters-message", "adjust-error", "adjust-result", "reconcile-error"]) $(id).textContent = "";
    $("login-error").textContent = message || "";
    $("updated").textContent = "Not signed in.";
    $("api-key").focus();
  }

  function showDashboard() {
    $("login").hidden = true;
    $("login-error").textContent = "";
    $("main").hidden = false;
    $("session").hidden = false;
    const role = session.canMutate ? "ops" : "viewer";
    const badge = $("role-badge");
    badge.dataset.role = role;
    badge.textContent = session.canMutate ? "ops" : "read-only";
    setReadOnly(!session.canMutate);
  }

  /** Hides and disables every mutating control. */
  function setReadOnly(readOnly) {
    session.canMutate = !readOnly;
    $("read-only-note").hidden = !readOnly;
    for (const el of document.querySelectorAll(".ops-only")) el.hidden = readOnly;
    $("adjust-fieldset").disabled = readOnly;
    $("reconcile-run").disabled = readOnly;
    for (const b of document.querySelectorAll("#dead-letters button")) b.disabled = readOnly;
    if (readOnly) {
      session.rendered.deadLetters = null;
      const badge = $("role-badge");
      badge.dataset.role = "viewer";
      badge.textContent = "read-only";
    }
  }

  /** A mutating call answered 403: this key is read-only after all. */
  function handleForbidden(e) {
    if (e.status === 403) setReadOnly(true);
    if (e.status === 401) signOut("The API key was rejected: " + e.message);
  }

  // ---- polling --------------------------------------------------------------

  async function poll(generation) {
    if (generation !== session.generation) return;
    try {
      await refresh();
      const live = $("live");
      live.textContent = "live";
      live.classList.remove("stale");
      $("updated").textContent = "Updated " + new Date().toLocaleTimeString() + ".";
    } catch (e) {
      if (generation !== session.generation) return;
      if (e.status === 401) { signOut("The API key was rejected: " + e.message); return; }
      const live = $("live");
      live.textContent = "update failed: " + e.message;
      live.classList.add("stale");
    }
    if (generation === session.generation) {
      session.timer = setTimeout(() => poll(generation), POLL_MS);
    }
  }

  async function refresh() {
    const [summary, dead, backordered] = await Promise.all([
      api("GET", "/v1/ops/summary"),
      api("GET", "/v1/ops/dead-letters?limit=" + DEAD_LETTERS_MAX),
      api("GET", "/v1/orders?state=backordered&limit=" + BACKORDERS_MAX),
    ]);
    renderSummary(summary);
    renderDeadLetters(dead.dead_letters || []);
    renderBackorders(backordered.orders || []);
    const brief = summary.reconciliation;
    if (brief && brief.id !== session.reconcileId) {
      renderReconcile(await api("GET", "/v1/ops/reconcile/last"));
    }
  }

  /** Calls `render(data)` only when `data` differs from what is shown, so
   * focus, selection and buttons survive a poll that changed nothing. */
  function renderIfChanged(name, data, render) {
    const signature = JSON.stringify(data);
    if (session.rendered[name] === signature) return;
    session.rendered[name] = signature;
    render(data);
  }

  // ---- panels ---------------------------------------------------------------

  function renderSummary(s) {
    renderIfChanged("alerts", s.alerts || [], renderAlerts);
    renderIfChanged("orders", s.orders_by_state || {}, renderOrders);
    renderIfChanged("lag", [s.consumer_lag_seconds || {}, s.consumer_backlog || {}], renderLag);
    setCounter("count-dead-letters", s.dead_letters, s.dead_letters > 0);
    setCounter("count-retries", s.retries, false);
    setCounter("count-failures", s.failures, s.failures > 0);
    setCounter("count-manual-ratio", Number(s.manual_adjustment_ratio || 0).toFixed(2), false);
    setCounter("count-fallbacks", s.carrier_fallbacks, false);
    const sh = s.shipping || {};
    setCounter("label-queue", sh.label_queue_depth ?? "–", false);
    setCounter("labels-in-flight", sh.labels_in_flight ?? "–", false);
    const rates = sh.rates || {};
    const version = rates.active_version || "none";
    setCounter("rates-version", rates.pending_version ? version + " → " + rates.pending_version : version, false);
    const breakers = Object.entries(sh.breakers || {}).map(([name, b]) => ["carrier " + name, b]);
    if (s.notifications && s.notifications.breaker) {
      breakers.push(["webhook " + s.notifications.endpoint, s.notifications.breaker]);
    }
    renderIfChanged("breakers", breakers, renderBreakers);
  }

  function setCounter(id, value, alerting) {
    const el = $(id);
    const text = String(value ?? "–");
    if (el.textContent !== text) el.textContent = text;
    el.classList.toggle("alerting", Boolean(alerting));
  }

  function renderAlerts(alerts) {
    const list = $("alerts");
    list.replaceChildren();
    if (alerts.length === 0) {
      list.append(el("li", { className: "ok" }, "No active alerts."));
      return;
    }
    for (const a of alerts) {
      const li = el("li", { dataset: { alert: a.name } });
      li.append(el("span", { className: "name" }, a.name.replace(/_/g, " ")), a.detail);
      list.append(li);
    }
  }

  function renderOrders(byState) {
    const known = STATE_ORDER.filter((s) => s in byState);
    const others = Object.keys(byState).filter((s) => !STATE_ORDER.includes(s)).sort();
    const rows = known.concat(others).map((state) => {
      const tr = el("tr", { dataset: { state } });
      tr.append(el("th", { scope: "row" }, state.replace(/_/g, " ")),
        el("td", { className: "num count" }, String(byState[state])));
      return tr;
    });
    fillBody("orders-by-state", rows, 2, "No orders yet.");
    const total = Object.values(byState).reduce((a, b) => a + Number(b), 0);
    $("orders-total").textContent = String(total);
  }

  function renderLag([lag, backlog]) {
    const keys = Array.from(new Set(Object.keys(lag).concat(Object.keys(backlog)))).sort();
    const rows = keys.map((key) => {
      const seconds = Number(lag[key] || 0);
      const tr = el("tr", { dataset: { consumer: key }, className: seconds >= 60 ? "lagging" : "" });
      tr.append(el("th", { scope: "row" }, key.replace("<-", " ← ")),
        el("td", { className: "num" }, seconds.toFixed(1)),
        el("td", { className: "num" }, String(backlog[key] ?? 0)));
      return tr;
    });
    fillBody("consumer-lag", rows, 3, "No consumers.");
  }

  function renderBreakers(breakers) {
    const rows = breakers.map(([name, b]) => {
      const state = b.state || "unknown";
      let detail = state.replace(/_/g, " ");
      if (state === "open" && b.until) detail += " until " + new Date(b.until).toLocaleTimeString();
      if (state === "closed" && b.consecutive_failures) detail += " (" + b.consecutive_failures + " failures)";
      const tr = el("tr", { dataset: { breaker: name } });
      tr.append(el("th", { scope: "row" }, name), el("td", { className: "state-" + state }, detail));
      return tr;
    });
    fillBody("breakers", rows, 2, "No breakers.");
  }

  function renderDeadLetters(letters) {
    renderIfChanged("deadLetters", [letters, session.canMutate], () => {
      const rows = letters.map((d) => {
        const env = d.envelope || {};
        const tr = el("tr", { dataset: { deadLetter: d.id } });
        tr.append(
          el("td", { className: "mono" }, d.id),
          el("td", {}, d.consumer + " ← " + d.producer),
          el("td", { className: "mono" }, env.type || ""),
          el("td", { className: "mono" }, env.subject || ""),
          el("td", { className: "error-text" }, d.error),
          el("td", { className: "num" }, String(d.attempts)),
          el("td", {}, formatTime(d.failed_at)),
        );
        if (session.canMutate) {
          const cell = el("td", { className: "actions ops-only" });
          cell.append(
            el("button", { type: "button", className: "replay", dataset: { action: "replay", id: d.id },
              ariaLabel: "Replay dead letter " + d.id }, "Replay"),
            el("button", { type: "button", className: "danger discard", dataset: { action: "discard", id: d.id },
              ariaLabel: "Discard dead letter " + d.id }, "Discard"));
          tr.append(cell);
        }
        return tr;
      });
      fillBody("dead-letters", rows, session.canMutate ? 8 : 7, "No dead letters.");
    });
  }

  function renderBackorders(orders) {
    renderIfChanged("backorders", orders, () => {
      const rows = orders.map((o) => {
        const waiting = (o.lines || []).filter((l) => l.backordered > 0 || (l.allocations || []).length === 0)
          .map((l) => l.sku + " × " + (l.backordered || l.qty)).join(", ");
        const tr = el("tr", { dataset: { order: o.id } });
        tr.append(el("td", { className: "mono" }, o.id), el("td", {}, formatTime(o.created_at)),
          el("td", {}, waiting || "–"), el("td", {}, o.expected_ship_date || "–"));
        return tr;
      });
      fillBody("backorders", rows, 4, "No backordered orders.");
    });
  }

  function renderReconcile(report) {
    session.reconcileId = report.id;
    const list = report.discrepancies || [];
    const repaired = list.filter((d) => d.repaired).length;
    const open = list.filter((d) => !d.repaired && d.action !== "none").length;
    const summary = $("reconcile-summary");
    summary.dataset.run = report.id;
    summary.dataset.discrepancies = String(list.length);
    summary.textContent = "Last run " + formatTime(report.finished_at) + " (" + report.trigger + "): " +
      report.skus_checked + " SKUs, " + report.reservations_checked + " reservations, " + report.orders_checked +
      " orders, " + report.picks_checked + " picks checked; " +
      (list.length === 0 ? "no discrepancy." : (list.length === 1 ? "1 discrepancy" : list.length + " discrepancies") + ", " + repaired + " repaired" +
        (open > 0 ? ", " + open + " not repaired." : "."));
    summary.className = list.length > 0 && open > 0 ? "error" : "message";
    const rows = list.map((d) => {
      const status = d.error ? "not repaired: " + d.error : d.repaired ? "repaired" : d.action === "none" ? "reported" : "already right";
      const tr = el("tr", { dataset: { kind: d.kind, status: d.repaired ? "repaired" : "open" } });
      tr.append(el("td", { className: "mono" }, d.kind.replace(/_/g, " ")), el("td", { className: "mono" }, d.sku),
        el("td", {}, d.location || "–"), el("td", { className: "mono" }, d.order_id || "–"),
        el("td", {}, d.detail), el("td", {}, d.action), el("td", { className: d.repaired ? "ok" : "" }, status));
      return tr;
    });
    fillBody("reconcile", rows, 7, "No discrepancies.");
  }

  async function onReconcile() {
    const button = $("reconcile-run");
    const error = $("reconcile-error");
    error.textContent = "";
    button.disabled = true;
    try {
      renderReconcile(await api("POST", "/v1/ops/reconcile"));
    } catch (e) {
      handleForbidden(e);
      error.textContent = "Reconciliation failed: " + e.message;
    } finally {
      button.disabled = !session.canMutate;
    }
  }

  async function loadLocations() {
    if (!session.canMutate) return;
    try {
      const data = await api("GET", "/v1/locations");
      const select = $("adjust-location");
      const current = select.value;
      select.replaceChildren(...(data.locations || []).map((l) =>
        el("option", { value: l.id }, l.id + " (" + l.kind + ", " + l.zone + ")")));
      if (current) select.value = current;
    } catch (e) {
      $("adjust-error").textContent = "Locations could not be loaded: " + e.message;
    }
  }

  // ---- actions --------------------------------------------------------------

  async function onDeadLetterAction(event) {
    const button = event.target.closest("button[data-action]");
    if (!button || button.disabled) return;
    const { action, id } = button.dataset;
    const message = $("dead-letters-message");
    for (const b of button.parentElement.querySelectorAll("button")) b.disabled = true;
    try {
      await api("POST", "/v1/ops/dead-letters/" + encodeURIComponent(id) + "/" + action);
      message.className = "message";
      message.textContent = (action === "replay" ? "Replayed " : "Discarded ") + id + ".";
      const row = button.closest("tr");
      if (row) row.remove();
      session.rendered.deadLetters = null;
    } catch (e) {
      handleForbidden(e);
      message.className = "error";
      message.textContent = "Could not " + action + " " + id + ": " + e.message;
      for (const b of button.parentElement ? button.parentElement.querySelectorAll("button") : []) b.disabled = !session.canMutate;
    }
  }

  async function onAdjust(event) {
    event.preventDefault();
    const error = $("adjust-error");
    const result = $("adjust-result");
    error.textContent = "";
    result.textContent = "";
    const sku = $("adjust-sku").value.trim();
    const location = $("adjust-location").value;
    const deltaText = $("adjust-delta").value.trim();
    const reason = $("adjust-reason").value.trim();
    const delta = Number(deltaText);
    if (!sku || !location || !reason || deltaText === "" || !Number.isInteger(delta)) {
      error.textContent = "Fill in SKU, location, a whole-number change and a reason.";
      return;
    }
    const submit = $("adjust-submit");
    submit.disabled = true;
    try {
      const inv = await api("POST", "/v1/inventory/adjustments", { sku, location, delta, reason });
      const at = (inv.locations || []).find((l) => l.location === location);
      result.dataset.sku = inv.sku;
      result.textContent = at
        ? inv.sku + " at " + location + ": on hand " + at.on_hand + ", reserved " + at.reserved + ", available " + at.available + "."
        : inv.sku + ": available " + inv.available + ".";
      $("adjust-delta").value = "";
    } catch (e) {
      handleForbidden(e);
      error.textContent = e.message;
    } finally {
      submit.disabled = false;
    }
  }

  // ---- helpers --------------------------------------------------------------

  /** Creates an element; `props` may carry className, dataset and attributes. */
  function el(tag, props, text) {
    const node = document.createElement(tag);
    for (const [k, v] of Object.entries(props || {})) {
      if (k === "dataset") Object.assign(node.dataset, v);
      else if (k === "className") { if (v) node.className = v; }
      else if (k === "ariaLabel") node.setAttribute("aria-label", v);
      else node[k] = v;
    }
    if (text !== undefined) node.textContent = text;
    return node;
  }

  function fillBody(tableId, rows, columns, emptyText) {
    const body = document.querySelector("#" + tableId + " tbody");
    if (rows.length === 0) {
      const td = el("td", { colSpan: columns }, emptyText);
      const tr = el("tr", { className: "empty" });
      tr.append(td);
      rows = [tr];
    }
    body.replaceChildren(...rows);
  }

  function formatTime(value) {
    if (!value) return "–";
    const date = new Date(value);
    return isNaN(date) ? String(value) : date.toLocaleString();
  }

  // ---- wiring ---------------------------------------------------------------

  $("login-form").addEventListener("submit", async (event) => {
    event.preventDefault();
    const key = $("api-key").value.trim();
    if (!key) { $("login-error").textContent = "Enter an API key."; return; }
    $("login-submit").disabled = true;
    try {
      await signIn(key);
    } catch (e) {
      session.key = null;
      $("login-error").textContent = "Sign-in failed: " + e.message;
    } finally {
      $("login-submit").disabled = false;
    }
  });
  $("logout").addEventListener("click", () => signOut(""));
  $("dead-letters").addEventListener("click", onDeadLetterAction);
  $("adjust-form").addEventListener("submit", onAdjust);
  $("reconcile-run").addEventListener("click", onReconcile);

  const saved = sessionStorage.getItem(KEY_STORAGE);
  if (saved) {
    signIn(saved).catch((e) => signOut("Please sign in again: " + e.message));
  } else {
    $("api-key").focus();
  }
})();
