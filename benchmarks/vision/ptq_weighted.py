"""Post-training palettization of MobileNetV2: plain vs Fisher-weighted k-means, and a planned allocation.

No training. Every Conv/Linear layer with >= 4096 weights (torchdkm's default min_numel) is clustered at 1-d with
groups of 16 output channels and per-channel scales (a layer whose axis-0 size 16 does not divide gets the largest
divisor <= 16), LUTs and scales counted at 16 bits and the weights rounded to fp16 afterwards, as in
ptq_granularity.py. Rows per bit width b:

* k-means:            torchdkm.palettize(model, cfg) - the plain k-means (the DKM initialisation);
* weighted k-means:   torchdkm.palettize(model, cfg, sensitivity=F) - k-means weighted by the Fisher diagonal F
                      (true Fisher: labels drawn from the model's own softmax, per-sample squared gradients);
* planned + weighted: torchdkm.plan at the size of the uniform row (same layers; candidates bits 1..8 at 1-d, one
                      LUT or g16, with or without scales, or fp32), then the weighted k-means with the planned rules;
* coremltools PostTrainingPalettizer / SKMPalettizer (with --coreml): the same layers and layouts
                      (per_grouped_channel, the same group sizes, enable_per_channel_scale), SKM with the same 32
                      calibration images one per batch and the same loss (cross-entropy against labels drawn from the
                      model's softmax); the same size as the k-means row.

Calibration: 32 seeded views (seed 1) of the photos; evaluation: 320 other seeded views (seed 0) of the same photos
(no labels: top-1 agreement with fp32 and mean KL(p_fp32 || p)). The calibration and evaluation images are
different crops of the same 11 photos, so this is not a held-out test of the Fisher's generalisation.

    python benchmarks/vision/ptq_weighted.py            # 4 and 3 bits (~10 min on 1 thread)
    python benchmarks/vision/ptq_weighted.py --quick    # 16 images, 4 bits, writes only with --out
"""
from __future__ import annotations

import argparse
import copy
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # benchmarks/: the shared harness (common.py)
sys.path.insert(0, str(Path(__file__).resolve().parent))
import common  # noqa: E402
from ptq_granularity import group_rules  # noqa: E402

import torchdkm  # noqa: E402
from torchdkm.planner import default_candidates, plan  # noqa: E402
from torchdkm.ptq import palettize  # noqa: E402
from torchdkm.sensitivity import fisher_diagonal  # noqa: E402

TAG = "ptq_weighted"


def fp16_weights(model, names):
    with torch.no_grad():
        for n in names:
            w = model.get_submodule(n).weight
            w.copy_(w.half().float())


def coreml_rows(fp32, rules, cfg, names, x_cal):
    """(method, model, seconds) for coremltools' PostTrainingPalettizer and SKMPalettizer on the layers ``names``
    with torchdkm's layouts (group size per layer from ``rules``)."""
    import logging

    import torch.nn.functional as F
    from coremltools.optimize.torch.palettization import (ModulePostTrainingPalettizerConfig,
                                                          ModuleSKMPalettizerConfig, PostTrainingPalettizer,
                                                          PostTrainingPalettizerConfig, SKMPalettizer,
                                                          SKMPalettizerConfig)

    logging.getLogger("coremltools").setLevel(logging.WARNING)

    def layout(name):
        c = rules.get(name) or cfg
        return dict(n_bits=c.bits, granularity="per_grouped_channel", group_size=c.group_size,
                    enable_per_channel_scale=bool(c.channel_scale))

    out = []
    t0 = time.perf_counter()
    ptp = PostTrainingPalettizer(copy.deepcopy(fp32), PostTrainingPalettizerConfig(
        module_name_configs={n: ModulePostTrainingPalettizerConfig(**layout(n)) for n in names})).compress()
    out.append(("coremltools PostTrainingPalettizer", ptp, time.perf_counter() - t0))
    gen = torch.Generator().manual_seed(0)

    def loss_fn(model, data):
        logits = model(data)
        y = torch.multinomial(logits.detach().softmax(-1), 1, generator=gen)[:, 0]
        return F.cross_entropy(logits, y, reduction="sum")

    t0 = time.perf_counter()
    skm = SKMPalettizer(copy.deepcopy(fp32), SKMPalettizerConfig(
        module_name_configs={n: ModuleSKMPalettizerConfig(**layout(n)) for n in names},
        calibration_nsamples=len(x_cal))).compress(dataloader=[x_cal[i:i + 1] for i in range(len(x_cal))],
                                                    loss_fn=loss_fn)
    out.append(("coremltools SKMPalettizer", skm, time.perf_counter() - t0))
    return out


