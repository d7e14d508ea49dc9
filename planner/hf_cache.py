"""A Hugging Face model id's config.json: from the local Hugging Face cache (standard library: the cache layout
huggingface_hub's `try_to_load_from_cache` reads), else downloaded alone (huggingface_hub's `hf_hub_download`,
short timeouts) unless the hub is offline (HF_HUB_OFFLINE=1).

Standard library at module level: `qfit plan org/name` stays light; huggingface_hub is imported only to download.
"""

from __future__ import annotations

import os
import re
from pathlib import Path

from planner.errors import QfitError

# "org/name": what the hub accepts as a repo id (letters, digits, - _ . ; one slash)
HF_ID_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]*/[A-Za-z0-9][A-Za-z0-9._-]*$")
# seconds for the one config.json request when the hub is reachable: a plan should not hang on a slow network
DOWNLOAD_TIMEOUT_S = 5


def looks_like_hf_id(text: str) -> bool:
    return bool(HF_ID_RE.match(text)) and not text.endswith((".json", ".toml"))


def hub_cache_dir() -> Path:
    """Where huggingface_hub keeps repositories: HF_HUB_CACHE, else $HF_HOME/hub, else
    $XDG_CACHE_HOME/huggingface/hub, else ~/.cache/huggingface/hub (huggingface_hub.constants)."""
    for var in ("HF_HUB_CACHE", "HUGGINGFACE_HUB_CACHE"):
        if os.environ.get(var):
            return Path(os.environ[var]).expanduser()
    if os.environ.get("HF_HOME"):
        return Path(os.environ["HF_HOME"]).expanduser() / "hub"
    xdg = os.environ.get("XDG_CACHE_HOME") or os.path.expanduser("~/.cache")
    return Path(xdg) / "huggingface" / "hub"


def hub_offline() -> bool:
    """HF_HUB_OFFLINE (or TRANSFORMERS_OFFLINE) set to a true value, as huggingface_hub reads it."""
    return any(os.environ.get(v, "").strip().lower() in ("1", "on", "yes", "true")
               for v in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE"))


def cached_config(repo_id: str, revision: str = "main") -> Path | None:
    """models--org--name/snapshots/<commit>/config.json of the cached `revision` (refs/<revision> names the
    commit); without the ref, the most recent snapshot holding a config.json. None when not cached."""
    repo = hub_cache_dir() / ("models--" + repo_id.replace("/", "--"))
    if not repo.is_dir():
        return None
    ref = repo / "refs" / revision
    if ref.is_file():
        path = repo / "snapshots" / ref.read_text().strip() / "config.json"
        if path.is_file():
            return path
    snapshots = [p / "config.json" for p in (repo / "snapshots").glob("*") if (p / "config.json").is_file()]
    return max(snapshots, key=lambda p: p.stat().st_mtime) if snapshots else None


def config_json(repo_id: str) -> Path:
    """The local path of `repo_id`'s config.json: cached, or downloaded alone when the hub is reachable.
    QfitError (one line, mentions `qfit profile`) when neither works."""
    cached = cached_config(repo_id)
    if cached is not None:
        return cached
    fix = (f"download it (huggingface-cli download {repo_id} config.json) or pass a config.json path; "
           f"`qfit profile PATH --out profiles/models/NAME.toml` adds it to the catalog")
    if hub_offline():
        raise QfitError(f"'{repo_id}' is not in qfit's catalog nor in the Hugging Face cache ({hub_cache_dir()}) "
                        f"and HF_HUB_OFFLINE is set: {fix}")
    os.environ.setdefault("HF_HUB_ETAG_TIMEOUT", str(DOWNLOAD_TIMEOUT_S))
    os.environ.setdefault("HF_HUB_DOWNLOAD_TIMEOUT", str(DOWNLOAD_TIMEOUT_S))
    try:
        from huggingface_hub import hf_hub_download
    except ImportError:
        raise QfitError(f"'{repo_id}' is not in qfit's catalog nor in the Hugging Face cache, and huggingface_hub "
                        f"is not installed to fetch its config.json: {fix}") from None
    try:
        return Path(hf_hub_download(repo_id, "config.json", cache_dir=str(hub_cache_dir()), etag_timeout=DOWNLOAD_TIMEOUT_S))
    except Exception as exc:  # offline, gated, unknown id: one line
        raise QfitError(f"cannot fetch config.json of '{repo_id}' from the Hugging Face hub ({type(exc).__name__}): "
                        f"{fix}") from None
