"""The DKM paper's vector layouts through Core ML: which layers ship with row-major vectors and with
``vector_axis="auto"``, and, where every layer ships, the converted program's LUT ops and weight-file size.

    python benchmarks/engine/coreml_vectors.py            # ResNet-50 and MobileNet-v1 (ImageNet shapes)

Layouts (DKM paper, Cho et al. 2022): ResNet-50 with every conv at 2^6 centroids of 6-d vectors and fc at 2^6 × 4-d
(its 29.4× row); ResNet-50 at 2^4 × 4-d (1 bit per weight); MobileNet-v1 with convs at 2^4 × 4-d and fc at 2^4 × 2-d.
Sizes and conversion do not depend on training: weights are the models' seeded random initialisation, each layer
snapped to its k-means centroids (prepare + finalize). Conversion: coremltools, iOS18, mlprogram (fp16 LUTs),
``skip_model_load`` (Linux); weight file = the mlpackage's weights/weight.bin; report = ``torchdkm.report(model,
lut_dtype_bits=16)`` (parameters) + buffers at fp16. Writes benchmarks/engine/results/coreml_vectors.{md,json}.
"""
from __future__ import annotations

import argparse
import logging
import sys
import tempfile
import time
from pathlib import Path

import torch
from torch import nn

import torchdkm
from torchdkm import DKMConfig
from torchdkm.export.coreml import attach_metadata, layout_problems

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # benchmarks/: the shared harness
import common  # noqa: E402

MIB = 1024 * 1024
OUT = Path(__file__).resolve().parent / "results" / "coreml_vectors.md"


