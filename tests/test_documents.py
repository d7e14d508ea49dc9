"""Every --json document has exactly the keys planner.documents declares (not a superset), through the CLI."""

from __future__ import annotations

import json

import pytest
from click.testing import CliRunner

from planner import documents as D
from planner.cli import cli
from planner.codec import SETTINGS_KEYS


def _json(*args: str, code: int | None = None):
    res = CliRunner().invoke(cli, list(args))
    if code is not None:
        assert res.exit_code == code, res.output
    return json.loads(res.stdout)


def _plan_keys_ok(doc: dict) -> None:
    assert tuple(doc) == D.PLAN_KEYS
    assert tuple(doc["settings"]) == SETTINGS_KEYS
    assert tuple(doc["params"]) == D.PARAMS_KEYS
    assert tuple(doc["memory"]) == D.MEMORY_KEYS
    assert tuple(doc["memory"]["components"]) == D.COMPONENT_KEYS
    for alt in doc["alternatives"]:
        assert tuple(alt) == D.ALTERNATIVE_KEYS
        assert tuple(alt["settings"]) == SETTINGS_KEYS


def test_plan_document_keys_when_it_fits():
    doc = _json("plan", "mistral-7b", "--gpu", "t4", "--json", code=0)
    _plan_keys_ok(doc)
    assert doc["fits"] and doc["alternatives"] and doc["advice"] is None


def test_plan_json_has_the_reasons_the_text_shows():
    doc = _json("plan", "mistral-7b", "--gpu", "t4", "--json", code=0)
    text = CliRunner().invoke(cli, ["plan", "mistral-7b", "--gpu", "t4"]).output
    assert doc["reasons"], "a fitting plan says why"
    for reason in doc["reasons"]:
        assert reason in text


def test_plan_document_keys_when_nothing_fits():
    doc = _json("plan", "llama-3.1-70b", "--gpu", "rtx4090", "--json", code=1)
    _plan_keys_ok(doc)
    assert not doc["fits"] and doc["alternatives"] == [] and doc["reasons"] == []
    assert tuple(doc["advice"]) == D.ADVICE_KEYS
    text = CliRunner().invoke(cli, ["plan", "llama-3.1-70b", "--gpu", "rtx4090"]).output
    # the text's advice lines come from the same data
    assert f"({doc['advice']['larger_gpu']})" in text
    assert f"fits on {doc['advice']['num_gpus']} x" in text and doc["advice"]["cpu_offload"] is True


def test_no_fit_advice_names_the_fewest_gpus_in_json_and_text():
    doc = _json("plan", "qwen2.5-14b", "--gpu", "rtx4090", "--seq-len", "4096", "--json", code=1)
    advice = doc["advice"]
    assert (advice["num_gpus"], advice["strategy"], advice["cpu_offload"]) == (2, "fsdp", False)
    text = CliRunner().invoke(cli, ["plan", "qwen2.5-14b", "--gpu", "rtx4090", "--seq-len", "4096"]).output
    assert "--num-gpus 2" in text


@pytest.mark.parametrize("model,gpu,n,strategy", [("mistral-7b", "rtx4090", 2, "ddp"),
                                                  ("qwen2.5-14b", "rtx4090", 2, "fsdp"),
                                                  ("llama-3.1-70b", "rtx4090", 2, "fsdp")])
def test_multi_plan_document_keys(model, gpu, n, strategy):
    doc = _json("plan", model, "--gpu", gpu, "--num-gpus", str(n), "--seq-len", "4096", "--json")
    assert tuple(doc) == D.MULTI_PLAN_KEYS
    assert doc["strategy"] == strategy
    assert tuple(doc["settings"]) == SETTINGS_KEYS
    assert tuple(doc["params"]) == D.PARAMS_KEYS
    assert tuple(doc["per_gpu"]) == D.per_gpu_keys(strategy)
    for alt in doc["alternatives"]:
        assert tuple(alt) == D.MULTI_ALTERNATIVE_KEYS
    if doc["fits"]:
        assert doc["advice"] is None and doc["reasons"]
    else:
        assert tuple(doc["advice"]) == D.ADVICE_KEYS and doc["reasons"] == []


