"""bitsandbytes' serialized 4-bit checkpoints, both ways, against bitsandbytes itself (CPU): a model quantized and
saved by transformers + bitsandbytes loads with bit-identical dequantized weights and equal logits; deltatune's
4-bit model saved in that layout loads back in transformers + bitsandbytes with the same weights; the codes."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import load_file, save_file

from deltatune.errors import CheckpointError
from deltatune.functional.nf4 import double_quantize, dynamic_code_8bit, quantize_blockwise_4bit
from deltatune.quant import Linear4bit, QuantConfig, quantize_model
from deltatune.quant.bnb_format import is_bnb_4bit_dir, load_bnb_4bit_causal_lm, save_bnb_4bit

bnb_functional = pytest.importorskip("bitsandbytes.functional")
transformers = pytest.importorskip("transformers")


def _tiny_dir(path):
    torch.manual_seed(0)
    config = transformers.LlamaConfig(
        vocab_size=97, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2,
    )  # fmt: skip
    transformers.LlamaForCausalLM(config).save_pretrained(path)
    return path


def _bnb_config(double_quant=True, quant_type="nf4"):
    return transformers.BitsAndBytesConfig(
        load_in_4bit=True,
        bnb_4bit_use_double_quant=double_quant,
        bnb_4bit_quant_type=quant_type,
        bnb_4bit_compute_dtype=torch.float32,
    )


def _bnb_dequantized(model, name):
    weight = model.get_submodule(name).weight
    return bnb_functional.dequantize_4bit(weight.data, weight.quant_state)


def _four_bit(model):
    return {n: m for n, m in model.named_modules() if isinstance(m, Linear4bit)}


def test_the_dynamic_code_is_bitsandbytes_table():
    code = dynamic_code_8bit()
    assert code.shape == (256,) and torch.all(code[1:] > code[:-1]) and code[-1] == 1.0 and (code == 0).sum() == 1
    assert torch.equal(code, bnb_functional.create_dynamic_map(signed=True))


@pytest.mark.parametrize("quant_type", ["nf4", "fp4"])
def test_four_bit_codes_and_double_quantization_scales_are_bitsandbytes_bytes(quant_type):
    torch.manual_seed(1)
    w = torch.randn(512, 384) * 0.02
    packed, absmax = quantize_blockwise_4bit(w, quant_type, 64)
    theirs, state = bnb_functional.quantize_4bit(w, blocksize=64, compress_statistics=True, quant_type=quant_type)
    assert torch.equal(packed, theirs.view(-1))
    codes, scale, offset = double_quantize(absmax)
    assert torch.equal(scale, state.state2.absmax) and torch.equal(offset, state.offset)
    assert torch.equal(codes, state.absmax)  # the 8-bit indices too: bitsandbytes' CPU encoder, bins and all


def test_the_8bit_encoder_matches_bitsandbytes_on_a_dense_grid():
    """2,000,001 evenly spaced values in [-1, 1] as absmax constants: double quantization's indices (of the values
    minus their mean, per block of 256) equal bitsandbytes' `quantize_blockwise` of the same centred values."""
    values = torch.linspace(-1, 1, 2_000_001)
    codes, scale, offset = double_quantize(values)
    theirs, state = bnb_functional.quantize_blockwise(values - offset, code=dynamic_code_8bit(), blocksize=256)
    assert torch.equal(scale, state.absmax) and torch.equal(codes, theirs)


def test_a_bitsandbytes_checkpoint_loads_bit_exact(tmp_path):
    source = _tiny_dir(tmp_path / "fp")
    saved = tmp_path / "bnb"
    theirs = transformers.AutoModelForCausalLM.from_pretrained(
        source, quantization_config=_bnb_config(), device_map="cpu"
    )
    theirs.save_pretrained(saved)
    assert is_bnb_4bit_dir(saved) and not is_bnb_4bit_dir(source)
    ours = load_bnb_4bit_causal_lm(saved)
    layers = _four_bit(ours)
    assert len(layers) == 14  # 7 linears per block, the output head stays full precision
    for name, layer in layers.items():
        assert torch.equal(layer.dequantize(torch.float32), _bnb_dequantized(theirs, name)), name
    ids = torch.randint(1, 97, (2, 7))
    torch.testing.assert_close(ours(input_ids=ids).logits, theirs(input_ids=ids).logits, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("double_quant", [True, False])
def test_deltatune_4bit_model_saved_loads_in_transformers_and_bitsandbytes(tmp_path, double_quant):
    source = _tiny_dir(tmp_path / "fp")
    ours = quantize_model(
        transformers.AutoModelForCausalLM.from_pretrained(source),
        QuantConfig(double_quant=double_quant, compute_dtype="fp32"),
    )
    save_bnb_4bit(ours, tmp_path / "out")
    config = json.loads((tmp_path / "out" / "config.json").read_text())["quantization_config"]
    assert config["bnb_4bit_use_double_quant"] is double_quant and config["quant_method"] == "bitsandbytes"
    theirs = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "out", device_map="cpu")
    for name, layer in _four_bit(ours).items():
        assert torch.equal(layer.dequantize(torch.float32), _bnb_dequantized(theirs, name)), name
    ids = torch.randint(1, 97, (2, 7))
    torch.testing.assert_close(theirs(input_ids=ids).logits, ours(input_ids=ids).logits, rtol=1e-5, atol=1e-5)
    again = load_bnb_4bit_causal_lm(tmp_path / "out")  # and back into deltatune, byte for byte
    for name, layer in _four_bit(again).items():
        assert torch.equal(layer.packed, _four_bit(ours)[name].packed)


