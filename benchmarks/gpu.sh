#!/usr/bin/env bash
# The GPU measurements, as one prepared script (run it from the repository root on a machine with a CUDA GPU):
# the SDXL 1024 px consumer-GPU LoRA recipe (peak memory, step time) and the comparison with the published diffusers
# script on the SD1.5 architecture at 512 px, and GRPO's rollout against the pipeline's own sampling with the window's
# training saving (bench_rollout.py: the full-size SD1.5 UNet with DDIM, and both families' tiny pipelines with an 8x
# wider denoiser, SD3's Flow-SDE among them). Results go to $OUT (default gpu-results/); see docs/performance.md.
# usage: benchmarks/gpu.sh [PEER_DIR]   (PEER_DIR defaults to ../shared/peer)
set -euo pipefail
peer=${1:-../shared/peer}
out=${OUT:-gpu-results}
mkdir -p "$out"
export PYTHONPATH=$PWD
nvidia-smi > "$out/nvidia-smi.txt"
python benchmarks/bench_step.py --model sdxl --resolution 1024 --batch 1 --caching --gradient-checkpointing \
    --adamw-8bit --bf16 --warmup 2 --steps 5 --json "$out/sdxl_1024_recipe.json" --markdown "$out/results.md"
python benchmarks/bench_peer.py --peer "$peer" --model sd15 --resolution 512 --batch 1 --steps 30 --warmup 5 \
    --rounds 3 --workdir "$out/peer-work" --json "$out/peer_sd15_512.json" --markdown "$out/results.md"
python benchmarks/bench_reference_memory.py --model sd15 --resolution 512 --steps 2 > "$out/reference_memory.jsonl"
python benchmarks/bench_rollout.py --model sd15 --resolution 512 --steps 10 --batch 8 --guidance 4.5 --window 2 \
    --rounds 9 --train-steps 3 --train-rounds 3 --json "$out/rollout_sd15_512.json"
python benchmarks/bench_rollout.py --model tiny-sd3 tiny-sd --width 8 --steps 10 --batch 8 --rounds 15 --no-training \
    --json "$out/rollout_tiny_x8.json"
cat "$out/results.md" "$out/reference_memory.jsonl" "$out/rollout_sd15_512.json" "$out/rollout_tiny_x8.json"
