"""Rules that keep the code base in shape: the core names no method or model family; size budgets hold."""

from __future__ import annotations

import ast
import re
from pathlib import Path

import pytest

SRC = Path(__file__).resolve().parents[1] / "src" / "deltatune"
CORE = ["model.py", "io.py", "inject.py", "layers.py", "registry.py", "config.py"]
FORBIDDEN = re.compile(r"\b(LORA|IA3|lora|llama|gpt2|bert|t5)\b", re.IGNORECASE)
MAX_FILE_LINES, MAX_FUNCTION_LINES = 600, 60


def _code_words(tree: ast.AST) -> list[tuple[int, str]]:
    """Identifiers and string literals of the code, docstrings excluded (comments never reach the AST)."""
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
            out.append((node.lineno, node.value))
        elif isinstance(node, ast.Name):
            out.append((node.lineno, node.id))
        elif isinstance(node, ast.Attribute):
            out.append((node.lineno, node.attr))
    return out


@pytest.mark.parametrize("name", CORE)
def test_core_is_method_and_family_agnostic(name):
    tree = ast.parse((SRC / name).read_text())
    hits = [f"{name}:{line}: {word!r}" for line, word in _code_words(tree) if FORBIDDEN.search(word)]
    assert not hits, "core files must not name a method or model family:\n" + "\n".join(hits)


def test_the_rule_catches_a_method_name():
    assert _code_words(ast.parse('"""LORA in a docstring is fine."""\nx = "LORA"'))[-1] == (2, "LORA")
    assert any(FORBIDDEN.search(w) for _, w in _code_words(ast.parse("if spec.peft_type == 'IA3': pass")))


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
