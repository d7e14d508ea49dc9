import sys

import numpy as np

sys.path.insert(0, __import__('os').path.dirname(__file__))
from explore import feats, load
from scipy.optimize import least_squares

from planner.profiles import load_gpu

CPU = ['calls', 'lora_calls', 'fixed']
GPU = ['mm', 'attn_flash', 'attn_mask', 'dq', 'act', 'logit', 'lora_flops']
STEP = ['opt', 'step']
def mats(rows, gpu):
    F = [feats(r, gpu) for r in rows]
    A = np.array([float(r['grad_accum']) for r in rows])
    C = np.array([[f[k] / a for k in CPU] for f, a in zip(F, A)])
    G = np.array([[f[k] / a for k in GPU] for f, a in zip(F, A)])
    S = np.array([[f[k] for k in STEP] for f in F])
    y = np.array([float(r['step_time_s']) for r in rows])
    return A, C, G, S, y
def pred(p, A, C, G, S):
    nc, ng = C.shape[1], G.shape[1]
    pc, pg, ps, k = p[:nc], p[nc:nc+ng], p[nc+ng:nc+ng+S.shape[1]], p[-1]
    c = C @ pc; g = G @ pg
    micro = (c**k + g**k) ** (1/k)
    return A * micro + S @ ps
def fit(A, C, G, S, y, p0=None):
    n = C.shape[1] + G.shape[1] + S.shape[1]
    p0 = np.ones(n + 1) if p0 is None else p0
    p0[-1] = 3
    lb = np.zeros(n + 1); lb[-1] = 1
    ub = np.full(n + 1, np.inf); ub[-1] = 20
    r = least_squares(lambda p: np.log(pred(p, A, C, G, S) / y), p0, bounds=(lb, ub))
    return r.x
if __name__ == '__main__':
    rows = [r for r in load(sys.argv[1]) if r['data'] != 'padded']
    gpu = load_gpu(sys.argv[2])
    A, C, G, S, y = mats(rows, gpu)
    p = fit(A, C, G, S, y)
    print(np.round(p, 3))
    e = (pred(p, A, C, G, S) / y - 1) * 100
    print('in-sample median %.1f max %.1f' % (np.median(abs(e)), abs(e).max()))
    ids = [r['run_id'].rsplit('|rep', 1)[0] for r in rows]; ms = [r['model'] for r in rows]
    for name, key in (('LOO-config', ids), ('LOMO', ms)):
        errs = []
        for i in range(len(rows)):
            tr = np.array([key[j] != key[i] for j in range(len(rows))])
            pi = fit(A[tr], C[tr], G[tr], S[tr], y[tr], p.copy())
            errs.append((pred(pi, A[i:i+1], C[i:i+1], G[i:i+1], S[i:i+1])[0] / y[i] - 1) * 100)
        errs = np.array(errs)
        print('%s median %.1f p90 %.1f max %.1f' % (name, np.median(abs(errs)), np.percentile(abs(errs), 90), abs(errs).max()))
        if name == 'LOO-config':
            for r, e1 in zip(rows, errs): print(f"  {r['run_id'][:78]:78s} {float(r['step_time_s']):6.3f} {e1:+6.1f}")
    if len(sys.argv) > 3:
        rows2 = [r for r in load(sys.argv[3]) if r['data'] != 'padded']
        A2, C2, G2, S2, y2 = mats(rows2, load_gpu(sys.argv[4]))
        e = (pred(p, A2, C2, G2, S2) / y2 - 1) * 100
        print('cross-GPU median %.1f p90 %.1f max %.1f' % (np.median(abs(e)), np.percentile(abs(e), 90), abs(e).max()))
