"""planner.data: reading local files, format detection, one-line errors, tokenization and lengths."""

from __future__ import annotations

import importlib.util
import json

import pytest

from planner import data
from planner.data import IGNORE_INDEX, DataError

ALPACA = [{"instruction": "Add the numbers.", "input": "2 + 3", "output": "5"},
          {"instruction": "Say hi.", "input": "", "output": "hi there"}]
CHAT = [{"messages": [{"role": "system", "content": "be brief"}, {"role": "user", "content": "hello"},
                      {"role": "assistant", "content": "hi"}, {"role": "user", "content": "bye"},
                      {"role": "assistant", "content": "see you"}]}]
TEXT = [{"text": "one two three"}, {"text": "four five"}]


class WordTokenizer:
    """A stand-in tokenizer: one id per whitespace-separated word (no transformers needed)."""

    bos_token_id, eos_token_id, pad_token_id = 1, 2, 0
    chat_template = None

    def __init__(self):
        self.vocab: dict[str, int] = {}

    def __call__(self, text, add_special_tokens=True):
        ids = [self.vocab.setdefault(w, len(self.vocab) + 10) for w in text.split()]
        return {"input_ids": ([self.bos_token_id] if add_special_tokens else []) + ids}

    def words(self, ids):
        inv = {v: k for k, v in self.vocab.items()}
        return [inv.get(i, f"<{i}>") for i in ids]


def write(tmp_path, name, content):
    path = tmp_path / name
    if isinstance(content, bytes):
        path.write_bytes(content)
    else:
        path.write_text(content, encoding="utf-8")
    return str(path)


def jsonl(rows):
    return "".join(json.dumps(r) + "\n" for r in rows)


# --------------------------------------------------------------------------- formats

@pytest.mark.parametrize("name,content,fmt", [
    ("a.jsonl", jsonl(ALPACA), "alpaca"),
    ("a.json", json.dumps(ALPACA), "alpaca"),
    ("wrapped.json", json.dumps({"data": ALPACA}), "alpaca"),
    ("lines-saved-as.json", jsonl(ALPACA), "alpaca"),
    ("c.json", json.dumps(CHAT), "chat"),
    ("c.jsonl", jsonl(CHAT), "chat"),
    ("t.jsonl", jsonl(TEXT), "text"),
    ("t.csv", "text\none two three\nfour five\n", "text"),
    ("a.csv", "instruction,input,output\nAdd the numbers.,2 + 3,5\n", "alpaca"),
    ("c.csv", 'messages\n"[{""role"": ""user"", ""content"": ""hi""}, {""role"": ""assistant"", ""content"": ""yo""}]"\n', "chat"),
], ids=lambda v: v if isinstance(v, str) and len(v) < 24 else None)
def test_format_is_detected(tmp_path, name, content, fmt):
    rows, got = data.load_rows(write(tmp_path, name, content))
    assert got == fmt
    assert rows and all(isinstance(r, dict) for r in rows)


def test_format_override(tmp_path):
    rows = [{"text": "x", "instruction": "y", "output": "z"}]
    assert data.load_rows(write(tmp_path, "r.jsonl", jsonl(rows)))[1] == "alpaca"
    assert data.load_rows(write(tmp_path, "r.jsonl", jsonl(rows)), "text")[1] == "text"


@pytest.mark.parametrize("name,content,fmt,expect", [
    ("missing.jsonl", jsonl([ALPACA[0], {"instruction": "x"}]), None, "row 2: missing field 'output'"),
    ("empty-out.jsonl", jsonl([ALPACA[0], {"instruction": "x", "output": "  "}]), None, "row 2: 'output' is empty"),
    ("nonstr.jsonl", jsonl([{"instruction": "x", "output": 5}]), None, "field 'output' must be text"),
    ("empty.jsonl", "\n\n", None, "has no rows"),
    ("bad.jsonl", jsonl(ALPACA) + "{oops\n", None, "line 3 is not valid JSON"),
    ("bad.json", "[{]", None, "is not valid JSON"),
    ("scalar.json", "42", None, "must hold a list of rows"),
    ("unknown.jsonl", jsonl([{"question": "q", "answer": "a"}]), None, "cannot tell the format"),
    ("notobj.jsonl", jsonl(["just a string"]), None, "row 1 is not an object"),
    ("text-missing.jsonl", jsonl([{"body": "x"}]), "text", "missing field 'text'"),
    ("chat-role.jsonl", jsonl([{"messages": [{"role": "bot", "content": "x"}]}]), None, "role 'bot'"),
    ("chat-noassist.jsonl", jsonl([{"messages": [{"role": "user", "content": "x"}]}]), None, "no non-empty assistant"),
    ("chat-shape.jsonl", jsonl([{"messages": "hello"}]), None, "non-empty list"),
    ("chat-msg.jsonl", jsonl([{"messages": [{"role": "user"}]}]), None, "needs 'role' and 'content'"),
    ("cells.csv", "text\n\"a\",b\n", None, "more cells than the header"),
    ("data.xlsx", "whatever", None, "qfit reads .json, .jsonl, .csv and .parquet"),
    ("latin1.jsonl", b'{"text": "caf\xe9"}\n', None, "is not UTF-8"),
])
def test_bad_input_is_a_one_line_error(tmp_path, name, content, fmt, expect):
    with pytest.raises(DataError) as err:
        data.load_rows(write(tmp_path, name, content), fmt)
    msg = str(err.value)
    assert expect in msg
    assert "\n" not in msg


