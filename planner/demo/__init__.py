"""`qfit run --demo`: a complete QLoRA fine-tune that needs no download and runs on a CPU.

  data       instructions.jsonl: 240 Alpaca-style rows written for qfit (see generate.py)
  tokenizer  a byte-level BPE with the profile's vocab_size (512), trained here on that data
  model      profiles/models/tiny-llama.toml's config with random weights (seeded), saved as a
             checkpoint and then loaded through the real 4-bit path like any other model

Tokenizer and model are built once into <qfit cache>/demo/tiny-llama and reused. Module level is
standard library only (torch and tokenizers are imported inside the functions).
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
import tomllib
from pathlib import Path

from planner.coefficients import user_cache_dir
from planner.data import alpaca_segments, load_rows
from planner.profiles import PROFILES_DIR

DEMO_DIR = Path(__file__).resolve().parent
DATA_FILE = DEMO_DIR / "instructions.jsonl"
MODEL_PROFILE = "tiny-llama"
BUILD_VERSION = 3  # bump when the way the demo model or tokenizer is built changes (invalidates the cache)
SEED = 0
SPECIAL_TOKENS = ("<pad>", "<s>", "</s>", "<unk>")  # ids 0..3: the profile's pad/bos/eos token ids

# Std of the random weights. transformers' default (initializer_range 0.02) gives a frozen random
# lm_head so small that, after the final RMSNorm, no logit can stand out by more than about
# 0.02 x hidden_size = 2.6: LoRA alone then cannot take the loss below ~5.5 nats. At 0.1 it can.
INIT_STD = 0.1
# Defaults of a demo run (each can be overridden on the command line). Only the LoRA adapter learns,
# on a random base, so the learning rate is 25x QLoRA's usual 2e-4.
# 120 steps x 8 rows = 960 rows = 4 epochs of the data: about 5 s of training on 2 CPU cores.
DEMO_RUN = {"max_steps": 120, "effective_batch": 8, "learning_rate": 5e-3, "warmup": 0.05}


def demo_model_dir(cache: Path | None = None) -> Path:
    return (cache or user_cache_dir()) / "demo" / f"{MODEL_PROFILE}-v{BUILD_VERSION}"


def profile_config() -> dict:
    with (PROFILES_DIR / "models" / f"{MODEL_PROFILE}.toml").open("rb") as fh:
        return tomllib.load(fh)["config"]


def training_texts() -> list[str]:
    """The demo rows rendered as they are trained on (prompt + response)."""
    rows, _ = load_rows(str(DATA_FILE), "alpaca")
    return ["".join(text for text, _ in alpaca_segments(r)) for r in rows]


def build_tokenizer(vocab_size: int):
    """A byte-level BPE (GPT-2 style: any text encodes, nothing is unknown) trained on the demo data,
    wrapped as a transformers fast tokenizer that adds <s> in front like Llama's."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=list(SPECIAL_TOKENS), min_frequency=2,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    tok.train_from_iterator(training_texts(), trainer)
    tok.post_processor = processors.TemplateProcessing(single="<s> $A", pair="<s> $A <s> $B",
                                                       special_tokens=[("<s>", tok.token_to_id("<s>"))])
    if tok.get_vocab_size() > vocab_size:
        raise RuntimeError(f"demo tokenizer has {tok.get_vocab_size()} tokens, the model only {vocab_size}")
    return PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="<pad>", bos_token="<s>", eos_token="</s>",
                                   unk_token="<unk>", model_max_length=profile_config()["max_position_embeddings"])


def prepare(cache: Path | None = None) -> Path:
    """The demo model directory (config, random weights, tokenizer), built on first use."""
    target = demo_model_dir(cache)
    if (target / "qfit-demo.json").is_file():
        return target
    import torch
    from transformers.utils import logging as hf_logging

    from planner.train.stack import hf_config, save_random_model

    cfg = profile_config()
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=".build-", dir=target.parent))
    try:
        bars = hf_logging.is_progress_bar_enabled()
        hf_logging.disable_progress_bar()  # a 2 MB model needs no "Writing model shards" bar
        try:
            with torch.random.fork_rng(devices=[]):
                torch.manual_seed(SEED)
                # fp32 on disk: the 4-bit load quantizes the linears, the rest is upcast to fp32 anyway
                save_random_model(hf_config({**cfg, "initializer_range": INIT_STD}), str(tmp), torch.float32)
        finally:
            if bars:
                hf_logging.enable_progress_bar()
        build_tokenizer(cfg["vocab_size"]).save_pretrained(str(tmp))
        (tmp / "qfit-demo.json").write_text(json.dumps({"profile": MODEL_PROFILE, "version": BUILD_VERSION,
                                                         "seed": SEED, "data": DATA_FILE.name}) + "\n")
        try:
            os.replace(tmp, target)  # atomic: a half-built directory is never used
        except OSError:  # another process finished first (the target exists and is not empty)
            if not (target / "qfit-demo.json").is_file():
                raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return target
