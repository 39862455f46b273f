# The lease (one H200, 15 min of device time, 2026-11-30): three calls to carry the packages the
# image lacks and SmolLM2's GGUF in halves, then the run. Paths: .whl/ (polars, polars-runtime-32,
# pandera, pydantic, pydantic-core, annotated-types, typing-inspection, typeguard, gguf), .dev2/
# (transformers 5.24.0, peft 0.21.2, first half of SmolLM2-135M-Instruct.Q4_1.gguf), .dev3/ (second half).
#
# call 1 (carry .whl): install into /tmp/site
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl
# call 2 (carry .dev2): transformers/peft, first half, CUDA smoke test of the driver on the tiny model (passed, 29 s)
export PYTHONPATH=/tmp/site TQDM_DISABLE=1
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .dev2/*.whl
cp .dev2/gguf_a /tmp/gguf_a
python3 -m pytest -q -x tests/test_gpu_scale.py::test_gpu_scale_dry_run
# call 3 (carry .dev3): join (sha256 b179c952...db53, as here) and run. This first run forgot
# --params and so used the built-in defaults, not params.yaml: see defaults_recipe/.
cat /tmp/gguf_a .dev3/gguf_b > /tmp/smol.gguf
cd /tmp/work && python3 $R/bench/gpu_scale.py --out $OUT/gs --deadline 555 --diffs-until 330 \
    --sizes 16,64,256,all --set model.source=gguf --set model.id=/tmp/smol.gguf
# call 4 (machine still warm): the recipe as meant, params.yaml + the paper-setting list (progress.json here)
cd /tmp/work2 && python3 $R/bench/gpu_scale.py --params $R/params.yaml --out $OUT/gs --deadline 390 \
    --diffs-until 290 --sizes 16,64,all --set model.source=gguf --set model.id=/tmp/smol.gguf
# call 5: the time guard had stopped the curve after n=16; the rest of the curve on the same dataset
# (scaling.json/md/png here)
cd /tmp/work2 && python3 -c "...; run_scaling(load_params('$R/params.yaml', PAPER_SETTING + gguf overrides), '16,64,all')"
