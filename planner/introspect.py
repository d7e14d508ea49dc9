"""Build an architecture on the meta device and read off what the memory model needs.

This is the ground truth behind every shipped model profile: `qfit profile` runs it to write a
profile, and the tests run it to check each shipped profile. torch and transformers are imported
inside the functions (this module must not slow `qfit plan`).
"""

from __future__ import annotations

from pathlib import Path

from planner.errors import QfitError

# HF config.json fields a profile keeps verbatim (those that exist for the model type).
CONFIG_FIELDS = (
    "model_type", "architectures", "hidden_size", "intermediate_size", "num_hidden_layers",
    "num_attention_heads", "num_key_value_heads", "head_dim", "vocab_size", "max_position_embeddings",
    "tie_word_embeddings", "hidden_act", "hidden_activation", "rms_norm_eps", "rope_theta",
    "attention_bias", "mlp_bias", "num_local_experts", "num_experts_per_tok", "sliding_window",
    "final_logit_softcapping", "attn_logit_softcapping", "query_pre_attn_scalar", "rope_scaling",
    "bos_token_id", "eos_token_id", "pad_token_id", "original_max_position_embeddings", "auto_map",
)


# what the memory model needs from a config.json: a profile without them would be filled with transformers'
# defaults (a "llama" with 4096 hidden, 32 layers) that have nothing to do with the model
PROFILE_REQUIRED_FIELDS = ("model_type", "hidden_size", "intermediate_size", "num_hidden_layers",
                           "num_attention_heads", "vocab_size", "max_position_embeddings")


class IntrospectionError(QfitError):
    """A config transformers cannot build; the message says what to fix."""


def build_meta_model(config_dict: dict, num_hidden_layers: int | None = None, trust_remote_code: bool = False):
    """A transformers causal LM with the given config on the meta device (no memory, no download)."""
    import torch  # lazy: heavy
    from transformers import AutoConfig, AutoModelForCausalLM

    cfg = dict(config_dict)
    model_type = cfg.pop("model_type", None)
    if not model_type:
        raise IntrospectionError("config has no 'model_type': add it (e.g. \"llama\")")
    if num_hidden_layers is not None:
        cfg["num_hidden_layers"] = num_hidden_layers
    cfg.pop("architectures", None)
    try:
        config = AutoConfig.for_model(model_type, **cfg)
    except ValueError as exc:
        raise IntrospectionError(f"transformers does not know model_type {model_type!r}: {exc}") from None
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config, trust_remote_code=trust_remote_code)
    return model


def _decoder_layers(model):
    base = model.get_decoder() if hasattr(model, "get_decoder") else model.model
    layers = getattr(base, "layers", None)
    if layers is None:
        raise IntrospectionError("cannot find the decoder layers (model.model.layers) of this architecture")
    return layers


def inventory(model) -> dict:
    """The module inventory of a built model, as stored in a profile's [inventory] table."""
    import torch.nn as nn

    layers = _decoder_layers(model)
    first = layers[0]
    linears = []
    linear_param_ids = set()
    for path, mod in first.named_modules():
        if type(mod) is nn.Linear:
            leaf = path.rsplit(".", 1)[-1]
            group = "attn" if ("attn" in path or "attention" in path) else "mlp"
            linears.append({
                "name": leaf, "path": path, "in_features": mod.in_features,
                "out_features": mod.out_features, "bias": mod.bias is not None, "group": group,
            })
            linear_param_ids.update(id(p) for p in mod.parameters())
    layer_other = sum(p.numel() for p in first.parameters() if id(p) not in linear_param_ids)
    norms = sum(1 for _, m in first.named_modules() if "norm" in type(m).__name__.lower())
    shape0 = [(n, tuple(p.shape)) for n, p in first.named_parameters()]
    for i, layer in enumerate(layers):
        if [(n, tuple(p.shape)) for n, p in layer.named_parameters()] != shape0:
            raise IntrospectionError(f"decoder layer {i} differs from layer 0; heterogeneous layers are not modelled")
    embed = model.get_input_embeddings().weight
    out = model.get_output_embeddings()
    tied = out is not None and out.weight is embed
    lm_head = 0 if (out is None or tied) else out.weight.numel()
    total = sum(p.numel() for p in model.parameters())
    in_layers = sum(p.numel() for p in layers.parameters())
    names = {n for n, _ in first.named_parameters()} | {lin["name"] for lin in linears}
    gated = any("gate_proj" in n or "gate_up" in n or n.endswith(".w1.weight") for n in names)
    return {
        "total_params": total,
        "layer_linears": linears,
        "layer_other_params": layer_other,
        "norms_per_layer": norms,
        "embed_params": embed.numel(),
        "lm_head_params": lm_head,
        "final_other_params": total - in_layers - embed.numel() - lm_head,
        "tied": tied,
        "mlp_gated": gated,
        "attn_implementation": model.config._attn_implementation or "eager",
    }


def read_config_json(path: str | Path) -> dict:
    """config.json -> the fields a profile keeps. Raises IntrospectionError naming what is wrong."""
    from planner.profiles import read_json_object

    raw = read_json_object(Path(path))
    if "text_config" in raw and "hidden_size" not in raw:  # multimodal wrappers keep the LM inside
        raw = {**raw["text_config"], "model_type": raw["text_config"].get("model_type", raw.get("model_type"))}
    return {k: raw[k] for k in CONFIG_FIELDS if k in raw}


def require_profile_fields(config: dict, source: str) -> None:
    """IntrospectionError naming every PROFILE_REQUIRED_FIELDS field the config lacks."""
    missing = [k for k in PROFILE_REQUIRED_FIELDS if k not in config]
    if missing:
        raise IntrospectionError(f"{source} lacks {', '.join(missing)}: qfit profile needs the model's own values "
                                 "(it does not fill them with transformers' defaults); use the model's full config.json")
