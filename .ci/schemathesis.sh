#!/usr/bin/env bash
# Fuzzes the real HTTP API against its own OpenAPI document with Schemathesis:
# builds `orderly`, starts `orderly serve` on a free port with a fresh data
# dir and one key per role, seeds a little data, and runs `st run` with the
# ops key. Fails on a server error, an undocumented status code, a wrong
# content type or a body that does not match its schema. Stops the server on
# every exit. Downloads nothing but Schemathesis from PyPI (into a venv under
# $HOME/.cache).
#
# Environment: ST_MAX_EXAMPLES (default 30 per operation), ST_SEED (default
# fixed, so a failure replays), ST_TIMEOUT (seconds `st run` may take before
# it is stopped and fails, default 240), ST_CHECKS (comma-separated `st run`
# checks, default the four above), CARGO_TARGET_DIR (as for cargo).
set -euo pipefail
cd "$(dirname "$0")/.."

ST_VERSION="4.32.5"
VENV="${HOME}/.cache/orderly-schemathesis"
MAX_EXAMPLES="${ST_MAX_EXAMPLES:-30}"
SEED="${ST_SEED:-20261126}"
ST_TIMEOUT="${ST_TIMEOUT:-240}"
CHECKS="${ST_CHECKS:-not_a_server_error,status_code_conformance,content_type_conformance,response_schema_conformance}"
TARGET_DIR="${CARGO_TARGET_DIR:-$PWD/target}"
BIN="${TARGET_DIR}/debug/orderly"
WORK="$(mktemp -d)"
SERVER_PID=""

cleanup() {
  local status=$?
  if [ -n "$SERVER_PID" ] && kill -0 "$SERVER_PID" 2>/dev/null; then
    kill "$SERVER_PID" 2>/dev/null || true
    wait "$SERVER_PID" 2>/dev/null || true
  fi
  if [ "$status" -ne 0 ] && [ -f "$WORK/server.log" ]; then
    echo "schemathesis: last server log lines:" >&2
    tail -n 40 "$WORK/server.log" >&2 || true
  fi
  rm -rf "$WORK"
  exit "$status"
}
trap cleanup EXIT

step() { printf '\n==> schemathesis: %s\n' "$*"; }

step "installing schemathesis ${ST_VERSION} into ${VENV}"
if ! "$VENV/bin/st" --version 2>/dev/null | grep -q "$ST_VERSION"; then
  python3 -m venv "$VENV"
  "$VENV/bin/pip" install --quiet --disable-pip-version-check "schemathesis==${ST_VERSION}"
fi
"$VENV/bin/st" --version

step "building orderly"
cargo build --quiet -p orderly
test -x "$BIN" || { echo "schemathesis: no binary at $BIN" >&2; exit 1; }
# A private copy: a shared target dir may be rebuilt by someone else meanwhile.
cp "$BIN" "$WORK/orderly"
BIN="$WORK/orderly"

step "configuring one key per role"
declare -A KEYS
: >"$WORK/orderly.toml"
for role in storefront warehouse carrier ops viewer; do
  out="$("$BIN" keys new --role "$role" --name "st-$role")"
  KEYS[$role]="$(printf '%s\n' "$out" | grep -oE 'ok_[A-Za-z0-9_-]+' | head -n1)"
  printf '%s\n' "$out" | sed -n '/^\[\[auth\.keys\]\]/,/^hash/p' >>"$WORK/orderly.toml"
  printf '\n' >>"$WORK/orderly.toml"
done
test -n "${KEYS[ops]}" || { echo "schemathesis: could not read the ops key" >&2; exit 1; }

step "starting orderly serve"
"$BIN" serve --config "$WORK/orderly.toml" --data-dir "$WORK/data" --listen 127.0.0.1:0 --durability normal \
  >"$WORK/server.log" 2>&1 &
SERVER_PID=$!
ADDR=""
for _ in $(seq 1 300); do
  ADDR="$(grep -oE 'listening on [0-9.]+:[0-9]+' "$WORK/server.log" | head -n1 | awk '{print $3}' || true)"
  [ -n "$ADDR" ] && break
  kill -0 "$SERVER_PID" 2>/dev/null || { echo "schemathesis: the server exited" >&2; exit 1; }
  sleep 0.1
done
test -n "$ADDR" || { echo "schemathesis: the server did not say where it listens" >&2; exit 1; }
BASE="http://${ADDR}"
echo "server at ${BASE}"

curl --silent --show-error --fail --max-time 10 "${BASE}/openapi.json" -o "$WORK/openapi.json" ||
  { echo "schemathesis: ${BASE}/openapi.json is not served (is the binary current?)" >&2; exit 1; }

step "seeding locations, stock, a hold and an order"
api() {
  local method=$1 path=$2 body=${3:-}
  curl --silent --show-error --fail-with-body --max-time 10 -X "$method" "${BASE}${path}" \
    -H "Authorization: Bearer ${KEYS[ops]}" -H 'Content-Type: application/json' ${body:+--data "$body"} >/dev/null
}
api PUT /v1/locations/WH-EU-1 '{"zone":"EU","kind":"warehouse"}'
api PUT /v1/locations/WH-US-1 '{"zone":"US","kind":"warehouse"}'
api POST /v1/inventory/receipts '{"location":"WH-EU-1","sku":"SKU-1","qty":1000}'
api POST /v1/inventory/receipts '{"location":"WH-US-1","sku":"SKU-2","qty":50}'
api POST /v1/holds '{"sku":"SKU-1","qty":1}'
api POST /v1/orders '{"customer":{"id":"c-1","email":"ada@example.com"},"ship_to":{"zone":"EU"},"lines":[{"sku":"SKU-1","qty":2,"unit_price":"9.99"}]}'

step "st run (max ${MAX_EXAMPLES} examples per operation, seed ${SEED})"
# From the scratch dir, so Schemathesis's caches stay out of the repository.
# One worker: with two, Hypothesis calls ast.parse from two threads and
# CPython 3.11 can fail with "SystemError: AST constructor recursion depth
# mismatch" (python/cpython#106905), a tool error, not a finding.
cd "$WORK"
timeout "$ST_TIMEOUT" "$VENV/bin/st" run "${BASE}/openapi.json" \
  --header "Authorization: Bearer ${KEYS[ops]}" \
  --checks "$CHECKS" \
  --max-examples "$MAX_EXAMPLES" \
  --seed "$SEED" \
  --workers 1 \
  --request-timeout 10 \
  --generation-database none \
  --suppress-health-check all \
  --no-color
