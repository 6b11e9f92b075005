"""A strict reader and a streaming, atomic writer of the safetensors format.

Format (https://github.com/huggingface/safetensors): 8-byte little-endian header length n, n bytes of JSON
``{name: {"dtype", "shape", "data_offsets": [begin, end]}, "__metadata__": {str: str}}`` (space-padded),
then the data section, tensors back to back in C order. Files written here are read by the safetensors
library, and vice versa.

Written by hand instead of with the safetensors package because (1) the writer streams each tensor's bytes
straight from the model (no copy of the whole state_dict, tied tensors allowed) and (2) the reader must turn
*every* malformed input into a :class:`FormatError`, never another exception or a crash.
"""
from __future__ import annotations

import json
import os
import struct
import sys
import tempfile
import zlib
from typing import Callable, Dict, Tuple

import torch
from torch import Tensor

from .errors import ConfigError, FormatError

DTYPES: Dict[str, torch.dtype] = {
    "F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
    "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8, "U8": torch.uint8,
    "BOOL": torch.bool,
}
for _code, _name in (("U16", "uint16"), ("U32", "uint32"), ("U64", "uint64"),
                     ("F8_E4M3", "float8_e4m3fn"), ("F8_E5M2", "float8_e5m2")):
    if hasattr(torch, _name):
        DTYPES[_code] = getattr(torch, _name)
CODES = {dt: code for code, dt in DTYPES.items()}
MAX_HEADER = 100 * 1024 * 1024  # the safetensors library's own limit

if sys.byteorder != "little":  # tensor bytes are written as they lie in memory
    raise ImportError("torchdkm's artifact format needs a little-endian machine")


def tensor_bytes(t: Tensor) -> memoryview:
    """The raw bytes of ``t`` in C order (no copy when it is a contiguous CPU tensor)."""
    t = t.detach().cpu().contiguous()
    if t.numel() == 0:
        return memoryview(b"")
    return memoryview(t.reshape(-1).view(torch.uint8).numpy())


def crc32(t: Tensor) -> int:
    return zlib.crc32(tensor_bytes(t))


def dtype_code(t: Tensor, name: str) -> str:
    if t.dtype not in CODES:
        raise ConfigError(f"tensor {name!r} has dtype {t.dtype}, which safetensors cannot store; allowed: "
                          f"{', '.join(str(d) for d in CODES)}")
    return CODES[t.dtype]


def write_atomic(path: str, write: Callable) -> None:
    """Call ``write(file)`` on a temporary file next to ``path``, fsync it, then rename it over ``path``: a
    crash leaves either the old file or the new one, never half of one."""
    path = os.fspath(path)
    folder = os.path.dirname(os.path.abspath(path))
    fd, tmp = tempfile.mkstemp(dir=folder, prefix="." + os.path.basename(path) + ".", suffix=".tmp")
    try:
        umask = os.umask(0)
        os.umask(umask)
        os.fchmod(fd, 0o666 & ~umask)  # mkstemp makes 0600; give the permissions a plain open() would
        with os.fdopen(fd, "wb") as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        try:
            os.unlink(tmp)
        except OSError:
            pass
        raise
    try:  # make the rename itself durable; not possible on every platform
        dfd = os.open(folder, os.O_RDONLY)
        try:
            os.fsync(dfd)
        finally:
            os.close(dfd)
    except OSError:
        pass


def write_safetensors(path: str, tensors: Dict[str, Tensor], make_metadata: Callable[[dict], Dict[str, str]]) -> int:
    """Write ``tensors`` atomically; ``make_metadata(entries)`` gives ``__metadata__`` from the header entries
    ({name: {dtype, shape, data_offsets}}), so it can checksum them. Returns the header size (8 + JSON)."""
    # Widest dtypes first: with an 8-byte aligned header every tensor is then aligned to its itemsize.
    names = sorted(tensors, key=lambda n: (-tensors[n].element_size(), n))
    entries: Dict[str, dict] = {}
    offset = 0
    for name in names:
        t = tensors[name]
        size = t.numel() * t.element_size()
        entries[name] = {"dtype": dtype_code(t, name), "shape": list(t.shape), "data_offsets": [offset, offset + size]}
        offset += size
    blob = json.dumps({"__metadata__": make_metadata(entries), **entries}, separators=(",", ":")).encode("utf-8")
    blob += b" " * (-len(blob) % 8)

    def write(f):
        f.write(struct.pack("<Q", len(blob)))
        f.write(blob)
        for name in names:
            f.write(tensor_bytes(tensors[name]))

    write_atomic(path, write)
    return 8 + len(blob)


