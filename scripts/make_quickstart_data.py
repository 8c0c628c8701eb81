"""Generate the bundled quickstart dataset: extract a person's name, age and city from a sentence as compact JSON.

Deterministic (seeded). The held-out split uses names and cities that never appear in training, so the metric
measures the skill, not memorised answers. Run: python scripts/make_quickstart_data.py
"""

from __future__ import annotations

import json
import random
from pathlib import Path

NAMES = """Maria Ahmed Chen Olga Tomas Priya Kwame Sofia Lars Aiko Mateo Fatima Ivan Chloe Rahul Zanele Pedro Yuki
Amara Jonas Leila Diego Hana Felix Noura Marco Ingrid Kofi Elena Ravi Mei Sven Alicia Omar Freya Tariq Lucia Bjorn
Nadia Hugo Keiko Arjun Elif Pablo Sanna Idris Greta Emeka Ines Viktor Asha Rosa Dmitri Layla Emil Thandiwe Bruno
Anya Kenji Selin Farid Clara Joao Ayla Nikolai Zara Anders Paloma Yusuf Eva Hiro Lena Samir Vera""".split()
CITIES = """Lisbon Nairobi Osaka Toronto Lima Oslo Cairo Dublin Hanoi Quito Porto Lagos Kyoto Denver Bergen Tunis
Cork Hue Cusco Tromso Accra Sapporo Calgary Arequipa Malmo Luxor Galway Dalat Sucre Bremen Dakar Nagoya Halifax
Trujillo Aarhus Aswan Limerick Hoian Potosi Leipzig""".split()
TEMPLATES = [
    "{name} is {age} years old and lives in {city}.",
    "Meet {name}, a {age}-year-old from {city}.",
    "Living in {city}, {name} just turned {age}.",
    "{name} ({age}) works in {city}.",
    "At {age}, {name} moved to {city}.",
    "Our new colleague {name} is based in {city} and is {age}.",
    "{name}, aged {age}, was born and raised in {city}.",
    "In {city} you will find {name}, who is {age}.",
]
INSTRUCTION = "Extract the person as JSON with keys name, age, city. Reply with the JSON only.\n\n"


def make(rng: random.Random, names: list[str], cities: list[str], n: int, seen: set) -> list[dict]:
    rows = []
    while len(rows) < n:
        name, city, age = rng.choice(names), rng.choice(cities), rng.randint(18, 89)
        template = rng.choice(TEMPLATES)
        if (name, city, age, template) in seen:
            continue
        seen.add((name, city, age, template))
        answer = json.dumps({"name": name, "age": age, "city": city})
        rows.append({"prompt": INSTRUCTION + template.format(name=name, age=age, city=city), "response": answer})
    return rows


def main() -> None:
    rng = random.Random(1234)
    names, cities = NAMES[:], CITIES[:]
    rng.shuffle(names)
    rng.shuffle(cities)
    held_names, held_cities = names[:15], cities[:8]
    seen: set = set()
    train = make(rng, names[15:], cities[8:], 320, seen)
    test = make(rng, held_names, held_cities, 64, seen)
    out = Path(__file__).resolve().parents[1] / "src" / "deltatune" / "data"
    for split, rows in (("train", train), ("test", test)):
        with open(out / f"quickstart_{split}.jsonl", "w") as fh:
            fh.writelines(json.dumps(r) + "\n" for r in rows)
    print(f"wrote {len(train)} train and {len(test)} test examples to {out}")


if __name__ == "__main__":
    main()
