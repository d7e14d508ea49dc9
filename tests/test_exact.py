"""Exact mode (planner/exact.py, planner/train/exact.py): a real QLoRA step traced on fake tensors.

(a) every shipped profile, cut to 2 decoder layers: the traced static terms against planner.memory's
    (to the byte, with its 512-byte rounding), and the traced peak against estimate() within
    PEAK_TOLERANCE, checkpointing on and off;
(b) the 2-and-3-layer extrapolation against a full-depth trace;
(c) what a user can get wrong raises a one-line ValueError;
plus two measured H200 runs (calibration/runs) and the rendering for `qfit plan --exact`.
Runtime on a 2-core CPU: about a minute.
"""

import dataclasses
import json
import subprocess
import sys
from pathlib import Path

import pytest

pytest.importorskip("torch")
pytest.importorskip("bitsandbytes")
pytest.importorskip("peft")

from planner.coefficients import load_coefficients  # noqa: E402
from planner.exact import STATIC_CATEGORIES, resolve, static_bytes, trace_step  # noqa: E402
from planner.memory import (  # noqa: E402
    estimate,
    lora_params_bytes,
    lora_tensor_numels,
    quant_constants_bytes,
    quantized_weights_bytes,
    resolve_targets,
    unquantized_weights_bytes,
)
from planner.profiles import PROFILES_DIR, load_model  # noqa: E402
from planner.report_exact import exact_json, exact_section  # noqa: E402
from planner.specs import LoraSettings, TrainSettings  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent
PROFILE_PATHS = sorted((PROFILES_DIR / "models").rglob("*.toml"))
COEFFS = load_coefficients()
LORA = LoraSettings(rank=8, alpha=16, dropout=0.05, targets=("all-linear",))
SMALL = TrainSettings(batch_size=1, grad_accum=2, seq_len=64, optim="adamw_torch")
# Observed on these 2-layer, 64-token specs (transformers 5.24, torch 2.13, peft 0.21.2, bitsandbytes 0.50.2):
# traced (without the 64 MiB of cuBLAS workspaces, which the analytic model has no term for) minus
# estimate() is within +-1% for the real architectures (gemma-2 -0.84%); tiny-llama (intermediate 384) at
# -1.6% with checkpointing, where fixed-size kernel buffers weigh most.
PEAK_TOLERANCE = 0.02
# transformers 5 runs Mixtral's experts through torch grouped_mm; after prepare_model_for_kbit_training they
# are fp32, and torch's meta kernel for aten._grouped_mm accepts only bf16, so the fake step stops there.
UNTRACEABLE = {"mixtral-8x7b": "aten._grouped_mm's fake kernel accepts only bf16; the k-bit-prep fp32 experts fail"}


def _two_layers(name: str):
    return dataclasses.replace(load_model(name), num_hidden_layers=2)


def _params(ckpt_values=(False, True)):
    out = []
    for path in PROFILE_PATHS:
        for ckpt in ckpt_values:
            marks = ()
            if path.stem in UNTRACEABLE:
                marks = pytest.mark.xfail(reason=UNTRACEABLE[path.stem], raises=ValueError, strict=True)
            out.append(pytest.param(path.stem, ckpt, marks=marks, id=f"{path.stem}-ckpt{int(ckpt)}"))
    return out


def test_profiles_are_all_found():
    assert len(PROFILE_PATHS) >= 20


# --------------------------------------------------------------------------- (a) static terms

@pytest.mark.parametrize("name", [p.stem for p in PROFILE_PATHS])
@pytest.mark.parametrize("double_quant", [False, True], ids=["dq0", "dq1"])
def test_static_terms_match_the_memory_model(name, double_quant):
    spec = _two_layers(name)
    train = dataclasses.replace(SMALL, double_quant=double_quant)
    traced = static_bytes(spec, LORA, train)
    numels = lora_tensor_numels(spec, LORA, resolve_targets(spec, LORA.targets))
    assert set(traced) <= set(STATIC_CATEGORIES)
    assert traced["quantized_weights"] == quantized_weights_bytes(spec)
    assert traced["unquantized_weights"] == unquantized_weights_bytes(spec)
    assert traced["lora_params"] == lora_params_bytes(numels)
    # with double quant this includes each weight's copy of the 256-entry map and the shared map
    # (functional.quantize_blockwise); H200 after-load bytes agree (llama-2-7b: 224 x 1024 + 1024 more
    # than the bare formula, plus 1024 of rotary buffers, traced under "buffers")
    assert traced["quant_constants"] == quant_constants_bytes(spec, double_quant)


# --------------------------------------------------------------------------- (a) peak vs estimate()

