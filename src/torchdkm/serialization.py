"""The compact artifact: ``save`` / ``load`` / ``inspect_file``.

One safetensors file. Each compressed layer's weight ``<key>`` (e.g. ``fc.weight``) is stored as ``<key>.lut``
(G × k × d: one table per group of axis-0 slices; float32, float16 or bfloat16), ``<key>.indices`` (uint8, its N
indices bit-packed at exactly ``bits`` bits in row-major order, each into its group's table, see torchdkm.packing)
and, for layers with per-slice scales, ``<key>.scale`` (C0, the LUT's dtype); every other state_dict entry is stored
as it is (tied entries once). ``__metadata__["torchdkm"]`` holds JSON::

    {"format": "torchdkm", "format_version": 2, "torchdkm_version": "0.2.0", "lut_dtype": "float32",
     "layers":  {"fc.weight": {"module": "fc", "kind": "Linear", "shape": [256, 512], "dtype": "float32",
                               "bits": 4, "dim": 1, "pad": 0, "n_vectors": 131072, "groups": 16,
                               "channel_scale": true}},
     "aliases": {"head.weight": "embed.weight"},          # tied state_dict entries, stored once
     "buffers": ["bn.running_mean", ...],                 # entries that are buffers, not parameters
     "crc32": [1234567, ...],       # crc32 of every stored tensor's bytes, tensors in sorted-name order
     "header_crc32": 89101112}      # crc32 of the stored tensors' names, dtypes and shapes (header_checksum)

and ``__metadata__["torchdkm_crc32"]`` the crc32 of that JSON text, so any flipped byte in the header or the
payload is detected (the safetensors package, which writes and parses the file, checks its structure and
offsets, not its bytes). File size = report(model).compressed_bytes + buffer_bytes + header (8-byte length +
header JSON, a few KB) + < 1 byte per layer (each layer's indices round up to whole bytes).

Format 3 adds a per-layer "vector_axis" (int) for layers whose d-vectors run along one weight axis
(DKMConfig.vector_axis; indices then in the order of torchdkm.functional.to_group_vectors with that axis); a file
is written as format 3 only when some layer has one, so files without it stay readable by torchdkm 0.2. Format 1
(torchdkm 0.1) is format 2 with one k × d LUT per layer and no scales, "groups" and "channel_scale" absent; it still
loads.
"""
from __future__ import annotations

import json
import os
import zlib
from dataclasses import dataclass
from importlib.metadata import version
from typing import Dict, Optional

import torch
from safetensors import safe_open
from safetensors.torch import save_file
from torch import Tensor, nn

from ._fileio import write_atomic
from .errors import ConfigError, FormatError
from .layers import FinalizedLayer
from .lut import finalized_layers, indices_to_weight, weight_key, weight_to_indices
from .packing import pack_bits, packed_size, unpack_bits
from .parametrization import require_plain

FORMAT_VERSION = 3
LUT_DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}
WEIGHT_DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16,
                 "float64": torch.float64}
COREML_PREFIX = "_COREML_/"  # Core ML metadata buffers (torchdkm.export.coreml) are not part of the artifact
# safetensors' names of the dtypes torchdkm stores; header_checksum covers them (as format 1 always has)
CODES = {torch.float64: "F64", torch.float32: "F32", torch.float16: "F16", torch.bfloat16: "BF16",
         torch.int64: "I64", torch.int32: "I32", torch.int16: "I16", torch.int8: "I8", torch.uint8: "U8",
         torch.bool: "BOOL"}
for _code, _name in (("U16", "uint16"), ("U32", "uint32"), ("U64", "uint64"),
                     ("F8_E4M3", "float8_e4m3fn"), ("F8_E5M2", "float8_e5m2")):
    if hasattr(torch, _name):
        CODES[getattr(torch, _name)] = _code


# ------------------------------------------------------------------------------------------------ save


