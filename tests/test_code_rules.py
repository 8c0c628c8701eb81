"""Rules that keep the code base in shape: the core names no method or model family; size budgets hold."""

from __future__ import annotations

import ast
import re
from pathlib import Path

import pytest

SRC = Path(__file__).resolve().parents[1] / "src" / "deltatune"
CORE = [
    *(
        SRC / n
        for n in [
            "model.py",
            "model_checkpoint.py",
            "input_adapter.py",
            "io.py",
            "inject.py",
            "layers.py",
            "registry.py",
            "config.py",
        ]
    ),
    *sorted((SRC / "quant").rglob("*.py")),
    *sorted((SRC / "train").rglob("*.py")),
    *sorted((SRC / "cli").rglob("*.py")),
]
MAX_FILE_LINES, MAX_FUNCTION_LINES = 600, 60
GENERIC_NAMES = {"bias", "alpha"}
"""Method config fields that are also everyday torch / matplotlib names (a layer's bias, a plot's alpha)."""


def _forbidden() -> tuple[set[str], set[str]]:
    """(words, attributes) the core must not use, generated from what is registered: every method's peft_type,
    parameter prefix and variant flags, every model family and family-specific module type in the architecture
    table; and the config fields that only one method has (`config.r`, `rank_pattern`, ...)."""
    import dataclasses

    import deltatune as dt
    from deltatune.config import AdapterConfig
    from deltatune.methods.lora_layer import LORA_VARIANTS
    from deltatune.models import ARCHS, linear_types

    words = {spec.peft_type.lower() for spec in dt.list_methods()}
    words |= {spec.param_prefix.strip("_").lower() for spec in dt.list_methods()}
    words |= {flag.removeprefix("use_").lower() for flag in LORA_VARIANTS}
    words |= {family.lower() for family in ARCHS}
    words |= {t.__name__.lower() for t in linear_types() if t.__module__.startswith("transformers")}
    base_fields = {f.name for f in dataclasses.fields(AdapterConfig)}
    attrs = {f.name for spec in dt.list_methods() for f in dataclasses.fields(spec.config_cls)} - base_fields
    return words, attrs - GENERIC_NAMES


def _tokens(word: str) -> list[str]:
    """`lora_A` -> [lora, a]; `LoraLinear` -> [lora, linear]; `gpt2` stays one token."""
    return [t.lower() for t in re.findall(r"[A-Z]?[a-z0-9]+|[A-Z]+(?![a-z])", word)]


def _code_words(tree: ast.AST) -> list[tuple[int, str, str]]:
    """(line, kind, text) of identifiers, attributes, keyword names and string literals, docstrings excluded
    (comments never reach the AST)."""
    docstrings = {
        id(node.body[0].value)
        for node in ast.walk(tree)
        if isinstance(node, (ast.Module, ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef))
        and node.body
        and isinstance(node.body[0], ast.Expr)
        and isinstance(node.body[0].value, ast.Constant)
    }
    out = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Constant) and isinstance(node.value, str) and id(node) not in docstrings:
            out.append((node.lineno, "string", node.value))
        elif isinstance(node, ast.Name):
            out.append((node.lineno, "name", node.id))
        elif isinstance(node, ast.Attribute):
            out.append((node.lineno, "attribute", node.attr))
        elif isinstance(node, ast.keyword) and node.arg:
            out.append((node.lineno, "attribute", node.arg))
        elif isinstance(node, (ast.FunctionDef, ast.ClassDef, ast.alias)):
            out.append((node.lineno, "name", getattr(node, "name", None) or ""))
    return out


def _violations(tree: ast.AST, words: set[str], attrs: set[str]) -> list[tuple[int, str]]:
    hits = []
    for line, kind, text in _code_words(tree):
        if set(_tokens(text)) & words or (kind == "attribute" and text in attrs):
            hits.append((line, text))
    return hits


@pytest.mark.parametrize("path", CORE, ids=lambda p: str(p.relative_to(SRC)))
def test_core_is_method_and_family_agnostic(path):
    words, attrs = _forbidden()
    hits = [
        f"{path.relative_to(SRC)}:{line}: {text!r}"
        for line, text in _violations(ast.parse(path.read_text()), words, attrs)
    ]
    assert not hits, "core files must not name a method, a model family or a method's own config field:\n" + "\n".join(
        hits
    )


def test_the_rule_catches_method_names_fields_and_families():
    words, attrs = _forbidden()
    assert {"lora", "adalora", "gralora", "vera", "dora", "llama", "gpt2", "conv1d"} <= words
    assert {"r", "rank_pattern", "lora_alpha", "init_r"} <= attrs
    code = 'x = "LORA"\ny = layer.lora_A\nz = config.r\nclass LoraThing: pass\nw = {"gpt2": 1}\nv = f(rank_pattern=2)'
    found = [text for _, text in _violations(ast.parse(code), words, attrs)]
    assert found.count("LORA") == 1 and {"lora_A", "r", "LoraThing", "gpt2", "rank_pattern"} <= set(found)
    assert not _violations(ast.parse('"""LORA in a docstring is fine."""\nname = "default"'), words, attrs)


def _python_files():
    root = SRC.parents[1]
    return [p for d in ("src", "tests", "benchmarks") for p in (root / d).rglob("*.py")]


def test_size_budgets():
    problems = []
    for path in _python_files():
        text = path.read_text()
        if len(text.splitlines()) > MAX_FILE_LINES:
            problems.append(f"{path}: {len(text.splitlines())} lines > {MAX_FILE_LINES}")
        for node in ast.walk(ast.parse(text)):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                length = node.end_lineno - node.lineno + 1
                if length > MAX_FUNCTION_LINES:
                    problems.append(f"{path}:{node.lineno} {node.name}() is {length} lines > {MAX_FUNCTION_LINES}")
    assert not problems, "\n".join(problems)
