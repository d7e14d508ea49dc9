"""Module layouts of the decoder families qfit knows without transformers.

Used when a user passes a local config.json (read with the standard library). Each layout is
stated per model_type from the transformers modeling file named in its comment; tests check every
layout against transformers on the meta device, for every shipped profile.
"""

from __future__ import annotations

from functools import lru_cache

# model types whose default attention depends on the transformers version (see SOFTCAPPING_EAGER_FROM)
SOFTCAPPING_EAGER_TYPES = ("gemma2",)

SOFTCAPPING_EAGER_FROM = (5, 21)
"""The transformers release from which Gemma-2 trains with eager attention when from_pretrained gets no
attn_implementation: transformers/models/gemma2/modeling_gemma2.py sets on Gemma2PreTrainedModel
`_supports_sdpa = False  # sdpa does not support softcapping` from 5.21.0 on, `_supports_sdpa = True` up to 5.20.x
(read in the wheels of 5.0.0, 5.17.0-5.20.0: True; 5.21.0, 5.23.0, 5.25.0: False), so the same profile ran sdpa on
the calibration machine (5.17.0, calibration/logs/attn-check-h200.txt) and runs eager on 5.21+. Eager keeps the
per-head seq x seq scores for backward (planner.memory.layer_saved_bytes_per_token). Before qfit's floor
(transformers>=5.0): 4.48-4.57 said True as well; 4.42-4.47 forced eager in Gemma2PreTrainedModel._check_and_enable_sdpa.
Other softcapping families in transformers 5.25 (vaultgemma, t5gemma) carry the same flag but are not qfit layouts."""


def version_tuple(version: str) -> tuple[int, ...]:
    """'5.17.0' -> (5, 17, 0); '5.21.0.dev0' -> (5, 21, 0): the leading numeric release components."""
    out = []
    for part in version.strip().split("."):
        digits = ""
        for ch in part:
            if not ch.isdigit():
                break
            digits += ch
        if not digits:
            break
        out.append(int(digits))
        if len(digits) < len(part):  # '0rc1', '0+local': the release stops here
            break
    return tuple(out)


@lru_cache(maxsize=1)
def installed_transformers_version() -> str | None:
    """The installed transformers' version from its package metadata (no import: `qfit plan` stays light);
    None when it is not installed."""
    from importlib import metadata

    try:
        return metadata.version("transformers")
    except metadata.PackageNotFoundError:
        return None


def default_attn_implementation(model_type: str, transformers_version: str | None, profiled: str = "sdpa") -> str:
    """The attention kernel transformers picks for training when from_pretrained gets no attn_implementation.

    `profiled` is what the profile's inventory states (the model's own fact for every version); the families of
    SOFTCAPPING_EAGER_TYPES run sdpa before SOFTCAPPING_EAGER_FROM and eager from it. transformers_version None
    (none installed, version unknown): the newest behaviour, eager.
    """
    if model_type not in SOFTCAPPING_EAGER_TYPES:
        return profiled
    if transformers_version and version_tuple(transformers_version) < SOFTCAPPING_EAGER_FROM:
        return "sdpa"
    return "eager"


def _lin(name, path, i, o, bias, group):
    return {"name": name, "path": path, "in_features": i, "out_features": o, "bias": bias, "group": group}


def _attn(cfg, q_bias, o_bias, fused=False):
    h = cfg["hidden_size"]
    heads = cfg["num_attention_heads"]
    hd = cfg.get("head_dim") or h // heads
    kv = cfg.get("num_key_value_heads") or heads
    if fused:  # phi3: one qkv_proj
        return [_lin("qkv_proj", "self_attn.qkv_proj", h, (heads + 2 * kv) * hd, q_bias, "attn"),
                _lin("o_proj", "self_attn.o_proj", heads * hd, h, o_bias, "attn")]
    return [_lin("q_proj", "self_attn.q_proj", h, heads * hd, q_bias, "attn"),
            _lin("k_proj", "self_attn.k_proj", h, kv * hd, q_bias, "attn"),
            _lin("v_proj", "self_attn.v_proj", h, kv * hd, q_bias, "attn"),
            _lin("o_proj", "self_attn.o_proj", heads * hd, h, o_bias, "attn")]


def _gated_mlp(cfg, bias, fused=False):
    h, i = cfg["hidden_size"], cfg["intermediate_size"]
    if fused:  # phi3: one gate_up_proj
        return [_lin("gate_up_proj", "mlp.gate_up_proj", h, 2 * i, bias, "mlp"),
                _lin("down_proj", "mlp.down_proj", i, h, bias, "mlp")]
    return [_lin("gate_proj", "mlp.gate_proj", h, i, bias, "mlp"),
            _lin("up_proj", "mlp.up_proj", h, i, bias, "mlp"),
            _lin("down_proj", "mlp.down_proj", i, h, bias, "mlp")]


def layout(cfg: dict) -> dict:
    """config.json fields -> the [inventory] table of a profile (no transformers needed).

    Raises KeyError for a missing field and ValueError for an unknown model_type.
    """
    mt = cfg["model_type"]
    h, v, n_layers = cfg["hidden_size"], cfg["vocab_size"], cfg["num_hidden_layers"]
    cfg["intermediate_size"]  # required by every family below
    tied = bool(cfg.get("tie_word_embeddings", mt in ("gemma2", "qwen2") and False))
    norms, other, attn_impl = 2, 2 * h, "sdpa"
    if mt in ("llama", "mistral"):  # modeling_llama.py / modeling_mistral.py
        ab, mb = cfg.get("attention_bias", False), cfg.get("mlp_bias", False)
        linears = _attn(cfg, ab, ab) + _gated_mlp(cfg, mb)
    elif mt == "qwen2":  # modeling_qwen2.py: q,k,v carry a bias, o_proj does not
        linears = _attn(cfg, True, False) + _gated_mlp(cfg, False)
    elif mt == "gemma2":  # modeling_gemma2.py: 4 RMSNorms per layer; attention: see SOFTCAPPING_EAGER_FROM
        linears = _attn(cfg, cfg.get("attention_bias", False), cfg.get("attention_bias", False)) + _gated_mlp(cfg, False)
        # the inventory states the newest behaviour, as `qfit profile` writes it; load_model resolves the version in use
        norms, other, attn_impl = 4, 4 * h, default_attn_implementation(mt, None)
    elif mt == "phi3":  # modeling_phi3.py: fused qkv_proj and gate_up_proj
        linears = _attn(cfg, False, False, fused=True) + _gated_mlp(cfg, False, fused=True)
    elif mt == "mixtral":  # modeling_mixtral.py (transformers 5): experts are 3-D parameters, not nn.Linear
        linears = _attn(cfg, False, False)
        e, i = cfg["num_local_experts"], cfg["intermediate_size"]
        other = 2 * h + e * h + e * (2 * i * h + h * i)  # norms + router + gate_up_proj + down_proj
    else:
        raise ValueError(mt)
    embed = v * h
    return {
        "layer_linears": linears,
        "layer_other_params": other,
        "norms_per_layer": norms,
        "embed_params": embed,
        "lm_head_params": 0 if tied else v * h,
        "final_other_params": h,
        "tied": tied,
        "mlp_gated": True,
        "attn_implementation": attn_impl,
        "total_params": n_layers * (other + sum(
            lin["in_features"] * lin["out_features"] + (lin["out_features"] if lin["bias"] else 0)
            for lin in linears)) + embed + (0 if tied else v * h) + h,
    }


KNOWN_MODEL_TYPES = ("llama", "mistral", "qwen2", "gemma2", "phi3", "mixtral")
