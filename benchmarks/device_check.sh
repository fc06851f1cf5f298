#!/usr/bin/env bash
# One prepared check for a machine with an NVIDIA GPU (H100/H200; python3 with torch+CUDA, nvcc;
# no network). Run it from anywhere: it works in the repository root.
#
#   bash benchmarks/device_check.sh
#
# Steps: environment (nvidia-smi, torch, nvcc) -> the wheels in .whl/ (`make device-wheels` fetches
# liger-kernel there, a contender of fused_linear_distill; carry .whl to the device, which has no
# package registry) -> build the extension in place (timed) ->
# `reuse doctor` -> the CUDA tests (pytest -k cuda) -> `reuse bench --device cuda`, one run per op
# -> SASS summary of the reuse_core kernels (cuobjdump) -> a short table of every step, last.
# A failing step is reported and the next one runs. The whole check keeps to a deadline
# (DEVICE_CHECK_BUDGET_S, default 400 s): each step's time limit is cut to what is left.
# Logs go to "$OUT" when it is set (else a fresh temporary folder): one file per step plus
# doctor.json and bench-<op>.json.
#
# Knobs: DEVICE_CHECK_SKIP_BUILD=1 (use the extension already built), DEVICE_CHECK_BUDGET_S,
# TORCH_CUDA_ARCH_LIST (default 9.0), MAX_JOBS (default 16), BENCH_REPEATS (default 10),
# PYTEST_ARGS (default "-q -x").
set -uo pipefail

cd "$(dirname "${BASH_SOURCE[0]}")/.." || exit 2
ROOT=$PWD
PY=${PYTHON:-python3}
LOGDIR=${OUT:-$(mktemp -d -t reuse-device-check.XXXXXX)}
mkdir -p "$LOGDIR"
START=$(date +%s)
DEADLINE=$((START + ${DEVICE_CHECK_BUDGET_S:-400}))
export TORCH_CUDA_ARCH_LIST=${TORCH_CUDA_ARCH_LIST:-9.0}
export MAX_JOBS=${MAX_JOBS:-16}
export PYTHONPATH="$ROOT${PYTHONPATH:+:$PYTHONPATH}"   # `python3 -m reuse_core` from this tree
export PYTHONUNBUFFERED=1
CUDA_BIN=${CUDA_HOME:-/usr/local/cuda}/bin
[[ -d $CUDA_BIN ]] && export PATH="$PATH:$CUDA_BIN"   # nvcc, cuobjdump when not on PATH
export PY LOGDIR ROOT BENCH_REPEATS=${BENCH_REPEATS:-10} PYTEST_ARGS=${PYTEST_ARGS:--q -x}

SUMMARY=()   # "name|status|seconds"
N=0

# step NAME CAP_SECONDS FUNCTION ARGS...: runs an exported FUNCTION under `timeout`, its output
# shown and saved; the cap is cut to the time left before the deadline (less a small reserve).
step() {
    local name=$1 cap=$2
    shift 2
    N=$((N + 1))
    local log="$LOGDIR/$(printf '%02d' "$N")-$name.log"
    local now left limit t0 rc status
    now=$(date +%s)
    left=$((DEADLINE - now - 10))
    limit=$((cap < left ? cap : left))
    printf '\n===== [%s] %s (limit %ss, log %s)\n' "$(date +%T)" "$name" "$limit" "$log"
    if ((limit < 15)); then
        echo "skipped: out of time"
        SUMMARY+=("$name|SKIPPED (out of time)|0")
        return 0
    fi
    t0=$(date +%s)
    if [[ ${QUIET:-0} == 1 ]]; then  # long output: to the log only, its tail to the terminal
        timeout --signal=TERM --kill-after=15 "$limit" bash -c '"$@"' "$name" "$@" > "$log" 2>&1
        rc=$?
        echo "[... last 25 lines of $log]"
        tail -n 25 "$log"
    else
        timeout --signal=TERM --kill-after=15 "$limit" bash -c '"$@"' "$name" "$@" 2>&1 | tee "$log"
        rc=${PIPESTATUS[0]}
    fi
    local dt=$(($(date +%s) - t0))
    case $rc in
        0) status=ok ;;
        124 | 137) status="TIMEOUT after ${limit}s" ;;
        *) status="FAILED (rc=$rc)" ;;
    esac
    echo "----- $name: $status in ${dt}s"
    SUMMARY+=("$name|$status|$dt")
    return "$rc"
}

