"""One codec for training settings: LoraSettings/TrainSettings <-> the `settings` dict.

Every document that stores settings (`qfit plan --json` and `--save`, plan.json and run_config.json of
`qfit run`, run_report.json, a rank's job, the calibration CSV rows) goes through these two functions,
so a field added to the settings is written and read in one place. Standard library only.
"""

from __future__ import annotations

from collections.abc import Mapping

from planner.errors import QfitError
from planner.specs import LoraSettings, TrainSettings

# The keys of the stable `settings` object (README, "--json schema"), in the order they are written.
SETTINGS_KEYS = (
    "batch_size", "grad_accum", "seq_len", "rank", "alpha", "lora_dropout", "targets",
    "gradient_checkpointing", "uncheckpointed_layers", "optim", "compute_dtype", "double_quant",
    "expandable_segments", "packing", "method",
)


def settings_to_dict(lora: LoraSettings, train: TrainSettings, targets: tuple[str, ...] | None = None) -> dict:
    """The stable `settings` object. `targets`: the resolved module names (default: as the user gave them)."""
    return {
        "batch_size": train.batch_size, "grad_accum": train.grad_accum, "seq_len": train.seq_len,
        "rank": lora.rank, "alpha": lora.alpha, "lora_dropout": lora.dropout,
        "targets": list(lora.targets if targets is None else targets),
        "gradient_checkpointing": train.gradient_checkpointing,
        "uncheckpointed_layers": train.uncheckpointed_layers, "optim": train.optim,
        "compute_dtype": train.compute_dtype, "double_quant": train.double_quant,
        "expandable_segments": train.expandable_segments, "packing": train.packing, "method": train.method,
    }


def _int(v) -> int:
    if isinstance(v, bool):
        raise QfitError(f"expected an integer, got {v!r}")
    if isinstance(v, str):
        v = v.strip()
    f = float(v)
    if f != int(f):
        raise QfitError(f"expected an integer, got {v!r}")
    return int(f)


def _bool(v) -> bool:
    if isinstance(v, bool):
        return v
    text = str(v).strip().lower()  # str() also covers numpy.bool_ cells of a pandas row
    if text in ("true", "1", "yes", "on"):
        return True
    if text in ("false", "0", "no", "off", ""):
        return False
    if isinstance(v, int | float):
        return bool(v)
    raise QfitError(f"expected true or false, got {v!r}")


def _targets(v) -> tuple[str, ...]:
    if isinstance(v, str):
        return tuple(t.strip() for t in v.split(",") if t.strip())
    return tuple(str(t) for t in v)


def settings_from_dict(d: Mapping, **overrides) -> tuple[LoraSettings, TrainSettings]:
    """Decode a `settings` object (or a calibration CSV row: strings, comma-joined targets, an
    `alloc_conf` column) into settings. Missing optional fields take the dataclass defaults (runs saved
    before a field existed); `overrides` replace fields by their dict key. Raises ValueError naming the
    field for a missing or malformed value."""
    d = {**d, **overrides}
    lora_defaults, train_defaults = LoraSettings(), TrainSettings()

    def get(key: str, conv, default=None):
        if key not in d or d[key] is None or d[key] == "":
            if default is None:
                raise QfitError(f"settings: missing {key!r}")
            return default
        try:
            return conv(d[key])
        except (TypeError, ValueError) as exc:
            raise QfitError(f"settings: {key!r} is malformed ({exc})") from None

    expandable = train_defaults.expandable_segments
    if "expandable_segments" in d and d["expandable_segments"] not in (None, ""):
        expandable = get("expandable_segments", _bool)
    elif "alloc_conf" in d:
        expandable = "expandable_segments:True" in str(d["alloc_conf"] or "")
    lora = LoraSettings(rank=get("rank", _int), alpha=get("alpha", _int, lora_defaults.alpha),
                        dropout=get("lora_dropout", float, lora_defaults.dropout),
                        targets=get("targets", _targets, lora_defaults.targets))
    train = TrainSettings(batch_size=get("batch_size", _int), grad_accum=get("grad_accum", _int, 1),
                          seq_len=get("seq_len", _int),
                          gradient_checkpointing=get("gradient_checkpointing", _bool, train_defaults.gradient_checkpointing),
                          optim=get("optim", str, train_defaults.optim),
                          compute_dtype=get("compute_dtype", str, train_defaults.compute_dtype),
                          double_quant=get("double_quant", _bool, train_defaults.double_quant),
                          expandable_segments=expandable,
                          kbit_upcast=get("kbit_upcast", _bool, train_defaults.kbit_upcast),
                          uncheckpointed_layers=get("uncheckpointed_layers", _int, 0),
                          packing=get("packing", _bool, False),
                          method=get("method", str, train_defaults.method),  # rows and plans from before: qlora
                          int8_outlier_share=_share(d.get("int8_outlier_share")))
    return lora, train


def _share(v) -> float | None:
    """A calibration row's measured int8 outlier share: absent, empty or NaN (a pandas cell) is None."""
    if v is None or v == "":
        return None
    try:
        f = float(v)
    except (TypeError, ValueError):
        raise QfitError(f"settings: 'int8_outlier_share' is malformed (expected a number in [0, 1], got {v!r})") from None
    return None if f != f else f
