"""What ``torchdkm compress`` leaves in its output folder (rank 0 only), each file written atomically:

    model.safetensors   the compressed artifact (torchdkm.save)
    report.json         per-layer rows, size (and what it counts), factor, the source file's size, accuracy
                        (causal LM: perplexity, also on data.extra_test corpora) before/after, timings
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
from typing import Optional

from torch import nn

from .._fileio import write_text_atomic
from ..parametrization import layer_spec, original_weight
from ..report import MIB
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
        "eval_data": eval_data(recipe),
        "size": dict(size.to_dict(), counted=size_parts(model, size)),
        "source_file": source_file(recipe),
        "artifact_mib": (out / ARTIFACT_NAME).stat().st_size / MIB,
        "epochs": {"fp32": recipe.training.fp32_epochs, "dkm": recipe.training.epochs},
        "wall_time_s": round(summary.get("wall_time_s", math.nan), 1),
        "distributed": dist_info,
        "artifact": ARTIFACT_NAME,
        "plots": plots,
    }
    if "plan" in summary:  # compression.budget: what the planner chose, and its size against the budget
        result["plan"] = {k: summary["plan"][k] for k in ("budget_bytes", "total_bytes", "bits_per_weight", "dloss",
                                                           "layers")}
    write_text_atomic(out / "report.json", json.dumps(_clean(result), indent=2) + "\n")
    write_text_atomic(out / "report.md", _markdown(result, size))
    print(_summary_line(result, out), flush=True)
    return result


def _quality(metric: str, summary: dict) -> dict:
    """{"accuracy": {fp32, kmeans_init, final}} of a classifier, or {"perplexity": {fp32, kmeans_init, dkm,
    final}, "eval_tokens": N, "extra_perplexity": {corpus: {fp32, final, eval_tokens}}} of a causal LM (dkm:
    after the DKM epochs, hard clusters, before finalize; extra: the data.extra_test corpora)."""
    if metric == "acc":
        return {"accuracy": {k: summary.get(f"acc_{k}") for k in ("fp32", "kmeans_init", "final")}}
    return {"perplexity": {k: summary.get(f"ppl_{k}") for k in ("fp32", "kmeans_init", "dkm", "final")},
            "eval_tokens": summary.get("eval_tokens"), "extra_perplexity": summary.get("extra_ppl", {})}


def eval_data(recipe) -> dict:
    """What the test metric is measured on, and whether that text or data came from the training corpus (it
    always does for ``data``: its test split, or a text file's last 10%), with the note the report shows."""
    d = recipe.data
    if d.text_file:
        note = f"test text: the last 10% of {d.text_file}'s tokens; training text: its first 90% (the same corpus)"
    elif recipe.model.is_causal_lm:
        note = f"test text: the test split of {d.name}; training text: its train split (the same corpus)"
    else:
        note = f"test data: the test split of {d.name}, held out from training on its train split (the same dataset)"
    if recipe.model.is_causal_lm:
        note += (", so a change in its perplexity mixes compression with adaptation to that corpus: a perplexity "
                 "below fp32's does not mean a better model in general")
        others = [e.label for e in d.extra_test]
        note += (f"; {', '.join(others)}: held-out text of another corpus, never trained on" if others else
                 "; data.extra_test can add held-out text of another corpus")
    return {"test": d.label, "same_corpus_as_training": True, "note": note}


def size_parts(model: nn.Module, size) -> dict:
    """What the compressed size counts, in MiB: the compressed layers' indices, their LUTs and scales (in
    size.lut_dtype_bits), and every other parameter at its own dtype (a tied tensor once)."""
    compressed = {id(original_weight(m)) for _, m in model.named_modules() if layer_spec(m) is not None}
    params = {id(p): p for p in model.parameters()}
    other_dtypes = sorted({str(p.dtype).replace("torch.", "") for i, p in params.items() if i not in compressed})
    return {"index_mib": sum(r.index_bits for r in size.layers) / 8 / MIB,
            "index_bits": sorted({r.bits for r in size.layers}),
            "lut_and_scale_mib": sum(r.lut_bits for r in size.layers) / 8 / MIB,
            "lut_dtype": {16: "float16", 32: "float32"}[size.lut_dtype_bits],
            "other_param_mib": size.other_param_bytes / MIB,
            "other_param_count": sum(p.numel() for i, p in params.items() if i not in compressed),
            "other_param_dtypes": other_dtypes}


def source_file(recipe) -> Optional[dict]:
    """{"path", "kind", "mib"} of the file the model was loaded from: model.gguf_file, model.checkpoint, or a
    transformers folder's weight files (*.safetensors, else *.bin; summed, the folder named if several); None for a model built from code."""
    spec, folder = recipe.model, recipe.folder
    if spec.checkpoint:
        from .build import _find_file

        path = Path(_find_file(spec.checkpoint, folder, "model.checkpoint"))
        return {"path": str(path), "kind": "checkpoint", "mib": path.stat().st_size / MIB}
    if not spec.is_transformers:
        return None
    from .hf import resolve_source

    model_dir = Path(resolve_source(spec.transformers, folder, "model.transformers"))
    if not model_dir.is_dir():  # a name in the Hugging Face cache: its files are not ours to find
        return None
    if spec.gguf_file:
        path = model_dir / spec.gguf_file
        return {"path": str(path), "kind": "GGUF", "mib": path.stat().st_size / MIB}
    files = sorted(model_dir.glob("*.safetensors")) or sorted(model_dir.glob("*.bin"))
    if not files:
        return None
    return {"path": str(files[0] if len(files) == 1 else model_dir), "kind": "weights",
            "mib": sum(f.stat().st_size for f in files) / MIB}


def _missing(x) -> bool:
    return x is None or (isinstance(x, float) and math.isnan(x))


def _pct(x) -> str:
    return "-" if _missing(x) else f"{100 * x:.2f}%"


def _ppl(x) -> str:
    return "-" if _missing(x) else f"{x:.2f}"


def _quality_table(r: dict) -> list:
    """Markdown rows: test accuracy, or held-out perplexity (lower is better), before and after; then the note
    on where the test data came from."""
    note = f"*{r['eval_data']['note']}.*"
    if "accuracy" in r:
        acc = r["accuracy"]
        return ["| | test accuracy |", "|---|---|",
                f"| fp32 (before) | {_pct(acc['fp32'])} |",
                f"| k-means init, no fine-tuning | {_pct(acc['kmeans_init'])} |",
                f"| DKM, finalized (after) | {_pct(acc['final'])} |", "", note]
    ppl, extra = r["perplexity"], r.get("extra_perplexity") or {}
    head = f"| | {r['data']}: held-out perplexity ({r['eval_tokens']} predicted tokens) |"
    head += "".join(f" {k}: other corpus ({v['eval_tokens']} predicted tokens) |" for k, v in extra.items())
    rows = [("fp32 (before)", "fp32"), ("k-means init, no fine-tuning", "kmeans_init"),
            ("DKM, hard clusters (last epoch)", "dkm"), ("DKM, finalized (after)", "final")]
    return [head, "|---|---|" + "---|" * len(extra),
            *(f"| {text} | {_ppl(ppl[key])} |" + "".join(f" {_ppl(v.get(key))} |" for v in extra.values())
              for text, key in rows), "", note]


def _size_text(r: dict) -> list:
    """The headline size, what it counts and in which dtype, and the source file and artifact beside it."""
    s, c = r["size"], r["size"]["counted"]
    bits = "/".join(map(str, c["index_bits"])) or "-"
    lines = [f"**Size: {s['fp32_mib']:.3f} MiB fp32 -> {s['compressed_mib']:.3f} MiB compressed = "
             f"{s['factor']:.1f}x smaller**", "",
             f"- counted: fp32 = every parameter at 4 bytes; compressed = {bits}-bit indices {_size(c['index_mib'])} "
             f"+ LUTs and scales {_size(c['lut_and_scale_mib'])} ({c['lut_dtype']}) + the other "
             f"{c['other_param_count']} parameters, not compressed, {_size(c['other_param_mib'])} "
             f"({', '.join(c['other_param_dtypes']) or '-'})",
             f"- artifact file {r['artifact']}: {_size(r['artifact_mib'])}"]
    src = r.get("source_file")
    if src:
        ratio = s["compressed_mib"] / src["mib"] if src["mib"] else math.inf
        than = f"{1 / ratio:.2f}x smaller than" if ratio < 1 else f"{ratio:.2f}x the size of"
        lines.append(f"- source file ({src['kind']}) `{Path(src['path']).name}`: {_size(src['mib'])}; the "
                     f"compressed model is {than} it")
    return lines


def _size(mib: float) -> str:
    """'93.8 MiB' style with three decimals, or KiB below one MiB (a small model's LUTs)."""
    return f"{mib:.3f} MiB" if mib >= 1 else f"{mib * 1024:.2f} KiB"


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
        *_size_text(r),
        "",
        *([f"planned for compression.budget: {r['plan']['total_bytes'] / 1024:.2f} KiB "
           f"({r['plan']['bits_per_weight']:.3f} bits/weight) within {r['plan']['budget_bytes'] / 1024:.2f} KiB, "
           f"estimated loss increase {r['plan']['dloss']:.4g}", ""] if "plan" in r else []),
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
        q = (f"perplexity on {r['data']} (the training corpus) {_ppl(r['perplexity']['fp32'])} fp32 -> "
             f"{_ppl(r['perplexity']['final'])} DKM")
        q += "".join(f", on {k} {_ppl(v.get('fp32'))} -> {_ppl(v.get('final'))}"
                     for k, v in (r.get("extra_perplexity") or {}).items())
    src = r.get("source_file")
    beside = f"; source file {src['mib']:.3f} MiB" if src else ""
    return (f"done in {r['wall_time_s']:.0f} s: {q}; "
            f"{s['fp32_mib']:.3f} MiB -> {s['compressed_mib']:.3f} MiB ({s['factor']:.1f}x){beside}; results in {out}/")


def _clean(x):
    """JSON-safe: NaN/inf become null."""
    if isinstance(x, float) and not math.isfinite(x):
        return None
    if isinstance(x, dict):
        return {k: _clean(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [_clean(v) for v in x]
    return x
