"""Property-based fuzzing of the checkpoint reader, for every method (issue 27).

A saved adapter is damaged the ways disks, tools and people damage files (truncated, bytes flipped, a lying header,
tensors missing, renamed, extra, reshaped, retyped, NaN/inf) and loaded: the load succeeds or raises a typed
deltatune error, the base model is unchanged after a refusal, and nothing in the folder is written.
"""

from __future__ import annotations

import json
import resource
import shutil
import struct
import warnings

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st
from safetensors.torch import load_file, save_file

import deltatune as dt
from deltatune.errors import DeltatuneError, UnknownFieldWarning
from tests.conftest import tiny_llama
from tests.reliability.hostile import assert_unchanged, folder_snapshot, model_snapshot
from tests.reliability.test_fuzz_configs import SPECS, valid_dict

WEIGHTS = "adapter_model.safetensors"


@pytest.fixture(scope="module")
def saved_adapters(tmp_path_factory):
    """One saved adapter per method (on the tiny LLaMA), with non-trivial values."""
    root = tmp_path_factory.mktemp("saved")
    for peft_type in SPECS:
        torch.manual_seed(0)
        model = dt.get_peft_model(tiny_llama(), SPECS[peft_type].config_cls.from_dict(valid_dict(peft_type)))
        with torch.no_grad():
            for p in model.parameters():
                if p.requires_grad:
                    p.add_(0.01 * torch.randn_like(p))
        model.save_pretrained(root / peft_type)
    return root


def _split(raw: bytes) -> tuple[dict, bytes]:
    (n,) = struct.unpack("<Q", raw[:8])
    return json.loads(raw[8 : 8 + n]), raw[8 + n :]


def _join(header: dict, body: bytes) -> bytes:
    text = json.dumps(header).encode()
    return struct.pack("<Q", len(text)) + text + body


def _damage_bytes(data: st.DataObject, raw: bytes) -> bytes:
    kind = data.draw(st.sampled_from(["truncate", "flip", "length", "header"]), label="byte damage")
    if kind == "truncate":
        return raw[: data.draw(st.integers(0, len(raw) - 1), label="keep bytes")]
    if kind == "flip":
        at = data.draw(st.integers(0, len(raw) - 1), label="at")
        return raw[:at] + bytes([raw[at] ^ data.draw(st.integers(1, 255), label="xor")]) + raw[at + 1 :]
    if kind == "length":
        return struct.pack("<Q", data.draw(st.integers(0, 2**64 - 1), label="header length")) + raw[8:]
    header, body = _split(raw)
    name = data.draw(st.sampled_from(sorted(k for k in header if k != "__metadata__")), label="entry")
    field = data.draw(st.sampled_from(["dtype", "shape", "data_offsets"]), label="field")
    values = {
        "dtype": st.sampled_from(["F32", "F16", "BF16", "I64", "BOOL", "U8", "F8_E4M3", "Q4", ""]),
        "shape": st.lists(st.sampled_from([0, 1, 3, 7, 10**6, 10**12]), max_size=3),
        "data_offsets": st.lists(st.sampled_from([0, 4, 10**3, 10**12]), min_size=2, max_size=2).map(sorted),
    }
    header[name][field] = data.draw(values[field], label="value")
    return _join(header, body)


def _damage_tensors(data: st.DataObject, tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    name = data.draw(st.sampled_from(sorted(tensors)), label="tensor")
    kind = data.draw(st.sampled_from(["drop", "rename", "extra", "reshape", "retype", "nan", "inf"]), label="damage")
    value = tensors[name]
    if kind == "drop":
        del tensors[name]
    elif kind == "rename":
        tensors[name.replace("base_model.model.", "base_model.model.x", 1) if "." in name else name + "x"] = (
            tensors.pop(name)
        )
    elif kind == "extra":
        tensors[name + "_extra"] = value.clone()
    elif kind == "reshape":
        tensors[name] = torch.zeros(value.numel() + data.draw(st.integers(1, 5), label="grow"))
    elif kind == "retype":
        dtype = data.draw(st.sampled_from([torch.int64, torch.int8, torch.bool, torch.float16, torch.float64]))
        tensors[name] = value.to(dtype)
    else:
        flat = value.clone().flatten()
        flat[data.draw(st.integers(0, max(flat.numel() - 1, 0)), label="at")] = float(kind)
        tensors[name] = flat.reshape(value.shape)
    return tensors


def _load_and_check(folder) -> None:
    """Load `folder` two ways; either works or is refused by a typed error with the model and folder untouched."""
    files = folder_snapshot(folder)
    base = tiny_llama()
    before = model_snapshot(base)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UnknownFieldWarning)
        try:
            dt.PeftModel.from_pretrained(base, folder)
        except DeltatuneError as exc:
            assert str(exc)
            assert_unchanged(base, before)
        assert folder_snapshot(folder) == files