def run(bits_list, n_eval, n_cal, log=print, coreml=False) -> dict:
    import mobilenet_v2 as mv2

    fp32 = mv2.load_mobilenet_v2()
    x_eval, x_cal = mv2.natural_images(n_eval, seed=0), mv2.natural_images(n_cal, seed=1)
    ref = mv2.logits_of(fp32, x_eval)
    t0 = time.perf_counter()
    sens = fisher_diagonal(fp32, [x_cal])
    fisher_s = time.perf_counter() - t0
    log(f"Fisher diagonal: {sens.samples} samples, {fisher_s:.1f} s")
    rows = []
    for bits in bits_list:
        cfg = torchdkm.DKMConfig(bits=bits, group_size=16, channel_scale=True)
        rules, _ = group_rules(fp32, cfg, {})
        layers = None
        for method in ("k-means", "weighted k-means", "planned + weighted"):
            model = copy.deepcopy(fp32)
            extra = {}
            t0 = time.perf_counter()
            if method == "k-means":
                palettize(model, cfg, rules)
            elif method == "weighted k-means":
                palettize(model, cfg, rules, sensitivity=sens)
            else:
                budget = rows[-2]["bytes"]
                t1 = time.perf_counter()
                p = plan(fp32, sensitivity=sens, budget_bytes=budget, layers=layers, lut_bits=16,
                         candidates=default_candidates(dims=(1,)))
                extra = {"plan_s": time.perf_counter() - t1, "plan": p.to_dict()}
                log(p.table())
                palettize(model, rules=p.rules, sensitivity=sens)
            secs = time.perf_counter() - t0
            rep = torchdkm.report(model, lut_dtype_bits=16, print_table=False)
            names = [r.name for r in rep.layers]
            if layers is None:
                layers = names
            fp16_weights(model, names)
            logits = mv2.logits_of(model, x_eval)
            numel = sum(r.numel for r in rep.layers)
            r = {"bits": bits, "method": method, "bytes": rep.compressed_bytes, "mib": rep.compressed_mib,
                 "bits_per_weight": sum(r.stored_bits for r in rep.layers) / numel, "layers": len(names),
                 "top1_agree": mv2.top1_agreement(logits, ref), "kl": mv2.kl_to_ref(logits, ref), "seconds": secs,
                 **extra}
            rows.append(r)
            log(f"{bits}b {method:<20} {r['bits_per_weight']:.3f} b/w {r['mib']:.3f} MiB top-1 agree "
                f"{100 * r['top1_agree']:.1f}% KL {r['kl']:.4f} ({secs:.1f} s)")
        if coreml:
            base = next(r for r in rows if r["bits"] == bits and r["method"] == "k-means")
            for method, model, secs in coreml_rows(fp32, rules, cfg, layers, x_cal):
                fp16_weights(model, layers)
                logits = mv2.logits_of(model, x_eval)
                r = {**{k: base[k] for k in ("bits", "bytes", "mib", "bits_per_weight", "layers")}, "method": method,
                     "top1_agree": mv2.top1_agreement(logits, ref), "kl": mv2.kl_to_ref(logits, ref), "seconds": secs}
                rows.append(r)
                log(f"{bits}b {method:<20} top-1 agree {100 * r['top1_agree']:.1f}% KL {r['kl']:.4f} ({secs:.1f} s)")
    return {"rows": rows, "fisher_s": fisher_s, "samples": sens.samples, "n_eval": n_eval}


def markdown(res) -> str:
    head = ["bits", "method", "bits/weight (compressed layers, incl. LUTs + scales)", "MiB", "top-1 agreement %",
            "KL to fp32", "seconds (plan + k-means; coremltools: sensitivity + k-means)"]
    rows = [[r["bits"], r["method"], f"{r['bits_per_weight']:.3f}", f"{r['mib']:.3f}", f"{100 * r['top1_agree']:.1f}",
             f"{r['kl']:.4f}", f"{r['seconds']:.1f}"] for r in res["rows"]]
    return common.markdown_table(head, rows)


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--bits", nargs="+", type=int, default=None, help="default 4 3")
    p.add_argument("--images", type=int, default=None, help="evaluation images (default 320)")
    p.add_argument("--calibration", type=int, default=32, help="calibration images for the Fisher diagonal")
    p.add_argument("--quick", action="store_true", help="16 images, 4 bits")
    p.add_argument("--coreml", action="store_true", help="add coremltools' PostTrainingPalettizer and SKMPalettizer")
    p.add_argument("--out", type=Path, default=None)
    p.add_argument("--threads", type=int, default=None)
    common.harness_args(p)
    a = p.parse_args(argv)
    common.start(__file__, a, argv)
    argv = sys.argv[1:] if argv is None else argv
    a.bits = a.bits or ([4] if a.quick else [4, 3])
    a.images = a.images or (16 if a.quick else 320)
    threads = common.setup_threads(a.threads)
    t0 = time.perf_counter()
    res = run(a.bits, a.images, a.calibration, coreml=a.coreml)
    res.update(wall_s=time.perf_counter() - t0, command=" ".join(["python benchmarks/vision/ptq_weighted.py", *argv]),
               torch=torch.__version__, threads=threads, code=common.code_version(Path(__file__)), quick=a.quick)
    print("\n" + markdown(res))
    out = a.out if a.out is not None else (None if a.quick else common.results_dir(__file__))
    out = common.output_path(out, a.allow_dirty)
    if out is not None:
        md = ["# Post-training palettization of MobileNetV2: plain vs Fisher-weighted k-means, planned allocation", "",
              __doc__.split("\n\n", 1)[1].split("\n    python")[0].strip(), "",
              f"Command: `{res['command']}`; torch {res['torch']}, {res['threads']} thread(s), shared 2-core CPU "
              f"(other jobs running); {res['wall_s'] / 60:.1f} min wall. Code "
              f"{', '.join(f'{k} {v}' for k, v in res['code'].items())}.", "",
              f"Fisher diagonal: {res['samples']} samples in {res['fisher_s']:.1f} s; evaluation on {res['n_eval']} "
              f"images.", "", markdown(res), ""]
        out.mkdir(parents=True, exist_ok=True)
        common.write_text_atomic(out / f"{TAG}.md", "\n".join(md))
        common.write_json(out / f"{TAG}.json", res)
        print(f"wrote {out / (TAG + '.md')} and .json")
    return res


if __name__ == "__main__":
    main()
