"""PNG plots for ``torchdkm compress`` (matplotlib, imported lazily with the Agg backend: no display needed)."""
from __future__ import annotations

import io
import math
from typing import Dict, List, Optional

from .._fileio import write_atomic


def pyplot():
    """matplotlib.pyplot on the Agg backend, or None without matplotlib."""
    try:
        import matplotlib
    except ImportError:
        return None
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def save_png(fig, path) -> None:
    """``fig`` as a PNG at ``path``, written atomically."""
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=110, bbox_inches="tight")
    write_atomic(path, lambda f: f.write(buf.getvalue()))


def plot_curves(metrics: List[dict], path, kmeans_init_acc: Optional[float] = None, metric: str = "acc") -> bool:
    """Train loss and test accuracy per epoch, the fp32 and DKM phases in two colours, and the accuracy right
    after the k-means initialisation (before any DKM step). ``metric="ppl"``: test perplexity (rows' test_ppl,
    log scale) instead of accuracy, and ``kmeans_init_acc`` is the perplexity. False without matplotlib."""
    plt = pyplot()
    if plt is None or not metrics:
        return False
    from matplotlib.ticker import MaxNLocator

    key = f"test_{metric}"
    scale = 100 if metric == "acc" else 1  # accuracy in %, perplexity as is
    ylabel, title = ("test accuracy (%)", "test accuracy") if metric == "acc" else \
        ("held-out perplexity (log scale)", "held-out perplexity (lower is better)")

    fig, (ax_loss, ax_acc) = plt.subplots(1, 2, figsize=(10, 3.6), layout="constrained")
    x = list(range(1, len(metrics) + 1))
    for phase, color in (("fp32", "tab:blue"), ("dkm", "tab:orange")):
        idx = [i for i, m in enumerate(metrics) if m["phase"] == phase]
        if not idx:
            continue
        label = "fp32 training" if phase == "fp32" else "DKM fine-tuning (eval = hard clusters)"
        ax_loss.plot([x[i] for i in idx], [metrics[i]["train_loss"] for i in idx], "o-", color=color, label=label)
        ax_acc.plot([x[i] for i in idx], [scale * metrics[i][key] for i in idx], "o-", color=color, label=label)
        soft = [i for i in idx if f"{key}_soft" in metrics[i]]
        if soft:  # the same network with its soft weights A·C: the soft-to-hard gap at a glance
            ax_acc.plot([x[i] for i in soft], [scale * metrics[i][f"{key}_soft"] for i in soft], "s--", color=color,
                        alpha=0.6, label="DKM, eval with soft weights A·C")
    n_fp32 = sum(m["phase"] == "fp32" for m in metrics)
    if kmeans_init_acc is not None and any(m["phase"] == "dkm" for m in metrics):
        ax_acc.plot([n_fp32 + 0.5], [scale * kmeans_init_acc], "x", color="tab:red", ms=9,
                    label="k-means init, before DKM training")
    ax_loss.set(xlabel="epoch", ylabel="train loss", title="training loss")
    ax_acc.set(xlabel="epoch", ylabel=ylabel, title=title)
    if metric == "ppl":
        ax_acc.set_yscale("log")
    for ax in (ax_loss, ax_acc):
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    save_png(fig, path)
    plt.close(fig)
    return True


def plot_histograms(layers: Dict[str, dict], path, max_layers: int = 12) -> bool:
    """One panel per compressed layer (the largest ``max_layers``): histogram of the trained weights before
    the final snap, with the centroid values marked (for d > 1, every coordinate of every centroid)."""
    plt = pyplot()
    if plt is None or not layers:
        return False
    names = sorted(layers, key=lambda n: -layers[n]["weights"].numel())[:max_layers]
    names.sort(key=list(layers).index)  # keep model order among the chosen ones
    cols = min(3, len(names))
    rows = math.ceil(len(names) / cols)
    fig, axes = plt.subplots(rows, cols, figsize=(4.2 * cols, 2.6 * rows), squeeze=False, layout="constrained")
    for ax, name in zip(axes.flat, names):
        info = layers[name]
        ax.hist(info["weights"].numpy(), bins=120, color="tab:gray", alpha=0.8)
        for c in info["centroids"].reshape(-1).unique().tolist():
            ax.axvline(c, color="tab:red", lw=0.8, alpha=0.8)
        ax.set_title(f"{name}  ({2 ** info['bits']} centroids, d={info['dim']})", fontsize=8)
        ax.tick_params(labelsize=7)
        ax.set_yticks([])
    for ax in list(axes.flat)[len(names):]:
        ax.axis("off")
    fig.suptitle("trained weights before the final snap (histogram) and centroids (red)", fontsize=10)
    save_png(fig, path)
    plt.close(fig)
    return True
