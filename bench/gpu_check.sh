#!/usr/bin/env bash
# Every GPU figure still open (docs/benchmarks-gpu.md, "Still to measure on a GPU") in one command, one results
# file. Sized for one H100 in at most 8 minutes (the parts' limits add up to 480 s; the machine's start is not
# counted): a part that fails or runs out of time is recorded as such while the others still run.
#
#   bench/gpu_check.sh [OUT_DIR]            default OUT_DIR: bench/results/gpu-check-<date>
#   WHEELS=/path/to/wheels bench/gpu_check.sh   install $WHEEL_PACKAGES (default: transformers peft accelerate
#                                               bitsandbytes) from there first (a device without network)
# The rehearsal's part needs dagster and polars too (WHEEL_PACKAGES="... dagster polars"); without them it is
# recorded as skipped.
#
# Writes OUT_DIR/<part>.txt (each part's whole output) and OUT_DIR/results.txt (per part: command, exit status,
# seconds, the last lines of its output, which hold the medians and ratios).
set -uo pipefail
cd "$(dirname "$0")/.."
out=${1:-bench/results/gpu-check-$(date +%F)}
mkdir -p "$out"
results="$out/results.txt"
python=${PYTHON:-python}

if [ -n "${WHEELS:-}" ]; then
    # shellcheck disable=SC2086  # a list of package names
    "$python" -m pip install --quiet --no-index --find-links "$WHEELS" \
        ${WHEEL_PACKAGES:-transformers peft accelerate bitsandbytes} \
        || { echo "installing the wheels in $WHEELS failed" >&2; exit 2; }
fi
"$python" - <<'EOF' > "$results" || { cat "$results" >&2; exit 2; }
import platform, torch
assert torch.cuda.is_available(), "no CUDA device: this check measures the GPU"
import transformers, peft
print(f"device: {torch.cuda.get_device_name(0)}; torch {torch.__version__}, CUDA {torch.version.cuda}, "
      f"transformers {transformers.__version__}, peft {peft.__version__}; {platform.node()}")
EOF
git rev-parse HEAD >> "$results" 2>/dev/null || echo "commit: unknown (not a git checkout)" >> "$results"

export HF_HUB_OFFLINE=1 TOKENIZERS_PARALLELISM=false
part() {  # part NAME SECONDS COMMAND...
    local name=$1 limit=$2
    shift 2
    local started=$SECONDS
    timeout --kill-after=10 "$limit" "$@" > "$out/$name.txt" 2>&1
    local status=$?
    {
        echo
        echo "== $name: $* (exit $status$([ $status -eq 124 ] && echo ": over its ${limit} s"), $((SECONDS - started)) s)"
        tail -n 30 "$out/$name.txt"
    } >> "$results"
}

# moce against LoRA only, eager and compiled, one optimiser step of the whole 7B-shaped model (target <= 1.10x).
part train_step 120 "$python" -m bench.train_step --device cuda --shape paper --steps 20 --warmup 3
# Decoding: the all-groups path against the gathered one and the base, at batch 1 and 16, and the layer alone.
part decode 90 "$python" -m bench.generate --device cuda --shape paper --caches static --batches 1,16 \
    --decode-paths both --repeats 3
part decode_layer 30 "$python" -m bench.moe_layer --device cuda --decode-only
# The paper's training path through the Trainer: QLoRA NF4, bf16, paged AdamW, compiled layers; step time, memory.
part qlora_train 120 "$python" -m bench.qlora_train --variants lora,moce --steps 10 --warmup 3
# The GPU tests (QLoRA training, merge, bf16 evaluation against the CPU) and the paper rehearsal's CUDA path.
part gpu_tests 60 "$python" -m pytest -q -p no:cacheprovider tests/gpu
if "$python" -c "import dagster, polars" 2>/dev/null; then
    part rehearsal_cuda 60 "$python" -m pytest -q -p no:cacheprovider tests/experiment/test_paper_rehearsal.py
else
    printf '\n== rehearsal_cuda: skipped (dagster or polars not installed)\n' >> "$results"
fi

echo "results: $results"