def entries_checksum(entries: dict) -> int:
    """crc32 of the header's tensor entries (names, dtypes, shapes, offsets) in a canonical form."""
    rows = sorted([name, e["dtype"], e["shape"], e["data_offsets"]] for name, e in entries.items())
    return zlib.crc32(json.dumps(rows, separators=(",", ":")).encode("utf-8"))


def _no_duplicates(pairs):
    out = {}
    for k, v in pairs:
        if k in out:
            raise ValueError(f"duplicate key {k!r}")
        out[k] = v
    return out


def parse_json(text: bytes, what: str):
    """JSON with duplicate keys rejected; any problem is a FormatError naming ``what``."""
    try:
        return json.loads(text.decode("utf-8"), object_pairs_hook=_no_duplicates)
    except (ValueError, RecursionError) as e:  # UnicodeDecodeError and JSONDecodeError are ValueErrors
        raise FormatError(f"{what} is not valid JSON: {e}") from None


def read_header(data: memoryview, where: str) -> Tuple[dict, Dict[str, str], int]:
    """(tensor entries, metadata, data start) of a safetensors file's bytes, fully validated."""
    if len(data) < 8:
        raise FormatError(f"{where} is not a safetensors file: it has {len(data)} bytes, fewer than the 8-byte header length")
    (n,) = struct.unpack("<Q", data[:8])
    if n > min(MAX_HEADER, len(data) - 8):
        raise FormatError(f"{where} is truncated or not a safetensors file: its header length field says {n} bytes, "
                          f"but {len(data) - 8} bytes follow")
    header = parse_json(bytes(data[8 : 8 + n]), f"the header of {where}")
    if not isinstance(header, dict):
        raise FormatError(f"the header of {where} is JSON {type(header).__name__}, not an object")
    metadata = header.pop("__metadata__", {})
    if not isinstance(metadata, dict) or not all(isinstance(k, str) and isinstance(v, str) for k, v in metadata.items()):
        raise FormatError(f"the __metadata__ of {where} is not a mapping of str to str")
    start, spans = 8 + n, []
    for name, entry in header.items():
        spans.append(_check_entry(name, entry, where) + (name,))
    spans.sort()
    end = 0
    for begin, stop, name in spans:  # the data section is exactly the tensors back to back, no holes
        if begin != end:
            raise FormatError(f"{where} is corrupted: tensor {name!r} starts at byte {begin} of the data, expected {end}")
        end = stop
    if start + end != len(data):
        raise FormatError(f"{where} is truncated or corrupted: its header describes {end} data bytes, "
                          f"the file holds {len(data) - start}")
    return header, metadata, start


def _check_entry(name: str, entry, where: str) -> Tuple[int, int]:
    if not isinstance(entry, dict) or set(entry) != {"dtype", "shape", "data_offsets"}:
        raise FormatError(f"{where}: header entry {name!r} is not {{dtype, shape, data_offsets}}")
    dtype, shape, offs = entry["dtype"], entry["shape"], entry["data_offsets"]
    if dtype not in DTYPES:
        raise FormatError(f"{where}: tensor {name!r} has dtype {dtype!r}; allowed: {', '.join(DTYPES)}")
    if not isinstance(shape, list) or not all(_is_count(s) for s in shape):
        raise FormatError(f"{where}: tensor {name!r} has shape {shape!r}, not a list of integers >= 0")
    if not isinstance(offs, list) or len(offs) != 2 or not all(_is_count(o) for o in offs) or offs[0] > offs[1]:
        raise FormatError(f"{where}: tensor {name!r} has data_offsets {offs!r}, not [begin, end] with begin <= end")
    numel = 1
    for s in shape:
        numel *= s
    size = numel * torch.empty((), dtype=DTYPES[dtype]).element_size()
    if offs[1] - offs[0] != size:
        raise FormatError(f"{where}: tensor {name!r} of shape {shape} ({dtype}) needs {size} bytes, "
                          f"its data_offsets span {offs[1] - offs[0]}")
    return offs[0], offs[1]


def _is_count(x) -> bool:
    return type(x) is int and x >= 0


def read_tensor(buf: bytearray, start: int, entry: dict) -> Tensor:
    """The tensor an already validated header entry describes (shares ``buf`` when aligned)."""
    dtype, shape = DTYPES[entry["dtype"]], entry["shape"]
    begin, end = entry["data_offsets"]
    if end == begin:
        return torch.empty(shape, dtype=dtype)
    flat = torch.frombuffer(buf, dtype=torch.uint8, count=end - begin, offset=start + begin)
    if (start + begin) % flat.new_empty((), dtype=dtype).element_size():
        flat = flat.clone()  # unaligned (a foreign writer): copy into an aligned allocation
    return flat.view(dtype).reshape(shape)
