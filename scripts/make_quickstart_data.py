"""Generate the bundled quickstart dataset: rewrite a date written in words as ISO 8601 (YYYY-MM-DD).

SmolLM2-135M-Instruct gets this wrong out of the box (it echoes the input or the pattern "YYYY-MM-DD"); a small LoRA
learns it in a few minutes on a CPU. Deterministic (seeded); the held-out dates never occur in training.
Run: python scripts/make_quickstart_data.py
"""

from __future__ import annotations

import datetime
import json
import random
from pathlib import Path

MONTHS = [
    "January",
    "February",
    "March",
    "April",
    "May",
    "June",
    "July",
    "August",
    "September",
    "October",
    "November",
    "December",
]
INSTRUCTION = "Rewrite this date as YYYY-MM-DD. Reply with the date only.\n\n"


def ordinal(day: int) -> str:
    suffix = "th" if 11 <= day % 100 <= 13 else {1: "st", 2: "nd", 3: "rd"}.get(day % 10, "th")
    return f"{day}{suffix}"


FORMATS = [
    lambda d: f"{MONTHS[d.month - 1]} {d.day}, {d.year}",
    lambda d: f"{d.day} {MONTHS[d.month - 1]} {d.year}",
    lambda d: f"the {ordinal(d.day)} of {MONTHS[d.month - 1]} {d.year}",
    lambda d: f"{MONTHS[d.month - 1][:3]} {d.day} {d.year}",
    lambda d: f"{d.day:02d}.{d.month:02d}.{d.year} (day.month.year)",
]


def make(rng: random.Random, n: int, seen: set) -> list[dict]:
    rows = []
    while len(rows) < n:
        date = datetime.date(1950, 1, 1) + datetime.timedelta(days=rng.randint(0, 36000))
        if date in seen:
            continue
        seen.add(date)
        text = rng.choice(FORMATS)(date)
        rows.append({"prompt": INSTRUCTION + text, "response": date.isoformat()})
    return rows


def main() -> None:
    rng = random.Random(1234)
    seen: set = set()
    train, test = make(rng, 400, seen), make(rng, 64, seen)
    out = Path(__file__).resolve().parents[1] / "src" / "deltatune" / "data"
    for split, rows in (("train", train), ("test", test)):
        with open(out / f"quickstart_{split}.jsonl", "w") as fh:
            fh.writelines(json.dumps(r) + "\n" for r in rows)
    print(f"wrote {len(train)} train and {len(test)} test examples to {out}")


if __name__ == "__main__":
    main()
