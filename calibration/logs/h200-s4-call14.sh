#!/bin/bash
# Session 4, GPU call 2 (nvidia-h200-x2): allocator probes (both settings); the contaminated bisections
# again in fresh processes (calibration/grids/clean-bisect-expandable.json, 4 cap steps); grid
# h200-heldout (models the fit never sees), split over the two GPUs.
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --target /tmp/site .whl/*.whl || exit 1
export PYTHONPATH=/tmp/site:$PWD PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1
R=/tmp/res; mkdir -p $R
(export CUDA_VISIBLE_DEVICES=0 QFIT_NVML_INDEX=0
 { python3 calibration/allocator_probe.py; PYTORCH_CUDA_ALLOC_CONF=expandable_segments:True python3 calibration/allocator_probe.py; } > $R/allocator-probe.txt 2>&1
 export PYTORCH_CUDA_ALLOC_CONF=expandable_segments:True
 timeout 300 python3 -m planner.train.harness --grid .gpu/ho-a.json --out $R/h200-heldout-a-expandable.csv --time-limit 260 --workdir /dev/shm/w0 > $R/log-ho-a.txt 2>&1; echo "exit $?" >> $R/log-ho-a.txt
 timeout 230 python3 -m planner.train.harness --grid .gpu/bis-a.json --out $R/h200-clean-bisect-a-expandable.csv --bisect-steps 4 --time-limit 180 --workdir /dev/shm/w0 > $R/log-bis-a.txt 2>&1; echo "exit $?" >> $R/log-bis-a.txt) &
(export CUDA_VISIBLE_DEVICES=1 QFIT_NVML_INDEX=1 PYTORCH_CUDA_ALLOC_CONF=expandable_segments:True
 timeout 320 python3 -m planner.train.harness --grid .gpu/ho-b.json --out $R/h200-heldout-b-expandable.csv --time-limit 280 --workdir /dev/shm/w1 > $R/log-ho-b.txt 2>&1; echo "exit $?" >> $R/log-ho-b.txt
 timeout 230 python3 -m planner.train.harness --grid .gpu/bis-b.json --out $R/h200-clean-bisect-b-expandable.csv --bisect-steps 4 --time-limit 170 --workdir /dev/shm/w1 > $R/log-bis-b.txt 2>&1; echo "exit $?" >> $R/log-bis-b.txt) &
wait
tar czf $OUT/res.tgz -C $R .
cat $R/allocator-probe.txt
grep -h "harness\]\|exit" $R/log-*.txt | cut -c1-200
