#!/usr/bin/env bash
# Every GPU check and measurement of this project in ONE command on a lent GPU machine (one
# H200, 16 cores, 128 GiB, no internet; python3 with torch, torchvision, nvidia-ml-py, no
# pytest): at most 8 minutes, every step guarded (a failed or overrun step is reported, the
# others still run), output unbuffered, a short table printed last.
#
# 1. Here, before the run (the GPU machine cannot download Fashion-MNIST):
#        bash bench/gpu_carry.sh      # its IDX files (30 MB) into .gpu-data/ (ignored by git)
# 2. The run, with the device tool, in the repository root of a copy of the working tree:
#        command:   bash bench/gpu.sh
#        timeout_s: 520               # the script ends by TOTAL=470 s (+10 s kill grace)
#        carry:     [".gpu-data"]
# 3. What comes back in $OUT (6 files):
#        summary.md       the table printed last: each step's status, seconds and budget, and
#                         the key figures (checks, images/s, ratios, GPU busy, goals met or not)
#        results.json     every step's JSON (checks, bench model/convs/e2e, recipes, ablate)
#        BENCHMARKS.md    the repo's BENCHMARKS.md with the GPU sections: copy it over the repo's
#        evidence.tar.gz  docs/figures/gpu/{recipes,ablate}.{md,json,png}: tar -xzf it at the
#                         repository root
#        gpu.log          everything the steps printed;  machine.txt  GPU, driver, versions
# Dry run on the CPU with tiny sizes (CI runs it: tests/test_gpu_script.py):
#        bash bench/gpu.sh --dry-run
# A partial rerun (15 minutes of device time hold one full run, not two): name the steps and a
# shorter deadline, e.g.   GPU_STEPS="1 2c" TOTAL=200 bash bench/gpu.sh
#
# The budget, in seconds (each step runs under `timeout`; none starts past the deadline; any
# B_* can be overridden from the environment):
#   1  checks: tests/test_cuda.py on cuda                                           B_CHECKS   75
#      (meanwhile Fashion-MNIST is prepared into a store, 8 processes, in the background)
#   2a bench model: paper, torchvision x fp32, bf16+cl, batch 256, eager            B_MODEL    60
#   2b bench convs: conv2 grouped vs two dense, conv1; cudnn.benchmark off/on       B_CONVS    20
#   3  bench e2e: 20,000 JPEGs; ours (decode on workers, on GPU) vs the reference   B_E2E     100
#   4  evidence on Fashion-MNIST, the two in parallel, 7 loader workers each:       B_EVIDENCE 170
#        recipes paper, then cuda-convnet, 5 epochs each;
#        ablate (profile paper, 2 seeds, 3 epochs = 1404 steps of 128) adding the rows
#        lrn, pool, dropout, towers one at a time (each rerun reuses the finished runs), so
#        that whatever the time allowed is in ablate.md
#   2c bench model with torch.compile (fp32, bf16+cl, each +compile; its section     B_COMPILE 110
#      replaces 2a's only if it finishes): last, with what is left (cold compiles may not fit)
#   report and pack                                                                 B_PACK     15
#   the deadline for everything                                                     TOTAL     470
set -uo pipefail # no -e: a failed step is recorded and the next one runs
cd "$(dirname "$0")/.."
ROOT=$PWD
SELF="$ROOT/bench/gpu.sh"
export PYTHONPATH="$ROOT/src${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1
PY=${PYTHON:-python3}