def _conv_bn(cin, cout, k=1, stride=1, groups=1):
    return [nn.Conv2d(cin, cout, k, stride, k // 2, groups=groups, bias=False), nn.BatchNorm2d(cout)]


class Bottleneck(nn.Module):
    def __init__(self, cin, mid, stride):
        super().__init__()
        out = mid * 4
        self.body = nn.Sequential(*_conv_bn(cin, mid), nn.ReLU(), *_conv_bn(mid, mid, 3, stride), nn.ReLU(),
                                  *_conv_bn(mid, out))
        self.down = nn.Sequential(*_conv_bn(cin, out, 1, stride)) if stride != 1 or cin != out else nn.Identity()

    def forward(self, x):
        return torch.relu(self.body(x) + self.down(x))


def resnet50() -> nn.Module:
    """torchvision's ResNet-50 shapes (25.6 M parameters): 7×7 stem, bottlenecks [3, 4, 6, 3], fc 2048 -> 1000."""
    layers, cin = [*_conv_bn(3, 64, 7, 2), nn.ReLU(), nn.MaxPool2d(3, 2, 1)], 64
    for mid, blocks, stride in [(64, 3, 1), (128, 4, 2), (256, 6, 2), (512, 3, 2)]:
        for i in range(blocks):
            layers.append(Bottleneck(cin, mid, stride if i == 0 else 1))
            cin = mid * 4
    return nn.Sequential(nn.Sequential(*layers), nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(2048, 1000))


def mobilenet_v1() -> nn.Module:
    """MobileNet-v1 (4.2 M parameters): a 3×3 stem, 13 depthwise-separable blocks, fc 1024 -> 1000."""
    layers, cin = [*_conv_bn(3, 32, 3, 2), nn.ReLU()], 32
    for cout, stride in [(64, 1), (128, 2), (128, 1), (256, 2), (256, 1), (512, 2)] + [(512, 1)] * 5 + [
            (1024, 2), (1024, 1)]:
        layers += [*_conv_bn(cin, cin, 3, stride, groups=cin), nn.ReLU(), *_conv_bn(cin, cout), nn.ReLU()]
        cin = cout
    return nn.Sequential(nn.Sequential(*layers), nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(1024, 1000))


CASES = [  # (model, builder, conv (bits, dim), fc (bits, dim))
    ("ResNet-50", resnet50, (6, 6), (6, 4)),
    ("ResNet-50", resnet50, (4, 4), (4, 4)),
    ("MobileNet-v1", mobilenet_v1, (4, 4), (4, 2)),
]


def prepared(build, conv, fc, axis: str) -> nn.Module:
    torch.manual_seed(0)
    model = build().eval()
    fc_name = [n for n, m in model.named_modules() if isinstance(m, nn.Linear)][-1]
    return torchdkm.prepare(model, DKMConfig(bits=conv[0], dim=conv[1], vector_axis=axis, min_numel=0),
                            rules={fc_name: DKMConfig(bits=fc[0], dim=fc[1], vector_axis=axis, min_numel=0)})


def convert(model: nn.Module, folder: Path) -> dict:
    """Finalize, attach the metadata, convert; LUT ops, compressed layers, weight-file and report sizes."""
    import coremltools as ct

    t0 = time.perf_counter()
    torchdkm.finalize(model)
    rep = torchdkm.report(model, lut_dtype_bits=16, print_table=False)
    attach_metadata(model)
    x = torch.randn(1, 3, 224, 224)
    mlmodel = ct.convert(torch.jit.trace(model, x), inputs=[ct.TensorType(shape=x.shape)], convert_to="mlprogram",
                         minimum_deployment_target=ct.target.iOS18, skip_model_load=True)
    ops = list(mlmodel._mil_program.functions["main"].operations)
    luts = [op for op in ops if op.op_type == "constexpr_lut_to_dense"]
    path = folder / "m.mlpackage"
    mlmodel.save(str(path))
    weight_bytes = sum(f.stat().st_size for f in path.rglob("weight.bin"))
    report_bytes = rep.compressed_bytes - rep.other_param_bytes / 2 + rep.buffer_bytes / 2  # fp32 -> fp16
    return {"lut_ops": len(luts), "compressed_layers": len(rep.layers),
            "vector_axes": sorted({int(op.vector_axis.val) for op in luts if op.lut.shape[-1] > 1}),
            "weight_file_mib": weight_bytes / MIB, "report_mib": report_bytes / MIB,
            "weight_file_over_report": weight_bytes / report_bytes, "convert_s": time.perf_counter() - t0}


def measure(name, build, conv, fc, folder: Path) -> dict:
    row = {"model": name, "conv": f"2^{conv[0]} × {conv[1]}-d", "fc": f"2^{fc[0]} × {fc[1]}-d"}
    for axis in ("flat", "auto"):
        model = prepared(build, conv, fc, axis)
        problems = layout_problems(model)
        row[f"refused_{axis}"] = len(problems)
        row["layers"] = sum(1 for _ in torchdkm.parametrization.dkm_layers(model))
        row[f"first_refusal_{axis}"] = problems[0] if problems else None
        if axis == "auto" and not problems:
            row.update(convert(model, folder))
        print(f"{name} {row['conv']}: {axis}: {len(problems)} of {row['layers']} layers refused", flush=True)
    return row


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    common.harness_args(ap)
    args = ap.parse_args(argv)
    args.out = OUT
    run = common.start(__file__, args, argv)
    common.setup_threads()
    logging.getLogger("coremltools").setLevel(logging.ERROR)
    with tempfile.TemporaryDirectory() as tmp:
        rows = [measure(name, build, conv, fc, Path(tmp)) for name, build, conv, fc in CASES]
    body = [[r["model"], r["conv"], r["fc"], str(r["layers"]), str(r["refused_flat"]), str(r["refused_auto"]),
             str(r.get("lut_ops", "-")), f"{r['weight_file_mib']:.2f}" if "weight_file_mib" in r else "-",
             f"{r['report_mib']:.2f}" if "report_mib" in r else "-",
             f"{r['weight_file_over_report']:.3f}" if "weight_file_over_report" in r else "-"] for r in rows]
    notes = [f"- {r['model']} {r['conv']}, auto: {r['first_refusal_auto']}" for r in rows if r["first_refusal_auto"]]
    text = "\n".join([
        "# Vector layouts through Core ML", "",
        "Layers Core ML refuses (`torchdkm.export.coreml.layout_problems` on the prepared model) with row-major "
        "vectors (`flat`) and with `vector_axis=\"auto\"`; where none is refused, the iOS18 conversion's "
        "`constexpr_lut_to_dense` ops and its weight file against `torchdkm.report` at fp16.", "",
        common.markdown_table(["model", "convs", "fc", "layers", "refused (flat)", "refused (auto)", "LUT ops",
                               "weight.bin MiB", "report MiB (fp16)", "ratio"], body), "",
        *(["Why layers stay refused:", "", *notes, ""] if notes else []),
        common.provenance_md(run), ""])
    common.write_report(args.out, text, rows)
    return 0


if __name__ == "__main__":
    sys.exit(main())
