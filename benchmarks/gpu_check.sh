#!/usr/bin/env bash
# One prepared check of GLARE on a lent GPU machine (H100/H200): install, CUDA + bf16, a Ray Train run on one
# GPU worker, Kornia views on the GPU, the step-cost table at ViT-S/16 224 px, batch 64, and model FLOP
# utilisation. Each stage runs under `timeout`; a failing stage is reported in the summary table at the end
# instead of stopping the script. Worst case (every stage at its limit) is about 5.5 minutes.
#
#   bash benchmarks/gpu_check.sh fetch       # HERE (PyPI reachable): wheels the GPU image lacks -> .whl/
#   bash benchmarks/gpu_check.sh             # on the GPU machine, from a checkout (with .whl/ carried along)
#   bash benchmarks/gpu_check.sh --dry-run   # on a CPU machine: the same stages, tiny sizes, no install
#
# The GPU image has python3.12 with torch, torchvision, timm, numpy, pandas, pyarrow, scikit-image, ... but no
# kornia, ray, omegaconf, and it cannot reach PyPI: `fetch` downloads what is missing (cp312 wheels) into
# .whl/ (git-ignored), dropping Ray's Java jars so that everything fits the 64 MiB a device call carries.
# Logs and summary.md go to $OUT (what the device tool brings back) or /tmp/glare-gpu-check.
set -euo pipefail

REPO=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
cd "$REPO"
WHEELS=${GLARE_WHEELS:-$REPO/.whl}
# Requirements the GPU image lacks (pinned as in requirements.txt), and what they pull in that it lacks too.
TOP_LEVEL=("ray[train,data]==2.60.0" "kornia==0.9.0" "omegaconf==2.3.0")
MISSING_DEPS=(jsonschema jsonschema-specifications referencing rpds-py tensorboardX pydantic annotated-types
    typing-inspection)
PLATFORM=(--only-binary=:all: --python-version 3.12 --implementation cp --platform manylinux_2_28_x86_64
    --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64)

