#!/usr/bin/env bash
# The checks that need a GPU, as one run on a lent GPU machine (which has PyTorch, onnxruntime
# and pytest but no eenn install): the CUDA tests (graphs, bf16, re-batching, pipelined streams),
# then benchmarks/deploy_speed.py on CUDA for each checkpoint given.
#
#   EENN_DATA_DIR=path/to/fashion-mnist bash benchmarks/gpu_checks.sh OUT_DIR CHECKPOINT...
#
# e.g. with runs/resnet20-peer.safetensors and runs/fmnist-vit/B-NET/best.safetensors copied
# beside the data; about 4 minutes for both on an H200 (docs/RESULTS.md, "On a GPU").
set -u
out=${1:?usage: gpu_checks.sh OUT_DIR CHECKPOINT...}
shift
mkdir -p "$out"
export PYTHONPATH="$PWD/src" PYTHONUNBUFFERED=1
nvidia-smi -L
python3 -m pytest -q -p no:cacheprovider tests/test_engine.py tests/test_inference.py \
    -k "cuda or graphs or stream or bucket or precision" 2>&1 | tee "$out/tests.log" | tail -5
for ck in "$@"; do
    python3 benchmarks/deploy_speed.py --device cuda --checkpoint "$ck" --limit 0 --batches 1,256,4096 \
        --samples 512,8192,8192 2>&1 | tee "$out/$(basename "$(dirname "$ck")")-$(basename "$ck" .safetensors).log" \
        | grep -v "Warning\|^  return"
done