def save(model: nn.Module, path, *, lut_dtype: torch.dtype = torch.float32) -> None:
    """Write a finalized ``model`` to ``path`` as one safetensors file (atomically: temp file + rename).

    lut_dtype: float32 (default; reload is bit-identical for float32/16/bf16 weights), float16 or bfloat16 (half
    the LUT and scale bytes; bit-identical for weights of that dtype, others are rounded to its values). Example::

        torchdkm.finalize(model); torchdkm.save(model, "model.safetensors")
    """
    lut_name = next((n for n, dt in LUT_DTYPES.items() if dt == lut_dtype), None)
    if lut_name is None:
        raise ConfigError(f"save got lut_dtype={lut_dtype!r}: allowed are torch.float32, torch.float16 and "
                          f"torch.bfloat16")
    require_plain(model, "torchdkm.save", dense=True)
    state = {k: v for k, v in model.state_dict().items() if COREML_PREFIX not in k}
    layers = {weight_key(name): (name, module, fin) for name, module, fin in finalized_layers(model)}
    param_keys = {n for n, _ in model.named_parameters(remove_duplicate=False)}
    # Compressed weights first, so an entry tied to one of them becomes its alias (not a dense copy).
    order = [k for k in state if k in layers] + [k for k in state if k not in layers]
    tensors: Dict[str, Tensor] = {}
    meta_layers, aliases, seen = {}, {}, {}
    for key in order:
        t = state[key]
        if not isinstance(t, Tensor):
            raise ConfigError(f"state_dict entry {key!r} is a {type(t).__name__}, not a tensor: save stores tensors only")
        ident = (t.untyped_storage().data_ptr(), t.storage_offset(), tuple(t.shape), t.stride(), t.dtype, t.device)
        if t.numel() and ident in seen:
            aliases[key] = seen[ident]
            continue
        seen[ident] = key
        if key in layers:
            name, module, fin = layers[key]
            parts, meta_layers[key] = _encode(name, module, fin, lut_dtype)
            tensors.update((f"{key}.{part}", v) for part, v in parts.items())
        else:
            tensors[key] = t
    clash = sorted(set(state) & {f"{k}.{part}" for k in layers for part in PARTS})
    if clash:
        raise ConfigError(f"state_dict entries {clash} clash with the names torchdkm stores compressed weights under")
    tensors = _for_safetensors(tensors)
    meta = {
        "format": "torchdkm", "torchdkm_version": _version(),
        "format_version": FORMAT_VERSION if any("vector_axis" in i for i in meta_layers.values()) else 2,
        "lut_dtype": lut_name, "layers": meta_layers, "aliases": aliases,
        "buffers": [k for k in state if k not in param_keys],
        "crc32": [crc32(tensors[n]) for n in sorted(tensors)], "header_crc32": header_checksum(tensors),
    }
    text = json.dumps(meta, separators=(",", ":"))
    metadata = {"torchdkm": text, "torchdkm_crc32": str(zlib.crc32(text.encode()))}
    write_atomic(path, lambda f: save_file(tensors, f.name, metadata=metadata))


def _for_safetensors(tensors: Dict[str, Tensor]) -> Dict[str, Tensor]:
    """The tensors as safetensors.save_file takes them: contiguous, on the CPU, of a dtype it stores, no two
    sharing memory (it refuses those; tied entries are already aliases, what is left is rare, so copy it)."""
    out, storages = {}, set()
    for name, t in tensors.items():
        if t.dtype not in CODES:
            raise ConfigError(f"tensor {name!r} has dtype {t.dtype}, which safetensors cannot store; allowed: "
                              f"{', '.join(str(d) for d in CODES)}")
        t = t.detach().cpu().contiguous()
        if t.numel():
            ptr = t.untyped_storage().data_ptr()
            if ptr in storages:
                t = t.clone()
            storages.add(t.untyped_storage().data_ptr())
        out[name] = t
    return out


def crc32(t: Tensor) -> int:
    """crc32 of a tensor's bytes in C order (on a little-endian machine: its bytes in the file)."""
    return zlib.crc32(t.detach().cpu().contiguous().reshape(-1).view(torch.uint8).numpy())


