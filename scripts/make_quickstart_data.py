"""Generate the bundled quickstart data: rewrite a date, written as people write dates, as ISO 8601 (YYYY-MM-DD).

SmolLM2-135M-Instruct gets this wrong out of the box (it echoes the input or the pattern "YYYY-MM-DD"); a small LoRA
learns it in a few minutes on a CPU. Deterministic (seeded). Four files:

- quickstart_train: the phrasings users type (month names, abbreviations, ordinals such as "the 1st of May",
  single-digit days, numeric dates with their stated order), under three instructions;
- quickstart_test: held-out dates in those phrasings;
- quickstart_unseen_test: held-out dates in phrasings and instructions that never occur in training (how the
  adapter does on what a user may type next);
- general_test: a few everyday questions outside the task (what the adapter may cost elsewhere), scored by
  whether the answer contains the expected word.

Run: python scripts/make_quickstart_data.py
"""

from __future__ import annotations

import calendar
import datetime
import json
import random
from pathlib import Path

MONTHS = list(calendar.month_name)[1:]
WEEKDAYS = list(calendar.day_name)


def ordinal(day: int) -> str:
    suffix = "th" if 11 <= day % 100 <= 13 else {1: "st", 2: "nd", 3: "rd"}.get(day % 10, "th")
    return f"{day}{suffix}"


def _month(d: datetime.date, rng: random.Random) -> str:
    name = MONTHS[d.month - 1]
    return name.lower() if rng.random() < 0.15 else name  # people do not always capitalise


TRAIN_FORMATS = [
    lambda d, g: f"{_month(d, g)} {d.day}, {d.year}",
    lambda d, g: f"{_month(d, g)} {d.day} {d.year}",
    lambda d, g: f"{d.day} {_month(d, g)} {d.year}",
    lambda d, g: f"the {ordinal(d.day)} of {_month(d, g)} {d.year}",
    lambda d, g: f"{ordinal(d.day)} {_month(d, g)} {d.year}",
    lambda d, g: f"{_month(d, g)} {ordinal(d.day)}, {d.year}",
    lambda d, g: f"{MONTHS[d.month - 1][:3]} {d.day} {d.year}",
    lambda d, g: f"{MONTHS[d.month - 1][:3]}. {ordinal(d.day)} {d.year}",
    lambda d, g: f"{d.day:02d}.{d.month:02d}.{d.year} (day.month.year)",
    lambda d, g: f"{d.month:02d}/{d.day:02d}/{d.year} (month/day/year)",
    lambda d, g: f"{d.day:02d}/{d.month:02d}/{d.year} (day/month/year)",
    lambda d, g: f"{d.month}/{d.day}/{d.year} (month/day/year)",
    lambda d, g: f"{d.day}/{d.month}/{d.year} (day/month/year)",
]
TRAIN_INSTRUCTIONS = [
    "Rewrite this date as YYYY-MM-DD. Reply with the date only.\n\n{date}",
    "Convert this date to ISO 8601 (YYYY-MM-DD). Date only.\n\n{date}",
    "What is {date} in YYYY-MM-DD format? Answer with the date only.",
]
UNSEEN_FORMATS = [
    lambda d, g: f"{MONTHS[d.month - 1]} the {ordinal(d.day)}, {d.year}",
    lambda d, g: f"the {ordinal(d.day)} day of {MONTHS[d.month - 1]}, {d.year}",
    lambda d, g: f"{d.year}, {MONTHS[d.month - 1]} {d.day}",
    lambda d, g: f"{d.day}-{MONTHS[d.month - 1][:3]}-{d.year}",
    lambda d, g: f"{WEEKDAYS[d.weekday()]}, {MONTHS[d.month - 1]} {d.day}, {d.year}",
    lambda d, g: f"{d.day:02d}-{d.month:02d}-{d.year} (day-month-year)",
]
UNSEEN_INSTRUCTIONS = [
    "Give me this date in ISO format (YYYY-MM-DD), nothing else: {date}",
    "Please format {date} as YYYY-MM-DD. Only the date.",
]
# Everyday requests answered by the base model itself (greedy, see `replay_rows`) and mixed into training: rehearsal,
# so the adapter learns dates without turning every answer into one. None of them is in GENERAL below.
REPLAY_PROMPTS = [
    "What is the capital of Italy?",
    "What is the capital of Japan?",
    "What is the capital of Canada?",
    "What is the capital of Germany?",
    "What is the capital of Spain?",
    "What is the capital of Egypt?",
    "What is 3 + 4?",
    "What is 9 + 6?",
    "What is 10 minus 3?",
    "What is 6 times 7?",
    "What is 20 divided by 4?",
    "What is 15 + 27?",
    "How many legs does a spider have?",
    "How many continents are there?",
    "How many hours are in a day?",
    "How many months are in a year?",
    "What gas do plants absorb from the air?",
    "What is the boiling point of water in Celsius?",
    "What is the chemical symbol for gold?",
    "What is the freezing point of water in Fahrenheit?",
    "Which animal is known as the king of the jungle?",
    "What is the tallest mountain in the world?",
    "What is the longest river in Africa?",
    "Which planet is closest to the Sun?",
    "What is the largest planet in our solar system?",
    "Who painted the Mona Lisa?",
    "Who wrote Pride and Prejudice?",
    "Who developed the theory of relativity?",
    "What language is spoken in Brazil?",
    "What is the main ingredient of guacamole?",
    "What colour is the sky on a clear day?",
    "What do bees make?",
    "What is the opposite of up?",
    "What is the opposite of happy?",
    "What is a synonym for big?",
    "Give me a word that rhymes with cat.",
    "Name a fruit that is yellow.",
    "Name three primary colours.",
    "Name a mammal that can fly.",
    "What is the plural of mouse?",
    "Spell the word 'necessary'.",
    "Translate 'hello' into French.",
    "Translate 'thank you' into Spanish.",
    "What is the square root of 81?",
    "Is 17 a prime number?",
    "What shape has three sides?",
    "How many sides does a hexagon have?",
    "What is H2O?",
    "What do you call a baby cat?",
    "What is the fastest land animal?",
    "Which ocean lies between Europe and America?",
    "What instrument has 88 keys?",
    "How many players are on a soccer team on the field?",
    "Write one sentence about the sea.",
    "Give me a tip for sleeping better.",
    "Suggest a name for a pet dog.",
    "What should I bring to a picnic?",
    "Describe the colour green in a few words.",
    "Why do we need to drink water?",
    "What is a noun?",
    "Finish the sentence: The early bird...",
    "What day comes after Monday?",
    "What month comes after March?",
    "Which season comes after winter?",
]
GENERAL = [  # (question, words any of which a right answer contains)
    ("What is the capital of France?", "Paris"),
    ("What is 7 + 5?", "12|twelve"),
    ("Which planet is known as the Red Planet?", "Mars"),
    ("What colour do you get by mixing blue and yellow?", "green"),
    ("Who wrote the play Romeo and Juliet?", "Shakespeare"),
    ("How many days are there in a week?", "7|seven"),
    ("What is the opposite of hot?", "cold"),
    ("What is the largest ocean on Earth?", "Pacific"),
]


