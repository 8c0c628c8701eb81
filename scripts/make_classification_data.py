"""Generate the bundled classification data (records `{"text": ..., "label": ...}`), for encoder methods.

Two small tasks, deterministic (seeded), each with a train and a test split:

- sentiment (positive / negative): one-sentence product and service reviews in which the words alone do not give
  the answer: negation ("is not reliable"), contrast ("I expected ... to be awful, but it was superb": the second
  clause decides) and hedged praise or blame. Test sentences pair held-out adjectives with the training aspects, and
  add two constructions that never occur in training.
- intents (alarm, weather, music, shopping_list, timer): what people ask a voice assistant; the test split uses
  held-out phrasings. The second source task of the AdapterFusion example (docs/methods.md).

Run: python scripts/make_classification_data.py
"""

from __future__ import annotations

import json
import random
from collections.abc import Callable
from pathlib import Path

ASPECTS = ["battery", "screen", "delivery", "staff", "food", "price", "camera", "sound", "keyboard", "service",
           "packaging", "room", "software", "fabric", "engine", "coffee", "app", "seat", "manual",
           "charger"]  # fmt: skip
GOOD = {"train": ["great", "excellent", "reliable", "wonderful", "fantastic", "solid", "impressive", "friendly",
                  "fast", "comfortable", "superb", "pleasant"],
        "test": ["outstanding", "lovely", "brilliant", "decent", "terrific", "sturdy"]}  # fmt: skip
BAD = {"train": ["terrible", "awful", "slow", "flimsy", "disappointing", "poor", "noisy", "rude", "broken",
                 "useless", "cheap", "annoying"],
       "test": ["dreadful", "horrible", "sluggish", "shoddy", "mediocre", "lousy"]}  # fmt: skip

Sentence = Callable[[str, str, str], str]  # (aspect, word that decides, the other word) -> text

TRAIN_TEMPLATES: list[tuple[Sentence, bool]] = [  # (sentence, whether the deciding word's sentiment is flipped)
    (lambda a, w, o: f"The {a} is {w}.", False),
    (lambda a, w, o: f"The {a} is not {w}.", True),
    (lambda a, w, o: f"I expected the {a} to be {o}, but it was {w}.", False),
    (lambda a, w, o: f"I wouldn't call the {a} {w}.", True),
    (lambda a, w, o: f"Honestly, the {a} was {w}.", False),
    (lambda a, w, o: f"Nobody could say the {a} is {w}.", True),
    (lambda a, w, o: f"The {a} looked {o} at first, yet it turned out {w}.", False),
    (lambda a, w, o: f"The {a} was never {w}.", True),
]
TEST_ONLY_TEMPLATES: list[tuple[Sentence, bool]] = [
    (lambda a, w, o: f"Far from {w}, that {a}.", True),
    (lambda a, w, o: f"Everyone warned me the {a} would be {o}; in fact it is {w}.", False),
]

INTENTS: dict[str, dict[str, list[str]]] = {
    "alarm": {
        "train": ["wake me up at {time}", "set an alarm for {time}", "I need an alarm at {time} tomorrow",
                  "please set my alarm to {time}", "alarm at {time} please"],
        "test": ["could you make sure I'm up by {time}", "ring me awake at {time}"],
    },
    "weather": {
        "train": ["what's the weather in {city}", "will it rain in {city} tomorrow", "how cold is it in {city}",
                  "is it sunny in {city} today", "weather forecast for {city}"],
        "test": ["should I bring an umbrella in {city}", "do I need a coat in {city} this evening"],
    },
    "music": {
        "train": ["play some {genre}", "put on {genre} music", "I want to listen to {genre}",
                  "start a {genre} playlist", "play my {genre} songs"],
        "test": ["some {genre} in the background would be nice", "turn on a bit of {genre}"],
    },
    "shopping_list": {
        "train": ["add {item} to my shopping list", "put {item} on the list", "we need {item}, add it to the list",
                  "remember to buy {item}", "shopping list: add {item}"],
        "test": ["we're out of {item}", "don't let me forget {item} at the store"],
    },
    "timer": {
        "train": ["set a timer for {minutes} minutes", "start a {minutes} minute timer", "timer for {minutes} minutes",
                  "count down {minutes} minutes", "remind me in {minutes} minutes"],
        "test": ["let me know when {minutes} minutes have passed", "the pasta needs {minutes} minutes, time it"],
    },
}  # fmt: skip
SLOTS = {
    "time": ["6am", "7:30", "half past six", "5:45", "8 o'clock", "noon", "9pm", "6:15"],
    "city": ["Paris", "Lagos", "Tokyo", "Lima", "Oslo", "Cairo", "Denver", "Seoul", "Perth", "Madrid"],
    "genre": ["jazz", "rock", "classical", "hip hop", "reggae", "blues", "techno", "folk", "country"],
    "item": ["milk", "eggs", "bread", "apples", "rice", "coffee beans", "butter", "dish soap", "tomatoes"],
    "minutes": ["5", "10", "12", "15", "20", "25", "three", "forty"],
}


def _sentiment_records(split: str, n: int, rng: random.Random) -> list[dict[str, str]]:
    templates = TRAIN_TEMPLATES + (TEST_ONLY_TEMPLATES if split == "test" else [])
    records, seen = [], set()
    while len(records) < n:
        label = "positive" if len(records) % 2 == 0 else "negative"
        template, flipped = rng.choice(templates)
        # the deciding word says the label, unless the construction flips it
        says_positive = (label == "positive") != flipped
        word = rng.choice(GOOD[split] if says_positive else BAD[split])
        other = rng.choice(BAD[split] if says_positive else GOOD[split])
        text = template(rng.choice(ASPECTS), word, other)
        if text not in seen:
            seen.add(text)
            records.append({"text": text, "label": label})
    rng.shuffle(records)
    return records


def _intent_records(split: str, per_intent: int, rng: random.Random) -> list[dict[str, str]]:
    records = []
    for intent, phrasings in INTENTS.items():
        seen: set[str] = set()
        while len(seen) < per_intent:
            template = rng.choice(phrasings[split])
            slots = {name: rng.choice(values) for name, values in SLOTS.items()}
            text = template.format(**slots)
            text = text[0].upper() + text[1:] if rng.random() < 0.5 else text
            if text not in seen:
                seen.add(text)
                records.append({"text": text, "label": intent})
    rng.shuffle(records)
    return records


def main() -> None:
    out = Path(__file__).resolve().parents[1] / "src" / "deltatune" / "data"
    rng = random.Random(20261130)
    sets = {
        "sentiment_train": _sentiment_records("train", 480, rng),
        "sentiment_test": _sentiment_records("test", 120, rng),
        "intents_train": _intent_records("train", 60, rng),
        "intents_test": _intent_records("test", 16, rng),
    }
    for name, records in sets.items():
        (out / f"{name}.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))
        print(f"{name}: {len(records)} records")


if __name__ == "__main__":
    main()
