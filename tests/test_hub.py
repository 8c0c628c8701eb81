"""Hub ids through huggingface_hub's cache (offline, pre-populated here) and push_to_hub with a stand-in upload."""

from __future__ import annotations

import shutil

import pytest
import torch

import deltatune as dt
from tests.conftest import model_output, tiny_llama

IDS = {"input_ids": torch.randint(0, 97, (2, 6), generator=torch.Generator().manual_seed(0))}
COMMITS = {"main": "a" * 40, "v1": "b" * 40}


def _cache(tmp_path, monkeypatch, saved):
    """A Hub cache holding repo user/adapter: "main" with the adapter in a subfolder `sub/` too, "v1" as a tag."""
    from huggingface_hub import constants

    root = tmp_path / "hub"
    repo = root / "models--user--adapter"
    for ref, commit in COMMITS.items():
        snapshot = repo / "snapshots" / commit
        shutil.copytree(saved[ref], snapshot)
        shutil.copytree(saved[ref], snapshot / "sub")
        (repo / "refs").mkdir(parents=True, exist_ok=True)
        (repo / "refs" / ref).write_text(commit)
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(root))
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)


def test_hub_ids_load_from_the_cache_with_revision_and_subfolder(tmp_path, monkeypatch):
    saved, outputs = {}, {}
    for seed, ref in ((1, "main"), (2, "v1")):
        torch.manual_seed(seed)
        model = dt.get_peft_model(tiny_llama(), dt.LoraConfig(r=2, target_modules=["q_proj"], init_lora_weights=False))
        model.save_pretrained(tmp_path / ref)
        saved[ref], outputs[ref] = tmp_path / ref, model_output(model, IDS)
    _cache(tmp_path, monkeypatch, saved)
    torch.testing.assert_close(
        model_output(dt.PeftModel.from_pretrained(tiny_llama(), "user/adapter"), IDS), outputs["main"]
    )
    pinned = dt.PeftModel.from_pretrained(tiny_llama(), "user/adapter", revision="v1")
    torch.testing.assert_close(model_output(pinned, IDS), outputs["v1"])
    pinned.load_adapter("user/adapter", adapter_name="sub", subfolder="sub")
    assert "sub" in pinned.peft_config
    with pytest.raises(dt.CheckpointError, match="offline"):
        dt.PeftModel.from_pretrained(tiny_llama(), "user/missing")


def test_push_to_hub_uploads_only_the_adapter_files(tmp_path, monkeypatch):
    from huggingface_hub import HfApi

    uploaded = {}

    def upload_folder(self, *, repo_id, folder_path, **kwargs):
        from pathlib import Path

        uploaded[repo_id] = sorted(p.name for p in Path(folder_path).rglob("*") if p.is_file())
        return "commit"

    monkeypatch.setattr(HfApi, "create_repo", lambda self, repo_id, **kwargs: repo_id)
    monkeypatch.setattr(HfApi, "upload_folder", upload_folder)
    model = dt.get_peft_model(tiny_llama(), dt.LoraConfig(r=2, target_modules=["q_proj"]))
    assert model.push_to_hub("user/adapter", commit_message="first") == "commit"
    assert uploaded["user/adapter"] == ["README.md", "adapter_config.json", "adapter_model.safetensors"]


def test_model_card_is_written_and_updated_keeping_the_body(tmp_path):
    import yaml

    model = dt.get_peft_model(tiny_llama(), dt.LoraConfig(r=2, target_modules=["q_proj"]))
    model.save_pretrained(tmp_path)
    text = (tmp_path / "README.md").read_text()
    header = yaml.safe_load(text.split("---\n")[1])
    assert header["library_name"] == "peft" and "lora" in header["tags"]
    (tmp_path / "README.md").write_text(text + "\nMy notes.\n")
    model.save_pretrained(tmp_path)
    assert (tmp_path / "README.md").read_text().endswith("My notes.\n")