# --- internal sub-commands: the evidence loops, each run as one guarded step ----------------
if [ "${1:-}" = "__recipes" ] || [ "${1:-}" = "__ablate" ]; then
    # Exit status: 0 all done, 3 stopped for lack of time, 124 the last run cut at the limit,
    # else the first failure's.
    left() { echo $((EV_END - $(date +%s))); }
    run() { # run ARGS...: one invocation, limited to the time left
        local t rc
        t=$(left)
        if ((t < 30)); then
            echo "${t} s left: not starting $*"
            return 3
        fi
        # SIGTERM at the limit: the run checkpoints and stops (its table is not rewritten).
        timeout -k 15 "$t" "$PY" -m alexnet "$@"
        rc=$?
        ((rc)) && echo "exit $rc: $*"
        return $rc
    }
    status=0
    if [ "$1" = "__recipes" ]; then
        for recipes in ${RECIPE_RUNS:-paper paper,cuda-convnet}; do # the second reuses the first's
            run recipes --data "$STORE" --out "$WORK/recipes" --recipes "$recipes" \
                $RECIPES_ARGS
            rc=$?
            ((rc && !status)) && status=$rc
            ((rc == 3 || rc == 124 || rc == 137)) && break
        done
    else
        rows=""
        for row in ${ABLATE_ROWS:-lrn pool dropout towers}; do # the most informative first
            rows=${rows:+$rows,}$row
            run ablate --profile paper --data "$STORE" --out "$WORK/ablate" --only "$rows" \
                $ABLATE_ARGS
            rc=$?
            ((rc && !status)) && status=$rc
            ((rc == 3 || rc == 124 || rc == 137)) && break
        done
    fi
    exit $status
fi

DRY=0
[ "${1:-}" = "--dry-run" ] && DRY=1
OUT=${OUT:-/tmp/alexnet-gpu-out}
WORK=${GPU_WORK:-$(mktemp -d "${TMPDIR:-/tmp}/alexnet-gpu-XXXXXX")}
mkdir -p "$OUT" "$WORK"
export WORK PY
MD="$OUT/BENCHMARKS.md"
START=$(date +%s)

if ((DRY)); then # the same steps on the CPU, tiny: the script cannot rot unnoticed
    DEV=cpu
    TOTAL=${TOTAL:-1500}
    B_CHECKS=${B_CHECKS:-400} B_MODEL=${B_MODEL:-150} B_CONVS=${B_CONVS:-60}
    B_E2E=${B_E2E:-150} B_EVIDENCE=${B_EVIDENCE:-400} B_COMPILE=${B_COMPILE:-150}
    B_PACK=${B_PACK:-15}
    MODEL_ARGS="--batch-size 2 --steps 1 --warmup 0 --num-classes 10 --quick"
    COMPILE_MODES="fp32,bf16+cl" # compiling the whole net takes minutes on a CPU
    CONVS_ARGS="--batch-size 2 --steps 1 --warmup 0"
    E2E_ARGS="--images 48 --steps 2 --warmup 1 --batch-size 8 --workers 1"
    PREP_ARGS="--limit 32 --workers 2"
    export RECIPES_ARGS="--epochs 1 --set train.batch_size=16 --val-limit 32 --workers 1 \
        --device cpu"
    export ABLATE_ARGS="--seeds 1 --steps 2 --batch-size 16 --val-limit 16 --workers 1 \
        --device cpu"
    # One invocation each (the suite's time; caching across invocations has its own tests)
    export RECIPE_RUNS="paper,cuda-convnet" ABLATE_ROWS="lrn"
    ABLATE_ROWS_NOTE="(dry run: 1 seed, 2 steps, the lrn row)"
else
    DEV=cuda
    TOTAL=${TOTAL:-470}
    B_CHECKS=${B_CHECKS:-75} B_MODEL=${B_MODEL:-60} B_CONVS=${B_CONVS:-20}
    B_E2E=${B_E2E:-100} B_EVIDENCE=${B_EVIDENCE:-170} B_COMPILE=${B_COMPILE:-110}
    B_PACK=${B_PACK:-15}
    MODEL_ARGS="--batch-size 256 --steps 10 --warmup 3"
    COMPILE_MODES="fp32,bf16+cl,fp32+compile,bf16+cl+compile"
    CONVS_ARGS="--batch-size 256 --steps 20 --warmup 3"
    E2E_ARGS="--images 20000 --steps 200 --warmup 20 --batch-size 256"
    PREP_ARGS="--workers 8"
    # 5 epochs of each recipe; validation on all 10,000 test images after each
    export RECIPES_ARGS="--epochs 5 --workers 7 --device cuda"
    # 3 epochs of Fashion-MNIST's 60,000 at the paper's batch 128 = 3 x 468 steps
    export ABLATE_ARGS="--seeds 2 --steps 1404 --val-limit 5000 --workers 7 --device cuda"
    ABLATE_ROWS_NOTE=""