def header_checksum(tensors: Dict[str, Tensor]) -> int:
    """crc32 of the tensors' names, dtypes and shapes: a flipped header byte can change these without
    safetensors noticing (F32 -> I32, a renamed tensor). The rows also hold [begin, end] offsets of a
    widest-dtype-first layout, as format 1 always has: they add nothing (they follow from the rest, and
    safetensors validates the file's real offsets), but dropping them would change every file's checksum."""
    rows, offset = [], 0
    for name in sorted(tensors, key=lambda n: (-tensors[n].element_size(), n)):
        t = tensors[name]
        size = t.numel() * t.element_size()
        rows.append([name, CODES[t.dtype], list(t.shape), [offset, offset + size]])
        offset += size
    return zlib.crc32(json.dumps(sorted(rows), separators=(",", ":")).encode("utf-8"))


PARTS = ("lut", "indices", "scale")  # the tensors a compressed weight <key> is stored as: <key>.lut, ...


def _encode(name: str, module: nn.Module, fin: FinalizedLayer, lut_dtype: torch.dtype):
    """({"lut", "indices"[, "scale"]} tensors, metadata) of one finalized layer."""
    w = module.weight
    if w.dtype not in WEIGHT_DTYPES.values():
        raise ConfigError(f"layer {name!r} has weight dtype {w.dtype}; allowed: {', '.join(WEIGHT_DTYPES)}")
    want = (fin.groups, 2**fin.bits, fin.dim)
    if fin.lut.dim() != 3 or tuple(fin.lut.shape) != want or w.shape[0] % fin.groups:
        raise ConfigError(f"layer {name!r}: its LUT has shape {tuple(fin.lut.shape)}, expected {want} with G dividing "
                          f"{w.shape[0]}")
    try:
        idx = weight_to_indices(w, fin.lut, fin.pad, fin.scale, fin.axis)
    except ConfigError as e:
        raise ConfigError(f"layer {name!r}: {e}; finalize again before saving") from None
    info = {"module": name, "kind": type(module).__name__, "shape": list(w.shape), "dtype": str(w.dtype)[6:],
            "bits": fin.bits, "dim": fin.dim, "pad": fin.pad, "n_vectors": idx.numel(), "groups": fin.groups,
            "channel_scale": fin.scale is not None}
    if fin.axis is not None:
        info["vector_axis"] = fin.axis
    parts = {"lut": fin.lut.detach().to(lut_dtype).contiguous(), "indices": pack_bits(idx, fin.bits)}
    if fin.scale is not None:
        parts["scale"] = fin.scale.detach().to(lut_dtype).reshape(-1).contiguous()
    return parts, info


def _version() -> str:
    return version("torchdkm")


# ------------------------------------------------------------------------------------------------ read


@dataclass
class Artifact:
    """A validated artifact: its torchdkm metadata, stored tensors and sizes."""

    meta: dict
    tensors: Dict[str, Tensor]
    header_bytes: int
    file_bytes: int


def read_artifact(path) -> Artifact:
    """Read and fully validate a torchdkm file (structure, metadata, checksums, index ranges)."""
    where = repr(os.fspath(path))
    f = _library(where, safe_open, os.fspath(path), framework="pt")  # parses and checks the header and offsets
    with f:
        meta = _read_meta(_library(where, f.metadata) or {}, where)  # before reading a foreign file's tensors
        tensors = {name: _library(where, f.get_tensor, name) for name in _library(where, f.keys)}
    file_bytes = _library(where, os.path.getsize, path)
    _check_meta(meta, tensors, where)
    for (name, t), crc in zip(sorted(tensors.items()), meta["crc32"]):
        if crc32(t) != crc:
            raise FormatError(f"{where} is corrupted: tensor {name!r} does not match its checksum")
    _check_layers(meta, tensors, where)
    data_bytes = sum(t.numel() * t.element_size() for t in tensors.values())
    return Artifact(meta, tensors, file_bytes - data_bytes, file_bytes)


def _library(where: str, call, *args, **kwargs):
    """``call(*args, **kwargs)``, a call into safetensors (or the OS): what it raises on a malformed or unreadable
    file becomes a FormatError. Broad on purpose: what the library raises on hostile bytes is no documented set."""
    try:
        return call(*args, **kwargs)
    except OSError as e:
        raise FormatError(f"cannot read {where}: {e}") from None
    except Exception as e:  # SafetensorError above all
        raise FormatError(f"{where} is truncated, corrupted or not a safetensors file: {e}") from None


