"""`qfit compare`: the numbers (planner.compare) separately from the text (planner.cli_compare).

Numbers: fits equals planner.search's verdict, hours = tokens / tokens_per_s / 3600, cost = hours x
price, the Pareto set on a constructed set and on real rows, --price, sorting, --max-hours and
--max-cost, the FSDP GPU count (Llama-3.1-70B: no count of RTX 4090s; Qwen2.5-14B at seq 4096: two). Text: the table lists every catalog
GPU, the --json schema, one-line errors with exit code 2, --dataset, --plot and the fit map PNGs.
"""

from __future__ import annotations

import json
import subprocess
import sys
from dataclasses import replace

import pytest
from click.testing import CliRunner
from hypothesis import given
from hypothesis import strategies as st

from planner.cli_compare import compare_cmd, parse_count
from planner.codec import SETTINGS_KEYS as CODEC_SETTINGS_KEYS
from planner.coefficients import load_coefficients
from planner.compare import (
    SPEED_CALIBRATED,
    SPEED_DATASHEET,
    Workload,
    approx_tokens,
    compare,
    pareto_flags,
    record_chars,
    search_all,
    speed_calibrated_on,
    workload_from_records,
)
from planner.documents import COMPARE_MULTI_GPU_KEYS
from planner.fitmap import FIT_MAP_BATCHES, FIT_MAP_SEQ_LENS, fit_map, fit_map_png
from planner.memory import quant_constants_bytes, quantized_weights_bytes
from planner.multigpu import RANK0_CPU_MEASURED, fsdp_per_gpu
from planner.profiles import all_gpus, gpu_names, load_gpu, load_model
from planner.report import gib_str
from planner.report_compare import reason_str
from planner.search import Request, search
from planner.specs import Coefficients, LoraSettings, TrainSettings

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
WORKLOAD = Workload.from_examples(5000, 350, 3)  # 5,250,000 tokens: the brief's example
SETTINGS_KEYS = set(CODEC_SETTINGS_KEYS)  # `qfit plan --json`'s shape


@pytest.fixture(scope="module")
def coeffs() -> Coefficients:
    return load_coefficients()


@pytest.fixture(scope="module")
def gpus():
    gs = all_gpus()
    assert len(gs) >= 15, "the catalog should hold at least 15 GPUs"
    return gs


@pytest.fixture(scope="module")
def mistral_cmp(coeffs, gpus):
    return compare(load_model("mistral-7b"), WORKLOAD, gpus, coeffs)


@pytest.fixture(scope="module")
def llama70_cmp(coeffs, gpus):
    return compare(load_model("llama-3.1-70b"), WORKLOAD, gpus, coeffs)


def _points(cmp):
    return [(o.hours, o.cost_usd) for o in cmp.fitting if o.hours is not None and o.cost_usd is not None]


# =========================================================================== numbers

def test_workload_totals():
    assert WORKLOAD.total_tokens == 5000 * 350 * 3 == 5_250_000
    assert Workload.from_tokens(2_000_000, epochs=2.5).total_tokens == 5_000_000
    assert Workload.from_examples(3, 100.5).tokens_per_epoch == 302  # round(301.5): banker's rounding to even
    for bad in (lambda: Workload.from_examples(0, 350), lambda: Workload.from_examples(10, 0),
                lambda: Workload.from_tokens(0), lambda: Workload.from_tokens(-5),
                lambda: Workload.from_tokens(100, epochs=0)):
        with pytest.raises(ValueError):
            bad()


def test_dataset_token_approximation():
    assert approx_tokens(0) == 0 and approx_tokens(1) == 1 and approx_tokens(8) == 2 and approx_tokens(9) == 3
    chat = {"messages": [{"role": "user", "content": "abcd" * 10}, {"role": "assistant", "content": "xy"}],
            "id": 17, "score": 0.5, "ok": True, "none": None}
    assert record_chars(chat) == len("user") + 40 + len("assistant") + 2  # numbers, bools, nulls are not text
    wl = workload_from_records([{"text": "a" * 400}, {"text": "b" * 40}], epochs=2)
    assert (wl.examples, wl.tokens_per_epoch, wl.total_tokens, wl.approximate) == (2, 110, 220, True)
    with pytest.raises(ValueError):
        workload_from_records([])


