"""Module layouts of the decoder families qfit knows without transformers.

Used when a user passes a local config.json (read with the standard library). Each layout is
stated per model_type from the transformers modeling file named in its comment; tests check every
layout against transformers on the meta device, for every shipped profile.
"""

from __future__ import annotations


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
    elif mt == "gemma2":  # modeling_gemma2.py: 4 RMSNorms per layer; _supports_sdpa = False (softcapping)
        linears = _attn(cfg, cfg.get("attention_bias", False), cfg.get("attention_bias", False)) + _gated_mlp(cfg, False)
        norms, other, attn_impl = 4, 4 * h, "eager"
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
