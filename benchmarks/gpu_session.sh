#!/usr/bin/env bash
# Every H100 figure of this project in one go, in priority order, as the GPU machine here allows:
# run it in the background (setsid) and collect the results while it runs.
#
#   bash benchmarks/gpu_session.sh [TRAIN_MINUTES [LAST_STAGE]]   # default 24, all stages
#
# LAST_STAGE (train, reference, sparse, quality, shapes) ends the session after that stage;
# TRAIN_ARGS (environment) adds trainer flags, e.g. TRAIN_ARGS=--no-compile.
#
# 1. trains the ShapesBench reference model from scratch (artifacts/shapes, resumable),
# 2. benchmarks it (quality on the held-out suite, speed, attention structure),
# 3. sparse kernel vs cuDNN / Flex at the Wan 480p shape (launch sweep), tile-layout and
#    TemporalSparse overheads, a full random-weight Wan2.1-1.3B step with each method,
# 4. what each sparse method costs in quality on the freshly trained model,
# 5. the kernel at the other three video shapes (default launch configuration).
# Results land in benchmarks/results/; logs and a progress file in artifacts/gpu-session/.
set -u
cd "$(dirname "$0")/.."
minutes="${1:-24}"
last="${2:-shapes}"
logs=artifacts/gpu-session
mkdir -p "$logs"
stage() { echo "$(date +%T) $*" >> "$logs/progress.txt"; }
ends_after() { if [ "$last" = "$1" ]; then stage done; exit 0; fi; }
stage "train ${minutes} min"
python -m dit_accel.pipelines.shapes.train --out artifacts/shapes --minutes "$minutes" ${TRAIN_ARGS:-} > "$logs/train.log" 2>&1
ends_after train
stage "reference benchmark"
python -m dit_accel.benchmarks.reference --model artifacts/shapes/pipeline > "$logs/reference.log" 2>&1
ends_after reference
stage "sparse kernel (wan 480p sweep), overheads, wan2.1-1.3b step"
python -m dit_accel.benchmarks.sparse --shapes wan2.1-1.3b-480p-81f > "$logs/sparse-wan.log" 2>&1
ends_after sparse
stage "sparse quality"
python -m dit_accel.benchmarks.sparse_quality --model artifacts/shapes/pipeline > "$logs/sparse-quality.log" 2>&1
ends_after quality
stage "sparse kernel, other shapes"
python -m dit_accel.benchmarks.sparse --parts kernel --configs default --iters 5 \
  --shapes wan2.1-14b-720p-81f,hunyuanvideo-720p-129f,cogvideox-5b-480p-49f --name sparse-shapes \
  > "$logs/sparse-shapes.log" 2>&1
stage done