def _read_meta(metadata: Dict[str, str], where: str) -> dict:
    """The torchdkm metadata of a safetensors file's ``__metadata__``, its checksum and version checked."""
    if "torchdkm" not in metadata:
        raise FormatError(f"{where} is a safetensors file but not a torchdkm file (no 'torchdkm' metadata; "
                          f"metadata keys: {sorted(metadata)})")
    text = metadata["torchdkm"]
    crc = metadata.get("torchdkm_crc32")
    if crc is not None and crc != str(zlib.crc32(text.encode())):
        raise FormatError(f"{where} is corrupted: its torchdkm metadata does not match its checksum")
    meta = parse_json(text.encode(), f"the torchdkm metadata of {where}")
    _check_version(meta, where)
    if crc is None:
        raise FormatError(f"{where} is corrupted: the torchdkm_crc32 metadata entry is missing")
    return meta


def _no_duplicates(pairs):
    out = {}
    for k, v in pairs:
        if k in out:
            raise FormatError(f"duplicate key {k!r}")
        out[k] = v
    return out


def parse_json(text: bytes, what: str):
    """JSON with duplicate keys rejected; any problem is a FormatError naming ``what``."""
    try:
        return json.loads(text.decode("utf-8"), object_pairs_hook=_no_duplicates)
    except (ValueError, RecursionError) as e:  # UnicodeDecodeError and JSONDecodeError are ValueErrors
        raise FormatError(f"{what} is not valid JSON: {e}") from None


def _check_version(meta, where: str) -> None:
    if not isinstance(meta, dict) or meta.get("format") != "torchdkm":
        raise FormatError(f"{where} is not a torchdkm file: its metadata lacks format='torchdkm'")
    v = meta.get("format_version")
    if type(v) is not int or v < 1:
        raise FormatError(f"{where} has format_version={v!r}: this torchdkm reads format version 1..{FORMAT_VERSION}")
    if v > FORMAT_VERSION:
        raise FormatError(f"{where} has format version {v} (written by torchdkm {meta.get('torchdkm_version')!r}); "
                          f"this torchdkm {_version()} reads format versions up to {FORMAT_VERSION}: upgrade torchdkm")


def _check_meta(meta: dict, tensors: Dict[str, Tensor], where: str) -> None:
    need = {"torchdkm_version": str, "lut_dtype": str, "layers": dict, "aliases": dict, "buffers": list,
            "crc32": list, "header_crc32": int}
    for key, typ in need.items():
        if type(meta.get(key)) is not typ:
            raise FormatError(f"{where}: torchdkm metadata field {key!r} is missing or not a {typ.__name__}")
    if meta["lut_dtype"] not in LUT_DTYPES:
        raise FormatError(f"{where}: lut_dtype {meta['lut_dtype']!r} is not one of {list(LUT_DTYPES)}")
    for name, t in tensors.items():
        if t.dtype not in CODES:
            raise FormatError(f"{where}: tensor {name!r} has dtype {t.dtype}; allowed: {', '.join(CODES.values())}")
    if meta["header_crc32"] != header_checksum(tensors):
        raise FormatError(f"{where} is corrupted: its tensor names, dtypes or shapes do not match their checksum")
    if len(meta["crc32"]) != len(tensors) or not all(type(c) is int for c in meta["crc32"]):
        raise FormatError(f"{where} is corrupted: it holds {len(tensors)} tensors but its metadata lists "
                          f"{len(meta['crc32'])} checksums")


