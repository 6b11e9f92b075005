"""Size accounting: what a compressed model costs to store, as the DKM paper counts it."""
from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import List, Optional

from torch import nn

from .errors import ConfigError
from .parametrization import layer_spec, original_weight

MIB = 1024 * 1024


@dataclass
class LayerRow:
    """One compressed layer. ``stored_bits`` = index bits (ceil(numel/dim) × bits) + LUT bits (groups × k × dim ×
    lut_bits, with the per-slice scales' C0 × lut_bits when the layer has them)."""

    name: str
    kind: str
    shape: tuple
    bits: int
    dim: int
    numel: int
    index_bits: int
    lut_bits: int
    groups: int = 1
    scaled: bool = False
    vector_axis: Optional[int] = None  # the axis d-vectors run along (None: row-major)

    @property
    def stored_bits(self) -> int:
        return self.index_bits + self.lut_bits

    @property
    def bits_per_weight(self) -> float:
        return self.stored_bits / self.numel


@dataclass
class Report:
    """Per-layer rows and totals. Sizes count parameters (buffers such as BatchNorm statistics are listed
    apart in ``buffer_bytes``): fp32 = every parameter at 4 bytes; compressed = compressed layers at their
    stored bits + every other parameter at its dtype; factor = fp32 / compressed."""

    layers: List[LayerRow]
    fp32_bytes: int
    compressed_bytes: float
    other_param_bytes: int
    buffer_bytes: int
    lut_dtype_bits: int = 32
    extra: dict = field(default_factory=dict)

    @property
    def fp32_mib(self) -> float:
        return self.fp32_bytes / MIB

    @property
    def compressed_mib(self) -> float:
        return self.compressed_bytes / MIB

    @property
    def factor(self) -> float:
        return self.fp32_bytes / self.compressed_bytes if self.compressed_bytes else float("inf")

    def to_dict(self) -> dict:
        return {
            "layers": [dict(asdict(r), shape=list(r.shape), stored_bits=r.stored_bits) for r in self.layers],
            "fp32_mib": self.fp32_mib,
            "compressed_mib": self.compressed_mib,
            "factor": self.factor,
            "other_param_bytes": self.other_param_bytes,
            "buffer_bytes": self.buffer_bytes,
            "lut_dtype_bits": self.lut_dtype_bits,
        }

    def table(self) -> str:
        head = (f"{'layer':<40} {'kind':<10} {'shape':<20} {'bits':>4} {'dim':>3} {'LUTs':>5} {'scale':>5} {'axis':>4} "
                f"{'weights':>10} {'bits/w':>7} {'KiB':>9}")
        lines = [head, "-" * len(head)]
        for r in self.layers:
            lines.append(
                f"{r.name[-40:]:<40} {r.kind[:10]:<10} {str(list(r.shape))[:20]:<20} {r.bits:>4} {r.dim:>3} "
                f"{r.groups:>5} {'yes' if r.scaled else '-':>5} {_axis(r):>4} {r.numel:>10} {r.bits_per_weight:>7.3f} "
                f"{r.stored_bits / 8 / 1024:>9.2f}"
            )
        lines.append("-" * len(head))
        lines.append(
            f"{len(self.layers)} compressed layers; other parameters {self.other_param_bytes / MIB:.3f} MiB; "
            f"fp32 {self.fp32_mib:.3f} MiB -> compressed {self.compressed_mib:.3f} MiB = {self.factor:.1f}x smaller"
        )
        return "\n".join(lines)

    def __str__(self) -> str:
        return self.table()


def report(model: nn.Module, *, lut_dtype_bits: int = 32, print_table: bool = True) -> Report:
    """Size report of a prepared or finalized model. Returns a :class:`Report`; prints its table by default.

    Example: a Linear(256, 128) at bits=2, dim=1 stores 32768 × 2 index bits + 4 × 32 LUT bits.
    """
    if lut_dtype_bits not in (16, 32):
        raise ConfigError(f"lut_dtype_bits={lut_dtype_bits!r} is not allowed: give 16 or 32")
    rows, compressed_ids = [], set()
    for name, module in model.named_modules():
        spec = layer_spec(module)
        if spec is None:
            continue
        w = original_weight(module)
        if id(w) in compressed_ids:  # a tied partner of a layer already counted
            continue
        compressed_ids.add(id(w))
        n_vec = -(-w.numel() // spec.dim)
        table_bits = (spec.groups * 2 ** spec.bits * spec.dim + (w.shape[0] if spec.scaled else 0)) * lut_dtype_bits
        rows.append(LayerRow(name, _kind(module), tuple(w.shape), spec.bits, spec.dim, w.numel(), n_vec * spec.bits,
                             table_bits, spec.groups, spec.scaled, spec.axis))
    params = {id(p): p for p in model.parameters()}
    fp32 = sum(p.numel() for p in params.values()) * 4
    other = sum(p.numel() * p.element_size() for i, p in params.items() if i not in compressed_ids)
    buffers = sum(b.numel() * b.element_size() for n, b in model.named_buffers() if not _is_dkm_state(n))
    out = Report(rows, fp32, sum(r.stored_bits for r in rows) / 8 + other, other, buffers, lut_dtype_bits)
    if print_table:
        print(out.table())
    return out


def _axis(row: LayerRow) -> str:
    """The table's vector-axis cell: '-' for dim 1, 'flat' for row-major vectors, else the axis."""
    return "-" if row.dim == 1 else ("flat" if row.vector_axis is None else str(row.vector_axis))


def _kind(module: nn.Module) -> str:
    """The layer's class name; a prepared layer's class is torch's ParametrizedX subclass of X: report X."""
    cls = type(module)
    return cls.__bases__[0].__name__ if cls.__name__.startswith("Parametrized") and cls.__bases__ else cls.__name__


def _is_dkm_state(buffer_name: str) -> bool:
    return ".parametrizations.weight." in f".{buffer_name}"