@pytest.mark.parametrize("peft_type", sorted(SPECS))
@given(data=st.data())
def test_damaged_weight_files_load_or_are_refused_by_name(saved_adapters, tmp_path_factory, peft_type, data):
    folder = tmp_path_factory.mktemp("damaged")
    shutil.copytree(saved_adapters / peft_type, folder, dirs_exist_ok=True)
    path = folder / WEIGHTS
    if data.draw(st.booleans(), label="damage bytes (else tensors)"):
        path.write_bytes(_damage_bytes(data, path.read_bytes()))
    else:
        save_file(_damage_tensors(data, load_file(path)), path)
    _load_and_check(folder)


@pytest.mark.parametrize("peft_type", ["LORA", "PROMPT_TUNING", "VERA"])
def test_nan_and_inf_tensors_are_refused_naming_the_tensor(saved_adapters, tmp_path, peft_type):
    shutil.copytree(saved_adapters / peft_type, tmp_path, dirs_exist_ok=True)
    tensors = load_file(tmp_path / WEIGHTS)
    name = sorted(tensors)[0]
    tensors[name] = (
        tensors[name].clone().flatten().index_fill_(0, torch.tensor([0]), float("nan")).reshape(tensors[name].shape)
    )
    save_file(tensors, tmp_path / WEIGHTS)
    base = tiny_llama()
    before = model_snapshot(base)
    with pytest.raises(dt.CheckpointError, match=f"{name}.*NaN/inf"):
        dt.PeftModel.from_pretrained(base, tmp_path)
    assert_unchanged(base, before)


def test_a_header_declaring_a_trillion_element_tensor_is_refused_before_any_allocation(saved_adapters, tmp_path):
    shutil.copytree(saved_adapters / "LORA", tmp_path, dirs_exist_ok=True)
    header, body = _split((tmp_path / WEIGHTS).read_bytes())
    name = sorted(k for k in header if k != "__metadata__")[0]
    header[name].update(shape=[10**6, 10**6], data_offsets=[0, 4 * 10**12])  # 4 TB declared, a few KB present
    (tmp_path / WEIGHTS).write_bytes(_join(header, body))
    peak_before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss  # KiB on Linux
    with pytest.raises(dt.CheckpointError, match="safetensors"):
        dt.PeftModel.from_pretrained(tiny_llama(), tmp_path)
    assert resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - peak_before < 256 * 1024  # no 4 TB try, no 4 GB


def test_a_lying_header_length_is_refused(saved_adapters, tmp_path):
    shutil.copytree(saved_adapters / "LORA", tmp_path, dirs_exist_ok=True)
    raw = (tmp_path / WEIGHTS).read_bytes()
    (tmp_path / WEIGHTS).write_bytes(struct.pack("<Q", 2**40) + raw[8:])
    with pytest.raises(dt.CheckpointError, match="truncated"):
        dt.PeftModel.from_pretrained(tiny_llama(), tmp_path)


def _small_gguf(path):
    gguf = pytest.importorskip("gguf")
    import numpy as np

    writer = gguf.GGUFWriter(str(path), "llama")
    writer.add_tensor("token_embd.weight", np.ones((64, 32), dtype=np.float32))
    writer.add_tensor("output.weight", np.ones((64, 32), dtype=np.float32))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return path


@pytest.mark.parametrize("keep", [0.5, 0.99, 0.02])
def test_a_truncated_gguf_is_refused_before_transformers_reads_it(tmp_path, keep):
    from deltatune.export.gguf_file import check_gguf
    from deltatune.pretrained import load_causal_lm

    path = _small_gguf(tmp_path / "m.gguf")
    check_gguf(path)  # whole: accepted
    raw = path.read_bytes()
    path.write_bytes(raw[: int(len(raw) * keep)])
    with pytest.raises(dt.CheckpointError, match="truncated|not a readable GGUF"):
        load_causal_lm(path)
