"""The memory model's terms against first principles, the real bitsandbytes layers, and properties."""

from dataclasses import replace

import pytest
from hypothesis import example, given, settings
from hypothesis import strategies as st

from planner import memory
from planner.coefficients import load_coefficients
from planner.memory import (
    estimate,
    lora_tensor_numels,
    optimizer_state_bytes,
    quant_constants_bytes,
    quantized_weights_bytes,
    resolve_targets,
    unquantized_weights_bytes,
)
from planner.profiles import load_gpu, load_model
from planner.search import Request, search
from planner.specs import LoraSettings, MemoryBreakdown, TrainSettings

MISTRAL = load_model("mistral-7b")
COEFFS = load_coefficients()


@pytest.fixture
def no_rounding(monkeypatch):
    """Turn off the allocator's 512-byte rounding to compare with exact tensor sizes."""
    monkeypatch.setattr(memory, "ALLOC_GRANULE", 1)
    for f in (quantized_weights_bytes, quant_constants_bytes, memory.lora_params_bytes, memory.lora_grads_bytes,
              optimizer_state_bytes):
        f.cache_clear()
    yield
    for f in (quantized_weights_bytes, quant_constants_bytes, memory.lora_params_bytes, memory.lora_grads_bytes,
              optimizer_state_bytes):
        f.cache_clear()


def test_four_bit_is_half_a_byte_per_weight(no_rounding):
    assert quantized_weights_bytes(MISTRAL) == MISTRAL.quantized_param_count // 2


def test_quant_constants_first_principles(no_rounding):
    n = MISTRAL.quantized_param_count
    tensors = MISTRAL.num_hidden_layers * len(MISTRAL.layer_linears)
    # no double quant: one fp32 absmax per 64 weights (0.5 bit/param) + a 16-entry fp32 code per tensor
    assert quant_constants_bytes(MISTRAL, False) == 4 * n // 64 + tensors * 64
    # double quant: uint8 absmax per 64, fp32 absmax per 256 blocks, code + offset + the nested 256-entry
    # map per tensor, and the shared map (~0.127 bit/param)
    dq = quant_constants_bytes(MISTRAL, True)
    assert dq == n // 64 + 4 * n // (64 * 256) + tensors * (64 + 4 + 1024) + 1024
    assert 0.126 < dq * 8 / n < 0.128


def test_lora_bytes_first_principles(no_rounding):
    lora = LoraSettings(rank=8, targets=("attn",))
    numels = lora_tensor_numels(MISTRAL, lora, resolve_targets(MISTRAL, lora.targets))
    assert sum(numels) == 6_815_744
    assert memory.lora_params_bytes(numels) == 4 * 6_815_744  # fp32
    assert memory.lora_grads_bytes(numels) == 4 * 6_815_744
    assert optimizer_state_bytes(numels, "adamw_torch") == (8 * 6_815_744, 0)