def _check_layers(meta: dict, tensors: Dict[str, Tensor], where: str) -> None:
    lut_dt = LUT_DTYPES[meta["lut_dtype"]]
    parts = set()
    for key, info in meta["layers"].items():
        bad = _layer_problem(info, meta["format_version"])
        if bad is None and weight_key(info["module"]) != key:
            bad = f"module {info['module']!r} does not own weight {key!r}"
        if bad:
            raise FormatError(f"{where}: layer {key!r} has invalid metadata: {bad}")
        lut, packed = tensors.get(f"{key}.lut"), tensors.get(f"{key}.indices")
        if lut is None or packed is None:
            raise FormatError(f"{where}: layer {key!r} lacks its tensor {key}.lut or {key}.indices")
        k, bits, n = 2 ** info["bits"], info["bits"], info["n_vectors"]
        if meta["format_version"] == 1:  # one k × d table, no scales: read as format 2
            info.update(groups=1, channel_scale=False)
            lut = tensors[f"{key}.lut"] = lut[None] if lut.dim() == 2 else lut
        want = (info["groups"], k, info["dim"])
        if tuple(lut.shape) != want or lut.dtype != lut_dt:
            raise FormatError(f"{where}: layer {key!r} has a LUT {lut.dtype} {tuple(lut.shape)}, expected {lut_dt} "
                              f"{want}")
        scale = tensors.get(f"{key}.scale")
        if info["channel_scale"] != (scale is not None) or (
                scale is not None and (tuple(scale.shape) != (info["shape"][0],) or scale.dtype != lut_dt)):
            raise FormatError(f"{where}: layer {key!r} has channel_scale={info['channel_scale']} but a scale tensor "
                              f"{None if scale is None else (scale.dtype, tuple(scale.shape))}; expected "
                              f"{(lut_dt, (info['shape'][0],)) if info['channel_scale'] else None}")
        if packed.dtype != torch.uint8 or tuple(packed.shape) != (packed_size(n, bits),):
            raise FormatError(f"{where}: layer {key!r} has indices {packed.dtype} {tuple(packed.shape)}, expected "
                              f"uint8 ({packed_size(n, bits)},) for {n} indices of {bits} bits")
        # Every b-bit value is < k = 2**b, so indices are in range by construction; the unused high bits of
        # the last byte must be zero (pack_bits writes them so).
        used = n * bits - 8 * (packed.numel() - 1)
        if packed.numel() and int(packed[-1]) >> used:
            raise FormatError(f"{where}: layer {key!r} has non-zero padding bits after its last index")
        parts.update(f"{key}.{part}" for part in PARTS if f"{key}.{part}" in tensors)
        if key in tensors:
            raise FormatError(f"{where}: {key!r} is stored both compressed and dense")
    dense = set(tensors) - parts
    names = dense | set(meta["layers"])
    for alias, target in meta["aliases"].items():
        if not isinstance(target, str) or target not in names or alias in names:
            raise FormatError(f"{where}: alias {alias!r} -> {target!r} is invalid")
    if not all(isinstance(b, str) and (b in dense or b in meta["aliases"]) for b in meta["buffers"]):
        raise FormatError(f"{where}: the buffers list names entries that are not stored")


def _layer_problem(info, version: int) -> Optional[str]:
    """What is wrong with one layer's metadata, or None."""
    if not isinstance(info, dict):
        return "not an object"
    fields = {"module": str, "kind": str, "shape": list, "dtype": str, "bits": int, "dim": int, "pad": int,
              "n_vectors": int}
    if version >= 2:
        fields.update(groups=int, channel_scale=bool)
    for f, typ in fields.items():
        if type(info.get(f)) is not typ:
            return f"field {f!r} is missing or not a {typ.__name__}"
    shape, bits, dim, pad = info["shape"], info["bits"], info["dim"], info["pad"]
    if not all(type(s) is int and s >= 0 for s in shape):
        return f"shape {shape!r} is not a list of integers >= 0"
    if info["dtype"] not in WEIGHT_DTYPES:
        return f"dtype {info['dtype']!r} is not one of {list(WEIGHT_DTYPES)}"
    if not (1 <= bits <= 8 and dim >= 1):
        return f"bits={bits}, dim={dim}: allowed bits 1..8, dim >= 1"
    numel = 1
    for s in shape:
        numel *= s
    if pad != (-numel) % dim or info["n_vectors"] != (numel + pad) // dim:
        return f"pad={pad}, n_vectors={info['n_vectors']} do not fit shape {shape} with dim={dim}"
    groups = info.get("groups", 1)
    if not shape or groups < 1 or shape[0] % groups or (groups > 1 and pad):
        return f"groups={groups} does not divide axis 0 of shape {shape} into whole vectors"
    if "vector_axis" in info:
        axis = info["vector_axis"]
        if version < 3 or type(axis) is not int or not 0 <= axis < len(shape) or pad:
            return f"vector_axis={axis!r} is not an axis of shape {shape} (format 3, no pad)"
        size = shape[0] // groups if axis == 0 else shape[axis]
        if size % dim:
            return f"vector_axis={axis}: dim={dim} does not divide {size}"
    return None