fi
DEADLINE=$((START + TOTAL))

# Fashion-MNIST: brought along by bench/gpu_carry.sh, else (a dry run here) the system's copy.
FM=${GPU_DATA:-$ROOT/.gpu-data}/fashion-mnist
[ -f "$FM/train-images-idx3-ubyte.gz" ] || FM=/usr/share/datasets/fashion-mnist
export STORE="$WORK/fashion-mnist"

# selected "ID name": whether GPU_STEPS (unset: all) names step ID ("2" names 2a, 2b and 2c;
# "4a" needs the store that "4" prepares)
selected() {
    local id=${1%% *} t
    [ -z "${GPU_STEPS:-}" ] && return 0
    for t in $GPU_STEPS; do
        [[ $id == "$t"* || $t == "$id"* ]] && return 0
    done
    return 1
}

report() { "$PY" bench/gpu_report.py "$WORK" "$OUT" "$@" || echo "(report failed: exit $?)"; }

# step NAME BUDGET CMD...: CMD under `timeout`, never past the deadline (less the packing
# time); its status, seconds and budget recorded in WORK/steps.tsv, the report rewritten.
step() {
    local name=$1 budget=$2 left t0 rc dt status
    shift 2
    if ! selected "$name"; then
        printf '%s\t%s\t0\tskipped: not in GPU_STEPS\n' "$name" "$budget" >>"$WORK/steps.tsv"
        return
    fi
    left=$((DEADLINE - B_PACK - $(date +%s)))
    if ((left < 10)); then
        printf '%s\t%s\t0\tskipped: no time left\n' "$name" "$budget" >>"$WORK/steps.tsv"
        echo "==> $name: skipped, no time left"
        return
    fi
    ((budget > left)) && budget=$left
    echo "==> [$(($(date +%s) - START)) s] $name (budget ${budget} s)"
    t0=$(date +%s)
    timeout -k 10 "$budget" "$@"
    rc=$?
    dt=$(($(date +%s) - t0))
    case $rc in
    0) status=ok ;;
    3) status="partial: out of time" ;;
    124 | 137) status="timeout after ${budget} s" ;;
    *) status="failed (exit $rc)" ;;
    esac
    printf '%s\t%s\t%s\t%s\n' "$name" "$budget" "$dt" "$status" >>"$WORK/steps.tsv"
    echo "<== $name: $status, ${dt} s"
    report
}

