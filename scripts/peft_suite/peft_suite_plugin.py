"""pytest plugin for running peft's own test files against peft or, through `peft_shim`, against deltatune.

Loaded with `-p peft_suite_plugin` (scripts/peft_suite on PYTHONPATH). Options:
  --peft-suite-target=peft|deltatune   deltatune installs the import shim before any test file is imported
  --peft-suite-log=FILE                one JSON line per test: id, method, outcome, and the failure's type and message
Tests parametrized with a config class of a method deltatune does not implement are deselected (listed in the log
as "not_shared"), so both runs cover the same tests: the methods the two libraries share.
"""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest

# peft config class -> the method's name in the results (the methods deltatune implements too)
SHARED_CONFIGS = {
    "LoraConfig": "LoRA",
    "AdaLoraConfig": "AdaLoRA",
    "IA3Config": "IA3",
    "VeraConfig": "VeRA",
    "GraloraConfig": "GraLoRA",
    "LNTuningConfig": "LN tuning",
    "PromptTuningConfig": "prompt tuning",
    "PrefixTuningConfig": "prefix tuning",
    "PromptEncoderConfig": "P-tuning",
    "AdaptionPromptConfig": "LLaMA-Adapter",
}
_CONFIG_IN_ID = re.compile(r"(?<![A-Za-z])(\w*Config)\b")
# a test without a config class in its id is attributed by its name; the rest are peft's generic tests (mostly LoRA)
_NAME_HINTS = (
    ("dora", "LoRA"),
    ("lora", "LoRA"),
    ("ia3", "IA3"),
    ("vera", "VeRA"),
    ("trainable_token", "trainable tokens"),
    ("modules_to_save", "generic"),
)


def pytest_addoption(parser: pytest.Parser) -> None:
    parser.addoption("--peft-suite-target", choices=("peft", "deltatune"), default="peft")
    parser.addoption("--peft-suite-log", default=None)


def pytest_configure(config: pytest.Config) -> None:
    if config.getoption("--peft-suite-target") == "deltatune":
        import peft_shim

        peft_shim.install()


def method_of(nodeid: str) -> str | None:
    """The shared method a test exercises; None when its id names a config class deltatune lacks."""
    params = nodeid.partition("[")[2]
    named = [m for m in _CONFIG_IN_ID.findall(params) if m != "config"]
    if named:
        return SHARED_CONFIGS.get(named[0])
    name = nodeid.partition("::")[2].lower()
    for hint, method in _NAME_HINTS:
        if hint in name:
            return method
    return "generic"


def _log(config: pytest.Config, record: dict) -> None:
    path = config.getoption("--peft-suite-log")
    if path:
        with Path(path).open("a") as f:
            f.write(json.dumps(record) + "\n")


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    kept, dropped = [], []
    for item in items:
        (kept if method_of(item.nodeid) is not None else dropped).append(item)
    for item in dropped:
        _log(config, {"id": item.nodeid, "method": None, "outcome": "not_shared"})
    if dropped:
        config.hook.pytest_deselected(items=dropped)
    items[:] = kept


_CONFIG: list[pytest.Config] = []


@pytest.hookimpl(tryfirst=True)
def pytest_sessionstart(session: pytest.Session) -> None:
    _CONFIG.append(session.config)


def pytest_runtest_logreport(report: pytest.TestReport) -> None:
    """One line per test (under xdist this runs in the controller): its call, or the phase that did not pass."""
    if report.when != "call" and report.outcome == "passed":
        return
    record = {"id": report.nodeid, "method": method_of(report.nodeid), "outcome": report.outcome, "when": report.when}
    if report.failed and report.longrepr is not None:
        crash = getattr(report.longrepr, "reprcrash", None)
        record["error"] = (crash.message if crash else str(report.longrepr))[:600]
    elif report.skipped and isinstance(report.longrepr, tuple):
        record["error"] = str(report.longrepr[2])[:300]
    _log(_CONFIG[0], record)