# ------------------------------------------------------------------------------------------------ load


def _stored_parts(art: Artifact) -> set:
    """Names of the tensors that store compressed weights."""
    return {f"{key}.{part}" for key in art.meta["layers"] for part in PARTS} & set(art.tensors)


def decode(art: Artifact) -> Dict[str, Tensor]:
    """The dense state_dict an artifact stores (tied entries share one tensor)."""
    state = {}
    for key, info in art.meta["layers"].items():
        idx = unpack_bits(art.tensors[f"{key}.indices"], info["bits"], info["n_vectors"])
        dtype = WEIGHT_DTYPES[info["dtype"]]
        state[key] = indices_to_weight(idx, art.tensors[f"{key}.lut"].to(dtype), info["shape"], dtype,
                                       art.tensors.get(f"{key}.scale"), info.get("vector_axis"))
    parts = _stored_parts(art)
    for name, t in art.tensors.items():
        if name not in parts:
            state[name] = t
    for alias, target in art.meta["aliases"].items():
        state[alias] = state[target]
    return state


def load(path, model: Optional[nn.Module] = None):
    """Load a torchdkm file. With ``model`` (a plain, unprepared model of the same architecture): restore its
    weights exactly (outputs bit-identical to the saved model), re-attach the per-layer records so
    ``torchdkm.report(model)`` works, and return ``model``. Without: return the decoded state_dict.

    Raises FormatError for anything wrong with the file or a model that does not match it.
    """
    art = read_artifact(path)
    state = decode(art)
    if model is None:
        return state
    require_plain(model, "torchdkm.load", dense=True)
    target = {k: v for k, v in model.state_dict().items() if COREML_PREFIX not in k}
    missing, unexpected = sorted(set(target) - set(state)), sorted(set(state) - set(target))
    if missing or unexpected:
        raise FormatError(f"the model does not match {os.fspath(path)!r}: entries only in the model: {missing[:10]}; "
                          f"only in the file: {unexpected[:10]}")
    wrong = [f"{k}: file {tuple(state[k].shape)} vs model {tuple(v.shape)}" for k, v in target.items()
             if tuple(v.shape) != tuple(state[k].shape)]
    if wrong:
        raise FormatError(f"the model does not match {os.fspath(path)!r}: shapes differ: {wrong[:10]}")
    model.load_state_dict(state, strict=False)
    for key, info in art.meta["layers"].items():
        module = model.get_submodule(info["module"]) if info["module"] else model
        lut = art.tensors[f"{key}.lut"].to(module.weight.dtype)
        scale = art.tensors.get(f"{key}.scale")
        module._torchdkm = FinalizedLayer(info["bits"], info["dim"], info["pad"], lut,
                                          None if scale is None else scale.to(module.weight.dtype),
                                          info.get("vector_axis"))
    return model


# ------------------------------------------------------------------------------------------------ inspect


