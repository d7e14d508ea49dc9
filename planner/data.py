"""Training data for `qfit run`: read rows, detect their format, tokenize, measure lengths.

Reads local .json / .jsonl / .csv / .parquet files (and a Hugging Face dataset id when the
`datasets` package is installed). Three row formats are recognised from the fields of the first row:

  alpaca  {"instruction", "input" (optional), "output"}   Stanford Alpaca's prompt template
  chat    {"messages": [{"role", "content"}, ...]}          the tokenizer's chat template, else a plain one
  text    {"text"}                                          every token is trained on

Every problem with the input is a DataError (a ValueError) whose one-line message says what to do,
raised before any model is loaded. Standard library only at module level (pandas for parquet and
`datasets` are imported inside the functions that need them); the tokenizer is passed in.
"""

from __future__ import annotations

import csv
import importlib.util
import json
import math
from dataclasses import dataclass
from pathlib import Path

from planner.errors import QfitError

FORMATS = ("alpaca", "chat", "text")
FILE_SUFFIXES = (".json", ".jsonl", ".csv", ".parquet")
CHAT_ROLES = ("system", "user", "assistant")
# Sequence lengths `qfit run` picks from when --seq-len is not given (the planner's auto ladder).
SEQ_LADDER = (256, 512, 1024, 2048, 4096, 8192, 16384, 32768)
IGNORE_INDEX = -100  # labels the loss skips (torch.nn.CrossEntropyLoss ignore_index)

# Stanford Alpaca's templates (github.com/tatsu-lab/stanford_alpaca, train.py PROMPT_DICT)
ALPACA_PROMPT = ("Below is an instruction that describes a task, paired with an input that provides further context. "
                 "Write a response that appropriately completes the request.\n\n"
                 "### Instruction:\n{instruction}\n\n### Input:\n{input}\n\n### Response:\n")
ALPACA_PROMPT_NO_INPUT = ("Below is an instruction that describes a task. "
                          "Write a response that appropriately completes the request.\n\n"
                          "### Instruction:\n{instruction}\n\n### Response:\n")
# Used for chat rows when the tokenizer has no chat template.
FALLBACK_CHAT_TURN = "### {role}:\n{content}\n\n"
FALLBACK_CHAT_PROMPT = "### Assistant:\n"


class DataError(QfitError):
    """A problem with the training data: the message is one line and says what to do."""


# --------------------------------------------------------------------------- reading

def read_rows(source: str) -> list[dict]:
    """A local file (by suffix) or, when no such file exists, a Hugging Face dataset id."""
    path = Path(source).expanduser()
    if path.is_dir():
        raise DataError(f"{source} is a directory: pass a .json, .jsonl, .csv or .parquet file")
    if not path.exists():
        if path.suffix.lower() in FILE_SUFFIXES or source.startswith((".", "/", "~")):
            raise DataError(f"no such file: {source}")
        return _read_hub(source)
    suffix = path.suffix.lower()
    if suffix not in FILE_SUFFIXES:
        raise DataError(f"cannot read {path.name}: qfit reads .json, .jsonl, .csv and .parquet files")
    if suffix == ".parquet":
        return _read_parquet(path)
    try:
        text = path.read_text(encoding="utf-8-sig")
    except UnicodeDecodeError:
        raise DataError(f"{path.name} is not UTF-8 text: re-save it as UTF-8") from None
    except OSError as exc:
        raise DataError(f"cannot read {source}: {exc.strerror or exc}") from None
    if suffix == ".csv":
        return _read_csv(text, path.name)
    if suffix == ".jsonl":
        return _read_jsonl(text, path.name)
    return _read_json(text, path.name)


def _read_jsonl(text: str, name: str) -> list[dict]:
    rows = []
    for lineno, line in enumerate(text.splitlines(), 1):
        if not line.strip():
            continue
        try:
            rows.append(json.loads(line))
        except json.JSONDecodeError as exc:
            raise DataError(f"{name} line {lineno} is not valid JSON ({exc.msg}): fix or remove that line") from None
    return rows


def _read_json(text: str, name: str) -> list[dict]:
    try:
        doc = json.loads(text)
    except json.JSONDecodeError as exc:
        if exc.msg == "Extra data":  # JSON Lines saved as .json
            return _read_jsonl(text, name)
        raise DataError(f"{name} is not valid JSON ({exc.msg}, line {exc.lineno}): fix the file") from None
    if isinstance(doc, dict):
        lists = [v for v in doc.values() if isinstance(v, list)]
        if len(lists) != 1:
            raise DataError(f"{name} must hold a list of rows (or an object with one list of rows)")
        doc = lists[0]
    if not isinstance(doc, list):
        raise DataError(f"{name} must hold a list of rows")
    return doc