def test_missing_file_and_directory(tmp_path):
    with pytest.raises(DataError, match="no such file"):
        data.load_rows(str(tmp_path / "nope.jsonl"))
    with pytest.raises(DataError, match="is a directory"):
        data.load_rows(str(tmp_path))


@pytest.mark.skipif(importlib.util.find_spec("datasets") is not None, reason="datasets is installed")
def test_hub_id_without_datasets_says_what_to_install():
    with pytest.raises(DataError, match="pip install datasets"):
        data.load_rows("someone/some-dataset")


@pytest.mark.skipif(bool(importlib.util.find_spec("pyarrow") or importlib.util.find_spec("fastparquet")),
                    reason="a parquet engine is installed")
def test_parquet_without_engine_says_what_to_install(tmp_path):
    with pytest.raises(DataError, match="pip install pyarrow"):
        data.load_rows(write(tmp_path, "d.parquet", b"PAR1"))


@pytest.mark.skipif(importlib.util.find_spec("pyarrow") is None, reason="needs pyarrow")
def test_parquet_roundtrip(tmp_path):
    import pandas as pd

    pd.DataFrame(ALPACA).to_parquet(tmp_path / "d.parquet")
    rows, fmt = data.load_rows(str(tmp_path / "d.parquet"))
    assert fmt == "alpaca" and rows[0]["output"] == "5"


# --------------------------------------------------------------------------- tokenization

def learned_words(tok, ex):
    return tok.words([i for i, lab in zip(ex.input_ids, ex.labels) if lab != IGNORE_INDEX])


def test_alpaca_learns_the_response_only():
    tok = WordTokenizer()
    (ex, _), notes = data.tokenize_rows(ALPACA, "alpaca", tok)
    assert ex.input_ids[0] == tok.bos_token_id and ex.labels[0] == IGNORE_INDEX
    assert learned_words(tok, ex) == ["5", "<2>"]  # the response, then EOS
    assert "### Response:" in " ".join(tok.words(ex.input_ids))
    assert len(ex.input_ids) == len(ex.labels)


def test_text_learns_everything():
    tok = WordTokenizer()
    exs, _ = data.tokenize_rows(TEXT, "text", tok)
    assert learned_words(tok, exs[0]) == ["one", "two", "three", "<2>"]


def test_chat_without_template_uses_the_fallback_and_learns_assistant_turns():
    tok = WordTokenizer()
    (ex,), notes = data.tokenize_rows(CHAT, "chat", tok)
    assert learned_words(tok, ex) == ["hi", "see", "you", "<2>"]
    assert any("no chat template" in n for n in notes)
    assert "User:" in " ".join(tok.words(ex.input_ids))


def test_chat_with_the_tokenizers_template():
    """A real transformers tokenizer with a Jinja chat template: the learned tokens decode to the
    assistant replies exactly."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    words = sorted({w for m in CHAT[0]["messages"] for w in m["content"].split()} | {"<|user|>", "<|assistant|>",
                                                                                     "<|system|>", "<|end|>"})
    vocab = {w: i + 4 for i, w in enumerate(words)} | {"<pad>": 0, "<s>": 1, "</s>": 2, "<unk>": 3}
    core = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    core.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tok = PreTrainedTokenizerFast(tokenizer_object=core, bos_token="<s>", eos_token="</s>", pad_token="<pad>",
                                  unk_token="<unk>")
    tok.chat_template = ("{% for m in messages %}<|{{ m['role'] }}|> {{ m['content'] }} <|end|> {% endfor %}"
                         "{% if add_generation_prompt %}<|assistant|> {% endif %}")
    (ex,), notes = data.tokenize_rows(CHAT, "chat", tok)
    learned = [i for i, lab in zip(ex.input_ids, ex.labels) if lab != IGNORE_INDEX]
    assert tok.decode(learned).split() == ["hi", "<|end|>", "see", "you", "<|end|>"]
    assert any("chat template" in n for n in notes)


# --------------------------------------------------------------------------- lengths

def test_length_stats_and_truncation():
    lengths = list(range(1, 101))
    st = data.length_stats(lengths)
    assert (st.min, st.median, st.p95, st.max) == (1, 50, 95, 100)
    assert data.truncation_rate(lengths, 90) == pytest.approx(0.10)
    assert data.truncation_rate(lengths, 100) == 0.0


@pytest.mark.parametrize("lengths,max_pos,expect", [
    ([100] * 20, 4096, 256),  # everything fits the smallest
    ([300] * 19 + [500], 4096, 512),  # cover the max: it is one step above p95
    ([300] * 99 + [3000], 4096, 512),  # a far tail (4096 > 2 x 512): cover p95, truncate the rest
    ([900] * 20, 512, 512),  # capped by the model
])
def test_choose_seq_len(lengths, max_pos, expect):
    assert data.choose_seq_len(data.length_stats(lengths), max_pos) == expect


def test_truncate_drops_rows_with_nothing_left_to_learn():
    keep = data.Example((1, 5, 6, 7), (IGNORE_INDEX, IGNORE_INDEX, 6, 7))
    lose = data.Example((1, 5, 5, 5, 6), (IGNORE_INDEX,) * 4 + (6,))
    out, dropped = data.truncate([keep, lose], 3)
    assert dropped == 1 and out == [data.Example((1, 5, 6), (IGNORE_INDEX, IGNORE_INDEX, 6))]


# --------------------------------------------------------------------------- the demo data

def test_demo_data_is_the_generated_file():
    from planner.demo import DATA_FILE, generate

    assert DATA_FILE.read_text(encoding="utf-8") == generate.text()
    rows, fmt = data.load_rows(str(DATA_FILE))
    assert fmt == "alpaca" and 150 <= len(rows) <= 300
