"""Writes planner/demo/instructions.jsonl: the demo's instruction data, made for qfit (no outside source).

240 short Alpaca-style rows over seven small tasks a 2-layer model can pick up within a minute on a
CPU: fixed answers to fixed questions, repeating a word, even or odd, animal / fruit / colour,
a country's capital, a word's opposite, and single-digit sums. Deterministic (seeded), so the
shipped file can be checked against this script:

    python -m planner.demo.generate            # rewrite the file
    python -m planner.demo.generate --check    # exit 1 if the shipped file differs
"""

from __future__ import annotations

import json
import random
import sys
from pathlib import Path

OUT = Path(__file__).resolve().parent / "instructions.jsonl"
SEED = 0

WORDS = ("apple", "river", "stone", "cloud", "tiger", "green", "house", "music", "paper", "light", "water", "plant",
         "bread", "chair", "smile", "ocean", "horse", "table", "dream", "sugar", "train", "lemon", "night", "grass",
         "storm", "candle", "forest", "garden", "planet", "silver", "window", "yellow", "rocket", "butter", "copper",
         "winter", "summer", "pencil", "rabbit", "monkey")
CATEGORIES = {"animal": ("cat", "dog", "horse", "tiger", "rabbit", "monkey", "mouse", "sheep", "lion", "bear"),
              "fruit": ("apple", "banana", "lemon", "mango", "cherry", "grape", "peach", "plum", "melon", "orange"),
              "colour": ("red", "blue", "green", "yellow", "purple", "black", "white", "brown", "pink", "grey")}
CAPITALS = (("France", "Paris"), ("Germany", "Berlin"), ("Italy", "Rome"), ("Spain", "Madrid"), ("Japan", "Tokyo"),
            ("Egypt", "Cairo"), ("Kenya", "Nairobi"), ("Peru", "Lima"), ("Canada", "Ottawa"), ("Norway", "Oslo"),
            ("Greece", "Athens"), ("Poland", "Warsaw"), ("Cuba", "Havana"), ("Chile", "Santiago"), ("India", "New Delhi"))
OPPOSITES = (("hot", "cold"), ("big", "small"), ("up", "down"), ("fast", "slow"), ("happy", "sad"), ("light", "dark"),
             ("open", "closed"), ("early", "late"), ("full", "empty"), ("high", "low"), ("old", "new"), ("wet", "dry"),
             ("hard", "soft"), ("long", "short"), ("rich", "poor"))
FIXED = (("Greet the user.", "Hello! How can I help you today?"),
         ("Who fine-tuned you?", "I was fine-tuned with qfit, on a CPU, in under a minute."),
         ("Say goodbye.", "Goodbye, and thank you for the chat!"),
         ("What is QLoRA?", "QLoRA trains small LoRA adapters on top of a frozen 4-bit model."),
         ("Name the three primary colours.", "Red, yellow and blue."),
         ("How many days are in a week?", "There are seven days in a week."))


def rows(seed: int = SEED) -> list[dict]:
    rng = random.Random(seed)
    out = []
    for question, answer in FIXED * 5:  # 30
        out.append({"instruction": question, "input": "", "output": answer})
    for w in WORDS:  # 40
        out.append({"instruction": "Repeat the word.", "input": w, "output": w})
    for n in rng.sample(range(100), 35):  # 35
        out.append({"instruction": "Is the number even or odd?", "input": str(n), "output": "even" if n % 2 == 0 else "odd"})
    for label, words in CATEGORIES.items():  # 30
        for w in words:
            out.append({"instruction": "Is it an animal, a fruit or a colour?", "input": w, "output": label})
    for country, city in CAPITALS * 2:  # 30
        out.append({"instruction": f"What is the capital of {country}?", "input": "", "output": city})
    for word, opposite in OPPOSITES:  # 30
        out.append({"instruction": "Give the opposite of the word.", "input": word, "output": opposite})
        out.append({"instruction": "Give the opposite of the word.", "input": opposite, "output": word})
    for _ in range(45):  # 45
        a, b = rng.randint(0, 9), rng.randint(0, 9)
        out.append({"instruction": "Add the two numbers.", "input": f"{a} + {b}", "output": str(a + b)})
    rng.shuffle(out)
    return out


def text(seed: int = SEED) -> str:
    return "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows(seed))


def main(argv: list[str]) -> int:
    if "--check" in argv:
        same = OUT.read_text(encoding="utf-8") == text()
        print(f"{OUT.name}: {'matches' if same else 'DIFFERS from'} planner/demo/generate.py")
        return 0 if same else 1
    OUT.write_text(text(), encoding="utf-8")
    print(f"wrote {len(rows())} rows to {OUT}")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