env_info() {
    echo "host: $(hostname)  date: $(date -Is)  repo: $ROOT  commit: $(git rev-parse --short HEAD 2>/dev/null || echo '?')"
    git status --short 2>/dev/null | head -20
    if command -v nvidia-smi >/dev/null; then nvidia-smi; else echo "nvidia-smi: not found"; fi
    if command -v nvcc >/dev/null; then nvcc --version | tail -2; else echo "nvcc: not on PATH"; fi
    echo "ninja: $(command -v ninja || echo 'not found (the build will compile one file at a time)')"
    echo "cuobjdump: $(command -v cuobjdump || echo 'not found')"
    "$PY" - <<'EOF'
import platform, torch
print(f"python {platform.python_version()}  torch {torch.__version__}  torch CUDA {torch.version.cuda}"
      f"  cuDNN {torch.backends.cudnn.version()}")
print(f"cuda available: {torch.cuda.is_available()}  devices: {torch.cuda.device_count()}")
if torch.cuda.is_available():
    p = torch.cuda.get_device_properties(0)
    print(f"device 0: {p.name}  sm_{p.major}{p.minor}  {p.total_memory / 2**30:.1f} GiB  {p.multi_processor_count} SMs")
for mod in ("triton", "pytest", "hypothesis", "pytest_benchmark"):
    try:
        m = __import__(mod)
        print(f"{mod} {getattr(m, '__version__', '?')}")
    except ImportError:
        print(f"{mod}: missing")
EOF
}