fetch() {  # here, with PyPI: cp312 wheels of what the GPU image lacks, one version each, into $WHEELS
    local py=${PYTHON:-$REPO/.venv/bin/python}
    mkdir -p "$WHEELS"
    # --no-deps: the closure would drag in torch and numpy, which the image has.
    "$py" -m pip download -q --no-deps "${PLATFORM[@]}" -d "$WHEELS" ray==2.60.0 kornia==0.9.0 omegaconf==2.3.0 \
        "${MISSING_DEPS[@]}"
    # Compiled companions, at the versions the wheels above require (pydantic pins pydantic-core exactly).
    local pins
    mapfile -t pins < <("$py" - "$WHEELS" <<'EOF'
import re
import sys
import zipfile
from pathlib import Path

for whl in sorted(Path(sys.argv[1]).glob("*.whl")):
    with zipfile.ZipFile(whl) as z:
        meta = next(n for n in z.namelist() if n.endswith(".dist-info/METADATA"))
        for line in z.read(meta).decode().splitlines():
            m = re.match(r"Requires-Dist: *((pydantic[-_]core|kornia[-_]rs)\b[^;]*)$", line)
            if m:
                print(m.group(1).replace(" ", ""))
EOF
)
    "$py" -m pip download -q --no-deps "${PLATFORM[@]}" -d "$WHEELS" "${pins[@]}"
    # omegaconf needs antlr4-python3-runtime 4.9.*, which PyPI has only as an sdist: build its pure-Python wheel.
    "$py" -m pip wheel -q --no-deps -w "$WHEELS" "antlr4-python3-runtime==4.9.3"
    # Ray's wheel (79 MB) holds a 35 MB Java runtime (ray/jars) that Python never loads; drop it and its
    # RECORD lines so the wheel set fits the 64 MiB one device call carries.
    "$py" - "$WHEELS" <<'EOF'
import sys
import zipfile
from pathlib import Path

for whl in Path(sys.argv[1]).glob("ray-*.whl"):
    slim = whl.with_suffix(".slim")
    with zipfile.ZipFile(whl) as src, zipfile.ZipFile(slim, "w", zipfile.ZIP_DEFLATED) as dst:
        for item in src.infolist():
            if item.filename.startswith("ray/jars/"):
                continue
            data = src.read(item)
            if item.filename.endswith(".dist-info/RECORD"):
                data = b"".join(line for line in data.splitlines(keepends=True) if not line.startswith(b"ray/jars/"))
            dst.writestr(item, data)
    slim.replace(whl)
EOF
    ls "$WHEELS"
    du -ch "$WHEELS"/*.whl | tail -1
}

install() {  # on the GPU machine: CUDA torch, the missing packages, then the project itself
    local py=${PYTHON:-python3} find=() pkgs=()
    [[ -d "$WHEELS" ]] && find=(--no-index --find-links "$WHEELS")
    if ! "$py" -c 'import sys, torch; sys.exit(0 if torch.cuda.is_available() else 1)' 2>/dev/null; then
        echo "no CUDA torch importable: installing torch and torchvision"
        "$py" -m pip install -q "${find[@]}" torch torchvision
    fi
    for spec in "${TOP_LEVEL[@]}"; do
        mod=${spec%%[[=]*}
        "$py" -c "import $mod" 2>/dev/null || pkgs+=("$spec")
    done
    # Ray Train needs these at import time; the image may or may not have them.
    "$py" -c 'import pydantic, tensorboardX, jsonschema' 2>/dev/null || pkgs+=("ray[train,data]==2.60.0")
    if ((${#pkgs[@]})); then
        echo "installing: ${pkgs[*]} ${find[*]:+(from $WHEELS)}"
        "$py" -m pip install -q --no-compile "${find[@]}" "${pkgs[@]}"
    fi
    # The project without its dependencies (the image's torch stays); PYTHONPATH covers a failure here.
    "$py" -m pip install -q --no-deps --no-build-isolation -e "$REPO" \
        || echo "warning: pip install -e failed; using PYTHONPATH=$REPO"
    "$py" -c 'import glare, kornia, ray, timm, torch, omegaconf
print(f"install: torch {torch.__version__} (cuda {torch.version.cuda}), timm {timm.__version__}, "
      f"kornia {kornia.__version__}, ray {ray.__version__}, omegaconf {omegaconf.__version__}")'
}

CUDA_CHECK='
import sys, time, torch
print("torch", torch.__version__, "cuda", torch.version.cuda, "available", torch.cuda.is_available())
if not torch.cuda.is_available():
    sys.exit("cuda: not available")
d = torch.device("cuda")
p = torch.cuda.get_device_properties(d)
n = 8192
a, b = torch.randn(n, n, device=d), torch.randn(n, n, device=d)
ref = a.double() @ b.double()
with torch.autocast("cuda", dtype=torch.bfloat16):
    c = a @ b
err = ((c.double() - ref).norm() / ref.norm()).item()
ab, bb = a.bfloat16(), b.bfloat16()
for _ in range(3):
    ab @ bb
torch.cuda.synchronize()
t = time.perf_counter()
for _ in range(10):
    ab @ bb
torch.cuda.synchronize()
tflops = 2 * n**3 / ((time.perf_counter() - t) / 10) / 1e12
ok = c.dtype == torch.bfloat16 and err < 2e-2
verdict = "ok" if ok else "BAD"
print(f"cuda: {p.name}, {p.total_memory / 2**30:.0f} GiB, sm_{p.major}{p.minor}; bf16 autocast matmul "
      f"{c.dtype}, rel. error {err:.1e} ({verdict}); {tflops:.0f} TFLOP/s bf16 {n}^3")
sys.exit(0 if ok else 1)
'

case "${1:-}" in
    fetch) fetch; exit 0 ;;
    _install) install; exit 0 ;;
    --dry-run) DRY=1 ;;
    "") DRY=0 ;;
    *) echo "usage: $0 [fetch | --dry-run]" >&2; exit 2 ;;
esac

LOGDIR=${OUT:-${TMPDIR:-/tmp}/glare-gpu-check}
mkdir -p "$LOGDIR"
SUMMARY="$LOGDIR/summary.md"
WORK=$(mktemp -d)
export PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1 RAY_USAGE_STATS_ENABLED=0 RAY_AUTH_MODE=disabled \
    RAY_DATA_DISABLE_PROGRESS_BARS=1 PYTHONPATH="$REPO${PYTHONPATH:+:$PYTHONPATH}"
if ((DRY)); then
    PY=${PYTHON:-$REPO/.venv/bin/python}
    SCALE=4  # a loaded 2-core CPU machine is far slower than the GPU box
else
    PY=${PYTHON:-python3}
    SCALE=1
fi
ROWS=()
NOTES=()

# run_stage NAME LIMIT_S GREP_PATTERN COMMAND...: run under timeout, log to $LOGDIR/NAME.log, record a row.
run_stage() {
    local name=$1 limit=$(($2 * SCALE)) pattern=$3 rc=0 start status
    shift 3
    local log="$LOGDIR/$name.log" cmd="$*"
    echo "=== $name (limit ${limit}s): ${cmd:0:160}"
    start=$(date +%s)
    timeout --kill-after=10 "$limit" "$@" >"$log" 2>&1 || rc=$?
    case $rc in
        0) status=ok ;;
        124 | 137) status="TIMEOUT after ${limit}s" ;;
        *) status="FAILED (rc $rc)" ;;
    esac
    ROWS+=("| $name | $status | $(($(date +%s) - start)) |")
    tail -n 40 "$log"
    NOTES+=("**$name**" "$(grep -E "$pattern" "$log" | head -n 25 || true)")
    if [[ $rc != 0 ]]; then NOTES+=("last lines: $(tail -n 3 "$log" | tr '\n' ' ')"); fi
    NOTES+=("")
}

if ((DRY)); then
    ROWS+=("| install | skipped (dry run) | 0 |")
else
    run_stage install 60 '^install:|^installing|warning|ERROR|error' bash "$0" _install
fi
run_stage cuda 30 '^cuda:|^torch' "$PY" -c "$CUDA_CHECK"

if ((DRY)); then
    train_args=(ray.use_gpu=false train.steps=4)
    views_args=(--device cpu --images 64 --batch 16 --view-size 64 --base-size 72 --passes 1 --compare-step
        --arch vit_small_patch16_224)
    step_args=(--device cpu --arch vit_small_patch16_224 --img-size 64 --batch 4 --steps 1 --warmup 1)
else
    train_args=(ray.use_gpu=true ray.cpus_per_worker=2 train.steps=20 train.batch_size=8 train.log_every=5)
    views_args=(--device cuda --cpus 8 --images 512 --batch 64 --passes 2 --pipelines ray_kornia,torch_dataloader)
    step_args=(--device cuda --arch vit_small_patch16_224 --img-size 224 --batch 64 --steps 5 --warmup 2)
fi
run_stage train 90 '\[glare\] (done|step 20|mIoU)|error|Error' \
    "$PY" -m glare.train --config tiny train.storage_path="$WORK/runs" train.run_name=gpu-check "${train_args[@]}"
run_stage views 60 'img/s|ratio|make_views on' "$PY" benchmarks/data_pipeline.py "${views_args[@]}"
run_stage step_cost 100 '^\| (glare|dino|frozen|time|peak|adapters|\(info\)|all on|[a-z0-9]+=0)|MFU|PASS|MISS|gpu:' \
    "$PY" benchmarks/step_cost.py "${step_args[@]}" --terms --flops

{
    echo "# GLARE GPU check $(date -Iseconds)"
    echo
    echo "$(nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader 2>/dev/null || echo 'no nvidia-smi')"
    echo
    echo "| stage | status | seconds |"
    echo "| --- | --- | --- |"
    printf '%s\n' "${ROWS[@]}"
    echo
    printf '%s\n' "${NOTES[@]}"
} >"$SUMMARY"
rm -rf "$WORK"
echo
echo "================================ summary ($SUMMARY)"
cat "$SUMMARY"
