"""functional/nf4.py: codebooks, packing, blockwise 4-bit quantization, double quantization."""

import pytest
import torch

from deltatune.functional.nf4 import (
    NF4_CODE,
    dequantize_blockwise_4bit,
    double_dequantize,
    double_quantize,
    pack_nibbles,
    quantize_blockwise_4bit,
    unpack_nibbles,
)
from deltatune.quant import dequantize_4bit, quantize_4bit

# QLoRA appendix / shared/reference/paper_facts.md §2, index order 0..15
PAPER_NF4 = [-1.0, -0.6961928009986877, -0.5250730514526367, -0.39491748809814453, -0.28444138169288635,
             -0.18477343022823334, -0.09105003625154495, 0.0, 0.07958029955625534, 0.16093020141124725,
             0.24611230194568634, 0.33791524171829224, 0.44070982933044434, 0.5626170039176941,
             0.7229568362236023, 1.0]  # fmt: skip


def test_nf4_codebook_is_the_papers():
    assert list(NF4_CODE) == PAPER_NF4


def test_pack_unpack_round_trip_with_high_nibble_first():
    idx = torch.tensor([1, 2, 15, 0, 7], dtype=torch.uint8)
    packed = pack_nibbles(idx)
    assert packed.tolist() == [0x12, 0xF0, 0x70]
    assert torch.equal(unpack_nibbles(packed, 5), idx)


@pytest.mark.parametrize("quant_type", ["nf4", "fp4"])
def test_codes_are_nearest_and_dequant_is_code_times_absmax(quant_type):
    torch.manual_seed(0)
    w = torch.randn(64 * 40 + 7)  # a partial last block
    packed, absmax = quantize_blockwise_4bit(w, quant_type, 64)
    deq = dequantize_blockwise_4bit(packed, absmax, w.shape, quant_type, 64)
    from deltatune.functional.nf4 import codebook

    code = codebook(quant_type)
    padded = torch.cat([w, w.new_zeros((-w.numel()) % 64)]).view(-1, 64)
    normalized = (padded / absmax[:, None]).reshape(-1)[: w.numel()]
    nearest = (normalized[:, None] - code[None]).abs().min(dim=1).values
    idx = unpack_nibbles(packed, w.numel()).long()
    torch.testing.assert_close((normalized - code[idx]).abs(), nearest)  # every code is a nearest one
    block_absmax = absmax.repeat_interleave(64)[: w.numel()]
    torch.testing.assert_close(deq, code[idx] * block_absmax, rtol=0, atol=0)
    # the documented error bound: half the largest gap between neighbouring code values, times the block's absmax
    gaps = code.sort().values.diff().max() / 2
    assert ((w - deq).abs() <= gaps * block_absmax + 1e-6).all()


@pytest.mark.parametrize("quant_type", ["nf4", "fp4"])
def test_matches_bitsandbytes_cpu_exactly(quant_type):
    bnb = pytest.importorskip("bitsandbytes.functional")
    torch.manual_seed(0)
    w = torch.randn(65536)
    theirs, state = bnb.quantize_4bit(w, blocksize=64, quant_type=quant_type, compress_statistics=False)
    packed, absmax = quantize_blockwise_4bit(w, quant_type, 64)
    assert torch.equal(theirs.flatten(), packed) and torch.equal(state.absmax, absmax)
    their_deq = bnb.dequantize_4bit(theirs, state).reshape(-1)
    torch.testing.assert_close(
        dequantize_blockwise_4bit(packed, absmax, w.shape, quant_type, 64), their_deq, rtol=0, atol=0
    )
    if quant_type == "nf4":
        assert bnb.get_4bit_type("nf4", device="cpu").tolist() == PAPER_NF4


def test_bits_per_parameter_with_and_without_double_quant():
    w = torch.randn(65536)
    plain, dq = quantize_4bit(w, double_quant=False), quantize_4bit(w, double_quant=True)
    assert plain.nbytes() * 8 / w.numel() == 4.5  # 4 + 32/64
    overhead = dq.nbytes() * 8 / w.numel() - 4  # 8/64 + 32/(64*256) + one fp32 offset per tensor
    assert overhead == pytest.approx(8 / 64 + 32 / (64 * 256) + 32 / 65536)
    assert overhead < 0.128


def test_double_quantization_round_trip_error_is_small():
    absmax = torch.rand(5000) * 3 + 1
    codes, scale, offset = double_quantize(absmax)
    assert codes.dtype == torch.uint8 and scale.numel() == 20
    restored = double_dequantize(codes, scale, offset)
    # about the nearest value of the 8-bit dynamic code: off by at most half its widest gap (0.9/64/2, near ±1) plus
    # one bin of the encoder's 1/65535 grid of [-1, 1], times the scale
    assert (restored - absmax).abs().max() <= scale.max() * (0.9 / 128 + 2 / 65535) + 1e-6


def test_quant_state_round_trip_shape_and_dtype():
    w = torch.randn(48, 80, dtype=torch.bfloat16)
    state = quantize_4bit(w)
    out = dequantize_4bit(state, torch.bfloat16)
    assert out.shape == w.shape and out.dtype == torch.bfloat16
    assert (out.float() - w.float()).abs().max() < 0.2 * w.float().abs().max()
