"""profiles/{models,gpus}/*.toml -> specs. Listing, validation, did-you-mean. Standard library only."""

from __future__ import annotations

import difflib
import json
import os
import sys
import tomllib
from dataclasses import replace
from functools import lru_cache
from pathlib import Path

from planner.architectures import default_attn_implementation, installed_transformers_version
from planner.errors import QfitError
from planner.hf_cache import config_json, looks_like_hf_id
from planner.specs import MEMORY_CLASS_FRAC, GpuSpec, LinearSpec, ModelSpec
from planner.units import looks_like_size, parse_size


def _data_dir(name: str) -> Path:
    """The repo's top-level folder (source checkout, editable install) or <prefix>/share/qfit (wheel)."""
    here = Path(__file__).resolve().parent.parent / name
    return here if here.is_dir() else Path(sys.prefix) / "share" / "qfit" / name


PROFILES_DIR = Path(os.environ.get("QFIT_PROFILES") or _data_dir("profiles"))


# model types whose modeling file applies config.sliding_window to every layer's mask (transformers 5)
SLIDING_WINDOW_TYPES = ("mistral", "mixtral", "phi3")


class ProfileError(QfitError):
    """A user-facing problem with a model or GPU name or file: the message says what to do."""


def _norm(name: str) -> str:
    return name.strip().lower().replace("_", "-")


# --------------------------------------------------------------------------- model profiles

def model_from_dict(doc: dict, origin: str) -> ModelSpec:
    """A profile document (TOML table) -> ModelSpec. Raises ProfileError naming a missing field."""
    cfg = doc.get("config", {})
    inv = doc.get("inventory", {})

    def need(table: dict, key: str, where: str):
        if key not in table:
            raise ProfileError(f"{origin}: missing field '{key}' in {where}")
        return table[key]

    heads = need(cfg, "num_attention_heads", "config")
    hidden = need(cfg, "hidden_size", "config")
    linears = tuple(
        LinearSpec(name=lin["name"], in_features=lin["in_features"], out_features=lin["out_features"],
                   bias=lin["bias"], group=lin["group"], count=lin.get("count", 1))
        for lin in need(inv, "layer_linears", "inventory")
    )
    act = cfg.get("hidden_activation") or cfg.get("hidden_act") or "silu"
    return ModelSpec(
        name=doc.get("name", origin), display_name=doc.get("display_name", doc.get("name", origin)),
        hf_id=doc.get("hf_id", ""), source=doc.get("source", origin),
        model_type=need(cfg, "model_type", "config"),
        hidden_size=hidden, intermediate_size=need(cfg, "intermediate_size", "config"),
        num_hidden_layers=need(cfg, "num_hidden_layers", "config"), num_attention_heads=heads,
        num_key_value_heads=cfg.get("num_key_value_heads") or heads,
        head_dim=cfg.get("head_dim") or hidden // heads, vocab_size=need(cfg, "vocab_size", "config"),
        max_position_embeddings=need(cfg, "max_position_embeddings", "config"),
        tie_word_embeddings=bool(inv.get("tied", cfg.get("tie_word_embeddings", False))),
        hidden_act=act, mlp_gated=bool(inv.get("mlp_gated", True)),
        attn_implementation=inv.get("attn_implementation", "sdpa"), layer_linears=linears,
        layer_other_params=need(inv, "layer_other_params", "inventory"),
        norms_per_layer=inv.get("norms_per_layer", 2), embed_params=need(inv, "embed_params", "inventory"),
        lm_head_params=need(inv, "lm_head_params", "inventory"),
        final_other_params=need(inv, "final_other_params", "inventory"),
        num_local_experts=cfg.get("num_local_experts", 0) or 0,
        num_experts_per_tok=cfg.get("num_experts_per_tok", 0) or 0,
        final_logit_softcapping=cfg.get("final_logit_softcapping"),
        attn_logit_softcapping=cfg.get("attn_logit_softcapping"),
        sliding_window=cfg.get("sliding_window") if cfg.get("model_type") in SLIDING_WINDOW_TYPES else None,
        aliases=tuple(doc.get("aliases", ())), notes=doc.get("notes", ""),
    )


@lru_cache(maxsize=64)
def _load_toml(path: Path) -> dict:
    with path.open("rb") as fh:
        return tomllib.load(fh)


@lru_cache(maxsize=2)
def _catalog(kind: str) -> dict[str, tuple[Path, dict]]:
    """Every profile of one kind ("models" or "gpus"): stem -> (path, document)."""
    return {path.stem: (path, _load_toml(path)) for path in sorted((PROFILES_DIR / kind).glob("*.toml"))}


def _model_docs() -> dict[str, tuple[Path, dict]]:
    return _catalog("models")


def model_names() -> list[str]:
    return sorted(_model_docs())


def _model_index() -> dict[str, str]:
    index = {}
    for stem, (_, doc) in _model_docs().items():
        for key in (stem, doc.get("hf_id", ""), doc.get("display_name", ""), *doc.get("aliases", ())):
            if key:
                index[_norm(key)] = stem
    return index