def _read_csv(text: str, name: str) -> list[dict]:
    rows = []
    for row in csv.DictReader(text.splitlines()):
        if None in row:
            raise DataError(f"{name} row {len(rows) + 1} has more cells than the header: quote cells that contain commas")
        msgs = row.get("messages")
        if isinstance(msgs, str) and msgs.lstrip().startswith("["):
            try:
                row = {**row, "messages": json.loads(msgs)}
            except json.JSONDecodeError:
                raise DataError(f"{name} row {len(rows) + 1}: 'messages' is not a JSON list: "
                                "write it as [{\"role\": ..., \"content\": ...}]") from None
        rows.append(row)
    return rows


def _read_parquet(path: Path) -> list[dict]:
    if not (importlib.util.find_spec("pyarrow") or importlib.util.find_spec("fastparquet")):
        raise DataError(f"reading {path.name} needs pyarrow: pip install pyarrow (or convert the file to .jsonl)")
    import pandas as pd

    try:
        frame = pd.read_parquet(path)
    except Exception as exc:  # pyarrow raises its own error types
        raise DataError(f"cannot read {path.name} as parquet: {str(exc).splitlines()[0]}") from None
    return [{k: _plain(v) for k, v in row.items()} for row in frame.to_dict(orient="records")]


def _plain(value):
    """numpy arrays and scalars from parquet -> lists and Python scalars."""
    if hasattr(value, "tolist"):
        value = value.tolist()
    if isinstance(value, list):
        return [_plain(v) for v in value]
    if isinstance(value, dict):
        return {k: _plain(v) for k, v in value.items()}
    return value


def _read_hub(dataset_id: str) -> list[dict]:
    if importlib.util.find_spec("datasets") is None:
        raise DataError(f"no such file: {dataset_id} (to read it as a Hugging Face dataset id, "
                        "install datasets: pip install datasets)")
    import datasets

    try:
        ds = datasets.load_dataset(dataset_id, split="train")
    except Exception as exc:  # offline, unknown id, no train split: datasets raises many types
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise DataError(f"cannot load the Hugging Face dataset {dataset_id!r} ({first}): "
                        "check the id and the network, or pass a local file") from None
    return [dict(r) for r in ds]


# --------------------------------------------------------------------------- formats

def detect_format(rows: list, name: str) -> str:
    """From the first row's fields: messages -> chat, instruction + output -> alpaca, text -> text."""
    if not rows:
        raise DataError(f"{name} has no rows: add training examples")
    first = rows[0]
    if not isinstance(first, dict):
        raise DataError(f"{name} row 1 is not an object: each row must be an object with named fields")
    if "messages" in first:
        return "chat"
    if "instruction" in first and "output" in first:
        return "alpaca"
    if "text" in first:
        return "text"
    fields = ", ".join(sorted(map(str, first))) or "no fields"
    raise DataError(f"cannot tell the format of {name} from row 1 ({fields}): use instruction/output (alpaca), "
                    "messages (chat) or text fields, or pass --format")


def _need_str(row: dict, key: str, where: str, hint: str) -> str:
    if key not in row or row[key] is None:
        raise DataError(f"{where}: missing field '{key}' ({hint})")
    value = row[key]
    if not isinstance(value, str):
        raise DataError(f"{where}: field '{key}' must be text, got {type(value).__name__}")
    return value


def validate_rows(rows: list, fmt: str, name: str) -> None:
    """Every row is well-formed for the format; the first bad one raises with its row number."""
    if fmt not in FORMATS:
        raise DataError(f"--format must be one of {', '.join(FORMATS)}, got {fmt!r}")
    if not rows:
        raise DataError(f"{name} has no rows: add training examples")
    for i, row in enumerate(rows, 1):
        where = f"{name} row {i}"
        if not isinstance(row, dict):
            raise DataError(f"{where} is not an object: each row must be an object with named fields")
        if fmt == "alpaca":
            hint = "alpaca rows need instruction and output, input is optional; --format picks another layout"
            for key in ("instruction", "output"):
                if not _need_str(row, key, where, hint).strip():
                    raise DataError(f"{where}: '{key}' is empty: fill it in or remove the row")
            if row.get("input") is not None and not isinstance(row["input"], str):
                raise DataError(f"{where}: field 'input' must be text, got {type(row['input']).__name__}")
        elif fmt == "text":
            if not _need_str(row, "text", where, "text rows need a text field; --format picks another layout").strip():
                raise DataError(f"{where}: 'text' is empty: fill it in or remove the row")
        else:
            _validate_chat(row, where)


