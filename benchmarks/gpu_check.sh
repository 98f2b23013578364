#!/usr/bin/env bash
# The GPU check of issue 21, as one prepared run of at most 8 minutes:
#
#   bash benchmarks/gpu_check.sh [--dry-run] [--out DIR]
#
# Steps (each logged to DIR/logs/STEP.log; a failing step is recorded as FAIL and the
# next one runs):
#   env          nvidia-smi GPU name + driver, torch and CUDA versions   -> env.txt
#   equivalence  tests/equivalence/test_cuda.py + test_backends.py       -> equivalence.xml
#   sweep        L16 bf16 training, batch 64, 128, ... until it no longer fits or gains
#                (the first run also measures the bf16 and fp32 matmul peaks) -> sweep/*.json
#   generate     bench --generate: 1 L16 image cached, 64 images together -> generate.json
#   quickstart   minidalle run configs/quickstart.toml --backend cuda (evaluate included)
#                                                                           -> quickstart/
#   fp32         L16 fp32 training at half the best bf16 batch           -> fp32.json
#   compiled     L16 bf16 at the best batch with backend.compile = true  -> compiled.json
# then prints the summary table (benchmarks/gpu_check_report.py; also summary.md/json).
#
# --dry-run runs the same steps on the `cpu` backend at tiny sizes (configs/unit_test.toml,
# configs/quickstart_mini.toml), so that the script's logic can be checked without a GPU.
# Python: $PYTHON -m minidalle when PYTHON is set, else .venv/bin/minidalle.
# Exit status: 0 all steps ran and every target was met; 1 a step failed; 3 every step ran
# but a target was missed (not judged in a dry run).
set -u  # (empty arrays are written ${A[@]+"${A[@]}"}: bash before 4.4 calls them unbound)

DRY=0
OUT=""
while [ $# -gt 0 ]; do
    case "$1" in
        --dry-run) DRY=1 ;;
        --out) OUT="${2:?--out needs a directory}"; shift ;;
        --out=*) OUT="${1#--out=}" ;;
        -h|--help) sed -n '2,23p' "$0" | sed 's/^# \{0,1\}//'; exit 0 ;;
        *) echo "gpu_check.sh: unknown argument $1 (try --help)" >&2; exit 2 ;;
    esac
    shift
done

ROOT="$(cd "$(dirname "$0")/.." && pwd)"
cd "$ROOT" || exit 2
if [ -n "${PYTHON:-}" ]; then
    PY=("$PYTHON"); MD=("$PYTHON" -m minidalle)
elif [ -x .venv/bin/minidalle ]; then
    PY=(.venv/bin/python); MD=(.venv/bin/minidalle)
else
    echo "gpu_check.sh: no .venv/bin/minidalle (run make venv) and PYTHON is not set" >&2
    exit 2
fi
STAMP="$(date -u +%Y%m%dT%H%M%SZ)"
[ -n "$OUT" ] || OUT="output/gpu_check/$([ $DRY = 1 ] && echo dry-)$STAMP"
mkdir -p "$OUT/logs" "$OUT/sweep" || exit 2
OUT="$(cd "$OUT" && pwd)"
STEPS="$OUT/steps.tsv"
printf 'step\tstatus\trc\tseconds\n' > "$STEPS"
# Nothing is downloaded: no hub look-ups, no pip.
export HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 PIP_NO_INDEX=1
export PYTHONUNBUFFERED=1

START=$(date +%s)
DEADLINE=$((START + 470))  # 8 minutes, less a margin for the summary
if [ $DRY = 1 ]; then
    BACKEND=cpu
    L16=(configs/unit_test.toml --set model.text_seq_len=16 --set bench.fmap_size=4
         --set bench.text_vocab=64 --set bench.num_image_tokens=32)
    BENCH_STEPS=(--steps 2 --warmup 1)
    PEAK=(--peak-sizes 256)
    SWEEP=(1 2)
    IMAGES=4
    UNCACHED=(--no-uncached)  # the uncached timings run on the GPU only
    QUICKSTART=(configs/quickstart_mini.toml)
    EQUIVALENCE=(tests/equivalence/test_cuda.py)
    COMPILE=()  # the cpu backend has no compile key: the same command without it
    # Tiny sizes: more threads only spin (and cost several times the CPU on a busy machine).
    export OMP_NUM_THREADS="${OMP_NUM_THREADS:-1}"
