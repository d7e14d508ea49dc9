"""The output folder of `qfit run`: refuse one in use, create it, find the newest complete checkpoint,
read a saved run back for --resume, and write its JSON documents (atomically) with the data's fingerprint.

Standard library and light planner modules only.
"""

from __future__ import annotations

import json
import os
import shutil
from dataclasses import replace
from pathlib import Path

from planner.codec import settings_from_dict
from planner.specs import LoraSettings, TrainSettings
from planner.train.options import RESUME_FIXED, RunError, RunOptions

RUN_CONFIG = "run_config.json"  # what --resume needs to continue the run (settings in effect, data, steps)
RUN_REPORT = "run_report.json"
PLAN_FILE = "plan.json"
CONFIG_VERSION = 1
# qfit run --num-gpus N: the rank that runs out of memory writes OOM_FILE (planner.train.distributed), the parent
# reads it to back off (planner.train.dist_run); every rank writes its measurements to RANK_FILE
OOM_FILE = "oom.json"
RANK_FILE = "rank{rank}.json"


def last_checkpoint(output: Path) -> Path | None:
    """The newest complete Trainer checkpoint (trainer_state.json and adapter weights written)."""
    best = None
    for p in output.glob("checkpoint-*"):
        step = p.name.rsplit("-", 1)[-1]
        if not (step.isdigit() and (p / "trainer_state.json").is_file()):
            continue
        if not any((p / f).is_file() for f in ("adapter_model.safetensors", "adapter_model.bin")):
            continue
        if best is None or int(step) > int(best.name.rsplit("-", 1)[-1]):
            best = p
    return best


def check_checkpoint(ckpt: Path) -> None:
    """A RunError naming the checkpoint when its files cannot be read (a truncated adapter, a broken
    trainer_state.json), before the Trainer tries and fails with a traceback."""
    import json

    from safetensors import safe_open

    try:
        json.loads((ckpt / "trainer_state.json").read_text())
        weights = ckpt / "adapter_model.safetensors"
        if weights.is_file():
            with safe_open(str(weights), framework="pt") as fh:
                for name in fh.keys():
                    fh.get_slice(name)
    except Exception as exc:  # any damage: the message says which file and what to do
        raise RunError(f"checkpoint {ckpt} is damaged ({type(exc).__name__}: {str(exc).splitlines()[0][:120]}): delete "
                       f"that folder to resume from the one before it, or start over with --overwrite") from None


def check_output(opts: RunOptions) -> Path:
    """Refuse an output directory in use (before anything slow happens); nothing is deleted here."""
    out = Path(opts.output).expanduser()
    if opts.resume:
        if not (out / RUN_CONFIG).is_file():
            raise RunError(f"nothing to resume in {out}: no {RUN_CONFIG} (start a run with --output {out})")
        if last_checkpoint(out) is None:
            raise RunError(f"{out} has no checkpoint to resume from (one is saved every --save-steps steps and on "
                           "Ctrl-C/SIGTERM): start again with --overwrite")
        return out
    if out.exists() and not out.is_dir():
        raise RunError(f"--output {out} is a file: pass a directory")
    if out.is_dir() and any(out.iterdir()):
        if not opts.overwrite:
            raise RunError(f"{out} exists and is not empty: pass --overwrite to replace it, "
                           f"or --resume {out} to continue the run in it")
        if not ((out / RUN_CONFIG).is_file() or (out / RUN_REPORT).is_file()):
            raise RunError(f"{out} was not written by qfit run, so --overwrite will not delete it: choose another --output")
    return out


def prepare_output(opts: RunOptions) -> Path:
    """check_output, then (new runs) replace an earlier qfit run there with --overwrite and create the directory."""
    out = check_output(opts)
    if not opts.resume and opts.overwrite and out.is_dir() and any(out.iterdir()):
        shutil.rmtree(out)
    out.mkdir(parents=True, exist_ok=True)
    return out


def resume_options(opts: RunOptions) -> tuple[RunOptions, dict]:
    """--resume DIR: the saved run's options (given options must not change the run midway)."""
    given = [k for k in RESUME_FIXED if getattr(opts, k) not in (None, False)]
    if given:
        flags = ", ".join("--" + k.replace("_", "-").replace("fmt", "format").replace("plan-path", "plan")
                          for k in given)
        raise RunError(f"--resume continues a run with its saved settings: drop {flags}")
    path = Path(opts.output).expanduser() / RUN_CONFIG
    if not path.is_file():
        raise RunError(f"nothing to resume in {opts.output}: no {RUN_CONFIG} (start a run with --output {opts.output})")
    try:
        saved = json.loads(path.read_text())
    except (OSError, json.JSONDecodeError) as exc:
        raise RunError(f"cannot read {path}: {exc}") from None
    if saved.get("version") != CONFIG_VERSION:
        raise RunError(f"{path} was written by another qfit version: start again with --overwrite")
    report = Path(opts.output).expanduser() / RUN_REPORT
    if report.is_file():
        try:
            done = json.loads(report.read_text())
        except (OSError, json.JSONDecodeError):
            done = {}
        if done.get("status") == "completed":
            raise RunError(f"the run in {opts.output} is complete ({done['steps']['completed']} steps): "
                           "start a new one with another --output")
    dataset = saved["dataset"]["source"]
    restored = replace(opts, model=None if saved["demo"] else saved["model"], demo=saved["demo"],
                       dataset=None if saved["demo"] else dataset, fmt=saved["format"], seq_len=saved["seq_len"],
                       max_steps=saved["max_steps"], learning_rate=saved["learning_rate"], warmup=saved["warmup"],
                       save_steps=saved["save_steps"], seed=saved["seed"], scheduler=saved.get("scheduler", "cosine"),
                       eval_dataset=(saved.get("eval") or {}).get("dataset"),
                       eval_fraction=(saved.get("eval") or {}).get("fraction", 0.0),
                       eval_steps=(saved.get("eval") or {}).get("steps"),
                       padding=saved.get("padding", "longest"))  # (runs saved before --padding existed: longest)
    return restored, saved


def saved_settings(saved: dict) -> tuple[LoraSettings, TrainSettings]:
    """The settings in effect of a saved run (run_config.json), through the one settings codec."""
    return settings_from_dict(saved["settings"])


def write_json(path: Path, doc: dict) -> None:
    """path <- doc, atomically (a reader never sees half a file, even after a crash)."""
    tmp = path.with_suffix(path.suffix + ".tmp")
    tmp.write_text(json.dumps(doc, indent=2, default=str) + "\n")
    os.replace(tmp, path)


def fingerprint(path: str) -> dict:
    """The data file as run_config.json records it: resolved path, size and mtime (a change warns on --resume)."""
    p = Path(path)
    if not p.is_file():
        return {"source": path}
    st = p.stat()
    return {"source": str(p.resolve()), "size_bytes": st.st_size, "mtime": int(st.st_mtime)}
