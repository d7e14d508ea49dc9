#!/bin/bash
# Session 4, GPU call 3 (nvidia-h200-x2): the fit promise again with the refitted coefficients (every
# recommended plan for T4 / RTX 4090 / A100-40GB emulated on the H200, effective batch 16 on GPU 0 and
# 120 on GPU 1), and the allocator probes (cap probes included).
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --target /tmp/site .whl/*.whl || exit 1
export PYTHONPATH=/tmp/site:$PWD PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1 PYTORCH_CUDA_ALLOC_CONF=expandable_segments:True
R=/tmp/res; mkdir -p $R
(export CUDA_VISIBLE_DEVICES=0 QFIT_NVML_INDEX=0
 timeout 420 python3 -m planner.train.validate --effective-batch 16 --out $R/h200-emulated-eff16-s4.csv --time-limit 380 --workdir /dev/shm/w0 > $R/log-v16.txt 2>&1; echo "exit $?" >> $R/log-v16.txt
 { unset PYTORCH_CUDA_ALLOC_CONF; python3 calibration/allocator_probe.py; PYTORCH_CUDA_ALLOC_CONF=expandable_segments:True python3 calibration/allocator_probe.py; } > $R/allocator-probe.txt 2>&1) &
(export CUDA_VISIBLE_DEVICES=1 QFIT_NVML_INDEX=1
 timeout 420 python3 -m planner.train.validate --effective-batch 120 --out $R/h200-emulated-eff120-s4.csv --time-limit 380 --workdir /dev/shm/w1 > $R/log-v120.txt 2>&1; echo "exit $?" >> $R/log-v120.txt) &
wait
python3 .gpu/attn_check.py > $R/attn-check.txt 2>&1
tar czf $OUT/res.tgz -C $R .
cat $R/allocator-probe.txt $R/attn-check.txt
grep -h "harness\]\|exit" $R/log-*.txt | cut -c1-220
