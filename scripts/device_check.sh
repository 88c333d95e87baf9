#!/usr/bin/env bash
# The accelerator check: does loopicl install, test, run fast, and resume on this machine's device?
#
#   bash scripts/device_check.sh                 # on a GPU machine: CUDA jax in its own venv
#   bash scripts/device_check.sh --cpu           # reduced form on the CPU (what CI runs)
#   options: --out DIR (default runs/device_check)   --jax cuda12|cuda13 (default cuda12)
#
# Steps, each recorded in DIR/device_check.md (one markdown summary):
#   1. install: CUDA jax into DIR/venv (scripts/install.sh, pinned versions); --cpu: this checkout's
#      .venv (or $PYTHON);
#   2. the test suite on the device (model.kernel=auto resolves to xla there); --cpu: two files;
#   3. the benchmark (scripts/benchmark.py) at batch 256 … 65 536: steps/s, examples/s and the
#      fraction of the device's matmul peak; --cpu: batch 256;
#   4. the default run killed with SIGKILL after its first checkpoint and resumed, against an
#      uninterrupted run of the same config: the final metrics must be identical.
# Exit status 0 when every step passed; the summary says which failed otherwise.
set -uo pipefail
cd "$(dirname "$0")/.."
out="runs/device_check"; cpu=0; cuda="cuda12"
while [ $# -gt 0 ]; do
  case "$1" in
    --cpu) cpu=1; shift ;;
    --out) out="$2"; shift 2 ;;
    --jax) cuda="$2"; shift 2 ;;
    *) echo "error: unknown argument $1; allowed: --cpu, --out DIR, --jax cuda12|cuda13" >&2; exit 2 ;;
  esac
done
mkdir -p "$out"
summary="$out/device_check.md"
failed=0
note() { echo "$*" | tee -a "$summary"; }
: > "$summary"

if [ "$cpu" = 1 ]; then
  python="${PYTHON:-.venv/bin/python}"
  export JAX_PLATFORMS=cpu
  batches="256"; tests=(tests/test_weights.py); steps=200; every=100; repeats=1
else
  LOOPICL_VENV="$out/venv" LOOPICL_JAX="$cuda" bash scripts/install.sh > "$out/install.log" 2>&1 \
    || { echo "error: install failed (see $out/install.log)" >&2; exit 1; }
  python="$out/venv/bin/python"
  export JAX_PLATFORMS="${JAX_PLATFORMS:-cuda}"   # tests/conftest.py would default to the CPU
  batches="256 1024 4096 16384 65536"; tests=(); steps=3000; every=1000; repeats=3
fi

note "# loopicl device check ($(date -u +%Y-%m-%d), $([ "$cpu" = 1 ] && echo reduced CPU form || echo full))"
note ""
note '```'
"$python" -c "import jax, loopicl; print('jax', jax.__version__, jax.devices())" 2>&1 | tee -a "$summary"
note '```'

note ""
note "## Tests"
if "$python" -m pytest -q -p no:cacheprovider "${tests[@]}" > "$out/tests.log" 2>&1; then
  note "passed: $(tail -1 "$out/tests.log")"
else
  note "FAILED: $(tail -1 "$out/tests.log") (see tests.log)"; failed=1
fi

note ""
note "## Benchmark (configs/default.py, scripts/benchmark.py)"
note ""
note "| batch | kernel | steps/s | examples/s | GFLOP/s | of matmul peak |"
note "|---|---|---|---|---|---|"
for b in $batches; do
  if "$python" scripts/benchmark.py --config configs/default.py --config.train.batch_size="$b" \
      --config.train.steps_per_call=10 --json --repeats="$repeats" --naive=false --xla_flops=false \
      --compare_xla=false > "$out/benchmark_$b.log" 2>&1; then
    tail -1 "$out/benchmark_$b.log" | "$python" -c "
import json, sys
r = json.loads(sys.stdin.read())
print(f\"| $b | {r['kernel']} | {r['steps_per_s']:.1f} | {r['examples_per_s']:.3g} | \"
      f\"{r['achieved_flops_per_s'] / 1e9:.1f} | {r['peak_fraction']:.1%} |\")" | tee -a "$summary"
  else
    note "| $b | failed: $(tail -1 "$out/benchmark_$b.log") | | | | |"; failed=1
  fi
done

note ""
note "## Kill and resume (configs/default.py, $steps steps, checkpoint every $every)"
run_flags=(--config configs/default.py --config.train.steps="$steps" --config.checkpoint.every="$every"
           --config.eval.every="$every" --progress=false)
rm -rf "$out/run_killed" "$out/run_whole"
"$python" scripts/train.py "${run_flags[@]}" --workdir "$out/run_whole" > "$out/run_whole.log" 2>&1 || failed=1
"$python" scripts/train.py "${run_flags[@]}" --workdir "$out/run_killed" > "$out/run_killed.log" 2>&1 &
pid=$!
while kill -0 "$pid" 2>/dev/null && [ ! -d "$out/run_killed/checkpoints/$every" ]; do sleep 0.2; done
kill -9 "$pid" 2>/dev/null; wait "$pid" 2>/dev/null
"$python" scripts/train.py "${run_flags[@]}" --workdir "$out/run_killed" > "$out/run_resumed.log" 2>&1 || failed=1
if "$python" - "$out" <<'EOF' | tee -a "$summary"
import json, sys
out = sys.argv[1]
last = lambda d: json.loads(open(f"{out}/{d}/metrics.jsonl").read().splitlines()[-1])
a, b = last("run_whole"), last("run_killed")
same = a == b  # the whole last evaluation record, every number to the last digit
print(f"uninterrupted: test_error {a.get('test_error')}, step {a['step']}; "
      f"killed + resumed: test_error {b.get('test_error')}, step {b['step']}: "
      f"{'identical' if same else 'DIFFERENT'}")
sys.exit(0 if same else 1)
EOF
then :; else failed=1; fi
grep -q "resumed from checkpoint" "$out/run_resumed.log" && note "the relaunch resumed from a checkpoint" \
  || { note "the relaunch did NOT resume from a checkpoint"; failed=1; }

note ""
note "result: $([ "$failed" = 0 ] && echo 'all steps passed' || echo 'SOME STEPS FAILED')"
exit "$failed"
