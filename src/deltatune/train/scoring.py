"""Scoring a run before and after training: the sets scored by generation (held-out, extra, general questions) or,
for classification, by predicted label; and their report into the run's `TrainResult`."""

from __future__ import annotations

from typing import TYPE_CHECKING

from deltatune.train.config import BUNDLED, TrainConfig
from deltatune.train.data import check_records, read_records
from deltatune.train.evaluate import GenerationSet, generate_for

if TYPE_CHECKING:
    from deltatune.train.trainer import TrainResult, _Run


def generation_sets(cfg: TrainConfig, eval_records: list) -> list[GenerationSet]:
    """The sets scored by generation (read and checked before the model loads): the held-out set, the extra ones
    (for the bundled data: its unseen phrasings) and the general questions; the first `generate_eval` of each."""
    if cfg.generate_eval <= 0:
        return []
    n = cfg.generate_eval
    sets = [GenerationSet("held-out", eval_records[:n], cfg.max_new_tokens)] if eval_records else []
    extra = cfg.data.extra_eval
    if extra is None:
        extra = {"unseen phrasings": f"{BUNDLED}_unseen"} if cfg.data.train == BUNDLED else {}
    named = [(name, source, cfg.max_new_tokens) for name, source in extra.items()]
    if cfg.data.general_eval:
        named.append(("general questions", cfg.data.general_eval, cfg.general_max_new_tokens))
    for name, source, budget in named:
        records = read_records(source, "test")
        check_records(records, cfg.data, source)
        sets.append(GenerationSet(name, records[:n], budget))
    return sets


def score_all(run: _Run, when: str) -> None:
    """Generate answers for every generation set, stored as its `before` or `after`."""
    share = getattr(run.objective, "padding_free", False) and run.cfg.data.share_prefixes  # its layout's probe passed
    for gen_set in run.generation_sets:
        budget = gen_set.max_new_tokens
        answers = generate_for(run.model, run.tokenizer, gen_set.records, run.cfg.data, budget, run.device, share)
        setattr(gen_set, when, answers)
    if run.objective.scores_predictions and run.eval_set:
        pad = run.tokenizer.pad_token_id or 0
        run.predictions[when] = run.objective.predict(
            run.model, run.eval_set, pad, run.cfg.optim.batch_size, run.device
        )
    run.model.train()


def report_scores(run: _Run, result: TrainResult) -> None:
    data = run.cfg.data
    for gen_set in run.generation_sets:
        result.scores[gen_set.name] = (gen_set.score(gen_set.before, data), gen_set.score(gen_set.after, data))
        result.set_samples[gen_set.name] = gen_set.samples(data)
        result.answers_before[gen_set.name] = list(gen_set.before)
    if run.predictions.get("before"):  # none when a seq2seq run scores no generations (generate_eval=0)
        _report_predictions(run, result)
    if run.eval_records and run.generation_sets:
        main = run.generation_sets[0]
        result.metric_before, result.metric_after = result.scores[main.name]
        result.samples = result.set_samples[main.name]


def _report_predictions(run: _Run, result: TrainResult) -> None:
    """The objective's own scores of its held-out predictions (classification: accuracy; seq2seq: exact match and
    ROUGE-L); the first is the run's main metric."""
    scores, samples, scored_by = run.objective.score_predictions(
        run.eval_records, run.predictions["before"], run.predictions["after"]
    )
    result.scores.update(scores)
    result.metric_before, result.metric_after = next(iter(scores.values()))
    result.scored_by, result.samples = scored_by, samples
    result.set_samples[next(iter(scores))] = samples  # one table of samples, whatever the number of scores
