#!/bin/bash
# Session 4, GPU call 1 (nvidia-h200-x2): the contaminated calibration rows measured again, one fresh
# process per model group (grids from `python -m planner.fit --out calibration/grids/clean-*.json`).
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --target /tmp/site .whl/*.whl || exit 1
export PYTHONPATH=/tmp/site:$PWD PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1
R=/tmp/res; mkdir -p $R
(export CUDA_VISIBLE_DEVICES=0 QFIT_NVML_INDEX=0 PYTORCH_CUDA_ALLOC_CONF=expandable_segments:True
 timeout 560 python3 -m planner.train.harness --grid .gpu/clean-exp-a.json --out $R/h200-clean-a-expandable.csv --time-limit 500 --workdir /dev/shm/w0 > $R/log-a.txt 2>&1; echo "exit $?" >> $R/log-a.txt) &
(export CUDA_VISIBLE_DEVICES=1 QFIT_NVML_INDEX=1
 PYTORCH_CUDA_ALLOC_CONF=expandable_segments:True timeout 430 python3 -m planner.train.harness --grid .gpu/clean-exp-b.json --out $R/h200-clean-b-expandable.csv --time-limit 380 --workdir /dev/shm/w1 > $R/log-b.txt 2>&1; echo "exit $?" >> $R/log-b.txt
 timeout 120 python3 -m planner.train.harness --grid calibration/grids/clean-default.json --out $R/h200-clean-default.csv --time-limit 90 --workdir /dev/shm/w1 > $R/log-d.txt 2>&1; echo "exit $?" >> $R/log-d.txt) &
wait
nvidia-smi --query-gpu=index,memory.used --format=csv
tar czf $OUT/res.tgz -C $R .
grep -h "harness\]\|exit" $R/log-*.txt | cut -c1-220