else
    BACKEND=cuda
    L16=(configs/l16.toml)
    BENCH_STEPS=(--steps 10 --warmup 3)
    PEAK=()
    SWEEP=(64 128 256 512 1024)
    IMAGES=64
    UNCACHED=()
    QUICKSTART=(configs/quickstart.toml --set backend.precision=bf16)
    EQUIVALENCE=(tests/equivalence/test_cuda.py tests/equivalence/test_backends.py -k cuda)
    COMPILE=(--set backend.compile=true)
fi

log() { echo "$*" | tee -a "$OUT/gpu_check.log"; }

# run_step NAME BUDGET_S CMD...: run CMD with its output in logs/NAME.log, for at most
# BUDGET_S seconds and never past the deadline; record PASS / FAIL / TIMEOUT / NOFIT
# (a bench batch that does not fit in memory) / SKIP (under MIN_S = 10 s left, or the
# step's own MIN_S when set) in steps.tsv.
LAST_RC=0
run_step() {
    local name=$1 budget=$2
    shift 2
    local left=$((DEADLINE - $(date +%s)))
    [ "$budget" -le "$left" ] || budget=$left
    if [ "$budget" -lt "${MIN_S:-10}" ]; then
        log "== $name: SKIP (no time left in the 8 minutes)"
        printf '%s\tSKIP\t-\t0\n' "$name" >> "$STEPS"
        LAST_RC=125
        return $LAST_RC
    fi
    log "== $name (at most ${budget}s): $*"
    local t0 status
    t0=$(date +%s)
    timeout -k 10 "$budget" "$@" > "$OUT/logs/$name.log" 2>&1
    LAST_RC=$?
    if [ $LAST_RC = 0 ]; then status=PASS
    elif [ $LAST_RC = 124 ] || [ $LAST_RC = 137 ]; then status=TIMEOUT
    elif grep -q "does not fit in memory" "$OUT/logs/$name.log"; then status=NOFIT
    else status=FAIL
    fi
    printf '%s\t%s\t%s\t%s\n' "$name" "$status" "$LAST_RC" "$(($(date +%s) - t0))" >> "$STEPS"
    log "   $status (rc $LAST_RC, $(($(date +%s) - t0))s); last lines:"
    tail -n 3 "$OUT/logs/$name.log" | sed 's/^/   | /' | tee -a "$OUT/gpu_check.log"
    return $LAST_RC
}

json_get() {  # json_get FILE KEY: a top-level number of a bench JSON, or empty
    "${PY[@]}" -c 'import json, sys
try:
    v = json.load(open(sys.argv[1])).get(sys.argv[2])
except (OSError, ValueError):
    v = None
print("" if v is None else v)' "$1" "$2"
}

# ---------------------------------------------------------------------------- env
{
    echo "mode: $([ $DRY = 1 ] && echo "dry run (cpu)" || echo gpu)"
    echo "date: $STAMP"
    echo "commit: $(git rev-parse --short HEAD 2>/dev/null || echo unknown)"
    if command -v nvidia-smi > /dev/null 2>&1; then
        echo "gpu: $(nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader 2>&1 | head -n 1)"
    else
        echo "gpu: none (no nvidia-smi)"
    fi
    # torch's version and CUDA build without importing torch (seconds of start-up)
    "${PY[@]}" -c 'import importlib.metadata as m, importlib.util as u, pathlib, re
text = (pathlib.Path(u.find_spec("torch").origin).parent / "version.py").read_text()
cuda = re.search(r"^cuda\b.*?=\s*(.+)$", text, re.M)
print("torch:", m.version("torch"), "CUDA", cuda.group(1).strip("\x27\" ") if cuda else "?")'
} > "$OUT/env.txt" 2>&1
sed 's/^/   /' "$OUT/env.txt" | tee -a "$OUT/gpu_check.log"

# ---------------------------------------------------------------------------- steps
run_step equivalence 150 "${PY[@]}" -m pytest -q -rs -p no:cacheprovider \
    --junitxml="$OUT/equivalence.xml" "${EQUIVALENCE[@]}"

