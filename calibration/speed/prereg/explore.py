import csv
import sys

import numpy as np

from planner.codec import settings_from_dict
from planner.memory import resolve_targets, trainable_params
from planner.profiles import load_gpu, load_model

DQ = 0.5 + 0.0625 + 2 + 2

def feats(row, gpu):
    m = load_model(row['model'])
    lora, train = settings_from_dict(row)
    masked = row['data'] != 'full'
    T = float(row['computed_tokens_per_step']) / train.grad_accum
    S = train.seq_len if row['data'] != 'padded' else T / train.batch_size
    L = m.num_hidden_layers
    ck = train.checkpointed_layers(L)
    rf = ck / L
    P = m.quantized_param_count
    head = m.vocab_size * m.hidden_size
    flops_peak = gpu.tflops('bf16') * 1e12
    bw = gpu.bandwidth_gb_s * 1e9
    passes = 2 + rf   # fwd, bwd-input, recompute
    mm = (2 * T * P) * passes + 2 * 2 * T * head
    attn_fwd = 2 * T * S * m.q_dim * L   # causal half
    attn = attn_fwd * (1 + rf) + 2.5 * attn_fwd
    names = resolve_targets(m, lora.targets)
    lora_p = sum(lin.count * lora.rank * (lin.in_features + lin.out_features) for lin in m.linears_in(names))
    lora_mods = sum(lin.count for lin in m.linears_in(names)) * L
    layer_passes = 2 * L + ck
    lin_calls = layer_passes * sum(lin.count for lin in m.layer_linears)
    f = {
        'mm': mm / flops_peak,
        'attn_flash': (0 if masked else attn) / flops_peak,
        'attn_mask': (2 * attn if masked else 0) / flops_peak,
        'dq': passes * DQ * P / bw,
        'act': T * layer_passes * m.hidden_size * 2 * 10 / bw + T * layer_passes * m.intermediate_size * 2 * 3 / bw,
        'logit': T * m.vocab_size * 4 * 6 / bw,
        'lora_flops': 6 * T * lora_p * L * (1 + rf) / flops_peak,
        'calls': lin_calls * 1e-4,
        'lora_calls': layer_passes * lora_mods / L * 1e-4,
        'fixed': 1e-2,
    }
    A = train.grad_accum
    f = {k: v * A for k, v in f.items()}
    f['opt'] = trainable_params(m, lora) * 16 / bw
    f['step'] = 1e-2
    return f

def load(path):
    rows = [r for r in csv.DictReader(open(path)) if r['status'] == 'ok']
    return rows

def fit(X, y):
    from scipy.optimize import nnls
    w = 1 / y
    c, _ = nnls(X * w[:, None], y * w)
    return c

def design(rows, gpu, keys=None):
    F = [feats(r, gpu) for r in rows]
    keys = keys or list(F[0])
    X = np.array([[f[k] for k in keys] for f in F]); y = np.array([float(r['step_time_s']) for r in rows])
    return X, y, keys

if __name__ == '__main__':
    rows = [r for r in load(sys.argv[1]) if r['data'] != 'padded']
    gpu = load_gpu(sys.argv[2])
    X, y, keys = design(rows, gpu)
    c = fit(X, y)
    print(dict(zip(keys, np.round(c, 3))))
    pred = X @ c
    err = (pred - y) / y * 100
    print('in-sample median abs %.1f max %.1f' % (np.median(abs(err)), abs(err).max()))
    # LOO per configuration (repeats of one configuration left out together)
    ids = [r['run_id'].rsplit('|rep', 1)[0] for r in rows]
    errs = []
    for i in range(len(rows)):
        tr = [j for j in range(len(rows)) if ids[j] != ids[i]]
        ci = fit(X[tr], y[tr]); errs.append((X[i] @ ci - y[i]) / y[i] * 100)
    errs = np.array(errs)
    print('LOO median abs %.1f p90 %.1f max %.1f' % (np.median(abs(errs)), np.percentile(abs(errs), 90), abs(errs).max()))
    # leave one model out
    ms = [r['model'] for r in rows]; e2 = []
    for i in range(len(rows)):
        tr = [j for j in range(len(rows)) if ms[j] != ms[i]]
        ci = fit(X[tr], y[tr]); e2.append((X[i] @ ci - y[i]) / y[i] * 100)
    e2 = np.array(e2)
    print('LOMO median abs %.1f p90 %.1f max %.1f' % (np.median(abs(e2)), np.percentile(abs(e2), 90), abs(e2).max()))
    for r, e, e_ in zip(rows, errs, e2): print(f"{r['run_id'][:80]:80s} {float(r['step_time_s']):7.3f} loo {e:+6.1f} lomo {e_:+6.1f}")