@pytest.mark.parametrize("model_name", ["mistral-7b", "llama-3.1-70b", "qwen2.5-0.5b", "gemma-2-9b"])
def test_search_all_is_planner_search(model_name, coeffs, gpus):
    """search_all shares memory estimates between GPUs; its plans must be search()'s, in order."""
    model = load_model(model_name)
    for req in (Request(), Request(seq_len=2048)):
        shared = search_all(model, gpus, req, coeffs)
        for gpu in gpus:
            ref = search(model, gpu, req, coeffs)
            assert shared[gpu.name].plans == ref.plans, gpu.name
            assert shared[gpu.name].best == ref.best, gpu.name
            assert shared[gpu.name].notes == ref.notes, gpu.name


def test_fits_and_best_plan_match_search(mistral_cmp, llama70_cmp, coeffs):
    for cmp in (mistral_cmp, llama70_cmp):
        assert {o.gpu.name for o in cmp.options + cmp.excluded} == set(gpu_names())
        for o in cmp.options:
            ref = search(cmp.model, o.gpu, Request(), coeffs)
            assert o.fits == (ref.best is not None), o.gpu.name
            assert o.plan == ref.best
            if o.fits:
                assert o.plan.memory.needs_bytes <= o.plan.capacity_bytes
            else:
                assert o.smallest.memory.needs_bytes > o.smallest.capacity_bytes
    assert all(o.fits for o in mistral_cmp.options)  # a 7B model fits every catalog GPU
    llama = {o.gpu.name: o for o in llama70_cmp.options}
    assert not llama["rtx4090"].fits and llama["h200"].fits


def test_hours_and_cost_formulas(mistral_cmp):
    tokens = WORKLOAD.total_tokens
    for o in mistral_cmp.fitting:
        assert o.tokens_per_s > 0
        assert o.hours == pytest.approx(tokens / o.tokens_per_s / 3600, rel=1e-12)
        assert o.price_usd_per_hour == o.gpu.price_usd_per_hour
        assert o.cost_usd == pytest.approx(o.hours * o.price_usd_per_hour, rel=1e-12)


def test_speed_basis_and_error_band(mistral_cmp, coeffs, gpus):
    basis = {o.gpu.name: o.speed_basis for o in mistral_cmp.options}
    on = speed_calibrated_on(coeffs)
    assert on == ("h100-sxm",)  # the GPU kind of calibration/speed/h100-speed-b.csv, named by the refit
    assert basis["h100-sxm"] == SPEED_CALIBRATED
    assert all(b == SPEED_DATASHEET for name, b in basis.items() if name not in on)
    # the cross-validated speed error widens every fitting GPU's hours into a band around the estimate
    assert mistral_cmp.speed_error_pct > 0
    for o in mistral_cmp.fitting:
        lo, hi = o.hours_range
        assert lo < o.hours < hi
    without = Coefficients(name="x", description="x",
                           values={k: v for k, v in coeffs.values.items() if k != "speed_cv_error_pct"})
    cmp = compare(load_model("mistral-7b"), WORKLOAD, [load_gpu("h200")], without)
    assert cmp.speed_error_pct is None and cmp.options[0].hours_range is None
    with_err = Coefficients(name="x", description="x", values={**coeffs.values, "speed_cv_error_pct": 20.0})
    o = compare(load_model("mistral-7b"), WORKLOAD, [load_gpu("h200")], with_err).options[0]
    lo, hi = o.hours_range
    assert lo == pytest.approx(o.hours / 1.2) and hi == pytest.approx(o.hours / 0.8)


def test_pareto_on_a_constructed_set():
    pts = [(1.0, 10.0), (2.0, 5.0), (3.0, 5.0), (4.0, 1.0), (2.0, 6.0), (1.0, 10.0), (5.0, 1.0), (0.5, 20.0)]
    # (3,5) is beaten by (2,5); (2,6) by (2,5); (5,1) by (4,1); the duplicate (1,10) pair stays on the front
    assert pareto_flags(pts) == [True, True, False, True, False, True, False, True]
    assert pareto_flags([]) == []
    assert pareto_flags([(1.0, 1.0)]) == [True]


@given(st.lists(st.tuples(st.integers(0, 20), st.integers(0, 20)), max_size=25))
def test_pareto_property(raw):
    pts = [(float(h), float(c)) for h, c in raw]
    flags = pareto_flags(pts)

    def dominates(a, b):
        return a[0] <= b[0] and a[1] <= b[1] and a != b

    front = [p for p, f in zip(pts, flags) if f]
    for p, f in zip(pts, flags):
        if f:
            assert not any(dominates(q, p) for q in pts)
        else:
            assert any(dominates(q, p) for q in front)


