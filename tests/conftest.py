import os

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")


def _cuda() -> bool:
    try:
        import torch

        return torch.cuda.is_available()
    except ImportError:
        return False


def pytest_collection_modifyitems(config, items):
    if _cuda():
        return
    skip = pytest.mark.skip(reason="needs a CUDA GPU")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)


@pytest.fixture(scope="module")
def cache(tmp_path_factory):
    """One qfit cache (demo model + tokenizer, runs.csv) per test module; the user's is never touched."""
    path = tmp_path_factory.mktemp("qfit-cache")
    old = os.environ.get("QFIT_CACHE")
    os.environ["QFIT_CACHE"] = str(path)
    yield path
    if old is None:
        os.environ.pop("QFIT_CACHE", None)
    else:
        os.environ["QFIT_CACHE"] = old
