#!/usr/bin/env bash
# The quick start, checked from the outside: the real `orderly` binary, HTTP only.
#
#   bash .ci/serve-lifecycle.sh PATH/TO/orderly
#
# 1. In a fresh temporary directory, `orderly serve` with no configuration at
#    all comes up on a free loopback port (/healthz, /readyz answer 200) and
#    refuses a mutating request without a key (401 application/problem+json).
# 2. `orderly keys new --role ops` makes a key; its `[[auth.keys]]` block and
#    the carrier endpoints and routes go into ./orderly.toml (found in the
#    working directory, no flag); `orderly carrier-sim` runs as its own process.
# 3. Through HTTP only: locations, stock receipts, orders (same_day and
#    standard, single- and multi-line, two zones), picks (GET /v1/picks/next +
#    confirm), packages, labels from the carrier simulator, delivery callbacks,
#    until every order is `delivered` (bounded wait: LIFECYCLE_TIMEOUT seconds,
#    default 60; fails otherwise, printing each order's state).
# 4. GET /openapi.json validates as OpenAPI 3.1 with openapi-spec-validator
#    (the system python's if it has it, else pinned into a venv under
#    $HOME/.cache).
#
# Needs bash, curl and python3 (standard library). Every child process is
# stopped on exit; the temporary directory is removed.
set -euo pipefail

BIN_ARG="${1:?usage: $0 PATH/TO/orderly}"
TIMEOUT="${LIFECYCLE_TIMEOUT:-60}"
VALIDATOR_VERSION="0.9.0"
VENV="${HOME}/.cache/orderly-openapi-validator"
test -x "$BIN_ARG" || { echo "serve-lifecycle: no executable at $BIN_ARG" >&2; exit 1; }

WORK="$(mktemp -d)"
PIDS=()
STARTED=$SECONDS

