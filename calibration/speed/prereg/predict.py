import csv
import json
import sys

sys.path.insert(0, __import__('os').path.dirname(__file__))
from nl import fit, load, mats, pred

from planner.profiles import load_gpu
from planner.train.throughput import normalize

rows = [r for r in load('calibration/speed/h100-speed-a.csv') if r['data'] != 'padded']
A, C, G, S, y = mats(rows, load_gpu('h100-sxm')); p = fit(A, C, G, S, y)
grid = [normalize(c) for c in json.load(open('calibration/grids/speed.json'))]
out = []
for c in grid:
    if c['data'] == 'padded': continue
    r = {k: str(v) for k, v in c.items()}
    r['computed_tokens_per_step'] = str(c['batch_size'] * c['seq_len'] * c['grad_accum'])
    A2, C2, G2, S2, _ = mats([{**r, 'step_time_s': '1'}], load_gpu('h200'))
    t = pred(p, A2, C2, G2, S2)[0]
    from planner.train.throughput import run_id
    out.append({'run_id': run_id(c), 'predicted_step_time_s': round(float(t), 4)})
w = csv.DictWriter(open('calibration/speed/h200-predicted-before-measuring.csv', 'w'), fieldnames=['run_id', 'predicted_step_time_s'])
w.writeheader(); w.writerows(out); print(len(out))