def test_compare_document_keys():
    docs = _json("compare", "llama-3.1-70b", "--tokens", "2M", "--json")
    assert docs and any(d["fits"] for d in docs) and any(not d["fits"] for d in docs)
    for d in docs:
        assert tuple(d) == D.COMPARE_OPTION_KEYS
        if d["fits"]:
            assert tuple(d["settings"]) == SETTINGS_KEYS and d["smallest"] is None and d["multi_gpu"] is None
        else:
            assert d["settings"] is None
            assert tuple(d["smallest"]) == D.COMPARE_SMALLEST_KEYS
            assert tuple(d["smallest"]["settings"]) == SETTINGS_KEYS
            if d["multi_gpu"] is not None:
                assert tuple(d["multi_gpu"]) == D.COMPARE_MULTI_GPU_KEYS


@pytest.mark.parametrize("args", [("plan", "mistrl-7b", "--gpu", "t4", "--json"),
                                  ("plan", "mistral-7b", "--gpu", "t4", "--bogus", "--json"),
                                  ("compare", "mistral-7b", "--json"),
                                  ("plan", "mistral-7b", "--gpu", "t4", "--num-gpus", "0", "--json")])
def test_error_document_keys(args):
    doc = _json(*args, code=2)
    assert tuple(doc) == D.ERROR_KEYS and doc["error"]


def test_catalog_document_keys():
    models = _json("models", "--json", code=0)
    gpus = _json("gpus", "--json", code=0)
    assert models and gpus
    assert all(tuple(m) == D.MODEL_ENTRY_KEYS for m in models)
    assert all(tuple(g) == D.GPU_ENTRY_KEYS for g in gpus)


def test_exact_document_keys():
    """exact_document over a stand-in ExactResult (the traced one is checked in tests/test_exact.py)."""
    from planner.coefficients import load_coefficients
    from planner.memory import estimate
    from planner.profiles import load_model
    from planner.specs import LoraSettings, TrainSettings

    class Traced:
        model, peak_allocated_bytes, simulated_reserved_bytes, simulated_required_bytes = "m", 10, 0, 0
        expandable_segments, paged_optimizer_bytes, tensor_peak_bytes = True, 0, 9
        peak_phase, peak_op, categories, static, phase_peaks = "backward", "mm", {}, {}, {}
        layers_traced, num_hidden_layers, extrapolated = (0, 1), 2, True
        attn_implementation, optimizer, device, trace_seconds, notes = "sdpa", "adamw_torch", "h200", 0.1, ()

        def as_fields(self):
            return {"logits": 5}

    breakdown = estimate(load_model("qwen2.5-0.5b"), LoraSettings(), TrainSettings(batch_size=1, seq_len=64),
                         load_coefficients())
    doc = D.exact_document(Traced(), breakdown)
    assert tuple(doc) == D.EXACT_KEYS
    assert tuple(doc["fields"]) == D.EXACT_FIELD_NAMES
    assert all(tuple(v) == D.EXACT_FIELD_KEYS for v in doc["fields"].values())
    assert doc["fields"]["logits"]["traced_bytes"] == 5


def test_calibrate_document_keys(tmp_path, monkeypatch):
    from planner import refit

    monkeypatch.setattr(refit, "refit_and_report", lambda paths, out, report: "fitted N runs")
    doc = _json("calibrate", "--refit", "--out", str(tmp_path / "c.json"), "--report", str(tmp_path / "r.md"),
                "--json", code=0)
    assert tuple(doc) == D.CALIBRATE_KEYS and doc["action"] in D.CALIBRATE_ACTIONS
    assert doc["coefficients_file"] == str(tmp_path / "c.json") and doc["runs"] and doc["summary"] == "fitted N runs"


def test_profile_document_keys(tmp_path):
    pytest.importorskip("transformers")
    from planner.profiles import PROFILES_DIR, _load_toml

    cfg = tmp_path / "config.json"
    cfg.write_text(json.dumps(_load_toml(PROFILES_DIR / "models" / "llama-3.2-1b.toml")["config"]))
    doc = _json("profile", str(cfg), "--name", "mine", "--json", code=0)
    assert tuple(doc) == D.PROFILE_KEYS and doc["name"] == "mine" and doc["out"] is None
    assert doc["config"]["hidden_size"] == 2048 and doc["inventory"]["layer_linears"]
