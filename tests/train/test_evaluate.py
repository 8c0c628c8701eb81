"""Generation scoring: exact and "contains" answers, the sets a run scores, the bundled data's coverage."""

from __future__ import annotations

import json
import re
from importlib import resources

from deltatune.train import load_train_config
from deltatune.train.config import DataConfig
from deltatune.train.evaluate import GenerationSet, answer_is_right
from deltatune.train.scoring import generation_sets


def test_exact_and_contains_answers():
    assert answer_is_right(" 2001-05-01\n", "2001-05-01")
    assert not answer_is_right("2001-05-1st", "2001-05-01")
    assert answer_is_right("The capital of France is Paris.", "Paris", "contains")
    assert answer_is_right("A week has seven days.", "7|seven", "contains")
    assert not answer_is_right("2017-07-07", "12|twelve", "contains")


def test_generation_set_scores_each_record_by_its_own_rule():
    records = [{"prompt": "q1", "response": "a"}, {"prompt": "q2", "response": "x|y", "match": "contains"}]
    assert GenerationSet("s", records, 8).score(["a", "has y in it"], DataConfig()) == 1.0
    assert GenerationSet("s", records, 8).score(["b", "has y in it"], DataConfig()) == 0.5


def test_bundled_runs_score_held_out_unseen_phrasings_and_general_questions(tmp_path):
    cfg = load_train_config(None, ["generate_eval=4", f"output_dir={tmp_path}"])
    sets = generation_sets(cfg, [{"prompt": "p", "response": "r"}] * 10)
    assert [(s.name, len(s.records)) for s in sets] == [
        ("held-out", 4),
        ("unseen phrasings", 4),
        ("general questions", 4),
    ]
    own = load_train_config(None, ["generate_eval=4", "data.general_eval=null", f"output_dir={tmp_path}"])
    assert [s.name for s in generation_sets(own, [])] == ["unseen phrasings"]


def _bundled(name: str) -> list[dict]:
    text = (resources.files("deltatune.data") / f"{name}.jsonl").read_text()
    return [json.loads(line) for line in text.splitlines()]


def test_bundled_data_covers_what_users_type_and_keeps_the_unseen_set_unseen():
    train, test, unseen = (_bundled(n) for n in ("quickstart_train", "quickstart_test", "quickstart_unseen_test"))
    prompts = " ".join(r["prompt"] for r in train)
    for phrasing in (r"the 1st of", r"the 2nd of", r"the 3rd of", r"\(month/day/year\)", r"\(day/month/year\)"):
        assert re.search(phrasing, prompts), phrasing
    assert re.search(r"\b\d/\d{1,2}/\d{4} \(month/day/year\)", prompts)  # single-digit, unpadded numbers
    dates = {r["response"] for r in train}
    assert not dates & {r["response"] for r in test + unseen}  # held-out dates never seen in training
    unseen_only = ("Give me this date in ISO format", "Please format", "day of", "(day-month-year)", " the ")
    for marker in unseen_only[:-1]:  # phrasings and instructions of the unseen set never occur in training
        assert marker not in prompts, marker
    assert all(any(m in r["prompt"] for m in unseen_only) for r in unseen)
