"""planner.train.sharded_load against the reference: the same checkpoint loaded by from_pretrained with
BitsAndBytesConfig (NF4, double quant, bnb_4bit_quant_storage = bf16, the FSDP recipe of
planner.train.distributed.load_for_strategy) on one process.

NF4 is deterministic: quantizing the same bf16 tensor with the same blocksize gives the same bits, so the 4-bit
weights must be bit-identical and the logits and loss equal up to the float summation order (FSDP2 changes none of
the arithmetic on one process; on two, the LoRA gradients are reduce-scattered, so they are compared to 1e-5).
The tiny model (profiles/models/tiny-llama.toml) is written as bf16 safetensors in 4 shards; nothing is downloaded.
"""

import os
import subprocess
import sys
from pathlib import Path

import pytest

torch = pytest.importorskip("torch")

REPO = Path(__file__).resolve().parents[1]
LORA_TARGETS = ["q_proj", "v_proj"]


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory):
    """(bf16 checkpoint in 4 safetensors shards, the same model saved pre-quantized by bitsandbytes)."""
    from transformers import AutoModelForCausalLM

    from planner import demo
    from planner.train import stack

    root = tmp_path_factory.mktemp("sharded")
    full = root / "bf16"
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(stack.hf_config(demo.profile_config()), dtype=torch.bfloat16)
    with torch.no_grad():
        for p in model.parameters():
            p.normal_(0.0, 0.1)  # transformers' 0.02 makes every logit near zero: a weak test
    model.save_pretrained(full, max_shard_size="300KB")
    assert len(list(full.glob("model-*.safetensors"))) >= 2
    pre = root / "prequantized"
    reference(full).save_pretrained(pre)
    return full, pre


@pytest.fixture(scope="module")
def prequantized_uint8(checkpoints, tmp_path_factory):
    """The same model saved by bitsandbytes with its default quant storage (uint8), as most 4-bit checkpoints are."""
    from transformers import AutoModelForCausalLM, BitsAndBytesConfig

    full, _ = checkpoints
    bnb = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
                             bnb_4bit_compute_dtype=torch.bfloat16)
    path = tmp_path_factory.mktemp("sharded") / "prequantized-uint8"
    AutoModelForCausalLM.from_pretrained(str(full), quantization_config=bnb, dtype=torch.bfloat16).save_pretrained(path)
    return path


def reference(path):
    from transformers import AutoModelForCausalLM, BitsAndBytesConfig

    bf = torch.bfloat16
    bnb = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
                             bnb_4bit_compute_dtype=bf, bnb_4bit_quant_storage=bf)
    return AutoModelForCausalLM.from_pretrained(str(path), quantization_config=bnb, dtype=bf)


def reference_with_lora(path):
    """from_pretrained + peft, its LoRA set to the loader's seeded init (lora_full_init) so gradients compare."""
    from peft import LoraConfig, get_peft_model

    from planner.train.sharded_load import lora_full_init

    model = get_peft_model(reference(path), LoraConfig(r=8, lora_alpha=16, lora_dropout=0.0, target_modules=LORA_TARGETS,
                                                       task_type="CAUSAL_LM"))
    params = dict(model.named_parameters())
    with torch.no_grad():
        for name, full in lora_full_init(model, 0).items():
            params[name].copy_(full)
    return model


def batch():
    g = torch.Generator().manual_seed(1)
    return torch.randint(4, 512, (2, 24), generator=g)


def _packed(model):
    return {n: p.detach().view(torch.int16) for n, p in model.named_parameters() if p.dim() == 2 and p.shape[1] == 1}


def test_packed_shape_is_what_bitsandbytes_writes():
    import bitsandbytes.functional as F

    from planner.train.sharded_load import packed_shape

    for out_f, in_f in ((384, 128), (64, 128), (3, 64)):
        q, _ = F.quantize_4bit(torch.randn(out_f, in_f, dtype=torch.bfloat16), quant_type="nf4",
                               quant_storage=torch.bfloat16)
        assert tuple(q.shape) == packed_shape(out_f * in_f, torch.bfloat16)


def test_one_process_matches_from_pretrained(checkpoints, prequantized_uint8):
    """World of one: the same NF4 bits in every Linear4bit, the same logits and loss, for the bf16 checkpoint and the
    pre-quantized ones (bf16 and uint8 quant storage)."""
    from safetensors import safe_open

    from planner.train.sharded_load import largest_tensor_bytes, load_sharded

    full, pre = checkpoints
    with safe_open(str(prequantized_uint8 / "model.safetensors"), "pt") as fh:
        assert fh.get_tensor("model.layers.0.self_attn.q_proj.weight").dtype == torch.uint8
    ids = batch()
    ref = reference(full).train()
    with torch.no_grad():
        want = ref(input_ids=ids, labels=ids)
    ref_packed = _packed(ref)
    assert len(ref_packed) == 2 * 7  # 2 layers x 7 linears, lm_head stays bf16
    for path in (full, pre, prequantized_uint8):
        stats = {}
        model = load_sharded(str(path), None, double_quant=True, stats=stats).train()
        got_packed = _packed(model)
        assert got_packed.keys() == ref_packed.keys()
        for name in ref_packed:
            assert torch.equal(got_packed[name], ref_packed[name]), name
        with torch.no_grad():
            got = model(input_ids=ids, labels=ids)
        assert torch.equal(got.logits, want.logits), path.name
        assert got.loss.item() == pytest.approx(want.loss.item(), abs=1e-6)
        assert stats["tensors"] == 21  # 2 x (7 linears + 2 norms) + embed + norm + lm_head
    assert stats["largest_read_bytes"] <= largest_tensor_bytes(pre)
    assert largest_tensor_bytes(full) == 512 * 128 * 2  # embed_tokens / lm_head in bf16