def test_an_unknown_code_table_is_refused(tmp_path):
    source = _tiny_dir(tmp_path / "fp")
    ours = quantize_model(transformers.AutoModelForCausalLM.from_pretrained(source), QuantConfig(compute_dtype="fp32"))
    save_bnb_4bit(ours, tmp_path / "out")
    tensors = load_file(tmp_path / "out" / "model.safetensors")
    key = next(k for k in tensors if k.endswith(".quant_map") and "nested" not in k)
    tensors[key] = tensors[key] * 0.5
    save_file(tensors, tmp_path / "out" / "model.safetensors")
    with pytest.raises(CheckpointError, match="quant_map"):
        load_bnb_4bit_causal_lm(tmp_path / "out")


def test_cli_export_and_training_from_a_4bit_checkpoint(tmp_path):
    """(Rows of 64+: bitsandbytes' own CPU dequantize_4bit is wrong for rows shorter than a block, e.g. 32x32.)"""
    from typer.testing import CliRunner

    import deltatune as dt
    from deltatune.cli.app import app
    from deltatune.errors import ConfigError
    from deltatune.pretrained import load_causal_lm
    from tests.conftest import tiny_tokenizer

    source, out = _tiny_dir(tmp_path / "fp"), tmp_path / "bnb4"
    tiny_tokenizer().save_pretrained(source)
    result = CliRunner().invoke(app, ["export", "bnb4", "--model", str(source), "--out", str(out)])
    assert result.exit_code == 0, result.output
    theirs = transformers.AutoModelForCausalLM.from_pretrained(out, device_map="cpu")
    model, _ = load_causal_lm(out)  # detected as 4-bit: loaded as it is
    for name, layer in _four_bit(model).items():
        assert torch.equal(layer.dequantize(torch.float32), _bnb_dequantized(theirs, name))
    with pytest.raises(ConfigError, match="already a bitsandbytes 4-bit"):
        load_causal_lm(out, quantize=QuantConfig())
    pm = dt.get_peft_model(model, dt.LoraConfig(r=2, target_modules=["q_proj", "v_proj"]))
    pm(input_ids=torch.randint(1, 50, (2, 6))).logits.float().pow(2).mean().backward()
    assert all(p.grad is not None for p in pm.parameters() if p.requires_grad)


@pytest.mark.parametrize(
    "lie, message",
    [
        ({"shape": [10**6, 10**6]}, "needs"),  # a trillion values declared over a few KiB of bytes
        ({"blocksize": 0}, "blocksize"),
        ({"blocksize": 48}, "blocksize"),
        ({"shape": "big"}, "unreadable"),
    ],
)
def test_a_bitsandbytes_file_with_a_lying_size_is_refused_before_decoding(tmp_path, lie, message):
    source = _tiny_dir(tmp_path / "fp")
    saved = tmp_path / "bnb"
    transformers.AutoModelForCausalLM.from_pretrained(
        source, quantization_config=_bnb_config(), device_map="cpu"
    ).save_pretrained(saved)
    tensors = load_file(saved / "model.safetensors")
    key = next(k for k in tensors if ".quant_state.bitsandbytes__" in k)
    blob = {**json.loads(bytes(tensors[key].tolist()).decode()), **lie}
    tensors[key] = torch.tensor(list(json.dumps(blob).encode()), dtype=torch.uint8)
    save_file(tensors, saved / "model.safetensors", metadata={"format": "pt"})
    with pytest.raises(CheckpointError, match=message):
        load_bnb_4bit_causal_lm(saved)