def test_pareto_rows_of_a_comparison(mistral_cmp):
    rows = [o for o in mistral_cmp.fitting]
    for o in rows:
        beaten = any(q.hours <= o.hours and q.cost_usd <= o.cost_usd and (q.hours < o.hours or q.cost_usd < o.cost_usd)
                     for q in rows if q is not o)
        assert o.pareto == (not beaten), o.gpu.name
    fastest = min(rows, key=lambda o: o.hours)
    cheapest = min(rows, key=lambda o: o.cost_usd)
    assert fastest.pareto and cheapest.pareto


def test_price_override(coeffs, gpus, mistral_cmp):
    cmp = compare(load_model("mistral-7b"), WORKLOAD, gpus, coeffs, prices={"h200": 0.01, "t4": 0.0})
    by = {o.gpu.name: o for o in cmp.options}
    ref = {o.gpu.name: o for o in mistral_cmp.options}
    assert by["h200"].price_given and by["h200"].price_usd_per_hour == 0.01
    assert by["h200"].cost_usd == pytest.approx(by["h200"].hours * 0.01)
    assert by["t4"].cost_usd == 0.0
    assert by["h200"].pareto  # cheapest non-free and among the fastest
    assert not by["a100-80gb"].price_given and by["a100-80gb"].cost_usd == ref["a100-80gb"].cost_usd
    with pytest.raises(ValueError, match="not among the compared GPUs"):
        compare(load_model("mistral-7b"), WORKLOAD, [load_gpu("t4")], coeffs, prices={"h200": 1.0})
    with pytest.raises(ValueError, match="--price"):
        compare(load_model("mistral-7b"), WORKLOAD, [load_gpu("h200")], coeffs, prices={"h200": -1.0})


@pytest.mark.parametrize("sort", ["cost", "time"])
def test_sorting(sort, coeffs, gpus):
    cmp = compare(load_model("llama-3.1-70b"), WORKLOAD, gpus, coeffs, sort=sort)
    fitting = [o for o in cmp.options if o.fits]
    key = [o.cost_usd if sort == "cost" else o.hours for o in fitting]
    assert key == sorted(key)
    n = len(fitting)
    assert all(o.fits for o in cmp.options[:n]) and not any(o.fits for o in cmp.options[n:])
    with pytest.raises(ValueError, match="--sort"):
        compare(load_model("mistral-7b"), WORKLOAD, gpus, coeffs, sort="speed")