def inspect_file(path) -> dict:
    """Per-layer sizes and totals of a torchdkm file, as a JSON-ready dict (validates the file fully).

    totals: fp32_bytes (every parameter at 4 bytes), compressed_bytes (as torchdkm.report counts),
    buffer_bytes, header_bytes, file_bytes, their MiB, factor = fp32 / compressed, file_factor = fp32 / file.
    """
    art = read_artifact(path)
    meta, lut_bytes_per = art.meta, LUT_DTYPES[art.meta["lut_dtype"]].itemsize
    rows, fp32, compressed_bits = [], 0, 0
    for key, info in meta["layers"].items():
        numel = info["n_vectors"] * info["dim"] - info["pad"]
        lut = art.tensors[f"{key}.lut"]
        scale = art.tensors.get(f"{key}.scale")
        index_bits = info["n_vectors"] * info["bits"]
        lut_bytes = lut.numel() * lut_bytes_per
        scale_bytes = 0 if scale is None else scale.numel() * lut_bytes_per
        stored = art.tensors[f"{key}.indices"].numel() + lut_bytes + scale_bytes
        rows.append({"name": key, "module": info["module"], "kind": info["kind"], "shape": info["shape"],
                     "dtype": info["dtype"], "bits": info["bits"], "dim": info["dim"], "pad": info["pad"],
                     "groups": info["groups"], "channel_scale": info["channel_scale"], "lut_shape": list(lut.shape),
                     "vector_axis": info.get("vector_axis"),
                     "index_bytes": stored - lut_bytes - scale_bytes, "lut_bytes": lut_bytes,
                     "scale_bytes": scale_bytes, "stored_bytes": stored,
                     "bits_per_weight": (index_bits + 8 * (lut_bytes + scale_bytes)) / max(numel, 1)})
        fp32 += 4 * numel
        compressed_bits += index_bits + 8 * (lut_bytes + scale_bytes)
    layer_parts = _stored_parts(art)
    buffers = set(meta["buffers"])
    other = buf_bytes = 0
    for name, t in art.tensors.items():
        if name in layer_parts:
            continue
        size = t.numel() * t.element_size()
        if name in buffers:
            buf_bytes += size
        else:
            other += size
            fp32 += 4 * t.numel()
    compressed = compressed_bits / 8 + other
    mib = 1024 * 1024
    totals = {"layers": len(rows), "fp32_bytes": fp32, "compressed_bytes": compressed, "other_param_bytes": other,
              "buffer_bytes": buf_bytes, "header_bytes": art.header_bytes, "file_bytes": art.file_bytes,
              "fp32_mib": fp32 / mib, "compressed_mib": compressed / mib, "file_mib": art.file_bytes / mib,
              "factor": fp32 / compressed if compressed else float("inf"),
              "file_factor": fp32 / art.file_bytes}
    return {"path": os.fspath(path), "format_version": meta["format_version"],
            "torchdkm_version": meta["torchdkm_version"], "lut_dtype": meta["lut_dtype"], "layers": rows,
            "totals": totals}


def format_inspect(info: dict) -> str:
    """The table ``torchdkm inspect FILE`` prints, from :func:`inspect_file`'s dict."""
    head = (f"{'layer':<40} {'shape':<20} {'bits':>4} {'dim':>3} {'LUTs (GxKxd)':>13} {'scale':>5} {'bits/w':>7} "
            f"{'stored KiB':>10}")
    lines = [f"{info['path']}: torchdkm format {info['format_version']} (written by torchdkm "
             f"{info['torchdkm_version']}), LUTs in {info['lut_dtype']}", head, "-" * len(head)]
    for r in info["layers"]:
        lut = "x".join(str(n) for n in r["lut_shape"])
        scale = "yes" if r["channel_scale"] else "-"
        lines.append(f"{r['name'][-40:]:<40} {str(r['shape'])[:20]:<20} {r['bits']:>4} {r['dim']:>3} {lut:>13} "
                     f"{scale:>5} {r['bits_per_weight']:>7.3f} {r['stored_bytes'] / 1024:>10.2f}")
    t = info["totals"]
    lines.append("-" * len(head))
    lines.append(f"{t['layers']} compressed layers; other parameters {t['other_param_bytes'] / 1024:.1f} KiB; "
                 f"buffers {t['buffer_bytes'] / 1024:.1f} KiB; header {t['header_bytes'] / 1024:.1f} KiB")
    lines.append(f"fp32 {t['fp32_mib']:.3f} MiB -> compressed {t['compressed_mib']:.3f} MiB ({t['factor']:.1f}x); "
                 f"file {t['file_mib']:.3f} MiB ({t['file_factor']:.1f}x)")
    return "\n".join(lines)
