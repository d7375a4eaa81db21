#!/usr/bin/env bash
# tools/gpu-check.sh OUT_DIR [webgpu|torch|all]: what this project claims on a real GPU, checked in one call, on a
# machine with an NVIDIA driver (or any Vulkan GPU), python3 with PyTorch, and possibly no Node, no
# network and no Vulkan loader: run it from the bundle `pnpm bundle:gpu-check` writes (its Node,
# Debian's libvulkan1 and the project), or from a checkout with Node and libvulkan1 installed.
#
# Steps, each with its own time limit (a hang costs one step, not the call); a part fits one call
# of at most 10 minutes, all of it does not:
#   both:   nvidia-smi, the Vulkan ICD found; doctor;
#   webgpu: gradients on the GPU vs the CPU reference; bench train-step --backend webgpu at 32x32
#           and 96x96, batch 64; the same network in PyTorch on the same GPU (fp32, TF32,
#           channels_last + bf16); launch --gpus 2 --share-gpu, 50 steps of Fashion-MNIST with
#           identical replicas; a summary with ours / PyTorch (450 s of limits).
#   torch:  the torch engine built against python3's torch (the issue allows 3 minutes); its
#           gradients on CUDA vs the same engine on the CPU; 200 steps of Fashion-MNIST on CUDA and
#           on the CPU, loss curves compared; launch --gpus 2 --share-gpu --engine torch with
#           identical replicas; images/s at 96x96, batch 64 and 256, fp32/tf32/bf16, ours and
#           PyTorch eager on the same GPU (510 s of limits).
# Writes OUT_DIR/gpu-check.json (the summary), OUT_DIR/gpu-check.log (everything), one log and
# JSON file per step. Exit code 0 when every step passed.
set -uo pipefail
ROOT=$(cd "$(dirname "$0")/.." && pwd)
[ $# -ge 1 ] && [ $# -le 2 ] || { echo "usage: $0 OUT_DIR [webgpu|torch|all]" >&2; exit 2; }
PART=${2:-all}
case $PART in webgpu|torch|all) ;; *) echo "$0: the part is webgpu, torch or all, got '$PART'" >&2; exit 2 ;; esac
mkdir -p "$1" && OUT=$(cd "$1" && pwd)
LOG=$OUT/gpu-check.log
: > "$OUT/steps.jsonl"
say() { echo "$*" | tee -a "$LOG"; }

# The bundle's Node and Vulkan loader, where the bundle has them.
[ -x "$ROOT/node/bin/node" ] && export PATH="$ROOT/node/bin:$PATH"
[ -e "$ROOT/vulkan/libvulkan.so.1" ] && export LD_LIBRARY_PATH="$ROOT/vulkan${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}"
command -v node >/dev/null || { say "gpu-check: no node on PATH (run it from the bundle of pnpm bundle:gpu-check)"; exit 2; }
# NVIDIA's Vulkan ICD file: VK_DRIVER_FILES if set, else the usual folders, else the driver's own.
# (Containers mount the driver's folder, e.g. /usr/local/nvidia, often as a file system of its own.)
if [ -z "${VK_DRIVER_FILES:-}" ]; then
  ICD=$(ls /usr/share/vulkan/icd.d/nvidia_icd*.json /etc/vulkan/icd.d/nvidia_icd*.json /usr/local/nvidia/share/vulkan/icd.d/nvidia_icd*.json 2>/dev/null | head -1)
  [ -n "$ICD" ] || ICD=$(timeout 30 find / /usr/local/nvidia \( -path /proc -o -path /sys -o -path "$OUT" \) -prune -o -name 'nvidia_icd*.json' -print 2>/dev/null | head -1)
  [ -n "$ICD" ] && export VK_DRIVER_FILES=$ICD
fi
# The driver's libraries (the ICD names libGLX_nvidia.so.0 without a path), where a container mounts them.
for d in /usr/local/nvidia/lib64 /usr/local/nvidia/lib; do
  [ -d "$d" ] && export LD_LIBRARY_PATH="${LD_LIBRARY_PATH:+$LD_LIBRARY_PATH:}$d"
done
export DTRAIN_BENCH_RESULTS_DIR=$OUT DTRAIN_DATA_DIR=$OUT/data TF_CPP_MIN_LOG_LEVEL=2
# DTRAIN_GPU_CHECK_SOFTWARE=1: try the script on the software GPU (pnpm setup:software-gpu; slow: steps time out).
SW_LAUNCH=() SW_BENCH=()
# The torch part's GPU flags; DTRAIN_GPU_CHECK_SOFTWARE=1 runs them on the CPU instead (a dry run).
TORCH_DEV=gpu TORCH_LAUNCH=(--gpus 2 --share-gpu)
if [ "${DTRAIN_GPU_CHECK_SOFTWARE:-}" = 1 ]; then
  export DTRAIN_ALLOW_SOFTWARE_GPU=1 DTRAIN_GPU_CHECK_TORCH_DEVICE=cpu
  SW_LAUNCH=(--allow-software-gpu) SW_BENCH=(--allow-software-gpu yes)
  TORCH_DEV=cpu TORCH_LAUNCH=(--workers 2)