def test_paged_and_8bit_optimizer_thresholds(no_rounding):
    small, large, tiny = 65_536, 229_376, 1_024  # r16 x 4096 stays on the allocator; r16 x 14336 is paged
    assert optimizer_state_bytes((small,), "paged_adamw_32bit") == (8 * small, 0)
    assert optimizer_state_bytes((large,), "paged_adamw_32bit") == (0, 8 * large)
    # 8-bit: 2 bytes/param + fp32 absmax per 256, fp32 below min_8bit_size (4096)
    assert optimizer_state_bytes((small,), "adamw_8bit") == (2 * small + 2 * 4 * small // 256, 0)
    assert optimizer_state_bytes((tiny,), "adamw_8bit") == (8 * tiny, 0)
    assert optimizer_state_bytes((large,), "paged_adamw_8bit") == (2 * 4 * large // 256, 2 * large)


def test_unquantized_are_fp32_after_prepare():
    assert unquantized_weights_bytes(MISTRAL) == 4 * (2 * 32000 * 4096 + 65 * 4096)


def test_static_terms_match_real_bitsandbytes_on_cpu(no_rounding, tmp_path):
    """Load the tiny model exactly as users do (from_pretrained + BitsAndBytesConfig + prepare_model_for_kbit_training)
    and count the bytes of every tensor it holds."""
    import torch

    from planner.profiles import PROFILES_DIR, _load_toml
    from planner.train import stack

    spec = load_model("tiny-llama")
    cfg = _load_toml(PROFILES_DIR / "models" / "tiny-llama.toml")["config"]
    for dq in (True, False):
        path = tmp_path / f"m{dq}"
        stack.save_random_model(stack.hf_config(cfg), str(path), torch.bfloat16)
        model = stack.load_4bit(str(path), "bf16", dq)
        packed = consts = unq = 0
        for p in model.parameters():
            if type(p).__name__ == "Params4bit":
                packed += p.untyped_storage().nbytes()
                qs = p.quant_state
                consts += qs.absmax.nbytes + qs.code.nbytes
                if qs.nested:
                    # the nested map: on the CPU one tensor is shared, on the GPU each weight holds a copy
                    consts += qs.state2.absmax.nbytes + qs.offset.nbytes + qs.state2.code.nbytes
            else:
                assert p.dtype == torch.float32
                unq += p.nbytes
        assert packed == quantized_weights_bytes(spec)
        assert consts + (1024 if dq else 0) == quant_constants_bytes(spec, dq)  # + the shared map
        assert unq == unquantized_weights_bytes(spec)


def test_plan_json_rows_add_up_to_its_totals():
    """What `qfit plan --json` promises a reader: the memory rows are int bytes that add up to the device
    total, the allocated rows to the peak allocated, and the peak fits inside what the plan needs."""
    from planner.documents import plan_document
    from planner.profiles import load_gpu
    from planner.reasons import explain
    from planner.search import Request

    doc = plan_document(explain(MISTRAL, load_gpu("t4"), Request(), COEFFS), MISTRAL, COEFFS)["memory"]
    rows = doc["components"]
    assert all(isinstance(v, int) and v >= 0 for v in rows.values())
    assert sum(rows.values()) == doc["device_used_bytes"]
    assert sum(rows[f] for f in MemoryBreakdown.ALLOCATED_FIELDS) == doc["peak_allocated_bytes"]
    assert doc["peak_allocated_bytes"] <= doc["peak_reserved_bytes"] <= doc["device_used_bytes"]
    assert doc["peak_allocated_bytes"] <= doc["required_bytes"] <= doc["needs_bytes"] <= doc["usable_bytes"]


def test_peak_is_the_max_over_phases():
    lora, train = LoraSettings(), TrainSettings(batch_size=2, seq_len=512, gradient_checkpointing=False)
    phases = memory.phases(MISTRAL, lora, train, COEFFS)
    b = estimate(MISTRAL, lora, train, COEFFS)
    assert b.peak_allocated_bytes == max(sum(p.values()) for p in phases.values())
    assert b.peak_phase in phases


def test_logits_dominate_llama3_without_checkpointing_pressure():
    """Llama-3's 128,256-entry vocabulary: the fp32 logits chain is the biggest activation term."""
    llama3 = load_model("llama-3.1-8b")
    b = estimate(llama3, LoraSettings(), TrainSettings(batch_size=8, seq_len=1024), COEFFS)
    assert b.logits > b.saved_activations


settings_ = dict(max_examples=40, deadline=None)
models = st.sampled_from(["mistral-7b", "llama-3.1-8b", "qwen2.5-1.5b", "gemma-2-2b", "phi-3-mini", "llama-2-13b"])
train_st = st.builds(TrainSettings, batch_size=st.integers(1, 32), seq_len=st.integers(16, 4096),
                     gradient_checkpointing=st.booleans(), optim=st.sampled_from(
                         ["adamw_torch", "adamw_8bit", "paged_adamw_32bit", "paged_adamw_8bit"]),
                     compute_dtype=st.sampled_from(["bf16", "fp16"]), double_quant=st.booleans(),
                     expandable_segments=st.booleans())
lora_st = st.builds(LoraSettings, rank=st.integers(1, 128), targets=st.sampled_from([("attn",), ("all-linear",)]),
                    dropout=st.sampled_from([0.0, 0.05]))


def _totals(b: MemoryBreakdown):
    # Not peak_allocated alone: with a paged optimizer a larger LoRA tensor (>= 1e5 elements) moves its
    # state from the allocator into managed memory, so torch's count can fall while the device total grows.
    return (b.device_used_bytes, b.needs_bytes)


@settings(**settings_)
@given(models, lora_st, train_st)
# found by hypothesis: a larger rank moved the peak from the loss to the last layer, and the slack with it
@example("qwen2.5-1.5b", LoraSettings(rank=94, targets=("all-linear",), dropout=0.0),
         TrainSettings(batch_size=1, seq_len=16, gradient_checkpointing=False, optim="adamw_8bit"))
# found by hypothesis: rank 17 -> 25 moves paged optimizer state off the allocator
@example("mistral-7b", LoraSettings(rank=17, targets=("attn",), dropout=0.0),
         TrainSettings(batch_size=1, seq_len=16, gradient_checkpointing=False, optim="paged_adamw_32bit"))
def test_memory_never_falls_when_batch_seq_or_rank_grow(name, lora, train):
    m = load_model(name)
    base = _totals(estimate(m, lora, train, COEFFS))
    for bigger_train, bigger_lora in ((replace(train, batch_size=train.batch_size + 1), lora),
                                      (replace(train, seq_len=train.seq_len + 64), lora),
                                      (train, replace(lora, rank=lora.rank + 8))):
        grown = _totals(estimate(m, bigger_lora, bigger_train, COEFFS))
        assert all(g >= b for g, b in zip(grown, base))


@settings(**settings_)
@given(models, lora_st, train_st)
def test_checkpointing_never_raises_memory(name, lora, train):
    m = load_model(name)
    off = estimate(m, lora, replace(train, gradient_checkpointing=False), COEFFS)
    on = estimate(m, lora, replace(train, gradient_checkpointing=True), COEFFS)
    assert on.peak_allocated_bytes <= off.peak_allocated_bytes
    assert on.needs_bytes <= off.needs_bytes


@settings(max_examples=15, deadline=None)
@given(models, st.sampled_from([256, 512, 1024]), st.sampled_from(["t4", "l4", "rtx4090", "a100-40gb"]))
def test_a_bigger_gpu_never_has_fewer_fitting_plans(name, seq, gpu_name):
    m, small = load_model(name), load_gpu(gpu_name)
    big = replace(small, memory_bytes=small.memory_bytes * 2)
    req = Request(seq_len=seq)
    assert len(search(m, big, req, COEFFS).fitting) >= len(search(m, small, req, COEFFS).fitting)


# --------------------------------------------------------------------------- Gemma-2's attention, by transformers version

@pytest.mark.parametrize("version,attn", [("5.17.0", "sdpa"), ("5.20.3", "sdpa"), ("5.21.0", "eager"),
                                          ("5.21.0.dev0", "eager"), ("5.25.0", "eager"), (None, "eager")])
def test_gemma2_attention_follows_the_transformers_version(version, attn):
    """modeling_gemma2.py: `_supports_sdpa = True` up to 5.20.x, `False  # sdpa does not support softcapping` from
    5.21.0 (planner.architectures.SOFTCAPPING_EAGER_FROM); None (transformers not installed): the newest behaviour.
    Families without the gate keep their profile's attention whatever the version."""
    from planner.architectures import default_attn_implementation

    assert load_model("gemma-2-2b", transformers_version=version).attn_implementation == attn
    assert default_attn_implementation("gemma2", version) == attn
    assert load_model("mistral-7b", transformers_version="5.17.0").attn_implementation == "sdpa"
    assert load_model("mistral-7b", transformers_version="5.25.0") == MISTRAL


def test_gemma2_under_transformers_5_17_saves_no_eager_scores():
    """calibration/heldout's gemma-2-2b b2 s512 ckpt0 ran on transformers 5.17.0 (sdpa): without checkpointing each layer
    keeps, per token, eager's q with the repeated k and v (4 x q_dim compute-dtype values) and per-head rows of scores
    (fp32 softmax, its bf16 cast, the bf16 tanh of softcapping: 8 B x heads x seq) instead of sdpa's q, k, v, output
    (2 x q_dim + 2 x kv_dim) and fp32 logsumexp per head (4 B x heads). 26 layers x 1,024 tokens x 36,832 B = 0.91 GiB."""
    old, new = (load_model("gemma-2-2b", transformers_version=v) for v in ("5.17.0", "5.25.0"))
    assert (old.attn_implementation, new.attn_implementation) == ("sdpa", "eager")
    lora, train = LoraSettings(rank=16, targets=("attn",)), TrainSettings(batch_size=2, grad_accum=2, seq_len=512,
                                                                        gradient_checkpointing=False)
    per_token_layer = 2 * 2 * (new.q_dim - new.kv_dim) + 8 * new.num_attention_heads * 512 - 4 * new.num_attention_heads
    assert per_token_layer == 36_832
    expected = new.num_hidden_layers * 2 * 512 * per_token_layer * COEFFS.get("act_scale")
    a, b = estimate(old, lora, train, COEFFS), estimate(new, lora, train, COEFFS)
    assert b.saved_activations - a.saved_activations == pytest.approx(expected, abs=new.num_hidden_layers)
    assert a.peak_phase == b.peak_phase == "backward, at the loss"  # so the peak moves by the saved set alone
    assert b.peak_allocated_bytes - a.peak_allocated_bytes == pytest.approx(expected, abs=new.num_hidden_layers)
    # with checkpointing only the recomputed layer differs: the saved layer inputs are the same
    ckpt = replace(train, gradient_checkpointing=True)
    assert estimate(old, lora, ckpt, COEFFS).saved_activations == estimate(new, lora, ckpt, COEFFS).saved_activations


def test_measured_rows_use_their_own_transformers_version():
    """planner.fit.row_model: a calibration row is predicted with the transformers it ran on, not the installed one."""
    from planner.fit import row_model

    assert row_model({"model": "gemma-2-2b", "transformers": "5.17.0"}).attn_implementation == "sdpa"
    assert row_model({"model": "gemma-2-2b", "transformers": "5.24.0"}).attn_implementation == "eager"
    assert row_model({"model": "gemma-2-2b", "transformers": float("nan")}) == load_model("gemma-2-2b")  # installed
    assert row_model({"model": "gemma-2-2b"}) == load_model("gemma-2-2b")


@pytest.mark.parametrize("installed,attn", [("5.17.0", "sdpa"), ("5.25.0", "eager"), (None, "eager")])
def test_plan_uses_the_installed_transformers(monkeypatch, installed, attn):
    """Without a version load_model (so `qfit plan`) asks the installed transformers' package metadata; none installed:
    the newest behaviour."""
    import planner.profiles

    monkeypatch.setattr(planner.profiles, "installed_transformers_version", lambda: installed)
    assert load_model("gemma-2-2b").attn_implementation == attn


def test_installed_transformers_version_is_read_without_importing_it():
    from importlib import metadata

    from planner.architectures import installed_transformers_version

    assert installed_transformers_version() == metadata.version("transformers")