def _validate_chat(row: dict, where: str) -> None:
    msgs = row.get("messages")
    if msgs is None:
        raise DataError(f"{where}: missing field 'messages' (chat rows need a list of {{role, content}} messages)")
    if not isinstance(msgs, list) or not msgs:
        raise DataError(f"{where}: 'messages' must be a non-empty list of {{role, content}} objects")
    for j, m in enumerate(msgs, 1):
        if not isinstance(m, dict) or "role" not in m or "content" not in m:
            raise DataError(f"{where}, message {j}: each message needs 'role' and 'content'")
        if m["role"] not in CHAT_ROLES:
            raise DataError(f"{where}, message {j}: role {m['role']!r} is not one of {', '.join(CHAT_ROLES)}")
        if not isinstance(m["content"], str):
            raise DataError(f"{where}, message {j}: 'content' must be text")
    if not any(m["role"] == "assistant" and m["content"].strip() for m in msgs):
        raise DataError(f"{where}: no non-empty assistant message, so nothing to train on: add one or remove the row")


def load_rows(source: str, fmt: str | None = None) -> tuple[list[dict], str]:
    """Read, detect (or check) the format, validate every row. -> (rows, format)."""
    rows = read_rows(source)
    name = Path(source).name or source
    if not isinstance(rows, list):
        raise DataError(f"{name} must hold a list of rows")
    fmt = fmt or detect_format(rows, name)
    validate_rows(rows, fmt, name)
    return rows, fmt


# --------------------------------------------------------------------------- rendering

def alpaca_segments(row: dict) -> list[tuple[str, bool]]:
    """(text, trained) pieces: the prompt is context only, the response is learned."""
    template = ALPACA_PROMPT if (row.get("input") or "").strip() else ALPACA_PROMPT_NO_INPUT
    prompt = template.format(instruction=row["instruction"], input=row.get("input") or "")
    return [(prompt, False), (row["output"], True)]


def has_chat_template(tokenizer) -> bool:
    return bool(getattr(tokenizer, "chat_template", None))


def chat_segments(messages: list[dict], tokenizer) -> tuple[list[tuple[str, bool]], bool]:
    """(text, trained) pieces of a conversation, and whether the tokenizer's template rendered it.

    Assistant replies are learned, the rest is context. With a chat template, each reply's span is
    found by rendering the conversation prefix by prefix (the prompt before it with
    add_generation_prompt=True, then through it); a template that does not render prefix by prefix
    falls back to learning every token.
    """
    if not has_chat_template(tokenizer):
        pieces = []
        for m in messages:
            trained = m["role"] == "assistant"
            if trained:
                pieces.append((FALLBACK_CHAT_PROMPT, False))
                pieces.append((m["content"], True))
                pieces.append(("\n\n", False))
            else:
                pieces.append((FALLBACK_CHAT_TURN.format(role=m["role"].capitalize(), content=m["content"]), False))
        return pieces, False

    def render(msgs, gen):
        return tokenizer.apply_chat_template(msgs, tokenize=False, add_generation_prompt=gen)

    full = render(messages, False)
    spans = []
    for i, m in enumerate(messages):
        if m["role"] != "assistant":
            continue
        before, through = render(messages[:i], True) if i else "", render(messages[: i + 1], False)
        if not (full.startswith(before) and full.startswith(through) and len(through) > len(before)):
            return [(full, True)], True
        spans.append((len(before), len(through)))
    pieces, pos = [], 0
    for start, end in spans:
        if start > pos:
            pieces.append((full[pos:start], False))
        pieces.append((full[start:end], True))
        pos = end
    if pos < len(full):
        pieces.append((full[pos:], False))
    return pieces, True


# --------------------------------------------------------------------------- tokenizing

@dataclass(frozen=True, slots=True)
class Example:
    input_ids: tuple[int, ...]
    labels: tuple[int, ...]  # IGNORE_INDEX where the token is context, not learned

    def __len__(self) -> int:
        return len(self.input_ids)


