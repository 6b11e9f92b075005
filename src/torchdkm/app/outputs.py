"""What ``torchdkm compress`` leaves in its output folder (rank 0 only), each file written atomically:

    model.safetensors   the compressed artifact (torchdkm.save)
    report.json         per-layer rows, size, factor, accuracy (causal LM: perplexity) before/after, timings
    report.md           the same for people
    metrics.jsonl       one JSON line per epoch: loss, accuracy, lr, DKM statistics (see torchdkm.stats)
    curves.png          training curves
    weights.png         per-layer weight histograms with the centroids marked
    recipe.yaml         the recipe as run
    checkpoint.pt       the last epoch's checkpoint (for --resume; may be deleted once the run is done)
"""
from __future__ import annotations

import json
import math
from pathlib import Path

from torch import nn

from .._fileio import write_text_atomic
from ..report import report as size_report
from ..serialization import save
from .plots import plot_curves, plot_histograms

ARTIFACT_NAME = "model.safetensors"


def write_metrics(out: Path, metrics: list) -> None:
    """Rewritten whole each epoch, so after a resume it holds exactly the checkpoint's epochs."""
    write_text_atomic(out / "metrics.jsonl", "".join(json.dumps(_clean(m)) + "\n" for m in metrics))


def write_outputs(out: Path, model: nn.Module, recipe, metrics: list, summary: dict, snapshot: dict,
                  dist_info: dict) -> dict:
    """Write every result file of a finished run; returns the report dict (also in report.json)."""
    import yaml

    out.mkdir(parents=True, exist_ok=True)
    write_text_atomic(out / "recipe.yaml", yaml.safe_dump(recipe.raw, sort_keys=False))
    save(model, out / ARTIFACT_NAME)
    size = size_report(model, print_table=False)
    metric = "ppl" if recipe.model.is_causal_lm else "acc"
    plots = []
    if plot_curves(metrics, out / "curves.png", summary.get(f"{metric}_kmeans_init"), metric=metric):
        plots.append("curves.png")
    if plot_histograms(snapshot, out / "weights.png"):
        plots.append("weights.png")
    result = {
        "recipe": recipe.name,
        "model": recipe.model.transformers or recipe.model.name,
        "data": recipe.data.label,
        **_quality(metric, summary),
        "size": size.to_dict(),
        "epochs": {"fp32": recipe.training.fp32_epochs, "dkm": recipe.training.epochs},
        "wall_time_s": round(summary.get("wall_time_s", math.nan), 1),
        "distributed": dist_info,
        "artifact": ARTIFACT_NAME,
        "plots": plots,
    }
    write_text_atomic(out / "report.json", json.dumps(_clean(result), indent=2) + "\n")
    write_text_atomic(out / "report.md", _markdown(result, size))
    print(_summary_line(result, out), flush=True)
    return result


def _quality(metric: str, summary: dict) -> dict:
    """{"accuracy": {fp32, kmeans_init, final}} of a classifier, or {"perplexity": {fp32, kmeans_init, dkm,
    final}, "eval_tokens": N} of a causal LM (dkm: after the DKM epochs, hard clusters, before finalize)."""
    if metric == "acc":
        return {"accuracy": {k: summary.get(f"acc_{k}") for k in ("fp32", "kmeans_init", "final")}}
    return {"perplexity": {k: summary.get(f"ppl_{k}") for k in ("fp32", "kmeans_init", "dkm", "final")},
            "eval_tokens": summary.get("eval_tokens")}


def _missing(x) -> bool:
    return x is None or (isinstance(x, float) and math.isnan(x))


def _pct(x) -> str:
    return "-" if _missing(x) else f"{100 * x:.2f}%"


def _ppl(x) -> str:
    return "-" if _missing(x) else f"{x:.2f}"


def _quality_table(r: dict) -> list:
    """Markdown rows: test accuracy, or held-out perplexity (lower is better), before and after."""
    if "accuracy" in r:
        acc = r["accuracy"]
        return ["| | test accuracy |", "|---|---|",
                f"| fp32 (before) | {_pct(acc['fp32'])} |",
                f"| k-means init, no fine-tuning | {_pct(acc['kmeans_init'])} |",
                f"| DKM, finalized (after) | {_pct(acc['final'])} |"]
    ppl = r["perplexity"]
    return [f"| | held-out perplexity ({r['eval_tokens']} predicted tokens) |", "|---|---|",
            f"| fp32 (before) | {_ppl(ppl['fp32'])} |",
            f"| k-means init, no fine-tuning | {_ppl(ppl['kmeans_init'])} |",
            f"| DKM, hard clusters (last epoch) | {_ppl(ppl['dkm'])} |",
            f"| DKM, finalized (after) | {_ppl(ppl['final'])} |"]


def _markdown(r: dict, size) -> str:
    s = r["size"]
    lines = [
        f"# torchdkm compress: {r['recipe']}",
        "",
        f"model `{r['model']}`, data `{r['data']}`, {r['epochs']['fp32']} fp32 + {r['epochs']['dkm']} DKM epochs, "
        f"{r['distributed']['world_size']} process(es), wall time {r['wall_time_s']:.0f} s",
        "",
        *_quality_table(r),
        "",
        f"**Size: {s['fp32_mib']:.3f} MiB fp32 -> {s['compressed_mib']:.3f} MiB compressed = "
        f"{s['factor']:.1f}x smaller** (indices + fp32 LUTs; other parameters at their dtype)",
        "",
        "| layer | kind | shape | bits | dim | weights | bits/weight | KiB |",
        "|---|---|---|---:|---:|---:|---:|---:|",
    ]
    for row in size.layers:
        lines.append(f"| {row.name} | {row.kind} | {list(row.shape)} | {row.bits} | {row.dim} | {row.numel} | "
                     f"{row.bits_per_weight:.3f} | {row.stored_bits / 8 / 1024:.2f} |")
    lines += ["", f"uncompressed parameters: {s['other_param_bytes'] / 1024:.1f} KiB"]
    if r["distributed"]["world_size"] > 1:
        agree = "identical on every rank" if r["distributed"]["ranks_identical"] else \
            f"DIFFER between ranks: {r['distributed']['mismatched']}"
        lines.append(f"weights and DKM centroids: {agree}")
    lines.append("")
    lines += [f"![{p}]({p})" for p in r["plots"]]
    return "\n".join(lines) + "\n"


def _summary_line(r: dict, out: Path) -> str:
    s = r["size"]
    if "accuracy" in r:
        q = f"accuracy {_pct(r['accuracy']['fp32'])} fp32 -> {_pct(r['accuracy']['final'])} DKM"
    else:
        q = f"perplexity {_ppl(r['perplexity']['fp32'])} fp32 -> {_ppl(r['perplexity']['final'])} DKM"
    return (f"done in {r['wall_time_s']:.0f} s: {q}; "
            f"{s['fp32_mib']:.3f} MiB -> {s['compressed_mib']:.3f} MiB ({s['factor']:.1f}x); results in {out}/")


def _clean(x):
    """JSON-safe: NaN/inf become null."""
    if isinstance(x, float) and not math.isfinite(x):
        return None
    if isinstance(x, dict):
        return {k: _clean(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [_clean(v) for v in x]
    return x
