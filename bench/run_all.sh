#!/usr/bin/env bash
# Every benchmark behind the README's figures, in one sequential run (well over an hour on 2 cores).
# Run it on an otherwise idle machine: each script compares against its anchors inside the same run,
# but a busy neighbour still distorts the ratios. Outputs land in bench/results/.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=.venv/bin/python
OUT=bench/results
mkdir -p "$OUT"
run() { echo "== $*" >&2; "$@"; }

# Engine alone: decode tokens/s vs transformers generate(), llama.cpp and the machine's roofline.
for shape in 110m 135m-deep; do
  run $PY -m bench.engine --shape $shape --batch-sizes 1,8,32 --threads 2 \
    --json $OUT/engine-$shape-float32.json | tee $OUT/engine-$shape-float32.md
  run $PY -m bench.engine --shape $shape --dtype bfloat16 --batch-sizes 1,8,32 --threads 2 --check-bf16 \
    --json $OUT/engine-$shape-bfloat16.json | tee $OUT/engine-$shape-bfloat16.md
  run $PY -m bench.engine --shape $shape --long-context --threads 2 \
    --json $OUT/engine-$shape-long.json | tee $OUT/engine-$shape-long.md
done
run $PY -m bench.engine --model weights/default --batch-sizes 1,32 --threads 2 \
  --json $OUT/engine-default-float32.json | tee $OUT/engine-default-float32.md
# Weight-only int8 beside llama.cpp q8_0 (our bfloat16 alone for the int8/bfloat16 ratio).
for shape in 110m 135m-deep; do
  run $PY -m bench.engine --shape $shape --dtype bfloat16 --quantization int8 --batch-sizes 1,32 --threads 2 \
    --skip-hf --json $OUT/engine-$shape-int8.json | tee $OUT/engine-$shape-int8.md
done

# Serving: concurrency sweep over HTTP, ours vs a naive one-request-at-a-time transformers server.
run $PY -m bench.serve --random-110m --threads 2 --dtypes float32,bfloat16 --compare-hf --concurrency 1,4,16
run $PY -m bench.serve --model weights/default --threads 2 --dtypes float32 --compare-hf --concurrency 1,4,16
run $PY -m bench.serve --random-110m --threads 2 --dtypes bfloat16,bfloat16+int8 --concurrency 1 \
  --tag serve-110m-int8
# Speculative decoding (ngram) against plain decoding: code, prose, sampled prose; 1 and 16 streams.
run $PY -m bench.speculative --model weights/default --threads 2 --json $OUT/speculative-default.json \
  | tee $OUT/speculative-default.md

# What HTTP costs over the engine; what structured output costs; prefix-cache TTFT; batch invariance.
run $PY -m bench.http_overhead --random-110m --streams 1,16 --threads 2 --prompt-tokens 128 --new-tokens 64 \
  --json $OUT/http-overhead-110m.json | tee $OUT/http-overhead-110m.md
run $PY -m bench.structured --shape 110m --dtype bfloat16 --streams 16 --new-tokens 128 --threads 2 \
  --json $OUT/structured-110m-bfloat16.json | tee $OUT/structured-110m-bfloat16.md
run $PY -m bench.prefix_cache --model weights/default --prefix-tokens 768 --threads 2 | tee $OUT/prefix-cache.md
run $PY -m bench.batch_invariance --model weights/default --prompts 64 --dtype float32 | tee $OUT/batch-invariance.md
run $PY -m bench.batch_invariance --model weights/default --prompts 64 --dtype bfloat16 \
  | tee -a $OUT/batch-invariance.md