def tokenize_segments(pieces: list[tuple[str, bool]], tokenizer, add_bos: bool, add_eos: bool) -> Example:
    """Each piece tokenized on its own (so the learned span is exact), then concatenated."""
    ids: list[int] = []
    labels: list[int] = []
    bos, eos = getattr(tokenizer, "bos_token_id", None), getattr(tokenizer, "eos_token_id", None)
    if add_bos and bos is not None:
        ids.append(bos)
        labels.append(IGNORE_INDEX)
    for text, trained in pieces:
        if not text:
            continue
        toks = tokenizer(text, add_special_tokens=False)["input_ids"]
        ids += toks
        labels += toks if trained else [IGNORE_INDEX] * len(toks)
    if add_eos and eos is not None:
        ids.append(eos)
        labels.append(eos)
    return Example(tuple(ids), tuple(labels))


def tokenize_rows(rows: list[dict], fmt: str, tokenizer) -> tuple[list[Example], list[str]]:
    """-> (examples, notes). Alpaca and chat learn the responses only; text learns everything."""
    notes = []
    out = []
    template_fell_back = False
    for i, row in enumerate(rows, 1):
        if fmt == "alpaca":
            out.append(tokenize_segments(alpaca_segments(row), tokenizer, add_bos=True, add_eos=True))
        elif fmt == "text":
            out.append(tokenize_segments([(row["text"], True)], tokenizer, add_bos=True, add_eos=True))
        else:
            try:
                pieces, templated = chat_segments(row["messages"], tokenizer)
            except Exception as exc:  # jinja raises TemplateError and others on conversations it rejects
                first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
                raise DataError(f"row {i}: the tokenizer's chat template rejected the conversation ({first}): "
                                "fix the row (roles usually alternate user/assistant) or pass --format text") from None
            template_fell_back |= templated and len(pieces) == 1 and pieces[0][1]
            # a template writes its own special tokens; the fallback gets BOS and an EOS after the last reply
            out.append(tokenize_segments(pieces, tokenizer, add_bos=not templated, add_eos=not templated))
    if fmt == "chat":
        notes.append("chat rows rendered with the tokenizer's chat template" if has_chat_template(tokenizer)
                     else "the tokenizer has no chat template: chat rows use qfit's plain '### Role:' template")
    if template_fell_back:
        notes.append("the chat template does not render conversations prefix by prefix: some rows learn every token")
    return out, notes


def truncate(examples: list[Example], seq_len: int) -> tuple[list[Example], int]:
    """Cut every example to seq_len tokens (keeping the start); drop those left with nothing to learn.

    -> (examples, dropped_count)."""
    kept, dropped = [], 0
    for ex in examples:
        cut = Example(ex.input_ids[:seq_len], ex.labels[:seq_len])
        if all(label == IGNORE_INDEX for label in cut.labels):
            dropped += 1
        else:
            kept.append(cut)
    return kept, dropped


# --------------------------------------------------------------------------- lengths

@dataclass(frozen=True, slots=True)
class LengthStats:
    count: int
    min: int
    median: int
    p95: int
    max: int

    def as_dict(self) -> dict:
        return {"count": self.count, "min": self.min, "median": self.median, "p95": self.p95, "max": self.max}


def _percentile(sorted_values: list[int], q: float) -> int:
    """Nearest-rank percentile (the smallest value with at least q of the data at or below it)."""
    rank = max(1, math.ceil(q * len(sorted_values)))
    return sorted_values[rank - 1]


def length_stats(lengths: list[int]) -> LengthStats:
    if not lengths:
        raise DataError("no examples to measure: the dataset is empty")
    s = sorted(lengths)
    return LengthStats(count=len(s), min=s[0], median=_percentile(s, 0.5), p95=_percentile(s, 0.95), max=s[-1])


def truncation_rate(lengths: list[int], seq_len: int) -> float:
    """Fraction of examples longer than seq_len (they lose their end)."""
    return sum(1 for n in lengths if n > seq_len) / len(lengths) if lengths else 0.0


def choose_seq_len(stats: LengthStats, max_positions: int) -> int:
    """The smallest ladder length that holds every example, unless that is more than one step above
    the one holding p95: then the p95 one (a long tail of a few rows should not double the memory
    and attention cost of every micro-batch). Capped by the model's max_position_embeddings."""
    def cover(n: int) -> int:
        return next((s for s in SEQ_LADDER if s >= n), SEQ_LADDER[-1])

    at_p95, at_max = cover(stats.p95), cover(stats.max)
    chosen = at_max if at_max <= 2 * at_p95 else at_p95
    return min(chosen, max_positions)
