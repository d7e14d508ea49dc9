"""Load a QLoRA model shard by shard under FSDP2: no rank ever holds more than its shard plus one tensor.

The pattern of torchtune's load_from_full_model_state_dict (FSDP2) and fsdp_qlora's load_and_quantize_parallel
(FSDP1), for bitsandbytes NF4:

1. build     the model from its config on the meta device (parameters only; buffers such as RoPE's inv_freq are
             real), every nn.Linear that transformers' BitsAndBytesConfig would quantize (all but the output
             embedding) replaced by a bitsandbytes Linear4bit whose weight is the *packed* NF4 tensor's shape,
             (numel / 4, 1) in bf16 storage (bnb_4bit_quant_storage = the compute dtype, so FSDP2 can shard and
             all-gather it like any other bf16 parameter);
2. LoRA      peft's get_peft_model on the meta model (the LoRA weights exist before sharding, so FSDP2 manages them:
             trainable, sharded, their gradients reduce-scattered);
3. shard     fully_shard on every decoder layer and on the root, optionally with CPUOffloadPolicy: every parameter
             becomes a meta DTensor sharded on dim 0;
4. stream    the checkpoint's safetensors files (any number of shards, read with safe_open) one tensor at a time:
             each rank reads the full tensor, quantizes it to NF4 on its own device exactly as transformers does
             (bitsandbytes.functional.quantize_4bit, blocksize 64, nf4, double quant as asked, bf16 storage), keeps
             its dim-0 chunk as the DTensor's local shard and drops the rest. The quant_state (absmax, and with
             double quant the nested absmax, code and offset; a few KiB per MiB of weights) is kept whole on every
             rank as the module's `quant_state`: after FSDP2 all-gathers a weight it hands Linear4bit a plain
             tensor, and bitsandbytes' fix_4bit_weight_quant_state_from_module re-attaches the module's
             quant_state before dequantizing. Pre-quantized bitsandbytes checkpoints (weight + weight.absmax,
             weight.quant_map, weight.nested_*, weight.quant_state.bitsandbytes__nf4) are read as they are.
5. LoRA init lora_A from a seeded generator on the full tensor (kaiming-uniform, peft's default), lora_B zeros: each
             rank keeps its chunk, so every rank agrees without a broadcast.

Peak per rank while loading: its shards so far + one full tensor in the compute dtype + that tensor's NF4 pack and
absmax (planner.multigpu.sharded_load_transient_bytes models it). On the CPU (gloo) every step runs as on a GPU
(tests/test_sharded_load.py checks logits and loss against from_pretrained + BitsAndBytesConfig on one process).
"""

from __future__ import annotations

import json
import math
import os
from pathlib import Path

import torch
from torch import nn

QUANT_KEYS = ("absmax", "quant_map", "nested_absmax", "nested_quant_map", "quant_state.bitsandbytes__nf4",
              "quant_state.bitsandbytes__fp4")
BLOCKSIZE = 64  # bitsandbytes' default 4-bit blocksize (Params4bit and quantize_4bit), as transformers uses it


class ShardedLoadError(RuntimeError):
    """The checkpoint does not match the model built from its config (a missing or unexpected tensor)."""


def safetensors_files(path: str | os.PathLike) -> list[Path]:
    """The checkpoint's safetensors files: those the index names (model.safetensors.index.json), else the single file."""
    root = Path(path)
    index = root / "model.safetensors.index.json"
    if index.is_file():
        names = sorted(set(json.loads(index.read_text())["weight_map"].values()))
        return [root / n for n in names]
    single = root / "model.safetensors"
    if single.is_file():
        return [single]
    raise ShardedLoadError(f"{root}: no model.safetensors or model.safetensors.index.json (sharded loading reads "
                           "safetensors checkpoints only)")


def largest_tensor_bytes(path: str | os.PathLike) -> int:
    """The largest tensor in the checkpoint, in bytes as stored (the loader's read buffer), from the headers only."""
    import struct

    best = 0
    for f in safetensors_files(path):
        with f.open("rb") as fh:
            (n,) = struct.unpack("<Q", fh.read(8))
            header = json.loads(fh.read(n))
        for k, v in header.items():
            if k != "__metadata__":
                best = max(best, v["data_offsets"][1] - v["data_offsets"][0])
    return best