# bf16 batch sweep: doubling until a batch does not fit, fails, gains under 3%, or the
# sweep's 150 s are spent.
BEST_BS=""
BEST_SPS=0
FIRST=1
SWEEP_END=$(($(date +%s) + 150))
for bs in "${SWEEP[@]}"; do
    budget=$((SWEEP_END - $(date +%s)))
    [ $budget -le 60 ] || budget=60
    if [ $FIRST = 0 ] && [ $budget -lt 20 ]; then
        log "   the sweep's time is spent: it stops before batch $bs"
        break
    fi
    peak=(--no-peak)
    [ $FIRST = 1 ] && peak=(${PEAK[@]+"${PEAK[@]}"})  # the matmul peaks once, with the first batch
    run_step "sweep_bf16_b$bs" "$budget" "${MD[@]}" bench "${L16[@]}" --backend "$BACKEND" \
        --precision bf16 --batch-size "$bs" "${BENCH_STEPS[@]}" ${peak[@]+"${peak[@]}"} \
        --json "$OUT/sweep/bf16_b$bs.json"
    FIRST=0
    [ $LAST_RC = 0 ] || break
    sps=$(json_get "$OUT/sweep/bf16_b$bs.json" samples_per_sec)
    [ -n "$sps" ] || break
    if "${PY[@]}" -c 'import sys; sys.exit(0 if float(sys.argv[1]) > 1.03 * float(sys.argv[2]) else 1)' "$sps" "$BEST_SPS"; then
        BEST_BS=$bs
        BEST_SPS=$sps
    else
        log "   batch $bs gains under 3% over batch $BEST_BS: the sweep stops"
        break
    fi
done
log "   best bf16 batch: ${BEST_BS:-none} (${BEST_SPS} samples/s)"
echo "${BEST_BS}" > "$OUT/sweep/best_batch.txt"

run_step generate 90 "${MD[@]}" bench "${L16[@]}" --backend "$BACKEND" --precision bf16 \
    --batch-size 1 --steps 1 --warmup 0 --no-peak --generate --generate-images "$IMAGES" ${UNCACHED[@]+"${UNCACHED[@]}"} \
    --json "$OUT/generate.json"

QS="$OUT/quickstart"
run_step quickstart 200 "${MD[@]}" run "${QUICKSTART[@]}" --backend "$BACKEND" \
    --set "run.out_dir=$QS" \
    --set "codec.path=$QS/codec/vqgan.ckpt" --set "tokenizer.path=$QS/tokenizer.yttm"

if [ -n "$BEST_BS" ]; then
    fp32_bs=$(( BEST_BS > 1 ? BEST_BS / 2 : 1 ))  # fp32 activations take twice the memory
    run_step fp32 60 "${MD[@]}" bench "${L16[@]}" --backend "$BACKEND" --precision fp32 \
        --batch-size "$fp32_bs" "${BENCH_STEPS[@]}" --no-peak --json "$OUT/fp32.json"
    if [ $LAST_RC != 0 ] && [ "$fp32_bs" -gt 1 ] && grep -q "does not fit in memory" "$OUT/logs/fp32.log"; then
        run_step fp32_half 60 "${MD[@]}" bench "${L16[@]}" --backend "$BACKEND" --precision fp32 \
            --batch-size $((fp32_bs / 2)) "${BENCH_STEPS[@]}" --no-peak --json "$OUT/fp32.json"
    fi
    # compiling L16 takes about a minute: not started with less left
    MIN_S=$([ $DRY = 1 ] && echo 10 || echo 60) run_step compiled 180 "${MD[@]}" bench "${L16[@]}" --backend "$BACKEND" --precision bf16 \
        ${COMPILE[@]+"${COMPILE[@]}"} --batch-size "$BEST_BS" "${BENCH_STEPS[@]}" --no-peak \
        --json "$OUT/compiled.json"
else
    log "== fp32, compiled: not run (no bf16 batch ran)"
    printf 'fp32\tFAIL\t-\t0\ncompiled\tFAIL\t-\t0\n' >> "$STEPS"
fi

# ---------------------------------------------------------------------------- summary
log "== done in $(($(date +%s) - START))s; summary:"
report=("${PY[@]}" benchmarks/gpu_check_report.py "$OUT")
[ $DRY = 1 ] && report+=(--dry-run)
"${report[@]}" | tee "$OUT/summary.txt"
exit "${PIPESTATUS[0]}"