cleanup() {
  local status=$?
  for pid in "${PIDS[@]}"; do
    if kill -0 "$pid" 2>/dev/null; then
      kill "$pid" 2>/dev/null || true
      wait "$pid" 2>/dev/null || true
    fi
  done
  if [ "$status" -ne 0 ]; then
    for log in "$WORK"/*.log; do
      [ -f "$log" ] || continue
      echo "serve-lifecycle: last lines of $(basename "$log"):" >&2
      tail -n 30 "$log" >&2 || true
    done
  fi
  rm -rf "$WORK"
  exit "$status"
}
trap cleanup EXIT
trap 'exit 130' INT
trap 'exit 143' TERM

step() { printf '\n==> serve-lifecycle: %s\n' "$*"; }
fail() { echo "serve-lifecycle: FAILED: $*" >&2; exit 1; }

# A private copy: a shared target dir may be rebuilt by someone else meanwhile.
cp "$BIN_ARG" "$WORK/orderly"
BIN="$WORK/orderly"
cd "$WORK"

# Waits for "<prefix> ADDR" in a log written by process $2; prints ADDR.
wait_listen() {
  local log=$1 pid=$2 prefix=$3 addr=""
  for _ in $(seq 1 300); do
    addr="$(grep -oE "${prefix} [0-9.]+:[0-9]+" "$log" 2>/dev/null | head -n1 | awk '{print $NF}' || true)"
    [ -n "$addr" ] && { echo "$addr"; return 0; }
    kill -0 "$pid" 2>/dev/null || fail "$(basename "$log" .log) exited before listening"
    sleep 0.1
  done
  fail "$(basename "$log" .log) did not say where it listens within 30 s"
}

# Polls GET $1 until it answers 200 (30 s at most).
wait_200() {
  for _ in $(seq 1 300); do
    [ "$(curl -s -o /dev/null -w '%{http_code}' --max-time 5 "$1" || true)" = 200 ] && return 0
    sleep 0.1
  done
  fail "$1 never answered 200"
}

stop() {
  local pid=$1 status=0
  kill -TERM "$pid"
  wait "$pid" || status=$?
  echo "stopped pid $pid (exit status $status)"
  [ "$status" -eq 0 ] || fail "process $pid exited with status $status on SIGTERM"
}

step "1. orderly serve with no configuration (cwd $WORK, nothing in it)"
test ! -e orderly.toml
"$BIN" serve --listen 127.0.0.1:0 >serve-noconfig.log 2>&1 &
PIDS+=($!)
ADDR="$(wait_listen serve-noconfig.log "${PIDS[-1]}" 'listening on')"
BASE="http://$ADDR"
wait_200 "$BASE/healthz"
wait_200 "$BASE/readyz"
echo "up at $BASE: /healthz $(curl -s "$BASE/healthz"), /readyz $(curl -s "$BASE/readyz")"
grep -q 'no API keys configured' serve-noconfig.log || fail "serve did not say that no API key is configured"
echo "serve said: $(grep -o 'no API keys configured[^"]*' serve-noconfig.log | head -n1)"
curl -s -o noauth.json -D noauth.headers -X POST "$BASE/v1/orders" -H 'Content-Type: application/json' \
  --data '{"customer":{"id":"c-1","email":"c1@example.com"},"ship_to":{"zone":"EU"},"lines":[{"sku":"SKU-1","qty":1,"unit_price":"9.99"}]}'
python3 - noauth.headers noauth.json <<'PY'
import json, sys
head = open(sys.argv[1]).read().splitlines()
status = int(head[0].split()[1])
ctype = next((l.split(":", 1)[1].strip() for l in head if l.lower().startswith("content-type:")), "")
body = json.load(open(sys.argv[2]))
assert status == 401, f"POST /v1/orders without a key answered {status}: {body}"
assert ctype.startswith("application/problem+json"), f"401 with content type {ctype!r}"
assert body.get("status") == 401 and body.get("type") and body.get("detail"), body
print(f"POST /v1/orders without a key: 401 {ctype}, type {body['type']}")
PY
stop "${PIDS[-1]}"

step "2. an ops key, orderly.toml, orderly carrier-sim"
"$BIN" keys new --role ops --name ci >keys.txt
KEY="$(grep -oE 'ok_[A-Za-z0-9_-]+' keys.txt | head -n1)"
test -n "$KEY" || fail "orderly keys new printed no key"
sed -n '/^\[\[auth\.keys\]\]/,/^hash/p' keys.txt >orderly.toml
grep -q '^hash = "sha256:' orderly.toml || fail "no [[auth.keys]] block in the output of orderly keys new"
grep -qF "$KEY" orderly.toml && fail "the key itself ended up in orderly.toml"

"$BIN" carrier-sim --listen 127.0.0.1:0 >carrier-sim.log 2>&1 &
PIDS+=($!)
SIM="http://$(wait_listen carrier-sim.log "${PIDS[-1]}" 'carrier-sim listening on')"
echo "carrier-sim at $SIM: $(head -n1 carrier-sim.log)"
cat >>orderly.toml <<EOF

[carriers]
endpoints = [{ id = "fastship", url = "$SIM" }, { id = "slowpost", url = "$SIM" }]
routes = [
  { zone = "EU", primary = "fastship", secondary = "slowpost" },
  { zone = "US", primary = "slowpost", secondary = "fastship" },
]
EOF
echo "orderly.toml:"; sed 's/^/    /' orderly.toml
"$BIN" check-config --config orderly.toml

step "3. orderly serve with ./orderly.toml (same ./data), the whole lifecycle over HTTP"
"$BIN" serve --listen 127.0.0.1:0 >serve.log 2>&1 &
PIDS+=($!)
ADDR="$(wait_listen serve.log "${PIDS[-1]}" 'listening on')"
BASE="http://$ADDR"
wait_200 "$BASE/readyz"
grep -q 'no API keys configured' serve.log && fail "serve did not load ./orderly.toml (it says no key is configured)"
echo "serve at $BASE"
LIFECYCLE_START=$SECONDS
python3 - "$BASE" "$KEY" "$TIMEOUT" <<'PY'
import json, sys, time, urllib.error, urllib.request

base, key, timeout = sys.argv[1], sys.argv[2], float(sys.argv[3])

def call(method, path, body=None, idem=None):
    data = None if body is None else json.dumps(body).encode()
    req = urllib.request.Request(base + path, data=data, method=method)
    req.add_header("Authorization", f"Bearer {key}")
    if data is not None:
        req.add_header("Content-Type", "application/json")
    if idem:
        req.add_header("Idempotency-Key", idem)
    try:
        with urllib.request.urlopen(req, timeout=20) as r:
            status, raw = r.status, r.read()
    except urllib.error.HTTPError as e:
        status, raw = e.code, e.read()
    return status, (json.loads(raw) if raw.strip() else None)

def must(expected, method, path, body=None, idem=None):
    status, out = call(method, path, body, idem)
    assert status == expected, f"{method} {path}: {status} (expected {expected}): {out}"
    return out

LOCATIONS = {"WH-EU-1": "EU", "WH-US-1": "US"}
SKUS = {"TEE-BLK-M": "19.99", "MUG-WHT": "9.50", "SNEAKER-42": "129.00"}
for loc, zone in LOCATIONS.items():
    must(200, "PUT", f"/v1/locations/{loc}", {"zone": zone, "kind": "warehouse"})
    for sku in SKUS:
        must(201, "POST", "/v1/inventory/receipts", {"location": loc, "sku": sku, "qty": 40}, idem=f"rcpt-{loc}-{sku}")
print(f"{len(LOCATIONS)} locations, {len(LOCATIONS) * len(SKUS)} receipts of 40 units")

def order(n, zone, priority, lines):
    body = {
        "customer": {"id": f"c-{n}", "email": f"c{n}@example.com"},
        "ship_to": {"zone": zone},
        "priority": priority,
        "lines": [{"sku": s, "qty": q, "unit_price": SKUS[s]} for s, q in lines],
    }
    created = must(201, "POST", "/v1/orders", body, idem=f"order-{n}")
    return created["id"], {"zone": zone, "priority": priority, "lines": len(lines)}

orders = dict([
    order(1, "EU", "standard", [("TEE-BLK-M", 2)]),
    order(2, "EU", "same_day", [("TEE-BLK-M", 1), ("MUG-WHT", 3)]),
    order(3, "US", "standard", [("SNEAKER-42", 1), ("MUG-WHT", 2)]),  # the sneaker line is reserved synchronously
    order(4, "US", "same_day", [("TEE-BLK-M", 1)]),
    order(5, "EU", "standard", [("MUG-WHT", 1), ("SNEAKER-42", 1), ("TEE-BLK-M", 3)]),
])
print(f"{len(orders)} orders:", ", ".join(f"{i} ({o['zone']} {o['priority']}, {o['lines']} line{'s' if o['lines'] > 1 else ''})" for i, o in orders.items()))

picks = {}        # order id -> location -> [pick ids]
pick_order = []   # (location, priority) in the order tasks were handed out
packed = set()    # (order id, location) packed
reported = set()  # shipment ids reported delivered
carriers = {}
states = {}
started = time.monotonic()
while True:
    for loc in LOCATIONS:
        while True:
            status, task = call("GET", f"/v1/picks/next?location={loc}")
            if status == 204:
                break
            assert status == 200, f"GET /v1/picks/next?location={loc}: {status} {task}"
            must(200, "POST", f"/v1/picks/{task['id']}/confirm", {"instruction_key": task["instruction_key"], "qty": task["qty"]})
            picks.setdefault(task["order_id"], {}).setdefault(loc, []).append(task["id"])
            pick_order.append((loc, task["priority"]))
    for oid in orders:
        o = must(200, "GET", f"/v1/orders/{oid}")
        states[oid] = o["state"]
        if o["state"] == "picked":
            # Packing learns of the picks from events: a 409 means "not yet", try again next round.
            for loc, ids in picks.get(oid, {}).items():
                if (oid, loc) in packed:
                    continue
                status, out = call("POST", "/v1/packages", {"order_id": oid, "location": loc, "pick_ids": ids})
                assert status in (201, 409), f"POST /v1/packages: {status} {out}"
                if status == 201:
                    packed.add((oid, loc))
        if o["state"] in ("shipped", "partially_shipped"):
            for s in o["shipments"]:
                sid = s["shipment_id"]
                if s["delivered_at"] is None and sid not in reported:
                    status, out = call("POST", f"/v1/shipments/{sid}/delivered")
                    assert status in (200, 409), f"POST /v1/shipments/{sid}/delivered: {status} {out}"
                    if status == 200:
                        reported.add(sid)
                        carriers[sid] = out["carrier"]
                        assert out["tracking_number"] and out["label_created_at"], out
    if all(s == "delivered" for s in states.values()):
        break
    if time.monotonic() - started > timeout:
        raise SystemExit(f"not every order reached delivered within {timeout:.0f} s: {states}; packed {sorted(packed)}")
    time.sleep(0.2)

took = time.monotonic() - started
for oid in orders:
    events = must(200, "GET", f"/v1/orders/{oid}/events")
    types = [e["type"] for e in events]
    assert types[0] == "orderly.order.created" and types[-1] == "orderly.order.delivered", types
for sku in SKUS:
    inv = must(200, "GET", f"/v1/inventory/{sku}")
    for l in inv["locations"]:
        assert l["reserved"] == 0 and l["reserved"] + l["safety"] <= l["on_hand"], l
print(f"picks handed out (location, priority), in order: {pick_order}")
print(f"labels by carrier: { {c: list(carriers.values()).count(c) for c in sorted(set(carriers.values()))} }")
print(f"lifecycle: {len(orders)} orders delivered ({sum(len(v) for p in picks.values() for v in p.values())} picks, "
      f"{len(packed)} packages, {len(reported)} shipments) in {took:.1f} s after intake")
PY
LIFECYCLE_SECS=$((SECONDS - LIFECYCLE_START))

step "4. /openapi.json validates as OpenAPI 3.1"
curl -s --fail --max-time 10 "$BASE/openapi.json" -o openapi.json || fail "GET /openapi.json"
PY_VALIDATOR=python3
if ! python3 -c "import openapi_spec_validator" 2>/dev/null; then
  if ! "$VENV/bin/python" -c "import openapi_spec_validator" 2>/dev/null; then
    echo "installing openapi-spec-validator ${VALIDATOR_VERSION} into ${VENV}"
    python3 -m venv "$VENV"
    "$VENV/bin/pip" install --quiet --disable-pip-version-check "openapi-spec-validator==${VALIDATOR_VERSION}"
  fi
  PY_VALIDATOR="$VENV/bin/python"
fi
"$PY_VALIDATOR" - openapi.json <<'PY'
import json, sys
from importlib.metadata import version
from openapi_spec_validator import OpenAPIV31SpecValidator, validate
doc = json.load(open(sys.argv[1]))
assert str(doc.get("openapi", "")).startswith("3.1."), f"openapi is {doc.get('openapi')!r}"
validate(doc, cls=OpenAPIV31SpecValidator)
print(f"openapi.json: OpenAPI {doc['openapi']}, {len(doc['paths'])} paths, valid "
      f"(openapi-spec-validator {version('openapi-spec-validator')}, OpenAPIV31SpecValidator)")
PY

stop "${PIDS[-1]}"
step "ok: no-config start, 401 without a key, every order delivered (${LIFECYCLE_SECS} s), OpenAPI 3.1 valid; $((SECONDS - STARTED)) s in all"