main() {
    echo "bench/gpu.sh $([ $DRY = 1 ] && echo '--dry-run ')on $(uname -n), work folder $WORK" \
        "${GPU_STEPS:+(steps $GPU_STEPS)}"
    cp BENCHMARKS.md "$MD"
    {
        command -v nvidia-smi >/dev/null && nvidia-smi --query-gpu=name,driver_version,memory.total,clocks.max.sm --format=csv,noheader
        "$PY" -c 'import sys, torch, torchvision; print("python", sys.version.split()[0], "torch", torch.__version__, "torchvision", torchvision.__version__, "cuda", torch.version.cuda, "available", torch.cuda.is_available())'
        echo "cores $(nproc), $(free -g 2>/dev/null | awk '/Mem:/ {print $2 " GiB"}')"
    } >"$WORK/machine.txt" 2>&1
    cp "$WORK/machine.txt" "$OUT/machine.txt"
    cat "$WORK/machine.txt"

    # The evidence's store, prepared on the CPU while the checks run (they mostly wait on the GPU).
    local prep=""
    if selected "4 evidence"; then
        echo "==> preparing Fashion-MNIST from $FM into $STORE in the background"
        "$PY" -m alexnet prepare "$FM" "$STORE" --kind fashion-mnist -q $PREP_ARGS \
            >"$WORK/prepare.log" 2>&1 &
        prep=$!
    fi

    step "1 checks" "$B_CHECKS" "$PY" tests/test_cuda.py --device $DEV --json "$WORK/checks.json"

    if [ -n "$prep" ]; then
        local t0=$(date +%s)
        wait $prep && echo "store ready ($(tail -1 "$WORK/prepare.log"))" || {
            echo "preparing the store failed:"
            cat "$WORK/prepare.log"
        }
        printf 'prepare store\t-\t%s\t%s\n' "$(($(date +%s) - t0))" \
            "$([ -f "$STORE/manifest.json" ] && echo ok || echo failed)" >>"$WORK/steps.tsv"
    fi

    # --loop tuned: what `alexnet train` runs; the plain loop differs only in the host's
    # allocator, which a GPU step barely touches, and would double the step's time.
    step "2a bench model" "$B_MODEL" bash -c "'$PY' -m alexnet bench model --device $DEV \
        --loop tuned --profiles paper,torchvision --modes fp32,bf16+cl $MODEL_ARGS \
        --markdown '$MD' --json \
        > '$WORK/bench-model.json'"
    step "2b bench convs" "$B_CONVS" bash -c "'$PY' -m alexnet bench convs --device $DEV \
        $CONVS_ARGS --markdown '$MD' --json > '$WORK/bench-convs.json'"
    step "3 bench e2e" "$B_E2E" bash -c "'$PY' -m alexnet bench e2e --device $DEV $E2E_ARGS \
        --dir '$WORK' --markdown '$MD' --json > '$WORK/bench-e2e.json'"

    # Evidence: both loops stop themselves by EV_END (then SIGTERM: checkpoint and exit).
    local ev=$B_EVIDENCE left=$((DEADLINE - B_PACK - $(date +%s) - 20))
    ((ev > left)) && ev=$left
    # The loops' own limit: their last run's SIGTERM, and its 15 s grace, end within the step's.
    export EV_END=$(($(date +%s) + ev - 20))
    echo "==> evidence: recipes and ablations in parallel for ${ev} s $ABLATE_ROWS_NOTE"
    step "4a recipes" "$ev" bash "$SELF" __recipes &
    local recipes_pid=$!
    step "4b ablate" "$ev" bash "$SELF" __ablate &
    local ablate_pid=$!
    wait $recipes_pid $ablate_pid

    local compile=$((DEADLINE - B_PACK - $(date +%s)))
    ((compile > B_COMPILE)) && compile=$B_COMPILE
    step "2c bench model +compile" "$compile" bash -c "'$PY' -m alexnet bench model \
        --device $DEV --loop tuned --profiles paper,torchvision --modes $COMPILE_MODES $MODEL_ARGS \
        --markdown '$MD' --json > '$WORK/bench-model-compile.json'"

    # Pack the evidence for docs/figures/gpu/ (untar at the repository root).
    local pack="$WORK/pack/docs/figures/gpu"
    mkdir -p "$pack"
    for f in recipes/recipes.md recipes/recipes.json recipes/recipes.png \
        ablate/ablate.md ablate/ablate.json ablate/ablate.png; do
        [ -f "$WORK/$f" ] && cp "$WORK/$f" "$pack/"
    done
    tar -czf "$OUT/evidence.tar.gz" -C "$WORK/pack" docs
    echo "==> [$(($(date +%s) - START)) s] done; \$OUT holds: $(cd "$OUT" && ls | tr '\n' ' ')"
    report --print
    # exit status 1 when a step failed or ran out of time (all of them ran, and are reported)
    ! cut -f4 "$WORK/steps.tsv" | grep -v '^skipped: not in GPU_STEPS' | grep -qv '^ok$'
}

main 2>&1 | tee "$OUT/gpu.log"
exit "${PIPESTATUS[0]}"
