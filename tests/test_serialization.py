import json
import os
import struct
import zlib

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from safetensors import safe_open
from safetensors.torch import save_file

import torchdkm
from torchdkm import ConfigError, FormatError
from torchdkm.serialization import format_inspect, inspect_file, read_artifact

from artifact_models import SmallCNN, TinyLM, finalized_cnn, finalized_lm, prepared_cnn

X_IMG = torch.randn(3, 1, 12, 12, generator=torch.Generator().manual_seed(5))
X_IDS = torch.randint(0, 64, (2, 9), generator=torch.Generator().manual_seed(5))


@pytest.fixture(scope="module")
def cnn_file(tmp_path_factory):
    model = finalized_cnn()
    path = tmp_path_factory.mktemp("cnn") / "cnn.safetensors"
    torchdkm.save(model, path)
    return model, path, path.read_bytes()


def _rounding_bytes(rep):
    """Each layer's indices take whole bytes; report counts exact bits."""
    return sum(-(-r.index_bits // 8) - r.index_bits / 8 for r in rep.layers)


# ------------------------------------------------------------------------------------------- round trip


@pytest.mark.parametrize("make, x", [(prepared_cnn, X_IMG), (finalized_cnn, X_IMG), (finalized_lm, X_IDS)])
def test_round_trip_into_skeleton_is_bit_identical(tmp_path, make, x):
    model = make()
    path = tmp_path / "m.safetensors"
    torchdkm.save(model, path)
    torch.manual_seed(123)  # a skeleton with different random weights
    skeleton = (SmallCNN() if isinstance(model, SmallCNN) else TinyLM()).eval()
    assert torchdkm.load(path, skeleton) is skeleton
    assert torch.equal(skeleton(x), model(x))
    restored = skeleton.state_dict()
    assert set(restored) == set(model.state_dict())
    for k, a in model.state_dict().items():
        assert a.dtype == restored[k].dtype and torch.equal(a, restored[k]), k
    # the per-layer records are back: report() sees the same compressed model
    before, after = torchdkm.report(model, print_table=False), torchdkm.report(skeleton, print_table=False)
    assert after.to_dict() == before.to_dict()
    if isinstance(model, TinyLM):
        assert skeleton.head.weight is skeleton.embed.weight  # tying survives


def test_load_without_skeleton_returns_the_state_dict(cnn_file):
    model, path, _ = cnn_file
    state = torchdkm.load(path)
    assert set(state) == set(model.state_dict())
    for k, v in model.state_dict().items():
        assert state[k].dtype == v.dtype and torch.equal(state[k], v), k


def test_tied_entry_stored_once(tmp_path):
    model = finalized_lm()
    path = tmp_path / "lm.safetensors"
    torchdkm.save(model, path)
    art = read_artifact(path)
    assert art.meta["aliases"] == {"head.weight": "embed.weight"}
    assert "head.weight" not in art.tensors and "embed.weight.indices" in art.tensors


# ------------------------------------------------------------------------------------------- sizes


@pytest.mark.parametrize("lut_dtype, lut_bits", [(torch.float32, 32), (torch.float16, 16)])
@pytest.mark.parametrize("make", [finalized_cnn, finalized_lm])
def test_file_size_is_report_plus_small_header(tmp_path, make, lut_dtype, lut_bits):
    model = make()
    path = tmp_path / "m.safetensors"
    torchdkm.save(model, path, lut_dtype=lut_dtype)
    rep = torchdkm.report(model, lut_dtype_bits=lut_bits, print_table=False)
    header = read_artifact(path).header_bytes
    assert header < 4096
    assert os.path.getsize(path) == pytest.approx(rep.compressed_bytes + rep.buffer_bytes + _rounding_bytes(rep) + header,
                                                  abs=1e-6)


def test_float16_luts_round_the_weights(tmp_path):
    model = finalized_cnn()
    path = tmp_path / "m.safetensors"
    torchdkm.save(model, path, lut_dtype=torch.float16)
    state = torchdkm.load(path)
    assert torch.equal(state["fc.weight"], model.fc.weight.half().float())


def test_inspect_matches_report(cnn_file):
    model, path, data = cnn_file
    info = inspect_file(path)
    json.dumps(info)  # JSON-ready, for `torchdkm inspect --json`
    rep = torchdkm.report(model, print_table=False)
    t = info["totals"]
    assert t["fp32_bytes"] == rep.fp32_bytes and t["compressed_bytes"] == pytest.approx(rep.compressed_bytes)
    assert t["buffer_bytes"] == rep.buffer_bytes and t["file_bytes"] == len(data)
    assert t["factor"] == pytest.approx(rep.factor)
    assert [r["name"] for r in info["layers"]] == [f"{r.name}.weight" for r in rep.layers]
    fc = info["layers"][-1]
    assert (fc["shape"], fc["bits"], fc["dim"], fc["pad"], fc["lut_shape"]) == ([10, 32], 7, 3, 1, [1, 128, 3])
    assert fc["stored_bytes"] == fc["index_bytes"] + fc["lut_bytes"] == -(-107 * 7 // 8) + 128 * 3 * 4
    table = format_inspect(info)
    assert "fc.weight" in table and "[10, 32]" in table and "compressed" in table


# ------------------------------------------------------------------------------------------- format


def test_file_is_standard_safetensors(cnn_file):
    _, path, _ = cnn_file
    with safe_open(str(path), framework="pt") as f:
        meta = f.metadata()
        assert f.get_tensor("fc.weight.indices").dtype == torch.uint8
        assert f.get_tensor("fc.weight.lut").shape == (1, 128, 3)
    info = json.loads(meta["torchdkm"])
    assert info["format"] == "torchdkm" and info["format_version"] == 2 and info["torchdkm_version"] == torchdkm.__version__
    assert info["layers"]["fc.weight"] == {"module": "fc", "kind": "Linear", "shape": [10, 32], "dtype": "float32",
                                           "bits": 7, "dim": 3, "pad": 1, "n_vectors": 107, "groups": 1,
                                           "channel_scale": False}


def test_save_is_atomic_and_leaves_no_temp_files(tmp_path, monkeypatch):
    path = tmp_path / "m.safetensors"
    path.write_bytes(b"old")
    torchdkm.save(finalized_cnn(), path)
    assert os.listdir(tmp_path) == ["m.safetensors"]
    good = path.read_bytes()

    import torchdkm.serialization as ser

    def broken(tensors, filename, metadata=None):  # fails half-way through writing the temp file
        with open(filename, "wb") as f:
            f.write(b"half a file")
        raise OSError("disk full")

    monkeypatch.setattr(ser, "save_file", broken)
    with pytest.raises(OSError, match="disk full"):
        torchdkm.save(finalized_cnn(seed=1), path)
    assert path.read_bytes() == good and os.listdir(tmp_path) == ["m.safetensors"]


def test_save_gives_the_file_the_umask_permissions(tmp_path):
    path = tmp_path / "m.safetensors"
    torchdkm.save(finalized_cnn(), path)
    umask = os.umask(0)
    os.umask(umask)
    assert os.stat(path).st_mode & 0o777 == 0o666 & ~umask  # not the 0600 of a temp file


def test_entries_sharing_memory_are_saved(tmp_path):
    model = finalized_cnn()
    model.register_buffer("bias_head", model.fc.bias[:4])  # overlaps fc.bias: safetensors refuses such pairs
    path = tmp_path / "m.safetensors"
    torchdkm.save(model, path)
    state = torchdkm.load(path)
    assert torch.equal(state["bias_head"], model.fc.bias[:4]) and torch.equal(state["fc.bias"], model.fc.bias)


# ------------------------------------------------------------------------------------------- save errors


def test_save_refuses_a_prepared_model(tmp_path):
    model = SmallCNN()
    torchdkm.prepare(model, torchdkm.DKMConfig(bits=2, min_numel=0))
    with pytest.raises(ConfigError, match="finalize"):
        torchdkm.save(model, tmp_path / "m.safetensors")


def test_save_refuses_weights_changed_after_finalize(tmp_path):
    model = finalized_cnn()
    with torch.no_grad():
        model.pw.weight[0, 0] += 0.123
    with pytest.raises(ConfigError, match="'pw'.*changed after finalize"):
        torchdkm.save(model, tmp_path / "m.safetensors")


def test_save_rejects_other_lut_dtypes(tmp_path):
    with pytest.raises(ConfigError, match="lut_dtype=torch.float64: allowed are torch.float32, torch.float16 and "
                                          "torch.bfloat16"):
        torchdkm.save(finalized_cnn(), tmp_path / "m.safetensors", lut_dtype=torch.float64)


# ------------------------------------------------------------------------------------------- load errors


def _rewrite_meta(data: bytes, edit, fix_crc=True) -> bytes:
    """The file with its torchdkm metadata JSON edited by ``edit(dict)`` (checksum recomputed if fix_crc)."""
    (n,) = struct.unpack("<Q", data[:8])
    header = json.loads(data[8 : 8 + n])
    meta = json.loads(header["__metadata__"]["torchdkm"])
    edit(meta)
    text = json.dumps(meta)
    header["__metadata__"]["torchdkm"] = text
    if fix_crc:
        header["__metadata__"]["torchdkm_crc32"] = str(zlib.crc32(text.encode()))
    blob = json.dumps(header).encode()
    blob += b" " * (-len(blob) % 8)
    return struct.pack("<Q", len(blob)) + blob + data[8 + n :]


def test_not_a_safetensors_file(tmp_path):
    for content in [b"", b"hello", b"PK\x03\x04" + bytes(100), b"\x10" + bytes(7) + b"not json at all!"]:
        (tmp_path / "x").write_bytes(content)
        with pytest.raises(FormatError, match="not a safetensors|not valid JSON|truncated"):
            torchdkm.load(tmp_path / "x")
    with pytest.raises(FormatError, match="cannot read"):
        torchdkm.load(tmp_path / "missing.safetensors")


def test_plain_safetensors_is_not_a_torchdkm_file(tmp_path):
    save_file({"w": torch.zeros(3)}, str(tmp_path / "plain.safetensors"))
    with pytest.raises(FormatError, match="not a torchdkm file"):
        torchdkm.load(tmp_path / "plain.safetensors")


def test_newer_format_version(tmp_path, cnn_file):
    def newer(meta):
        meta["format_version"] = 4
        meta["torchdkm_version"] = "9.0"

    (tmp_path / "new").write_bytes(_rewrite_meta(cnn_file[2], newer))
    with pytest.raises(FormatError, match="format version 4 .*torchdkm '9.0'.*upgrade"):
        torchdkm.load(tmp_path / "new")


def test_truncated_file(tmp_path, cnn_file):
    (tmp_path / "t").write_bytes(cnn_file[2][:-10])
    with pytest.raises(FormatError, match="truncated"):
        torchdkm.load(tmp_path / "t")


def test_flipped_payload_byte_is_caught_by_checksum(tmp_path, cnn_file):
    data = bytearray(cnn_file[2])
    data[-3] ^= 0x10  # inside the last tensor's bytes
    (tmp_path / "c").write_bytes(bytes(data))
    with pytest.raises(FormatError, match="corrupted: tensor .* checksum"):
        torchdkm.load(tmp_path / "c")


def test_retyped_tensor_is_caught_by_header_checksum(tmp_path, cnn_file):
    data = cnn_file[2]
    (n,) = struct.unpack("<Q", data[:8])
    header = data[8 : 8 + n].replace(b'"F32"', b'"I32"', 1)  # same size: safetensors itself accepts it
    (tmp_path / "r").write_bytes(data[:8] + header + data[8 + n :])
    with pytest.raises(FormatError, match="names, dtypes or shapes do not match their checksum"):
        torchdkm.load(tmp_path / "r")


def test_skeleton_mismatch_names_the_layers(cnn_file):
    _, path, _ = cnn_file
    other = SmallCNN()
    other.fc = torch.nn.Linear(32, 11)
    with pytest.raises(FormatError, match=r"fc.weight: file \(10, 32\) vs model \(11, 32\)"):
        torchdkm.load(path, other)
    other = SmallCNN()
    other.extra = torch.nn.Linear(2, 2)
    with pytest.raises(FormatError, match=r"only in the model: \['extra.bias', 'extra.weight'\]"):
        torchdkm.load(path, other)
    with pytest.raises(FormatError, match=r"only in the file: \['bn1.bias'"):
        torchdkm.load(path, TinyLM())


def test_prepared_skeleton_is_refused(cnn_file):
    model = torchdkm.prepare(SmallCNN(), torchdkm.DKMConfig(bits=2, min_numel=0))
    with pytest.raises(ConfigError, match="plain model"):
        torchdkm.load(cnn_file[1], model)


# ------------------------------------------------------------------------------------------- fuzzing

FUZZ = settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])


def _load_or_format_error(tmp_path, data, reference):
    """Loading ``data`` raises FormatError, or gives exactly the reference weights: never anything else."""
    path = tmp_path / "fuzz.safetensors"
    path.write_bytes(data)
    try:
        state = torchdkm.load(path)
    except FormatError:
        return False
    assert set(state) == set(reference)
    for k, v in reference.items():
        assert state[k].dtype == v.dtype and torch.equal(state[k], v), k
    return True


@FUZZ
@given(cut=st.integers(0, 10**6))
def test_fuzz_truncation(tmp_path, cnn_file, cut):
    data = cnn_file[2]
    with pytest.raises(FormatError):
        torchdkm.load(_write(tmp_path, data[: cut % len(data)]))


@FUZZ
@given(flips=st.lists(st.tuples(st.integers(0, 10**6), st.integers(1, 255)), min_size=1, max_size=4))
def test_fuzz_flipped_bytes(tmp_path, cnn_file, flips):
    model, _, data = cnn_file
    data = bytearray(data)
    for pos, mask in flips:
        data[pos % len(data)] ^= mask
    _load_or_format_error(tmp_path, bytes(data), model.state_dict())


@FUZZ
@given(flips=st.lists(st.tuples(st.integers(0, 10**6), st.integers(1, 255)), min_size=1, max_size=3))
def test_fuzz_flipped_header_bytes(tmp_path, cnn_file, flips):
    model, _, data = cnn_file
    (n,) = struct.unpack("<Q", data[:8])
    data = bytearray(data)
    for pos, mask in flips:  # only the header JSON: the part a checksum of the payload cannot see
        data[8 + pos % n] ^= mask
    _load_or_format_error(tmp_path, bytes(data), model.state_dict())


JSON_VALUES = st.recursive(st.none() | st.booleans() | st.integers(-10, 10**12) | st.floats(allow_nan=False)
                           | st.text(max_size=8), lambda c: st.lists(c, max_size=3)
                           | st.dictionaries(st.text(max_size=5), c, max_size=3), max_leaves=6)


@FUZZ
@given(path=st.lists(st.integers(0, 50), min_size=1, max_size=4), value=JSON_VALUES, fix_crc=st.booleans())
def test_fuzz_edited_metadata(tmp_path, cnn_file, path, value, fix_crc):
    model, _, data = cnn_file
    changed = []

    def edit(meta):  # replace one value somewhere in the metadata tree, chosen by ``path``
        node = meta
        for step in path:
            keys = list(node) if isinstance(node, dict) else list(range(len(node)))
            if not keys:
                break
            key = keys[step % len(keys)]
            if isinstance(node[key], (dict, list)) and step % 3:
                node = node[key]
                continue
            changed.append(node[key] != value)
            node[key] = value
            return

    edited = _rewrite_meta(data, edit, fix_crc)
    if not fix_crc:  # an edit the checksum does not cover is always caught
        ok = _load_or_format_error(tmp_path, edited, model.state_dict())
        assert not (ok and any(changed))
        return
    # With the checksum recomputed the edit is a deliberately different file: it may load (e.g. a changed
    # version string), but anything invalid is a FormatError, never another exception, in both load modes.
    path = _write(tmp_path, edited)
    for skeleton in (None, SmallCNN()):
        try:
            torchdkm.load(path, skeleton)
        except FormatError:
            pass


def _write(tmp_path, data):
    path = tmp_path / "fuzz.safetensors"
    path.write_bytes(data)
    return path