def test_a_checkpoint_that_does_not_match_the_config_is_named(checkpoints, tmp_path):
    import shutil

    from safetensors.torch import load_file, save_file

    from planner.train.sharded_load import ShardedLoadError, load_sharded

    full, _ = checkpoints
    bad = tmp_path / "bad"
    shutil.copytree(full, bad)
    shard = sorted(bad.glob("model-*.safetensors"))[-1]
    tensors = load_file(shard)
    tensors["model.layers.9.mlp.up_proj.weight"] = torch.zeros(2, 2, dtype=torch.bfloat16)
    save_file(tensors, shard, metadata={"format": "pt"})
    with pytest.raises(ShardedLoadError, match="layers.9"):
        load_sharded(str(bad), None)


@pytest.mark.slow
@pytest.mark.parametrize("cpu_offload", ["0", "1"], ids=["on-device", "cpu-offload"])
def test_two_gloo_processes_match_from_pretrained(checkpoints, tmp_path, cpu_offload):
    """torchrun, 2 CPU processes, gloo: every decoder layer and the root under fully_shard (with CPUOffloadPolicy in
    the second case), each rank holding half of every tensor. The logits and loss equal the one-process reference
    (4-bit weights all-gathered and dequantized with the module's quant_state), and so do the LoRA gradients
    after FSDP2's reduce-scatter, for the bf16 and the pre-quantized checkpoint."""
    full, pre = checkpoints
    ids = batch()
    torch.save(ids, tmp_path / "batch.pt")
    env = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1"}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2", "--standalone",
           str(REPO / "tests" / "sharded_worker.py"), str(tmp_path), cpu_offload, str(full), str(pre)]
    res = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=400)
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-3000:]

    ref = reference_with_lora(full).train()
    want = ref(input_ids=ids, labels=ids)
    want.loss.backward()
    want_grads = {n: p.grad for n, p in ref.named_parameters() if p.grad is not None}
    assert len(want_grads) == 2 * 2 * 2  # lora_A and lora_B of q_proj and v_proj in 2 layers
    for tag in ("bf16", "prequantized"):
        ranks = [torch.load(tmp_path / f"{tag}-rank{r}.pt") for r in (0, 1)]
        for got in ranks:
            assert got["wrapper"].startswith("FSDP")
            assert torch.equal(got["logits"], want.logits.detach()), tag
            assert got["loss"].item() == pytest.approx(want.loss.item(), abs=1e-6)
            assert got["grads"].keys() == want_grads.keys()
            for name, g in want_grads.items():
                torch.testing.assert_close(got["grads"][name], g, rtol=1e-5, atol=1e-6)
            assert got["trainable"] == sorted(want_grads)
        # each rank holds its half of every tensor: the q_proj 4-bit pack is (128 * 128 / 4, 1) -> 2048 rows each
        q = "base_model.model.model.layers.0.self_attn.q_proj.base_layer.weight"
        assert [r["local"][q] for r in ranks] == [(2048, 1), (2048, 1)]
        lora_a = "base_model.model.model.layers.0.self_attn.q_proj.lora_A.default.weight"
        assert [r["local"][lora_a] for r in ranks] == [(4, 128), (4, 128)]
        # the planner's shard term: each rank holds half of the 4-bit packs (2 values a byte, bf16 storage)
        from planner.memory import quantized_weights_bytes
        from planner.multigpu import largest_checkpoint_tensor_bytes
        from planner.profiles import load_model

        spec = load_model("tiny-llama")
        packed = [sum(2 * shape[0] for shape in r["local"].values() if len(shape) == 2 and shape[1] == 1) for r in ranks]
        assert packed[0] == packed[1] and sum(packed) == quantized_weights_bytes(spec)
        assert all(r["stats"]["largest_read_bytes"] == largest_checkpoint_tensor_bytes(spec) for r in ranks)
        # the same AdamW step on the reference gives the same loss after it
        if tag == "bf16":
            opt = torch.optim.AdamW([p for p in ref.parameters() if p.requires_grad], lr=1e-2)
            opt.step()
            with torch.no_grad():
                stepped = ref(input_ids=ids, labels=ids).loss.item()
            assert stepped < want.loss.item()
        for got in ranks:
            assert got["after_step"].item() == pytest.approx(stepped, abs=1e-4)
        # rank 0 saved one standard PEFT adapter, with the stepped LoRA weights, loadable on the reference
        from peft import PeftModel
        from safetensors.torch import load_file

        adapter = tmp_path / f"{tag}-adapter"
        assert (adapter / "adapter_config.json").is_file()
        saved = load_file(adapter / "adapter_model.safetensors")
        assert len(saved) == 8 and all(v.dtype == torch.float32 for v in saved.values())
        loaded = PeftModel.from_pretrained(reference(full), str(adapter)).train()
        with torch.no_grad():
            assert loaded(input_ids=ids, labels=ids).loss.item() == pytest.approx(stepped, abs=1e-4)


