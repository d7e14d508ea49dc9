"""Partial checkpointing: the planner's model of it and the real stack doing what the plan says."""

from dataclasses import replace

import pytest

from planner.coefficients import load_coefficients
from planner.memory import estimate, phases
from planner.profiles import load_gpu, load_model
from planner.search import Request, make_plan, next_larger_batch, search
from planner.specs import LoraSettings, TrainSettings
from planner.speed import tokens_per_second

LORA = LoraSettings(rank=16, alpha=32, dropout=0.05, targets=("all-linear",))


@pytest.fixture(scope="module")
def coeffs():
    return load_coefficients()


def _train(n, **kw):
    return TrainSettings(batch_size=8, grad_accum=2, seq_len=1024, gradient_checkpointing=True,
                         uncheckpointed_layers=n, **kw)


def test_memory_and_speed_grow_with_each_uncheckpointed_layer(coeffs):
    m = load_model("mistral-7b")
    prev = estimate(m, LORA, _train(0), coeffs)
    prev_speed = tokens_per_second(m, LORA, _train(0), load_gpu("a100-40gb"), coeffs)
    for n in (1, 8, 31):
        cur = estimate(m, LORA, _train(n), coeffs)
        speed = tokens_per_second(m, LORA, _train(n), load_gpu("a100-40gb"), coeffs)
        assert cur.peak_allocated_bytes > prev.peak_allocated_bytes
        assert speed > prev_speed
        prev, prev_speed = cur, speed


def test_endpoints_match_all_and_none(coeffs):
    """All layers uncheckpointed is the no-checkpointing case; 0 is the classic one (same phases)."""
    m = load_model("llama-3.1-8b")
    off = replace(_train(0), gradient_checkpointing=False)
    assert estimate(m, LORA, _train(m.num_hidden_layers), coeffs).peak_allocated_bytes == \
        estimate(m, LORA, off, coeffs).peak_allocated_bytes
    assert "backward, last checkpointed layer" not in phases(m, LORA, _train(0), coeffs)
    assert "backward, last checkpointed layer" in phases(m, LORA, _train(4), coeffs)


def test_saved_activations_are_exactly_the_layer_mix(coeffs):
    """k checkpointed inputs + (L - k) whole layers: linear in the number of uncheckpointed layers."""
    m = load_model("mistral-7b")
    saved = [phases(m, LORA, _train(n), coeffs)["backward, at the loss"]["saved_activations"] for n in (0, 1, 2)]
    assert saved[2] - saved[1] == pytest.approx(saved[1] - saved[0], abs=2)


def test_search_fills_memory_with_uncheckpointed_layers(coeffs):
    """Where the recommended plan leaves layers uncheckpointed, one more would not fit, and without
    partial checkpointing the best plan is slower."""
    partial = 0
    for gpu_name in ("t4", "rtx4090", "a100-40gb"):
        for model_name in ("mistral-7b", "llama-3.1-8b"):
            for seq in (512, 2048):
                m, gpu = load_model(model_name), load_gpu(gpu_name)
                best = search(m, gpu, Request(seq_len=seq), coeffs).best
                n = best.train.uncheckpointed_layers
                if not n:
                    continue
                partial += 1
                one_more = make_plan(m, gpu, best.lora, replace(best.train, uncheckpointed_layers=n + 1), coeffs)
                assert not one_more.fits  # the most that fit
                assert next_larger_batch(best, coeffs) is None or next_larger_batch(best, coeffs).train.uncheckpointed_layers == 0
                fixed = search(m, gpu, Request(seq_len=seq, uncheckpointed_layers=0), coeffs).best
                assert fixed.train.uncheckpointed_layers == 0 and best.tokens_per_s > fixed.tokens_per_s
    assert partial >= 3


def test_trainer_recomputes_only_checkpointed_layers(tmp_path, monkeypatch):
    """The real stack (4-bit tiny Llama, peft, Trainer): each checkpointed layer's MLP runs twice per
    micro-batch (forward + recompute), an uncheckpointed one once."""
    pytest.importorskip("bitsandbytes")
    from peft import get_peft_model
    from transformers import Trainer

    from planner.memory import resolve_targets
    from planner.train import harness, stack

    spec = load_model("tiny-llama")
    path = harness.model_path("tiny-llama", harness.profile_fields("tiny-llama"), "bf16", tmp_path, None)
    base = stack.load_4bit(path, "bf16", True)
    lora = LoraSettings(rank=4, alpha=8, dropout=0.0, targets=("attn",))
    model = get_peft_model(base, stack.lora_config(lora, resolve_targets(spec, lora.targets)))
    layers = stack.decoder_layers(model)
    assert len(layers) == spec.num_hidden_layers >= 2
    calls = [0] * len(layers)
    index = {id(layer.mlp): i for i, layer in enumerate(layers)}
    mlp_cls = type(layers[0].mlp)
    forward = mlp_cls.forward

    def counted(self, *args, **kwargs):  # module hooks do not fire in the recompute; the class method does
        calls[index[id(self)]] += 1
        return forward(self, *args, **kwargs)

    monkeypatch.setattr(mlp_cls, "forward", counted)
    train = TrainSettings(batch_size=2, grad_accum=1, seq_len=16, gradient_checkpointing=True,
                          optim="adamw_torch", uncheckpointed_layers=1)
    args = stack.training_arguments(str(tmp_path / "out"), train, max_steps=1, learning_rate=1e-4)
    ds = stack.FixedLengthDataset(2, 16, spec.vocab_size)
    Trainer(model=model, args=args, train_dataset=ds, callbacks=stack.checkpoint_callbacks(train)).train()
    assert calls[:-1] == [2] * (len(layers) - 1)
    assert calls[-1] == 1


def test_measured_speedups_and_memory_follow_the_model():
    """benchmarks/partial_ckpt_speed.py on the committed H200 sweeps (not in the fit): each layer left
    uncheckpointed is measured faster, and the predicted peak above the weights is within 2%."""
    import csv
    import sys
    from pathlib import Path

    root = Path(__file__).resolve().parents[1]
    sys.path.insert(0, str(root / "benchmarks"))
    import partial_ckpt_speed as bench

    rows = [r for p in sorted((root / "benchmarks" / "results").glob("partial-ckpt-h200-*.csv"))
            for r in csv.DictReader(open(p, newline=""))]
    tables = bench.summarize(rows, load_coefficients(), load_gpu("h200"))
    assert set(tables) == {"Mistral-7B-v0.1", "Llama-3.1-8B"}
    for table in tables.values():
        speedups = [float(row[2].rstrip("x")) for row in table]
        assert speedups == sorted(speedups) and speedups[0] == 1.0
        for row in table:
            measured, predicted = float(row[4]), float(row[5])
            assert abs(predicted - measured) / measured < 0.02