fi
cd "$ROOT"
say "gpu-check: $(date -u +%FT%TZ) in $ROOT; node $(node --version); VK_DRIVER_FILES=${VK_DRIVER_FILES:-unset}; LD_LIBRARY_PATH=${LD_LIBRARY_PATH:-}"

FAILED=0
# step NAME LIMIT_S COMMAND...: runs it with a time limit, its output in OUT/NAME.log and the log.
# INFO=1 step ...: what it prints is for the record; its exit code does not fail the check (doctor
# exits 1 where the CPU backend, which the bundle leaves out, cannot load).
step() {
  local name=$1 limit=$2 t0 rc ms secs
  shift 2
  say "--- $name (limit ${limit} s): $*"
  t0=$(date +%s%N)
  timeout -k 5 "$limit" "$@" > "$OUT/$name.log" 2>&1
  rc=$?
  ms=$(( ($(date +%s%N) - t0) / 1000000 ))
  secs=$(printf '%d.%03d' $((ms / 1000)) $((ms % 1000)))
  grep -v '^Warning: maxDynamic' "$OUT/$name.log" | tail -40 | tee -a "$LOG"
  [ $rc -eq 0 ] || [ "${INFO:-}" = 1 ] || FAILED=1
  [ $rc -eq 124 ] && say "$name: TIMED OUT after ${limit} s"
  say "$name: exit $rc in ${secs} s"
  printf '{"step":"%s","exit":%d,"seconds":%s,"limitSeconds":%d}\n' "$name" "$rc" "$secs" "$limit" >> "$OUT/steps.jsonl"
}

INFO=1 step nvidia-smi 10 nvidia-smi --query-gpu=index,name,driver_version,memory.total,pci.bus_id --format=csv
INFO=1 step doctor 45 node --import tsx packages/cli/src/main.ts doctor --json
cp "$OUT/doctor.log" "$OUT/doctor.json" 2>/dev/null
if [ "$PART" != torch ]; then
step gradients 110 node --import tsx tools/gpu-check/check-gradients.ts "$OUT/gradients.json"
step train-step 90 node --import tsx tools/bench/main.ts train-step --backend webgpu --sizes 32,96 --batch 64 --warmup 3 --steps 10 ${SW_BENCH[@]+"${SW_BENCH[@]}"}
step torch 80 python3 tools/bench/torch_resnet.py --sizes 32,96 --batch 64 --warmup 5 --steps 20 --out "$OUT/torch.json"
# 6,400 images / (2 workers x batch 64) = 50 steps; the bundle's Fashion-MNIST is a reduced copy (640 train + 100 test images a class).
step launch 90 node --import tsx packages/cli/src/main.ts launch --gpus 2 --share-gpu --backend webgpu --dataset fashion-mnist --epochs 1 \
  --limit-train 6400 --limit-test 1000 --batch-size 64 --metrics-port 0 --out "$OUT/launch-run" ${SW_LAUNCH[@]+"${SW_LAUNCH[@]}"}
step summary 15 node --import tsx tools/gpu-check/summary.ts "$OUT"
fi
if [ "$PART" != webgpu ]; then
step torch-build 150 node packages/torch-engine/scripts/build.mjs --force
cp packages/torch-engine/native/build/build-info.json "$OUT/torch-build-info.json" 2>/dev/null
step torch-gradients 60 node --import tsx tools/gpu-check/torch-engine.ts gradients "$OUT/torch-gradients.json"
# 200 steps (2 epochs of the reduced 6,400 images at batch 64) on CUDA and on the CPU, from the same seed.
for dev in $( [ $TORCH_DEV = gpu ] && echo gpu ) cpu; do
  step "torch-curve-$dev" 45 node --import tsx packages/cli/src/main.ts train --engine torch --backend $dev --dataset fashion-mnist --epochs 2 \
    --limit-train 6400 --limit-test 1000 --batch-size 64 --log-every 10 --out "$OUT/torch-curve-$dev"
done
[ $TORCH_DEV = cpu ] && cp -r "$OUT/torch-curve-cpu" "$OUT/torch-curve-gpu" 2>/dev/null
step torch-curves 15 node --import tsx tools/gpu-check/compare-curves.ts "$OUT/torch-curve-gpu" "$OUT/torch-curve-cpu" "$OUT/torch-curves.json"
step torch-launch 60 node --import tsx packages/cli/src/main.ts launch "${TORCH_LAUNCH[@]}" --engine torch --dataset fashion-mnist --epochs 1 \
  --limit-train 6400 --limit-test 1000 --batch-size 64 --metrics-port 0 --out "$OUT/torch-launch-run"
step torch-speed 150 node --import tsx tools/gpu-check/torch-engine.ts speed "$OUT/torch-speed.json"
fi
say "gpu-check: $([ $FAILED -eq 0 ] && echo 'every step passed' || echo 'FAILED steps: see above'); summary in $OUT/gpu-check.json"
exit $FAILED
