"""Coefficients: load them (stdlib json) and pick the one for a GPU. The fit lives in planner/fit.py.

Resolution order for `qfit plan`: the user's own calibration for the detected/asked GPU
(~/.cache/qfit/coefficients-<gpu>.json, written by `qfit calibrate --gpu auto`), then the
project's fitted file calibration/coefficients.json, then calibration/defaults.json.
"""

from __future__ import annotations

import json
import os
from functools import lru_cache
from pathlib import Path

from planner.errors import QfitError
from planner.profiles import _data_dir
from planner.specs import Coefficients

CALIBRATION_DIR = _data_dir("calibration")
DEFAULTS_FILE = CALIBRATION_DIR / "defaults.json"
FITTED_FILE = CALIBRATION_DIR / "coefficients.json"


def user_cache_dir() -> Path:
    base = os.environ.get("QFIT_CACHE") or os.path.join(
        os.environ.get("XDG_CACHE_HOME") or os.path.expanduser("~/.cache"), "qfit")
    return Path(base)


def user_coefficients_file(gpu_name: str) -> Path:
    return user_cache_dir() / f"coefficients-{gpu_name}.json"


def _read_document(path: str) -> dict:
    """A coefficients file: a JSON object with "name" and a "values" object of numbers; QfitError naming the
    file and what to do otherwise."""
    fix = "pass a file written by `qfit calibrate` (like calibration/coefficients.json)"
    try:
        doc = json.loads(Path(path).read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        where = f"{exc.msg}, line {exc.lineno}" if isinstance(exc, json.JSONDecodeError) else "not UTF-8 text"
        raise QfitError(f"coefficients file {path} is not valid JSON ({where}): {fix}") from None
    except OSError as exc:
        raise QfitError(f"cannot read coefficients file {path}: {exc.strerror}") from None
    if not isinstance(doc, dict) or not isinstance(doc.get("values"), dict) or not doc["values"]:
        raise QfitError(f"coefficients file {path} holds no \"values\" object of coefficients: {fix}")
    bad = [k for k, v in doc["values"].items() if isinstance(v, bool) or not isinstance(v, (int, float, str))]
    if bad:
        raise QfitError(f"coefficients file {path}: value of {bad[0]!r} is not a number: {fix}")
    doc.setdefault("name", Path(path).stem)
    return doc


@lru_cache(maxsize=8)
def _read(path: str) -> Coefficients:
    doc = _read_document(path)
    defaults = json.loads(DEFAULTS_FILE.read_text())["values"] if Path(path) != DEFAULTS_FILE else {}
    values = {**defaults, **doc["values"]}  # a fitted file may leave some terms at their defaults
    desc = doc.get("description", "")
    if doc.get("measured_on"):
        m = doc["measured_on"]
        desc = f"{doc['name']}: fitted on {m.get('runs', '?')} configurations on {m.get('gpu', '?')}, {m.get('stack', '')}, {m.get('date', '')}"
    return Coefficients(name=doc["name"], description=desc or doc["name"], values=values)


def load_coefficients(gpu_name: str | None = None, path: str | None = None) -> Coefficients:
    if path:
        return _read(str(Path(path).resolve()))
    if gpu_name:
        user = user_coefficients_file(gpu_name)
        if user.is_file():
            return _read(str(user))
    if FITTED_FILE.is_file():
        return _read(str(FITTED_FILE))
    return _read(str(DEFAULTS_FILE))