def test_max_hours_and_max_cost_filters(coeffs, gpus, mistral_cmp):
    hours = sorted(o.hours for o in mistral_cmp.fitting)
    costs = sorted(o.cost_usd for o in mistral_cmp.fitting)
    max_h, max_c = hours[len(hours) // 2], costs[len(costs) // 2]
    model = load_model("mistral-7b")
    for kw, attr, limit in (({"max_hours": max_h}, "hours", max_h), ({"max_cost": max_c}, "cost_usd", max_c)):
        cmp = compare(model, WORKLOAD, gpus, coeffs, **kw)
        assert cmp.fitting and cmp.excluded
        assert all(getattr(o, attr) <= limit for o in cmp.fitting)
        assert all(getattr(o, attr) > limit for o in cmp.excluded)
        assert {o.gpu.name for o in cmp.fitting + cmp.excluded} == {o.gpu.name for o in mistral_cmp.fitting}
        assert not any(o.pareto for o in cmp.excluded)
        pts = _points(cmp)  # the front is recomputed among what is kept
        assert [o.pareto for o in cmp.fitting] == pareto_flags(pts)
    both = compare(model, WORKLOAD, gpus, coeffs, max_hours=max_h, max_cost=max_c)
    assert all(o.hours <= max_h and o.cost_usd <= max_c for o in both.fitting)
    for bad in ({"max_hours": 0}, {"max_cost": -1.0}):
        with pytest.raises(ValueError):
            compare(model, WORKLOAD, gpus, coeffs, **bad)


def test_multi_gpu_llama70b_on_rtx4090_with_sharded_loading(llama70_cmp, coeffs):
    """compare's FSDP count is planner.multigpu.fsdp_per_gpu (the sharded loader, adamw_torch; CPU offload when no
    count fits without it) for the smallest configuration. Llama-3.1-70B: one 24 GiB (or 15 GiB) card does not hold
    its ~32 GiB of 4-bit weights, two do with CPU offload, and the row names the node's CPU RAM."""
    model = load_model("llama-3.1-70b")
    base = quantized_weights_bytes(model) + quant_constants_bytes(model, True)
    for name in ("rtx4090", "t4"):
        o = next(o for o in llama70_cmp.options if o.gpu.name == name)
        m, small = o.multi_gpu, o.smallest
        assert not o.fits and m is not None and m.count == 2 and m.cpu_offload, name
        ref = fsdp_per_gpu(model, small.lora, replace(small.train, optim="adamw_torch"), coeffs, 2, cpu_offload=True,
                           loading="sharded")
        assert m.memory == ref and m.per_gpu_needs_bytes == ref.needs_bytes <= m.capacity_bytes == small.capacity_bytes
        assert m.cpu_ram_bytes == ref.cpu_ram.total_bytes > quantized_weights_bytes(model)
        assert base > m.capacity_bytes and m.calibrated is True
        # the training phase decomposes as before: shard + replicated + gathered
        assert ref.training_needs_bytes == m.shard_bytes + m.replicated_bytes + m.gathered_layer_bytes
        assert m.gathered_layer_bytes == ref.gathered_layers + ref.gathered_root
        assert "2 x " + name + " with FSDP + CPU offload sharding would fit" in reason_str(o)
        assert f"CPU RAM {gib_str(m.cpu_ram_bytes)} GiB per node" in reason_str(o)
    # the 4-bit base of a 70B model is what does not fit one card
    assert next(o for o in llama70_cmp.options if o.gpu.name == "rtx4090").largest_term[0] == "quantized_weights"
    # the fitting GPUs carry no multi-GPU numbers
    assert all(x.multi_gpu is None and x.multi_gpu_max is None for x in llama70_cmp.fitting)


def test_multi_gpu_count_qwen14b_seq4096_on_rtx4090(coeffs):
    """Qwen2.5-14B at seq 4096 does not fit one RTX 4090 and fits two with FSDP (the plan that ran on two
    capped H200 ranks): compare names 2, the fewest count on which fsdp_per_gpu fits the usable capacity."""
    model = load_model("qwen2.5-14b")
    o = compare(model, WORKLOAD, [load_gpu("rtx4090")], coeffs, request=Request(seq_len=4096)).options[0]
    assert not o.fits
    m, small = o.multi_gpu, o.smallest
    assert m is not None and m.count == 2 and m.calibrated
    ref = fsdp_per_gpu(model, small.lora, replace(small.train, optim="adamw_torch"), coeffs, 2, loading="sharded")
    assert m.memory == ref and m.per_gpu_needs_bytes == ref.needs_bytes <= m.capacity_bytes == small.capacity_bytes
    assert not m.cpu_offload and m.cpu_ram_bytes == ref.cpu_ram.read_buffers  # no offload: only the read buffers
    assert ref.training_needs_bytes == m.shard_bytes + m.replicated_bytes + m.gathered_layer_bytes
    assert small.memory.needs_bytes > small.capacity_bytes  # one card does not


def test_compare_never_plans_rank0_cpu_loading(coeffs):
    """compare counts the sharded load (never the whole model on a rank); rank-0 CPU loading is refused."""
    model = load_model("qwen2.5-14b")
    o = compare(model, WORKLOAD, [load_gpu("rtx4090")], coeffs, request=Request(seq_len=4096)).options[0]
    whole = quantized_weights_bytes(model) + quant_constants_bytes(model, True)
    assert o.multi_gpu.memory.loading == "sharded" and o.multi_gpu.memory.load_allocated < whole
    with pytest.raises(ValueError) as exc:
        fsdp_per_gpu(load_model("mistral-7b"), LoraSettings(), TrainSettings(optim="adamw_torch"), coeffs, 2,
                     loading="rank0_cpu")
    assert str(exc.value) == RANK0_CPU_MEASURED


def test_bare_capacity_gpu_has_no_time(coeffs):
    # 5000GiB: no catalog card of its memory class lends it speed facts (24GiB would borrow the L4's)
    cmp = compare(load_model("qwen2.5-0.5b"), WORKLOAD, [load_gpu("5000GiB"), load_gpu("l4")], coeffs)
    bare = next(o for o in cmp.options if o.gpu.name == "5000GiB")
    assert bare.fits and bare.hours is None and bare.cost_usd is None and not bare.pareto
    assert cmp.options[0].gpu.name == "l4"  # rows with figures first


# =========================================================================== fit map

def test_fit_map_grid_is_monotone(coeffs):
    model, gpu = load_model("mistral-7b"), load_gpu("rtx4090")
    grid = fit_map(model, gpu, Request(), coeffs)
    assert [row[0].batch_size for row in grid] == list(FIT_MAP_BATCHES)
    assert [c.seq_len for c in grid[0]] == list(FIT_MAP_SEQ_LENS)
    for i, row in enumerate(grid):
        for j, cell in enumerate(row):
            assert cell.shown.train.batch_size == cell.batch_size and cell.shown.train.seq_len == cell.seq_len
            assert cell.shown.lora.rank == 16 and cell.shown.lora.targets == ("all-linear",)
            if cell.fits:  # anything smaller in either direction fits too
                assert all(grid[k][j].fits for k in range(i)) and all(row[k].fits for k in range(j))
    assert grid[0][0].fits and not grid[-1][-1].fits


def test_fit_map_beyond_context(coeffs):
    grid = fit_map(load_model("llama-2-7b"), load_gpu("h200"), Request(), coeffs)  # 4096 positions
    assert all(row[-1].beyond_model and not row[-1].fits for row in grid)
    assert not any(c.beyond_model for c in grid[0][:-1])


# =========================================================================== text (CLI)

ARGS = ["mistral-7b", "--examples", "5000", "--avg-tokens", "350", "--epochs", "3"]


def run(args):
    return CliRunner().invoke(compare_cmd, args)


def test_help_ends_with_an_example():
    res = run(["--help"])
    assert res.exit_code == 0
    assert "Example: qfit compare mistral-7b --examples 5000 --avg-tokens 350 --epochs 3" in res.output


def test_table_lists_every_catalog_gpu():
    res = run(ARGS)
    assert res.exit_code == 0, res.output
    lines = res.stdout.splitlines()
    assert lines[0].startswith("qfit compare: Mistral-7B") and "5,250,000 tokens" in lines[0]
    rows = [ln for ln in lines if ln.split()[:1] in (["*"], *([n] for n in gpu_names()))
            and (" yes " in ln or " no " in ln)]
    assert len(rows) >= 15
    assert {n for n in gpu_names() if any(f" {n} " in f" {r} " for r in rows)} == set(gpu_names())
    assert any(r.startswith("*") for r in rows)  # Pareto rows are marked
    assert "(calibrated)" in res.stdout and "(est.)" in res.stdout
    assert "USD per GPU" in res.stdout  # the terminal bar chart


def test_table_for_a_model_that_fits_few_gpus():
    res = run(["llama-3.1-70b", "--tokens", "2M", "--gpus", "rtx4090,h200,12GiB"])
    assert res.exit_code == 0, res.output
    out = res.stdout
    assert "Does not fit" in out
    line = next(ln for ln in out.splitlines() if ln.strip().startswith("rtx4090") and "needs" in ln)
    assert "2 x rtx4090 with FSDP + CPU offload would fit (" in line and "GiB per GPU, CPU RAM " in line
    assert "2 x 12GiB with FSDP + CPU offload would fit" in out
    assert "FSDP (calibrated on 2 x H200)" in out and "the model loaded shard by shard (estimate" in out
    assert "not supported yet" not in out and "rank 0" not in out
    # a model that two RTX 4090s hold with FSDP, and one does not
    res = run(["qwen2.5-14b", "--tokens", "2M", "--seq-len", "4096", "--gpus", "rtx4090,h200"])
    line = next(ln for ln in res.stdout.splitlines() if ln.strip().startswith("rtx4090") and "needs" in ln)
    assert "2 x rtx4090 with FSDP would fit" in line and "estimate" not in line


def test_json_schema():
    res = run(ARGS + ["--json"])
    assert res.exit_code == 0, res.output
    doc = json.loads(res.stdout)
    assert isinstance(doc, list) and len(doc) == len(gpu_names())
    for d in doc:
        for key in ("gpu", "fits", "settings", "peak_reserved_bytes", "needs_bytes", "tokens_per_s", "hours",
                    "cost_usd", "pareto", "speed_basis", "reason", "multi_gpu", "price_usd_per_hour"):
            assert key in d, key
        assert d["fits"] is True
        assert set(d["settings"]) == SETTINGS_KEYS
        assert isinstance(d["peak_reserved_bytes"], int) and isinstance(d["needs_bytes"], int)
        assert d["cost_usd"] == pytest.approx(d["hours"] * d["price_usd_per_hour"])
        assert d["hours"] == pytest.approx(d["total_tokens"] / d["tokens_per_s"] / 3600, rel=1e-3)
    costs = [d["cost_usd"] for d in doc]
    assert costs == sorted(costs)
    assert any(d["pareto"] for d in doc)
    assert next(d for d in doc if d["gpu"] == "h100-sxm")["speed_basis"] == "calibrated"


def test_json_for_gpus_that_do_not_fit():
    res = run(["llama-3.1-70b", "--tokens", "2M", "--gpus", "rtx4090,h200", "--json"])
    doc = {d["gpu"]: d for d in json.loads(res.stdout)}
    r = doc["rtx4090"]
    assert r["fits"] is False and r["settings"] is None and r["hours"] is None and r["cost_usd"] is None
    assert "needs" in r["reason"] and r["needs_bytes"] > r["capacity_bytes"]
    m = r["multi_gpu"]
    assert tuple(m) == COMPARE_MULTI_GPU_KEYS and "2 x rtx4090 with FSDP + CPU offload sharding would fit" in r["reason"]
    assert (m["count"], m["cpu_offload"], m["loading"]) == (2, True, "sharded") and m["cpu_ram_bytes"] > m["sharded_bytes"] / 2
    assert set(r["smallest"]["settings"]) == SETTINGS_KEYS
    assert doc["h200"]["fits"] is True
    res = run(["qwen2.5-14b", "--tokens", "2M", "--seq-len", "4096", "--gpus", "rtx4090", "--json"])
    m = json.loads(res.stdout)[0]["multi_gpu"]
    assert m["count"] == 2 and m["basis"] == "FSDP-sharded 4-bit base, calibrated on 2 x H200"
    assert m["per_gpu_needs_bytes"] <= m["capacity_bytes"] and m["peak_phase"] in ("load", "training")


def test_cli_price_sort_and_limits():
    res = run(ARGS + ["--price", "h200=0.05", "--sort", "time", "--json"])
    doc = json.loads(res.stdout)
    h = next(d for d in doc if d["gpu"] == "h200")
    assert h["price_usd_per_hour"] == 0.05 and h["price_basis"] == "--price"
    hours = [d["hours"] for d in doc]
    assert hours == sorted(hours)
    res = run(ARGS + ["--max-hours", "1", "--max-cost", "0.7", "--json"])
    doc = json.loads(res.stdout)
    assert doc and all(d["hours"] <= 1 and d["cost_usd"] <= 0.7 for d in doc)
    text = run(ARGS + ["--max-hours", "1"]).stdout
    assert "Over the limits" in text and "--max-hours 1" in text


@pytest.mark.parametrize("args, fragment", [
    (["--tokens", "1M", "--gpus", "h2000"], "Did you mean: h200"),
    (["--tokens", "1M", "--price", "h200=abc"], "must be a number"),
    (["--tokens", "1M", "--price", "h200"], "GPU=USD_PER_HOUR"),
    (["--tokens", "1M", "--price", "h2000=3"], "unknown GPU"),
    (["--examples", "0", "--avg-tokens", "350"], "--examples must be a positive integer"),
    (["--tokens", "0"], "--tokens"),
    (["--tokens", "-5"], "--tokens"),
    (["--examples", "100"], "--avg-tokens"),
    ([], "give the workload"),
    (["--tokens", "1M", "--examples", "5", "--avg-tokens", "3"], "give one workload"),
    (["--examples", "abc", "--avg-tokens", "3"], "--examples"),
    (["--tokens", "1M", "--sort", "speed"], "--sort"),
    (["--tokens", "1M", "--max-hours", "0"], "--max-hours"),
    (["--tokens", "1M", "--epochs", "-1"], "--epochs"),
    (["--tokens", "1M", "--seq-len", "999999"], "max_position_embeddings"),
    (["--dataset", "/nonexistent/data.jsonl"], "no such file"),
    (["--tokens", "1M", "--plot", "out.txt"], ".png"),
])
def test_errors_are_one_line_exit_2(args, fragment):
    res = run(["mistral-7b", *args])
    assert res.exit_code == 2, res.output
    assert res.stdout == ""
    err = res.stderr.strip()
    assert err.startswith("error: ") and "\n" not in err and "Traceback" not in err
    assert fragment in err
    js = run(["mistral-7b", *args, "--json"])
    assert js.exit_code == 2
    assert set(json.loads(js.stdout)) == {"error"} and fragment in json.loads(js.stdout)["error"]


def test_unknown_model_error():
    res = run(["mistrl-7b", "--tokens", "1M"])
    assert res.exit_code == 2 and "Did you mean: mistral-7b" in res.stderr


def test_count_parsing():
    assert parse_count("2M", "--tokens") == 2_000_000
    assert parse_count("800k", "--tokens") == 800_000
    assert parse_count("5,250,000", "--tokens") == 5_250_000
    assert parse_count("2.5e6", "--tokens") == 2_500_000


def test_dataset_jsonl_json_csv(tmp_path):
    jl = tmp_path / "d.jsonl"
    jl.write_text("\n".join(json.dumps({"instruction": "a" * 300, "output": "b" * 100, "id": i}) for i in range(10)) + "\n")
    res = run(["mistral-7b", "--dataset", str(jl), "--epochs", "2", "--gpus", "h200", "--json"])
    d = json.loads(res.stdout)[0]
    assert d["total_tokens"] == 10 * 100 * 2 and d["tokens_approximate"] is True
    text = run(["mistral-7b", "--dataset", str(jl), "--gpus", "h200"]).stdout
    assert "approximate" in text and "1 token per 4 characters" in text
    js = tmp_path / "d.json"
    js.write_text(json.dumps({"train": [{"text": "x" * 40}] * 5}))
    assert json.loads(run(["mistral-7b", "--dataset", str(js), "--gpus", "h200", "--json"]).stdout)[0]["total_tokens"] == 50
    cs = tmp_path / "d.csv"
    cs.write_text("id,prompt,score\n1,abcdefgh,0.5\n2,abcd,1\n")
    assert json.loads(run(["mistral-7b", "--dataset", str(cs), "--gpus", "h200", "--json"]).stdout)[0]["total_tokens"] == 3
    bad = tmp_path / "d.jsonl.bad"
    bad.write_text("{}")
    res = run(["mistral-7b", "--dataset", str(bad)])
    assert res.exit_code == 2 and ".jsonl, .json or .csv" in res.stderr
    broken = tmp_path / "broken.jsonl"
    broken.write_text('{"text": "ok"}\n{not json\n')
    res = run(["mistral-7b", "--dataset", str(broken)])
    assert res.exit_code == 2 and "line 2" in res.stderr


def test_plot_png(tmp_path):
    pytest.importorskip("matplotlib")
    out = tmp_path / "cost.png"
    res = run(ARGS + ["--plot", str(out)])
    assert res.exit_code == 0, res.output
    data = out.read_bytes()
    assert data[:8] == PNG_SIGNATURE and len(data) > 10_000
    assert "plot: wrote" in res.stderr or "plot: wrote" in res.stdout
    res = run(ARGS + ["--plot", str(tmp_path / "no" / "such" / "dir.png")])
    assert res.exit_code == 2 and "cannot write" in res.stderr


def test_plot_without_matplotlib(monkeypatch, tmp_path):
    for name in [m for m in sys.modules if m == "matplotlib" or m.startswith("matplotlib.")]:
        monkeypatch.delitem(sys.modules, name)
    monkeypatch.setitem(sys.modules, "matplotlib", None)  # `import matplotlib` now raises ImportError
    res = run(ARGS + ["--plot", str(tmp_path / "x.png")])
    assert res.exit_code == 2
    assert res.stderr.strip() == "error: --plot needs matplotlib: pip install matplotlib"
    from planner.fitmap import MatplotlibMissing

    with pytest.raises(MatplotlibMissing, match="pip install matplotlib"):
        fit_map_png(load_model("mistral-7b"), load_gpu("t4"), Request(), load_coefficients(), str(tmp_path / "f.png"))


def test_fit_map_png(tmp_path, coeffs):
    pytest.importorskip("matplotlib")
    out = tmp_path / "fit.png"
    assert fit_map_png(load_model("llama-2-7b"), load_gpu("t4"), Request(), coeffs, str(out)) == str(out)
    assert out.read_bytes()[:8] == PNG_SIGNATURE


def test_compare_path_imports_stay_light():
    """The modules on the `qfit compare` path import no heavy library at module level."""
    code = ("import sys, planner.cli_compare, planner.compare, planner.report_compare, planner.fitmap\n"
            "heavy = ['torch', 'transformers', 'peft', 'bitsandbytes', 'pandas', 'matplotlib', 'numpy']\n"
            "print(','.join(m for m in heavy if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == ""


def test_wired_into_qfit():
    import planner.cli as cli_mod

    assert "compare" in cli_mod.cli.list_commands(None)
    res = CliRunner().invoke(cli_mod.cli, ["compare", *ARGS[0:1], "--tokens", "1M", "--gpus", "h2000"])
    assert res.exit_code == 2 and res.stderr.startswith("error: unknown GPU")
    assert CliRunner().invoke(cli_mod.cli, ["compare", *ARGS]).exit_code == 0
    # as `qfit plan`: exit 1 when no GPU fits
    res = CliRunner().invoke(cli_mod.cli, ["compare", "llama-3.1-70b", "--tokens", "1M", "--gpus", "t4,rtx4090"])
    assert res.exit_code == 1 and "Does not fit" in res.stdout


# --------------------------------------------------------------------------- --num-gpus N: the count held fixed

def test_num_gpus_rows_are_plan_num_gpus_choices(coeffs):
    """With --num-gpus 2 every row is `qfit plan --num-gpus 2`'s choice (planner.multigpu.choose_multi): the same
    strategy and per-rank settings; tokens/s is 2 x one rank's; cost = hours x 2 x price."""
    from planner.multigpu import choose_multi
    model = load_model("mistral-7b")
    gpus = [load_gpu(n) for n in ("t4", "rtx4090", "h100-sxm")]
    c = compare(model, WORKLOAD, gpus, coeffs, num_gpus=2)
    assert c.num_gpus == 2 and len(c.options) == 3
    for o in c.options:
        choice = choose_multi(model, o.gpu, Request(), coeffs, 2)
        assert o.count == 2 and o.strategy == choice.strategy
        assert o.fits == (choice.best is not None)
        if o.fits:
            assert o.plan == choice.best
            assert o.tokens_per_s == pytest.approx(2 * choice.best.tokens_per_s_per_gpu)
            assert o.hours == pytest.approx(WORKLOAD.total_tokens / o.tokens_per_s / 3600)
            assert o.cost_usd == pytest.approx(o.hours * 2 * o.gpu.price_usd_per_hour)


def test_num_gpus_halves_the_hours_of_a_ddp_run(coeffs):
    """Mistral-7B fits one H100: on two (DDP, each rank half the effective batch) the wall time is at most
    the one-GPU time, and never below half of it (one rank's speed does not grow with the split batch)."""
    model, gpu = load_model("mistral-7b"), load_gpu("h100-sxm")
    one = compare(model, WORKLOAD, [gpu], coeffs).options[0]
    two = compare(model, WORKLOAD, [gpu], coeffs, num_gpus=2).options[0]
    assert two.strategy == "ddp" and two.plan.train.effective_batch * 2 == one.plan.train.effective_batch
    assert one.hours / 2 * 0.999 <= two.hours <= one.hours * 1.001


def test_num_gpus_not_fitting_says_why_per_gpu(coeffs):
    """Llama-3.1-70B on 2 x 8 GiB cards does not fit, not even with CPU offload: the row names the count, the
    strategy and the least per-GPU need (offload included); on 2 x T4 it fits with offload."""
    from planner.report_compare import reason_str, render_text
    c = compare(load_model("llama-3.1-70b"), WORKLOAD, [load_gpu("8GiB")], coeffs, num_gpus=2)
    o = c.options[0]
    assert not o.fits and o.hours is None and o.cost_usd is None and o.peak_reserved_bytes is None
    assert o.smallest.memory.needs_bytes > o.smallest.capacity_bytes and o.smallest.memory.cpu_offload
    line = reason_str(o)
    assert line.startswith("on 2 x 8GiB (FSDP + CPU offload)") and "per GPU" in line
    t4 = compare(load_model("llama-3.1-70b"), WORKLOAD, [load_gpu("t4")], coeffs, num_gpus=2).options[0]
    assert t4.fits and t4.strategy == "fsdp" and t4.plan.memory.cpu_offload
    assert "2 GPUs of each kind" in render_text(c)


def test_num_gpus_cli(tmp_path):
    runner = CliRunner()
    res = runner.invoke(compare_cmd, ["mistral-7b", "--tokens", "2M", "--gpu", "rtx4090", "--num-gpus", "2", "--json"])
    assert res.exit_code == 0, res.output
    row = json.loads(res.output)[0]
    assert row["num_gpus"] == 2 and row["strategy"] in ("ddp", "fsdp") and row["fits"]
    res = runner.invoke(compare_cmd, ["mistral-7b", "--tokens", "2M", "--num-gpus", "0"])
    assert res.exit_code == 2 and "--num-gpus must be a positive integer" in res.output
    res = runner.invoke(compare_cmd, ["mistral-7b", "--tokens", "2M", "--num-gpus", "2", "--method", "auto"])
    assert res.exit_code == 2 and "multi-GPU plans are QLoRA only" in res.output