def load_model(name_or_path: str, transformers_version: str | None = None) -> ModelSpec:
    """A short name, a Hugging Face id, a profile .toml, or a local config.json (or its folder), as the
    transformers that will run it builds it: its default attention (Gemma-2: sdpa before 5.21, eager from it;
    planner.architectures.default_attn_implementation). transformers_version None: the installed one (package
    metadata, no import), or the newest behaviour when none is installed. A measured row passes its own
    `transformers` column (planner.fit.row_model)."""
    spec = _find_model(name_or_path)
    version = transformers_version or installed_transformers_version()
    attn = default_attn_implementation(spec.model_type, version, spec.attn_implementation)
    return spec if attn == spec.attn_implementation else replace(spec, attn_implementation=attn)


def _find_model(name_or_path: str) -> ModelSpec:
    path = Path(name_or_path).expanduser()
    if name_or_path.endswith((".json", ".toml")) or path.is_dir():
        return _load_model_file(path)
    direct = PROFILES_DIR / "models" / f"{_norm(name_or_path)}.toml"
    if direct.is_file():  # the common case: a short name; parse one file, not the catalog
        return model_from_dict(_load_toml(direct), str(direct))
    stem = _model_index().get(_norm(name_or_path))
    if stem is None and looks_like_hf_id(name_or_path):  # org/name outside the catalog: its config.json
        try:
            path = config_json(name_or_path)
        except QfitError as exc:  # a ProfileError, as for any model qfit cannot find
            raise ProfileError(str(exc)) from None
        return model_from_config_json(path, name=name_or_path, hf_id=name_or_path)
    if stem is None:
        raise ProfileError(f"unknown model '{name_or_path}'.{_did_you_mean(name_or_path, _model_index())} "
                           "(`qfit models` lists all; a path to a config.json works too)")
    path, doc = _model_docs()[stem]
    return model_from_dict(doc, str(path))


def _load_model_file(path: Path) -> ModelSpec:
    if path.is_dir():
        path = path / "config.json"
    if not path.is_file():
        raise ProfileError(f"no such file: {path}")
    if path.suffix == ".toml":
        try:
            with path.open("rb") as fh:
                return model_from_dict(tomllib.load(fh), str(path))
        except tomllib.TOMLDecodeError as exc:
            raise ProfileError(f"{path} is not valid TOML: {exc}") from None
    return model_from_config_json(path)


def read_json_object(path: Path) -> dict:
    """A JSON file that must hold an object; ProfileError (one line) otherwise."""
    try:
        raw = json.loads(Path(path).read_text(encoding="utf-8"))
    except json.JSONDecodeError as exc:
        raise ProfileError(f"{path} is not valid JSON ({exc.msg}, line {exc.lineno})") from None
    except UnicodeDecodeError:
        raise ProfileError(f"{path} is not a JSON text file (binary content): give the model's config.json") from None
    except OSError as exc:
        raise ProfileError(f"cannot read {path}: {exc.strerror}") from None
    if not isinstance(raw, dict):
        raise ProfileError(f"{path} must hold a JSON object")
    return raw


def model_from_config_json(path: Path, name: str | None = None, hf_id: str = "") -> ModelSpec:
    """Read a Hugging Face config.json with the standard library and lay out its modules. `name`/`hf_id`: the
    Hugging Face id it was read for (from the cache: the folder is a commit hash, not a name)."""
    from planner.architectures import KNOWN_MODEL_TYPES, layout

    raw = read_json_object(path)
    if "model_type" not in raw:
        raise ProfileError(f"{path}: missing field 'model_type'")
    if raw["model_type"] not in KNOWN_MODEL_TYPES:
        raise ProfileError(
            f"{path}: qfit has no built-in layout for model_type '{raw['model_type']}' "
            f"(known: {', '.join(KNOWN_MODEL_TYPES)}); run `qfit profile {path}` to write a profile from transformers")
    for key in ("hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
                "vocab_size", "max_position_embeddings"):
        if key not in raw:
            raise ProfileError(f"{path}: missing field '{key}'")
        if not isinstance(raw[key], int) or raw[key] <= 0:
            raise ProfileError(f"{path}: field '{key}' must be a positive integer, got {raw[key]!r}")
    if raw["model_type"] == "mixtral" and "num_local_experts" not in raw:
        raise ProfileError(f"{path}: missing field 'num_local_experts'")
    inv = layout(raw)
    name = name or raw.get("_name_or_path") or path.parent.name or path.stem
    return model_from_dict({"name": name, "display_name": name, "hf_id": hf_id, "source": str(path),
                            "config": raw, "inventory": inv}, str(path))


# --------------------------------------------------------------------------- GPU profiles

def _gpu_docs() -> dict[str, tuple[Path, dict]]:
    return _catalog("gpus")


