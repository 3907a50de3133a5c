#!/usr/bin/env bash
# Bounded fuzzing: every target of crates/orderly-fuzz for a few seconds
# (ORDERLY_FUZZ_SECONDS, default 5), after replaying its committed seed
# corpus in fuzz/corpus/<target>/. Generation is proptest (arbitrary bytes,
# mutations of the seeds, structure-aware JSON edits), not libFuzzer: stable
# Rust only, and an instrumented (ASan + sancov) build of the dependency tree
# costs far more CI time than the run itself (see README "Fuzzing").
# A failing input is saved under $CARGO_TARGET_DIR/fuzz-artifacts/<target>/.
set -euo pipefail
cd "$(dirname "$0")/.."
export ORDERLY_FUZZ_SECONDS="${ORDERLY_FUZZ_SECONDS:-5}"
log="$(mktemp)"
status=0
cargo nextest run -p orderly-fuzz --test fuzz --no-capture --retries 0 --test-threads 1 >"$log" 2>&1 || status=$?
grep -E '^fuzz |FAIL|panicked|failed on|Summary|^error' "$log" || true
if [ "$status" -ne 0 ]; then
  tail -n 60 "$log"
  echo "fuzzing found a failure (exit $status)"
fi
rm -f "$log"
exit "$status"
