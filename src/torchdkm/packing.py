"""Bit-packing of b-bit indices (b = 1..8) into bytes, as pure tensor functions.

Bit order (little-endian, LSB first): index i occupies bits ``i*b .. i*b+b-1`` of the packed stream, and
stream bit p is bit ``p % 8`` (value ``1 << (p % 8)``) of byte ``p // 8``. N indices take exactly
``ceil(N*b/8)`` bytes; unused high bits of the last byte are zero.

Example: bits=3, idx=[1, 2, 7] -> stream 1 | 2<<3 | 7<<6 = 0b1_1101_0001 -> bytes [0xD1, 0x01].

Vectorised by groups: ``lcm(b, 8)`` bits hold G = lcm(b, 8)/b indices in B = lcm(b, 8)/8 bytes (B <= 7), and
every group has the same layout, so packing and unpacking are a few whole-tensor ops on an M × B (or M × G)
view. :func:`unpack_groups` is also what compact layers and the ONNX export rebuild weights with.
"""
from __future__ import annotations

import math
from typing import Tuple

import torch
from torch import Tensor

from .errors import ConfigError


def packed_size(n: int, bits: int) -> int:
    """Bytes that n indices of ``bits`` bits take: ceil(n*bits/8)."""
    return (n * bits + 7) // 8


def _group(bits: int) -> Tuple[int, int]:
    """(indices per group G, bytes per group B) for ``bits``."""
    if not (isinstance(bits, int) and not isinstance(bits, bool) and 1 <= bits <= 8):
        raise ConfigError(f"bits={bits!r} is not allowed: give an integer in 1..8")
    span = bits * 8 // math.gcd(bits, 8)  # lcm(bits, 8)
    return span // bits, span // 8


def pack_bits(idx: Tensor, bits: int) -> Tensor:
    """Pack indices ``idx`` (int tensor of N values in 0..2**bits-1) into uint8[ceil(N*bits/8)].

    Example: pack_bits(torch.tensor([1, 2, 7]), 3) -> tensor([209, 1], dtype=torch.uint8)
    """
    per_group, group_bytes = _group(bits)
    idx = idx.reshape(-1)
    if idx.dtype.is_floating_point or idx.dtype.is_complex or idx.dtype == torch.bool:
        raise ConfigError(f"pack_bits wants an integer tensor of indices, got dtype {idx.dtype}")
    n = idx.numel()
    if n and (int(idx.min()) < 0 or int(idx.max()) >= 2**bits):
        raise ConfigError(
            f"pack_bits got indices in {int(idx.min())}..{int(idx.max())}: with bits={bits} allowed is 0..{2**bits - 1}"
        )
    groups = -(-n // per_group)
    padded = torch.zeros(groups * per_group, dtype=torch.int64, device=idx.device)
    padded[:n] = idx
    shifts = torch.arange(per_group, dtype=torch.int64, device=idx.device) * bits
    word = (padded.view(groups, per_group) << shifts).sum(1, keepdim=True)  # no carries: fields are disjoint
    byte_shifts = torch.arange(group_bytes, dtype=torch.int64, device=idx.device) * 8
    out = ((word >> byte_shifts) & 0xFF).to(torch.uint8).reshape(-1)
    return out[: packed_size(n, bits)].clone()


def unpack_bits(packed: Tensor, bits: int, n: int) -> Tensor:
    """Inverse of :func:`pack_bits`: uint8[ceil(n*bits/8)] -> int64[n], values in 0..2**bits-1.

    Example: unpack_bits(torch.tensor([209, 1], dtype=torch.uint8), 3, 3) -> tensor([1, 2, 7])
    """
    per_group, group_bytes = _group(bits)
    if packed.dtype != torch.uint8 or packed.dim() != 1:
        raise ConfigError(f"unpack_bits wants a 1-D uint8 tensor, got {packed.dtype} of shape {tuple(packed.shape)}")
    if packed.numel() != packed_size(n, bits):
        raise ConfigError(
            f"unpack_bits got {packed.numel()} bytes: {n} indices of {bits} bits take {packed_size(n, bits)} bytes"
        )
    idx = unpack_groups(pad_to_groups(packed, bits), bits)
    return idx[:n] if idx.numel() != n else idx


def pad_to_groups(packed: Tensor, bits: int) -> Tensor:
    """``packed`` with zero bytes appended up to whole groups (see the module docstring)."""
    extra = -packed.numel() % _group(bits)[1]
    return torch.cat([packed, packed.new_zeros(extra)]) if extra else packed


def unpack_groups(data: Tensor, bits: int) -> Tensor:
    """uint8[groups*B] -> int64[groups*G]: every index of whole groups (trailing ones past n are zero).

    Index g of a group starts at bit s = g*bits, inside byte s//8; as bits <= 8 it ends by the next byte, so
    it is (lo + 256*hi) // 2**(s%8) & (2**bits - 1) with lo, hi those two bytes. Written with Gather, Mul,
    integer Div and BitwiseAnd on values < 2**16 (not shifts, not a 56-bit word: onnxruntime loses bits of
    int64 values above 2**53) so that the ONNX graph it exports to is short and exact.
    """
    per_group, group_bytes = _group(bits)
    x = data.to(torch.int64)
    if per_group == 1:  # bits == 8
        return x
    x = x.reshape(-1, group_bytes)
    starts = [g * bits for g in range(per_group)]
    if group_bytes > 1:
        # hi clamped to the group's last byte: only an index that ends inside lo reaches past it, and then
        # hi's bits are masked off anyway.
        lo = torch.tensor([s // 8 for s in starts], device=x.device)
        hi = torch.tensor([min(s // 8 + 1, group_bytes - 1) for s in starts], device=x.device)
        x = x.index_select(1, lo) + x.index_select(1, hi) * 256
    shift = torch.tensor([2 ** (s % 8) for s in starts], device=x.device)
    x = torch.div(x, shift, rounding_mode="trunc") & (2**bits - 1)
    return x.reshape(-1)