def packed_shape(numel: int, storage: torch.dtype) -> tuple[int, int]:
    """bitsandbytes.functional.quantize_4bit's output shape: 2 values a byte, viewed as `storage`, one column."""
    nbytes = (numel + 1) // 2
    item = torch.empty((), dtype=storage).element_size()
    return (nbytes // item, 1)


def _is_prequantized(config) -> bool:
    q = getattr(config, "quantization_config", None)
    if q is None:
        return False
    q = q if isinstance(q, dict) else q.to_dict()
    return bool(q.get("load_in_4bit") or q.get("_load_in_4bit"))


def build_meta_model(path: str, compute_dtype: torch.dtype, double_quant: bool):
    """The causal LM from its config: parameters on meta, buffers real; Linear4bit in place of quantized linears.

    Returns (model, config, the checkpoint keys of the 4-bit weights, double_quant: a pre-quantized checkpoint's own)."""
    import bitsandbytes as bnb
    from accelerate import init_empty_weights
    from transformers import AutoConfig, AutoModelForCausalLM

    config = AutoConfig.from_pretrained(path)
    if _is_prequantized(config):
        qc = config.quantization_config if isinstance(config.quantization_config, dict) else config.quantization_config.to_dict()
        double_quant = bool(qc.get("bnb_4bit_use_double_quant", double_quant))
        del config.quantization_config  # we build the 4-bit layers ourselves
    config.use_cache = False
    with init_empty_weights(include_buffers=False):
        model = AutoModelForCausalLM.from_config(config, dtype=compute_dtype)
    model.tie_weights()  # under init_empty_weights from_config leaves tied embeddings as two parameters
    skip = {id(model.get_output_embeddings())}
    quantized = []
    for name, module in list(model.named_modules()):
        for child_name, child in list(module.named_children()):
            if type(child) is not nn.Linear or id(child) in skip:
                continue
            q = bnb.nn.Linear4bit(child.in_features, child.out_features, bias=child.bias is not None,
                                  compute_dtype=compute_dtype, compress_statistics=double_quant, quant_type="nf4",
                                  quant_storage=compute_dtype, device="meta")
            q.weight = bnb.nn.Params4bit(
                torch.empty(packed_shape(child.in_features * child.out_features, compute_dtype), dtype=compute_dtype,
                            device="meta"),
                requires_grad=False, compress_statistics=double_quant, quant_type="nf4", quant_storage=compute_dtype,
                bnb_quantized=True, blocksize=BLOCKSIZE, module=q)
            q.weight_shape = (child.out_features, child.in_features)  # the logical shape, for the loader
            if child.bias is not None:
                q.bias = nn.Parameter(torch.empty(child.out_features, dtype=compute_dtype, device="meta"),
                                      requires_grad=False)
            setattr(module, child_name, q)
            quantized.append(f"{name}.{child_name}.weight" if name else f"{child_name}.weight")
    for p in model.parameters():
        p.requires_grad_(False)
    return model, config, set(quantized), double_quant


def decoder_layers(model) -> list[nn.Module]:
    """The decoder layers (the FSDP units): the model's `layers` ModuleList (Llama, Mistral, Qwen, Gemma, ...)."""
    for name, module in model.named_modules():
        if name.endswith("layers") and isinstance(module, nn.ModuleList) and len(module):
            return list(module)
    raise ShardedLoadError("no decoder layer list (a ModuleList named 'layers') in the model")


def _param_slots(model) -> dict[str, list[tuple[nn.Module, str]]]:
    """checkpoint name -> every (module, attribute) holding that parameter. Tied weights share one list, under each of
    their names (a checkpoint may store the embedding, the lm_head, or both)."""
    by_id: dict[int, list[tuple[nn.Module, str]]] = {}
    out: dict[str, list[tuple[nn.Module, str]]] = {}
    for mname, module in model.named_modules(remove_duplicate=False):
        for pname, p in module.named_parameters(recurse=False, remove_duplicate=False):
            holders = by_id.setdefault(id(p), [])
            if not any(m is module and a == pname for m, a in holders):
                holders.append((module, pname))
            out[f"{mname}.{pname}" if mname else pname] = holders
    return out


def _local_chunk(full: torch.Tensor, rank: int, world: int) -> torch.Tensor:
    """FSDP2's Shard(0) placement: torch.chunk over dim 0 (the last ranks may get less, or nothing)."""
    chunks = torch.chunk(full, world, dim=0)
    if rank < len(chunks):
        return chunks[rank].clone()  # its own storage: the full tensor is freed after this
    return full.new_empty((0,) + tuple(full.shape[1:]))


def _set_sharded(slots, like, local: torch.Tensor, requires_grad: bool) -> None:
    """Replace the meta DTensor parameter by one with this rank's local shard (FSDP2 re-reads the module's parameter
    in its lazy init, as after load_state_dict(assign=True), and re-pads the shard)."""
    from torch.distributed.tensor import DTensor

    if isinstance(like, DTensor):
        value = DTensor.from_local(local, like.device_mesh, like.placements, run_check=False, shape=like.shape,
                                   stride=like.stride())
    else:  # world of one, no fully_shard: a plain tensor
        value = local
    param = nn.Parameter(value, requires_grad=requires_grad)
    for module, attr in slots:
        module._parameters[attr] = param


def quantize(weight: torch.Tensor, compute_dtype: torch.dtype, double_quant: bool):
    """NF4 as transformers' BitsAndBytesConfig quantizes a weight on load (Params4bit._quantize): blocksize 64."""
    import bitsandbytes.functional as F

    return F.quantize_4bit(weight.to(compute_dtype), blocksize=BLOCKSIZE, compress_statistics=double_quant,
                           quant_type="nf4", quant_storage=compute_dtype)


def iter_lora_full_init(model, seed: int):
    """peft's default LoRA init as full fp32 tensors from a seeded generator, one at a time, by parameter name (sorted,
    so every rank and a reference model draw the same numbers): lora_A kaiming-uniform(a=sqrt(5)) = U(+-1/sqrt(fan_in)),
    lora_B zeros. One tensor at a time: a rank never holds the whole adapter unsharded."""
    gen = torch.Generator().manual_seed(seed)
    for name, p in sorted(model.named_parameters(), key=lambda kv: kv[0]):
        if "lora_" not in name:
            continue
        full = torch.zeros(tuple(p.shape), dtype=torch.float32)
        if ".lora_A." in name:
            bound = 1 / math.sqrt(p.shape[1])
            full.uniform_(-bound, bound, generator=gen)
        yield name, full


def lora_full_init(model, seed: int) -> dict[str, torch.Tensor]:
    """iter_lora_full_init as a dict (for a reference model, which holds its adapter whole anyway)."""
    return dict(iter_lora_full_init(model, seed))


def _init_lora(model, rank: int, world: int, device, seed: int) -> None:
    """Every rank computes the same full LoRA tensors (iter_lora_full_init) and keeps its chunk: no broadcast needed."""
    modules = dict(model.named_modules())
    for name, full in iter_lora_full_init(model, seed):
        mname, _, pname = name.rpartition(".")
        module = modules[mname]
        like = getattr(module, pname)
        _set_sharded([(module, pname)], like, _local_chunk(full.to(like.dtype), rank, world).to(device), requires_grad=True)


def load_sharded(path: str, lora_config=None, *, compute_dtype: torch.dtype = torch.bfloat16, double_quant: bool = True,
                 cpu_offload: bool = False, mp_policy=None, gradient_checkpointing: bool = False, lora_seed: int = 0,
                 device: torch.device | None = None, stats: dict | None = None):
    """The model, FSDP2-sharded over the default process group (or whole on a world of one without a group), its
    4-bit weights quantized tensor by tensor, with LoRA (when lora_config is given) trainable and sharded.

    stats, when given, receives the loader's facts in bytes: largest_read_bytes (the biggest tensor read whole),
    tensors, and on CUDA peak_allocated_bytes during loading."""
    import torch.distributed as dist
    from bitsandbytes.functional import QuantState
    from safetensors import safe_open

    distributed = dist.is_available() and dist.is_initialized()
    rank, world = (dist.get_rank(), dist.get_world_size()) if distributed else (0, 1)
    if device is None:
        device = torch.device("cuda", torch.cuda.current_device()) if torch.cuda.is_available() else torch.device("cpu")
    model, config, quantized, double_quant = build_meta_model(path, compute_dtype, double_quant)
    if gradient_checkpointing:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        model.enable_input_require_grads()
    slots = _param_slots(model)  # checkpoint names, before peft renames anything (it keeps the module objects)
    if lora_config is not None:
        from peft import get_peft_model

        model = get_peft_model(model, lora_config)
    if distributed:
        from torch.distributed.fsdp import CPUOffloadPolicy, MixedPrecisionPolicy, fully_shard

        kw = {"mp_policy": mp_policy or MixedPrecisionPolicy()}
        if cpu_offload:
            kw["offload_policy"] = CPUOffloadPolicy(pin_memory=device.type == "cuda")
        for layer in decoder_layers(model):
            fully_shard(layer, **kw)
        fully_shard(model, **kw)
    shard_device = torch.device("cpu") if cpu_offload else device
    facts = {"largest_read_bytes": 0, "tensors": 0}
    seen = set()
    for file in safetensors_files(path):
        with safe_open(str(file), framework="pt", device="cpu") as fh:
            keys = list(fh.keys())
            quant_parts = {k for k in keys if any(k.endswith(f".weight.{q}") for q in QUANT_KEYS)}
            for key in keys:
                if key in quant_parts:
                    continue
                if key not in slots:
                    raise ShardedLoadError(f"{file.name}: tensor {key!r} has no parameter in the model built from its config")
                full = fh.get_tensor(key)
                facts["largest_read_bytes"] = max(facts["largest_read_bytes"], full.numel() * full.element_size())
                facts["tensors"] += 1
                module, attr = slots[key][0]
                like = getattr(module, attr)
                if key in quantized:
                    prefix = key + "."
                    qs_keys = [k for k in keys if k.startswith(prefix) and k in quant_parts]
                    if qs_keys:  # a pre-quantized bitsandbytes checkpoint: packed uint8 (or storage-typed) + its state
                        # stored as uint8 (bitsandbytes' default) or in the storage dtype: the same bytes either way
                        packed = full.to(device).reshape(-1).view(torch.uint8).view(compute_dtype).reshape(-1, 1)
                        qs = QuantState.from_dict({k[len(prefix):]: fh.get_tensor(k) for k in qs_keys}, device=device)
                    else:
                        packed, qs = quantize(full.to(device), compute_dtype, double_quant)
                    expect = packed_shape(math.prod(module.weight_shape), compute_dtype)
                    if tuple(packed.shape) != expect:
                        raise ShardedLoadError(f"{key}: packed 4-bit shape {tuple(packed.shape)}, expected {expect}")
                    module.quant_state = qs  # whole on every rank: the all-gathered weight is dequantized with it
                    local = _local_chunk(packed, rank, world).to(shard_device)
                    del packed
                else:
                    local = _local_chunk(full.to(compute_dtype), rank, world).to(shard_device)
                del full
                _set_sharded(slots[key], like, local, requires_grad=False)
                seen.add(id(slots[key]))
    missing = [k for k, holders in slots.items() if id(holders) not in seen]
    if missing:
        raise ShardedLoadError(f"the checkpoint lacks {len(missing)} tensor(s), e.g. {missing[:3]}")
    if lora_config is not None:
        _init_lora(model, rank, world, shard_device, lora_seed)
    leftover = [n for n, p in model.named_parameters() if p.is_meta or (hasattr(p, "_local_tensor") and p._local_tensor.is_meta)]
    if leftover:
        raise ShardedLoadError(f"{len(leftover)} parameter(s) were never loaded, e.g. {leftover[:3]}")
    if not distributed:
        model.to(device)
    if stats is not None:
        stats.update(facts)
        if device.type == "cuda":
            stats["peak_allocated_bytes"] = torch.cuda.max_memory_allocated(device)
    return model


def gather_adapter(model) -> dict[str, torch.Tensor]:
    """The LoRA weights whole (FSDP2's DTensor shards all-gathered; every rank must call it), on the CPU, by the
    model's parameter names. Only the adapter is gathered: never the 4-bit base (Trainer's FULL_STATE_DICT would
    gather every parameter of the model onto rank 0's CPU)."""
    out = {}
    for name, p in model.named_parameters():
        if "lora_" in name:
            full = p.full_tensor() if hasattr(p, "full_tensor") else p
            out[name] = full.detach().to("cpu", copy=True)
    return out


def save_adapter(model, out_dir: str | os.PathLike, rank: int) -> None:
    """One standard PEFT adapter (adapter_config.json + adapter_model.safetensors) from rank 0; every rank gathers."""
    state = gather_adapter(model)
    if rank == 0:
        peft_model = getattr(model, "module", model)
        peft_model.save_pretrained(str(out_dir), state_dict=state)
