import time

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from torchdkm.packing import pack_bits, packed_size, unpack_bits


def reference_pack(idx, bits):
    """The documented bit order, one bit at a time: index i at stream bits i*b.., stream bit p = bit p%8 of byte p//8."""
    stream = [(v >> j) & 1 for v in idx for j in range(bits)]
    stream += [0] * (-len(stream) % 8)
    return [sum(stream[8 * q + j] << j for j in range(8)) for q in range(len(stream) // 8)]


def test_documented_example():
    assert pack_bits(torch.tensor([1, 2, 7]), 3).tolist() == [0xD1, 0x01]
    assert unpack_bits(torch.tensor([0xD1, 0x01], dtype=torch.uint8), 3, 3).tolist() == [1, 2, 7]


@settings(max_examples=200, deadline=None)
@given(st.integers(1, 8).flatmap(lambda b: st.tuples(st.just(b), st.lists(st.integers(0, 2**b - 1), max_size=70))))
def test_round_trip_and_bit_order_match_reference(case):
    bits, values = case
    idx = torch.tensor(values, dtype=torch.int64)
    packed = pack_bits(idx, bits)
    assert packed.dtype == torch.uint8 and packed.numel() == packed_size(len(values), bits)
    assert packed.tolist() == reference_pack(values, bits)
    out = unpack_bits(packed, bits, len(values))
    assert out.dtype == torch.int64 and out.tolist() == values


@pytest.mark.parametrize("bits", range(1, 9))
def test_exact_size_and_zero_padding_bits(bits):
    n = 13
    packed = pack_bits(torch.full((n,), 2**bits - 1), bits)
    assert packed.numel() == -(-n * bits // 8)
    used = n * bits - 8 * (packed.numel() - 1)
    assert int(packed[-1]) >> used == 0


@pytest.mark.parametrize("dtype", [torch.int32, torch.uint8, torch.int16])
def test_accepts_any_integer_dtype(dtype):
    idx = torch.tensor([3, 0, 1, 2], dtype=dtype)
    assert unpack_bits(pack_bits(idx, 2), 2, 4).tolist() == [3, 0, 1, 2]


def test_vectorised_on_a_million_indices():
    idx = torch.randint(0, 32, (1_000_000,))
    start = time.perf_counter()
    out = unpack_bits(pack_bits(idx, 5), 5, idx.numel())
    assert time.perf_counter() - start < 5.0  # a Python loop over elements would take far longer
    assert torch.equal(out, idx)


def test_errors_say_what_is_allowed():
    with pytest.raises(ValueError, match="1..8"):
        pack_bits(torch.tensor([0]), 9)
    with pytest.raises(ValueError, match="1..8"):
        unpack_bits(torch.zeros(1, dtype=torch.uint8), 0, 1)
    with pytest.raises(ValueError, match="allowed is 0..7"):
        pack_bits(torch.tensor([8]), 3)
    with pytest.raises(ValueError, match="allowed is 0..7"):
        pack_bits(torch.tensor([-1]), 3)
    with pytest.raises(ValueError, match="integer"):
        pack_bits(torch.tensor([1.0]), 3)
    with pytest.raises(ValueError, match="take 2 bytes"):
        unpack_bits(torch.zeros(3, dtype=torch.uint8), 3, 5)
    with pytest.raises(ValueError, match="uint8"):
        unpack_bits(torch.zeros(2, dtype=torch.int64), 3, 5)