def gpu_names() -> list[str]:
    return sorted(_gpu_docs(), key=lambda s: _gpu_docs()[s][1]["memory_bytes"])


def _gpu_index() -> dict[str, str]:
    index = {}
    for stem, (_, doc) in _gpu_docs().items():
        for key in (stem, doc.get("display_name", ""), *doc.get("aliases", ())):
            if key:
                index[_norm(key)] = stem
    return index


def gpu_from_dict(doc: dict, origin: str) -> GpuSpec:
    try:
        return GpuSpec(
            name=doc["name"], display_name=doc["display_name"], memory_bytes=int(doc["memory_bytes"]),
            compute_capability=doc["compute_capability"], bf16=doc["bf16"],
            flash_attention_2=doc["flash_attention_2"], bf16_tflops=float(doc["bf16_tflops"]),
            fp16_tflops=float(doc["fp16_tflops"]), bandwidth_gb_s=float(doc["bandwidth_gb_s"]),
            price_usd_per_hour=doc.get("price_usd_per_hour"), price_date=doc.get("price_date", ""),
            price_source=doc.get("price_source", ""), source=doc["source"],
            memory_source=doc.get("memory_source", ""), aliases=tuple(doc.get("aliases", ())),
            fp32_tflops=float(doc.get("fp32_tflops", 0.0)), int8_tops=float(doc.get("int8_tops", 0.0)),
        )
    except KeyError as exc:
        raise ProfileError(f"{origin}: missing field {exc}") from None


def load_gpu(name: str) -> GpuSpec:
    """A catalog name ('t4', 'NVIDIA A100-SXM4-80GB') or a bare capacity ('24GiB', '16GB')."""
    if name.strip().startswith("-") and looks_like_size(name.strip()[1:]):
        raise ProfileError(f"--gpu {name}: a capacity must be positive, e.g. 24GiB")
    if looks_like_size(name):
        size = parse_size(name)
        if size <= 0:
            raise ProfileError(f"--gpu {name}: a capacity must be positive, e.g. 24GiB")
        return capacity_gpu(size, name)
    direct = PROFILES_DIR / "gpus" / f"{_norm(name)}.toml"
    if direct.is_file():
        return gpu_from_dict(_load_toml(direct), str(direct))
    stem = _gpu_index().get(_norm(name))
    if stem is None:
        raise ProfileError(f"unknown GPU '{name}'.{_did_you_mean(name, _gpu_index())} "
                           "(`qfit gpus` lists all; a capacity such as 24GiB works too)")
    path, doc = _gpu_docs()[stem]
    return gpu_from_dict(doc, str(path))


def memory_class(memory_bytes: int) -> list[GpuSpec]:
    """Catalog GPUs whose memory is within MEMORY_CLASS_FRAC of `memory_bytes`, slowest first."""
    near = [g for g in all_gpus() if abs(g.memory_bytes - memory_bytes) <= MEMORY_CLASS_FRAC * memory_bytes]
    return sorted(near, key=lambda g: (g.bandwidth_gb_s, max(g.bf16_tflops, g.fp16_tflops), g.name))


def capacity_gpu(memory_bytes: int, label: str, class_bytes: int | None = None, **facts) -> GpuSpec:
    """A card known by its memory (`--gpu 24GiB`, or an uncatalogued GPU NVML reports): planned like the
    slowest catalog card of its memory class (`class_bytes`, default `memory_bytes`), whose speed facts
    it borrows (speed_proxy names it); with none in the class, no speed facts (tokens/s unknown).
    `facts` override fields (display_name, bf16, compute_capability: what NVML or torch read)."""
    spec = GpuSpec.bare_capacity(memory_bytes, label)
    near = memory_class(class_bytes or memory_bytes)
    if near:
        proxy = near[0]
        spec = replace(spec, bf16_tflops=proxy.bf16_tflops or proxy.fp16_tflops, fp16_tflops=proxy.fp16_tflops,
                       bandwidth_gb_s=proxy.bandwidth_gb_s, fp32_tflops=proxy.fp32_tflops, int8_tops=proxy.int8_tops,
                       speed_proxy=proxy.display_name)
    return replace(spec, **facts)


def all_gpus() -> list[GpuSpec]:
    return [load_gpu(n) for n in gpu_names()]


def all_models() -> list[ModelSpec]:
    return [load_model(n) for n in model_names()]


def match_gpu_name(device_name: str) -> GpuSpec | None:
    """NVML's device name ('NVIDIA H200', 'Tesla T4') -> a catalog GPU, or None."""
    stem = _gpu_index().get(_norm(device_name))
    if stem is None:
        return None
    path, doc = _gpu_docs()[stem]
    return gpu_from_dict(doc, str(path))


def _did_you_mean(word: str, index: dict[str, str]) -> str:
    close = difflib.get_close_matches(_norm(word), list(index), n=6, cutoff=0.6)
    stems = list(dict.fromkeys(index[c] for c in close))[:3]
    return f" Did you mean: {', '.join(stems)}?" if stems else ""
