"""The README's API example runs as written (with tiny models standing in for `base` and `base2`)."""

from __future__ import annotations

import re
from pathlib import Path

import deltatune as dt
from tests.conftest import tiny_llama

README = Path(__file__).resolve().parents[1] / "README.md"


def test_readme_api_example_runs(tmp_path, monkeypatch, capsys):
    text = README.read_text()
    section = text[text.index("## The API in five lines") :]
    code = re.search(r"```python\n(.*?)```", section, re.S).group(1)
    monkeypatch.chdir(tmp_path)
    namespace = {"base": tiny_llama(), "base2": tiny_llama()}
    exec(compile(code, "README.md", "exec"), namespace)  # noqa: S102 - our own README
    assert "trainable params:" in capsys.readouterr().out
    assert (tmp_path / "out" / "adapter_model.safetensors").exists()
    assert not any(isinstance(m, dt.PeftModel) for m in namespace["merged"].modules())
