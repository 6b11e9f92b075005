"""benchmarks/llm/deploy.py on a tiny random LLaMA (tied embedding/head, like SmolLM2): artifact -> from_config +
load -> greedy generation, compact mode giving the same tokens in the child measurement, and the Core ML conversion
(iOS18 and iOS26) with a LUT op for every compressed weight, Core ML's rebuilt weights equal to PyTorch's, and the
weight.bin explained by its constants."""
import json

import pytest
import torch

import torchdkm
from hf_tiny import tiny_llama_config

transformers = pytest.importorskip("transformers")
deploy = pytest.importorskip("deploy")


def _artifact(tmp_path):
    cfg = tiny_llama_config(num_hidden_layers=1)
    torch.manual_seed(0)
    model = transformers.LlamaForCausalLM(cfg).eval()
    for name, prm in model.named_parameters():
        if "norm" in name:  # not all ones (coremltools drops a multiplication by ones)
            prm.data.uniform_(0.5, 1.5)
    deploy.fp16_other_params(model)
    torchdkm.palettize(model, deploy.uniform_config(4))
    cfg.save_pretrained(tmp_path)
    torchdkm.save(model, tmp_path / "model.safetensors", lut_dtype=torch.float16)
    (tmp_path / "prompt.json").write_text(json.dumps([3, 14, 15, 92, 65]))
    return model


def test_reloaded_artifact_generates_and_compact_gives_the_same_tokens(tmp_path):
    model = _artifact(tmp_path)
    shipped = torchdkm.load(tmp_path / "model.safetensors", deploy.fresh_model(tmp_path))
    ids = torch.tensor([[3, 14, 15, 92, 65]])
    assert torch.equal(deploy.greedy(shipped, ids, 6), deploy.greedy(model, ids, 6))
    dense = deploy.child("dense", tmp_path, 6, 1)
    compact = deploy.child("compact", tmp_path, 6, 1)
    assert dense["tokens"] == compact["tokens"] == deploy.greedy(shipped, ids, 6).tolist()
    assert compact["tensor_bytes"] < dense["tensor_bytes"]
    assert dense["tokens_per_s"] > 0 and compact["gen_peak_rss_mib"] > 0


@pytest.mark.parametrize("target", ["iOS18", "iOS26"])
def test_coreml_conversion_has_a_lut_op_per_compressed_weight(tmp_path, target):
    pytest.importorskip("coremltools")
    _artifact(tmp_path)
    shipped = torchdkm.load(tmp_path / "model.safetensors", deploy.fresh_model(tmp_path))
    c = deploy.convert_coreml(shipped, 16, target, tmp_path / "m.mlpackage")
    assert c["compressed_layers"] == 8  # 7 Linears + the tied embedding/head, counted once
    assert c["lut_ops"] == c["layers_with_lut"] == 8 and not c["missing"]
    assert c["n_dense_compressed_consts"] == 0
    assert c["rebuild_max_rel_err"] < 2e-3  # fp16 rounding of LUTs and scales only
    kinds = c["const_bytes_by_kind"]
    parts = deploy.accounted_parts(shipped)
    assert kinds["LUT indices"] == pytest.approx(parts["LUT indices"], abs=15)  # each layer rounds up to a byte
    assert kinds["norm weights"] == parts["norm weights"]  # fp16, as torchdkm counts them
    if target == "iOS26":  # the grouped LUTs and per-row scales as torchdkm stores them
        assert kinds["LUTs"] == parts["LUTs"] and kinds["scales"] == parts["scales"]
    assert 0 <= c["weight_bin_bytes"] - sum(kinds.values()) < 64 * 2 * (len(c["op_counts"]) + 200)
    assert not any(isinstance(m, deploy.LogitsOnly) for m in shipped.modules())  # converted a copy
    if target == "iOS26":
        _check_markdown(tmp_path, shipped, c)


def _check_markdown(tmp_path, shipped, c):
    """The report renders every section from one Core ML result and one child measurement."""
    mode = deploy.child("dense", tmp_path, 2, 1)

    parts = deploy.accounted_parts(shipped)
    res = dict(settings=dict(prompt="p", sample_tokens=2, gen_tokens=2, repeats=1, coreml_len=16, compress_s=0.1),
               versions=dict(coremltools="9.0"), generation=dict(prompt_tokens=5, source_text="a\nb", artifact_text="c"),
               accounted_bytes=sum(parts.values()), accounted_parts=parts,
               artifact_bytes=(tmp_path / "model.safetensors").stat().st_size,
               modes={"dense": mode, "compact": {**mode, "mode": "compact"}}, compact_same_tokens=True, coreml=[c],
               provenance=dict(date="d", git="g", command="c", machine=dict(cores=2, threads=1, torch="t",
                                                                            python="p", arch="a")))
    res["explanation"] = deploy.explain(res)
    md = deploy.markdown(res)
    assert "| iOS26 |" in md and "zero biases of the Linears" in md and "a ⏎ b" in md
    assert "deduplicated to one per shape" in res["explanation"]