wheels() {
    local w=(.whl/*.whl)
    [[ -e ${w[0]} ]] || { echo "no wheels in .whl/ (make device-wheels): the contenders they bring are left out"; return 0; }
    PIP_BREAK_SYSTEM_PACKAGES=1 "$PY" -m pip install --no-deps --no-index --no-input "${w[@]}"
}

build() {
    rm -f reuse_core/_C*.so
    echo "TORCH_CUDA_ARCH_LIST=$TORCH_CUDA_ARCH_LIST MAX_JOBS=$MAX_JOBS"
    local t0=$(date +%s)
    if PIP_BREAK_SYSTEM_PACKAGES=1 "$PY" -m pip install -v --no-build-isolation --no-deps --no-input -e . \
        && ls reuse_core/_C*.so >/dev/null 2>&1; then
        echo "build: pip editable install ok in $(($(date +%s) - t0))s"
    else
        echo "build: pip editable install failed (or left no reuse_core/_C*.so) after $(($(date +%s) - t0))s;" \
            "trying setup.py build_ext --inplace"
        t0=$(date +%s)
        "$PY" setup.py build_ext --inplace || return 1
        echo "build: setup.py build_ext --inplace ok in $(($(date +%s) - t0))s"
    fi
    ls -la reuse_core/_C*.so
    "$PY" -c "from reuse_core.ops import _ext; print('extension loaded:', _ext.available(), _ext.LOAD_ERROR or '', _ext.build_info())"
    "$PY" -c "from reuse_core.ops import _ext; raise SystemExit(0 if _ext.available() and _ext.build_info()['cuda'] else 1)" \
        || { echo "build: the extension did not load, or has no CUDA"; return 1; }
}

doctor() {
    "$PY" -m reuse_core doctor --json > "$LOGDIR/doctor.json"
    "$PY" -m reuse_core doctor
}

cuda_tests() {
    if ! ls tests/ops/test_*.py >/dev/null 2>&1; then echo "no tests under tests/ops"; return 1; fi
    local args
    read -r -a args <<< "$PYTEST_ARGS"
    "$PY" -m pytest "${args[@]}" -p no:cacheprovider -rfE tests/ops -k cuda
}

bench_op() {  # bench_op OP LIMIT: a budget leaves time to print the table before the hard limit
    local op=$1 limit=$2
    "$PY" -m reuse_core bench --device cuda --ops "$op" --repeats "$BENCH_REPEATS" \
        --budget "$((limit * 2 / 3))" --json "$LOGDIR/bench-$op.json"
}

sass() {
    local so
    so=$(ls reuse_core/_C*.so 2>/dev/null | head -1)
    [[ -n $so ]] || { echo "no reuse_core/_C*.so"; return 1; }
    command -v cuobjdump >/dev/null || { echo "cuobjdump not on PATH: skipped"; return 0; }
    cuobjdump -res-usage "$so" > "$LOGDIR/res-usage.txt" 2>&1
    cuobjdump -sass "$so" > "$LOGDIR/sass.txt" 2>&1 || { echo "cuobjdump -sass failed"; head "$LOGDIR/sass.txt"; return 1; }
    "$PY" - "$LOGDIR/sass.txt" "$LOGDIR/res-usage.txt" <<'EOF'
import re, shutil, subprocess, sys
from collections import Counter, defaultdict
sass, res = open(sys.argv[1]).read(), open(sys.argv[2]).read()
counts = defaultdict(Counter)
cur = None
for line in sass.splitlines():
    m = re.search(r"Function : (\S+)", line)
    if m:
        cur = m.group(1)
        continue
    m = re.match(r"\s+/\*[0-9a-f]{4,}\*/\s+(?:@!?U?P\w+\s+)?([A-Z][A-Z0-9_.]*)", line)
    if m and cur:
        op = m.group(1)
        c = counts[cur]
        c["total"] += 1
        base = op.split(".")[0]
        if base in ("LDL", "STL"): c["local(LDL/STL)"] += 1
        if base == "MUFU": c[op] += 1
        if base in ("LDG", "STG"): c[f"{base}{'.128' if '.128' in op else '.64' if '.64' in op else ''}"] += 1
        if base in ("HMMA", "HGMMA", "WGMMA", "SHFL", "BAR", "REDUX", "RED", "ATOM", "ATOMG"): c[base] += 1
usage = {}
for m in re.finditer(r"Function (\S+):\s*(REG:\d+ STACK:\d+ SHARED:\d+ LOCAL:\d+)", res):
    usage[m.group(1)] = m.group(2)
names = [n for n in counts if "reuse_core" in n or "reuse" in n] or list(counts)
demangle = {}
if shutil.which("c++filt") and names:
    out = subprocess.run(["c++filt"], input="\n".join(names), capture_output=True, text=True).stdout.splitlines()
    demangle = dict(zip(names, out))
print(f"{len(names)} reuse_core kernel(s) in {sys.argv[1]} ({len(counts)} functions in all)")
for n in sorted(names):
    short = re.sub(r"\(.*", "", demangle.get(n, n))[:90]
    c = counts[n]
    keys = ", ".join(f"{k} {v}" for k, v in sorted(c.items()) if k != "total")
    print(f"- {short}\n    {c['total']} instr; {usage.get(n, 'REG:?')}; {keys}")
spills = [re.sub(r"\(.*", "", demangle.get(n, n))[:60] for n in names if counts[n]["local(LDL/STL)"]]
print("local-memory (LDL/STL) instructions in: " + (", ".join(spills) if spills else "none"))
# the attention kernels of the 16-bit types must run on tensor cores
attn = [n for n in names if "attention" in demangle.get(n, n) and ("half" in demangle.get(n, n) or "bfloat16" in demangle.get(n, n))]
no_mma = [re.sub(r"\(.*", "", demangle.get(n, n))[:60] for n in attn if not (counts[n]["HMMA"] or counts[n]["HGMMA"])]
print(f"attention 16-bit kernels: {len(attn)}, without HMMA/HGMMA: " + (", ".join(no_mma) if no_mma else "none"))
EOF
}

final_table() {
    echo
    echo "===== device check: results ($(date +%T), $(( $(date +%s) - START ))s in all, logs in $LOGDIR)"
    "$PY" - "$LOGDIR" <<'EOF' || true
import glob, json, os, sys
sys.path.insert(0, os.getcwd())
from reuse_core import bench
rows, meta = [], None
for path in sorted(glob.glob(os.path.join(sys.argv[1], "bench-*.json"))):
    with open(path) as f:
        rep = json.load(f)
    rows += rep["results"]
    meta = meta or rep["meta"]
    if rep["meta"].get("skipped"):
        print(f"not run in {os.path.basename(path)}: {len(rep['meta']['skipped'])} case(s)")
if rows:
    print(f"{meta['device_name']}, torch {meta['torch']}, copy bandwidth {meta.get('copy_bandwidth_gbs')} GB/s,"
          f" {meta['repeats']} interleaved repeats, medians")
    print(bench.format_table(rows))
try:
    with open(os.path.join(sys.argv[1], "doctor.json")) as f:
        doc = json.load(f)
    print("doctor: " + "; ".join(f"{o['op']}/{o['backend']}: {o['status']}" for o in doc["ops"]))
except (OSError, ValueError):
    print("doctor: no report")
EOF
    printf '\n%-28s %-24s %s\n' step status seconds
    local s
    for s in "${SUMMARY[@]}"; do
        IFS='|' read -r a b c <<< "$s"
        printf '%-28s %-24s %s\n' "$a" "$b" "$c"
    done
}

export -f env_info wheels build doctor cuda_tests bench_op sass

step env 60 env_info
step wheels 60 wheels
if [[ ${DEVICE_CHECK_SKIP_BUILD:-0} == 1 ]]; then
    SUMMARY+=("build|SKIPPED (DEVICE_CHECK_SKIP_BUILD=1)|0")
else
    QUIET=1 step build 300 build
fi
step doctor 90 doctor
step cuda-tests 150 cuda_tests
OPS=$("$PY" -c "from reuse_core.bench import BENCHES; print(' '.join(BENCHES))" 2>/dev/null || echo "distill_kl ensemble_average attention")
read -r -a OPS_ARR <<< "$OPS"
NOPS=${#OPS_ARR[@]}
for i in "${!OPS_ARR[@]}"; do
    op=${OPS_ARR[$i]}
    # share what is left (less the SASS step) between the ops still to run
    left=$((DEADLINE - $(date +%s) - 40))
    per=$((left / (NOPS - i)))
    per=$((per > 240 ? 240 : per))
    step "bench-$op" "$per" bench_op "$op" "$per"
done
step sass 40 sass
final_table 2>&1 | tee "$LOGDIR/summary.txt"