@pytest.mark.parametrize("name,ckpt", _params())
def test_peak_matches_the_memory_model_at_two_layers(name, ckpt):
    spec = _two_layers(name)
    train = dataclasses.replace(SMALL, gradient_checkpointing=ckpt)
    res = trace_step(spec, LORA, train)
    assert res.layers_traced == (2,) and not res.extrapolated
    analytic = estimate(spec, LORA, train, COEFFS).peak_allocated_bytes
    err = (res.tensor_peak_bytes - analytic) / analytic
    assert abs(err) <= PEAK_TOLERANCE, f"{name}: traced {res.tensor_peak_bytes:,} vs analytic {analytic:,} ({err:+.2%})"
    # the workspaces are the only difference between the two peaks; everything else is a traced tensor
    assert res.peak_allocated_bytes - res.tensor_peak_bytes == 2 * 32 * 2**20
    assert all(isinstance(v, int) and v >= 0 for v in res.categories.values())
    assert sum(res.categories.values()) == res.peak_allocated_bytes
    assert res.peak_phase.startswith("step 2")  # the second optimizer step holds the optimizer state


# --------------------------------------------------------------------------- (b) extrapolation

@pytest.mark.parametrize("ckpt", [False, True], ids=["ckpt0", "ckpt1"])
def test_extrapolation_matches_a_full_depth_trace(ckpt):
    """Llama-3.2-1B, 16 layers: 2- and 3-layer traces extrapolated per phase == one 16-layer trace, to the byte."""
    train = dataclasses.replace(SMALL, gradient_checkpointing=ckpt, grad_accum=1)
    ex = trace_step("llama-3.2-1b", LORA, train)
    assert ex.extrapolated and ex.layers_traced == (2, 3)
    full = trace_step("llama-3.2-1b", LORA, train, layers=16)
    assert ex.peak_phase == full.peak_phase
    assert ex.peak_allocated_bytes == full.peak_allocated_bytes
    assert ex.categories == full.categories
    assert ex.static == full.static
    # fragmentation does not extrapolate: only the whole-depth trace is replayed through the allocator
    assert ex.simulated_reserved_bytes == 0 and full.simulated_reserved_bytes >= full.peak_allocated_bytes


# --------------------------------------------------------------------------- measured H200 runs

# calibration/runs/h200-a-expandable.csv, rows "mistral-7b|bf16|dq1|b1x2|s256|ckpt0|r8|attn|adamw_torch|...cap0"
# and "...|dq1|b4x2|s1024|ckpt1|r16|all-linear|paged_adamw_32bit|...cap0": peak_allocated_bytes minus the
# process offset (after_load_allocated_bytes - the true static weights; the cuBLAS workspaces were already
# in after_load there, so they are compared without). benchmarks/bench_exact.py runs all 31 such rows.
H200_ROWS = [
    (TrainSettings(batch_size=1, grad_accum=2, seq_len=256, gradient_checkpointing=False, optim="adamw_torch"),
     LoraSettings(rank=8, alpha=16, targets=("attn",)), 7447512576 - (4717627392 - 4650518528)),
    (TrainSettings(batch_size=4, grad_accum=2, seq_len=1024, gradient_checkpointing=True, optim="paged_adamw_32bit"),
     LoraSettings(rank=16, alpha=32, targets=("all-linear",)), 9403693568 - (4717627392 - 4650518528)),
]


@pytest.mark.parametrize("train,lora,measured", H200_ROWS, ids=["ckpt0", "ckpt1"])
def test_traced_peak_matches_h200_measurements(train, lora, measured):
    res = trace_step("mistral-7b", lora, train)
    assert abs(res.tensor_peak_bytes - measured) <= 0.001 * measured  # observed: within 35 KB of ~7-9 GB


def test_true_static_weights_of_the_h200_model():
    """The 4,650,518,528 B used above: Mistral-7B, double quant, as loaded (no LoRA)."""
    traced = static_bytes("mistral-7b", LoraSettings(), SMALL)
    assert sum(v for k, v in traced.items() if k != "lora_params") == 4650518528


# --------------------------------------------------------------------------- (c) bad input

def test_unknown_architecture_is_a_one_line_error():
    with pytest.raises(ValueError, match="does not know model_type 'not-a-model'") as exc:
        trace_step({"model_type": "not-a-model", "hidden_size": 64, "intermediate_size": 128, "num_hidden_layers": 2,
                    "num_attention_heads": 4, "vocab_size": 100}, LORA, SMALL)
    assert "\n" not in str(exc.value)