def _date(rng: random.Random) -> datetime.date:
    """Uniform over 1950-2049, but a third of the days are 1-9 (single digits and 1st/2nd/3rd are where a
    model slips: "2001-05-1st")."""
    year, month = rng.randint(1950, 2049), rng.randint(1, 12)
    last = calendar.monthrange(year, month)[1]
    day = rng.randint(1, 9) if rng.random() < 1 / 3 else rng.randint(1, last)
    return datetime.date(year, month, day)


def make(rng: random.Random, n: int, seen: set, formats: list, instructions: list) -> list[dict]:
    rows = []
    while len(rows) < n:
        date = _date(rng)
        if date in seen:
            continue
        seen.add(date)
        text = rng.choice(formats)(date, rng)
        rows.append({"prompt": rng.choice(instructions).format(date=text), "response": date.isoformat()})
    return rows


def replay_rows(max_new_tokens: int = 32) -> list[dict]:
    """The base model's own greedy answers to REPLAY_PROMPTS, cut after their last full sentence."""
    from deltatune.pretrained import load_causal_lm
    from deltatune.train.config import DataConfig
    from deltatune.train.evaluate import generate_for

    model, tokenizer = load_causal_lm("smollm2")
    records = [{"prompt": q, "response": ""} for q in REPLAY_PROMPTS]
    answers = generate_for(model, tokenizer, records, DataConfig(), max_new_tokens, "cpu")
    rows = []
    for question, answer in zip(REPLAY_PROMPTS, answers, strict=True):
        answer = answer.strip()
        end = max(answer.rfind(". "), answer.rfind(".\n"), answer.rfind("!"), answer.rfind("?"))
        answer = answer if answer.endswith((".", "!", "?")) or end < 0 else answer[: end + 1]
        rows.append({"prompt": question, "response": answer})
    return rows


def main() -> None:
    rng = random.Random(1234)
    seen: set = set()
    dates = make(rng, 600, seen, TRAIN_FORMATS, TRAIN_INSTRUCTIONS)
    train = dates + replay_rows()
    random.Random(99).shuffle(train)
    splits = {
        "quickstart_train": train,
        "quickstart_test": make(rng, 64, seen, TRAIN_FORMATS, TRAIN_INSTRUCTIONS),
        "quickstart_unseen_test": make(rng, 48, seen, UNSEEN_FORMATS, UNSEEN_INSTRUCTIONS),
        "general_test": [{"prompt": q, "response": a, "match": "contains"} for q, a in GENERAL],
    }
    out = Path(__file__).resolve().parents[1] / "src" / "deltatune" / "data"
    for name, rows in splits.items():
        with open(out / f"{name}.jsonl", "w") as fh:
            fh.writelines(json.dumps(r) + "\n" for r in rows)
    print(", ".join(f"{len(rows)} {name}" for name, rows in splits.items()), f"written to {out}")


if __name__ == "__main__":
    main()