def test_run_plans_fsdp_with_sharded_loading_and_offload_for_70b_on_two_4090s():
    """`qfit run --num-gpus 2` plans what `qfit plan --num-gpus 2` shows: for Llama-3.1-70B on RTX 4090s DDP and FSDP
    without offload do not fit, FSDP with CPU offload and the sharded loader does (the parent's planning, no launch)."""
    from types import SimpleNamespace

    from planner.multigpu import choose_multi
    from planner.profiles import load_gpu, load_model
    from planner.search import Request
    from planner.train.dist_run import _plan_multi

    spec, gpu = load_model("llama-3.1-70b"), load_gpu("rtx4090")
    plan, tried = _plan_multi(spec, SimpleNamespace(spec=gpu), Request(), 2, None, cpu=False)
    assert (plan.strategy, plan.memory.loading, plan.memory.cpu_offload) == ("fsdp", "sharded", True)
    assert [t.split(":")[0] for t in tried] == ["ddp", "fsdp"]
    from planner.coefficients import load_coefficients

    assert plan.memory == choose_multi(spec, gpu, Request(), load_coefficients("rtx4090"), 2).best.memory
    from planner.train.options import RunError

    with pytest.raises(RunError, match="does not fit"):
        _plan_multi(spec, SimpleNamespace(spec=gpu), Request(), 2, None, cpu=False, loading="full")


@pytest.mark.parametrize("kw, fragment", [
    ({"num_gpus": 2, "strategy": "ddp", "loading": "full"}, "--loading is FSDP's"),
    ({"loading": "sharded"}, "--loading needs --num-gpus 2"),
    ({"num_gpus": 2, "loading": "meta"}, "--loading must be sharded or full"),
])
def test_run_loading_option_is_checked(kw, fragment, tmp_path):
    from planner.train.options import RunError, RunOptions

    with pytest.raises(RunError, match=fragment):
        RunOptions(output=str(tmp_path / "x"), demo=True, **kw)


def test_the_70b_benchmark_builder_writes_what_the_loader_reads(tmp_path):
    """benchmarks/fsdp_70b.py build, on tiny-llama and the CPU: one file per decoder layer plus an index; its
    pre-quantized (nf4) checkpoint and its bf16 one load to the same 4-bit model (same logits)."""
    import importlib.util

    from planner.train.sharded_load import load_sharded, safetensors_files

    spec = importlib.util.spec_from_file_location("fsdp_70b", REPO / "benchmarks" / "fsdp_70b.py")
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    logits = []
    for fmt in ("nf4", "bf16"):
        d = tmp_path / fmt
        assert bench.main(["build", "--dir", str(d), "--model", "tiny-llama", "--device", "cpu", "--format", fmt]) == 0
        assert len(safetensors_files(d)) == 4  # embedding, 2 layers, norm + lm_head
        model = load_sharded(str(d), None).train()
        with torch.no_grad():
            logits.append(model(input_ids=batch()).logits)
    assert torch.equal(logits[0], logits[1])


@pytest.mark.parametrize("store_lm_head", [False, True], ids=["embedding-only", "both-names"])
def test_tied_embeddings_load_as_one_parameter(tmp_path, store_lm_head):
    """tie_word_embeddings (Qwen2.5-0.5B, Gemma): the checkpoint stores the embedding (and sometimes the lm_head under
    its own name too); the loaded model keeps one shared parameter and matches from_pretrained."""
    from safetensors.torch import load_file, save_file
    from transformers import AutoModelForCausalLM

    from planner import demo
    from planner.train import stack
    from planner.train.sharded_load import load_sharded

    torch.manual_seed(0)
    cfg = stack.hf_config({**demo.profile_config(), "tie_word_embeddings": True})
    model = AutoModelForCausalLM.from_config(cfg, dtype=torch.bfloat16)
    with torch.no_grad():
        for p in model.parameters():
            p.normal_(0.0, 0.1)
    model.save_pretrained(tmp_path)
    if store_lm_head:
        tensors = load_file(tmp_path / "model.safetensors")
        assert "lm_head.weight" not in tensors
        tensors["lm_head.weight"] = tensors["model.embed_tokens.weight"].clone()
        save_file(tensors, tmp_path / "model.safetensors", metadata={"format": "pt"})
    got = load_sharded(str(tmp_path), None).train()
    assert got.lm_head.weight is got.model.embed_tokens.weight
    ids = batch()
    with torch.no_grad():
        assert torch.equal(got(input_ids=ids).logits, reference(tmp_path).train()(input_ids=ids).logits)