def test_remote_code_is_refused(tmp_path):
    cfg = {"model_type": "llama", "auto_map": {"AutoModelForCausalLM": "modeling_x.XForCausalLM"}, "hidden_size": 64,
           "intermediate_size": 128, "num_hidden_layers": 2, "num_attention_heads": 4, "vocab_size": 100}
    path = tmp_path / "config.json"
    path.write_text(json.dumps(cfg))
    with pytest.raises(ValueError, match="trust_remote_code") as exc:
        trace_step(str(path), LORA, SMALL)
    assert "\n" not in str(exc.value)


@pytest.mark.parametrize("missing", ["hidden_size", "vocab_size", "num_hidden_layers"])
def test_missing_config_field_is_named(tmp_path, missing):
    cfg = {"model_type": "llama", "hidden_size": 64, "intermediate_size": 128, "num_hidden_layers": 2,
           "num_attention_heads": 4, "vocab_size": 100, "max_position_embeddings": 128}
    del cfg[missing]
    path = tmp_path / "config.json"
    path.write_text(json.dumps(cfg))
    with pytest.raises(ValueError, match=f"missing field '{missing}'") as exc:
        trace_step(str(path), LORA, SMALL)
    assert "\n" not in str(exc.value)


def test_unknown_name_and_bad_targets():
    with pytest.raises(ValueError, match="unknown model"):
        trace_step("no-such-model", LORA, SMALL)
    with pytest.raises(ValueError, match="no linear named 'qkv'"):
        trace_step("tiny-llama", LoraSettings(targets=("qkv",)), SMALL)


def test_a_config_json_of_an_unshipped_architecture_traces(tmp_path):
    """A config.json transformers knows and qfit ships no profile for (Qwen3) is built from transformers."""
    cfg = {"model_type": "qwen3", "hidden_size": 128, "intermediate_size": 256, "num_hidden_layers": 2,
           "num_attention_heads": 4, "num_key_value_heads": 2, "head_dim": 32, "vocab_size": 512,
           "max_position_embeddings": 256}
    path = tmp_path / "config.json"
    path.write_text(json.dumps(cfg))
    spec, fields = resolve(str(path))
    assert spec.model_type == "qwen3" and fields["num_hidden_layers"] == 2
    res = trace_step(str(path), LORA, SMALL)
    assert res.peak_allocated_bytes > res.static["quantized_weights"] > 0


# --------------------------------------------------------------------------- rendering

@pytest.fixture(scope="module")
def tiny():
    spec = load_model("tiny-llama")
    breakdown = estimate(spec, LORA, SMALL, COEFFS)
    return spec, breakdown, trace_step(spec, LORA, SMALL)


def test_exact_json_numbers(tiny):
    spec, breakdown, res = tiny
    doc = exact_json(spec, LORA, SMALL, breakdown, result=res)
    assert doc["peak_allocated_bytes"] == res.peak_allocated_bytes
    assert doc["analytic_peak_allocated_bytes"] == breakdown.peak_allocated_bytes
    assert sum(v["traced_bytes"] for v in doc["fields"].values()) == res.peak_allocated_bytes
    assert all(isinstance(v, int) for v in doc["categories"].values())
    # a whole-depth trace: reserved is the allocator simulated over it; device use adds context and paged state
    assert res.simulated_reserved_bytes >= res.peak_allocated_bytes
    assert doc["peak_reserved_bytes"] == res.simulated_reserved_bytes
    assert doc["reserved_source"] == "allocator simulation"
    assert doc["device_used_bytes"] == doc["peak_reserved_bytes"] + breakdown.cuda_context + res.paged_optimizer_bytes
    # an extrapolated trace has no simulation: traced allocated + the fitted allocator slack
    ex = exact_json(spec, LORA, SMALL, breakdown, result=dataclasses.replace(res, simulated_reserved_bytes=0))
    assert ex["peak_reserved_bytes"] == res.peak_allocated_bytes + breakdown.allocator_reserve
    assert ex["reserved_source"].startswith("traced allocated")
    json.dumps(doc)


def test_exact_section_text(tiny):
    spec, breakdown, res = tiny
    text = exact_section(spec, LORA, SMALL, breakdown, result=res)
    assert "traced GiB" in text and "analytic GiB" in text and "peak allocated" in text
    assert "peak reserved (allocator simulated)" in text and "planner/allocsim.py" in text
    assert " GB" not in text
    assert res.peak_phase in text


def test_light_modules_import_no_heavy_library():
    code = ("import sys; import planner.exact, planner.report_exact; "
            "print([m for m in ('torch', 'transformers', 'peft', 'bitsandbytes') if m in sys.modules])")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True, cwd=ROOT)
    assert out.stdout.strip() == "[]"
