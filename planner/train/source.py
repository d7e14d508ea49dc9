"""Where the model comes from: a local directory, a profile name or a Hugging Face id (resolve_model, with
the Hub's config.json from the cache or downloaded), and its tokenizer (load_tokenizer, set up to pad).

Module level is light; huggingface_hub and transformers are imported inside the functions.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

from planner.profiles import ProfileError, load_model
from planner.specs import ModelSpec
from planner.train.options import RunError, one_line


@dataclass(frozen=True, slots=True)
class ModelSource:
    spec: ModelSpec
    ref: str  # what from_pretrained gets: a local directory or a Hugging Face id
    local: bool


def _env_true(name: str) -> bool:
    return os.environ.get(name, "").strip().lower() in ("1", "true", "yes", "on")


def _hub_config(hf_id: str) -> str:
    """config.json of a Hub model from the local cache, or downloaded when online. -> local path."""
    from huggingface_hub import hf_hub_download, try_to_load_from_cache

    cached = try_to_load_from_cache(hf_id, "config.json")
    if isinstance(cached, str):
        return cached
    if _env_true("HF_HUB_OFFLINE") or _env_true("TRANSFORMERS_OFFLINE"):
        raise RunError(f"{hf_id} is not in the local Hugging Face cache and the Hub is offline (HF_HUB_OFFLINE): "
                       f"download it first (huggingface-cli download {hf_id}) or pass a local model directory")
    try:
        return hf_hub_download(hf_id, "config.json")
    except Exception as exc:  # network, auth (gated), unknown repo: huggingface_hub raises many types
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise RunError(f"cannot get {hf_id} from the Hugging Face Hub ({first[:160]}): check the id, the network "
                       "and access (gated models need `huggingface-cli login`), or pass a local model directory") from None


def resolve_model(name: str) -> ModelSource:
    """A local model directory, a profile name (`qfit models`), or a Hugging Face id."""
    path = Path(name).expanduser()
    if path.is_dir():
        if not (path / "config.json").is_file():
            raise RunError(f"{name} has no config.json: pass a model directory saved with save_pretrained")
        if not any(path.glob("*.safetensors")) and not any(path.glob("*.bin")):
            raise RunError(f"{name} has a config.json but no weights (*.safetensors or *.bin)")
        try:
            spec = load_model(str(path))
        except ProfileError as exc:
            raise RunError(str(exc)) from None
        return ModelSource(spec, str(path.resolve()), True)
    try:
        spec = load_model(name)
        hf_id = spec.hf_id
    except ProfileError:
        if "/" not in name or name.startswith((".", "/", "~")):
            raise
        hf_id, spec = name, None
    if not hf_id:
        raise RunError(f"{name} has no Hugging Face id to load weights from: use --demo for the tiny demo model, "
                       "or pass a local model directory")
    config = _hub_config(hf_id)
    if spec is None:
        try:
            spec = load_model(config)
        except ProfileError as exc:
            raise RunError(str(exc)) from None
    return ModelSource(spec, hf_id, False)


def load_tokenizer(ref: str):
    """The tokenizer of a model directory or Hub id, set up to pad micro-batches on the right."""
    from transformers import AutoTokenizer

    try:
        tok = AutoTokenizer.from_pretrained(ref)
    except Exception as exc:  # OSError (missing files), ValueError (unknown class), ...
        raise RunError(f"cannot load the tokenizer of {ref} ({one_line(exc, 160)}): "
                       "the model directory needs its tokenizer files") from None
    if tok.pad_token_id is None:  # padding is masked out of the loss, so any existing token will do
        tok.pad_token = tok.eos_token if tok.eos_token is not None else tok.unk_token
    if tok.pad_token_id is None:
        raise RunError(f"the tokenizer of {ref} has no pad, eos or unk token to pad micro-batches with")
    tok.padding_side = "right"
    return tok
