"""MiniLM fine-tuning step: plain vs torchdkm vs coremltools DKMPalettizer, each in its own process.

all-MiniLM-L6-v2 + a 5-class head on BBC News text, batch 32 × 64 tokens, AdamW, every Linear layer of
the encoder at 4 bits (1-D clusters). Prints median step time, first-step time (DKM initialisation
included) and peak RSS per method, and the ratios measured in this run.

    python benchmarks/dkm_step.py                     # all three (coremltools only if installed)
    python benchmarks/dkm_step.py --steps 6 --coreml-steps 3 --out benchmarks/results/dkm_step.md
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import statistics
import subprocess
import sys
import time

BATCH, SEQ, CLASSES = 32, 64, 5


def _batch():
    """A fixed batch of real BBC News text, tokenised to 32 × 64."""
    import torch
    from transformers import AutoTokenizer

    from minilm import minilm_path
    from torchdkm.app.zoo.data import load_bbc_news

    texts, labels, *_ = load_bbc_news()
    tok = AutoTokenizer.from_pretrained(minilm_path())
    enc = tok(list(texts[:BATCH]), padding="max_length", truncation=True, max_length=SEQ, return_tensors="pt")
    return enc["input_ids"], enc["attention_mask"], torch.tensor(list(labels[:BATCH]))


def _model():
    import torch
    from torch import nn
    from transformers import AutoModel

    from minilm import minilm_path

    class Classifier(nn.Module):
        def __init__(self):
            super().__init__()
            self.encoder = AutoModel.from_pretrained(minilm_path())
            self.head = nn.Linear(self.encoder.config.hidden_size, CLASSES)

        def forward(self, ids, mask):
            h = self.encoder(input_ids=ids, attention_mask=mask).last_hidden_state
            m = mask[..., None].to(h.dtype)
            return self.head((h * m).sum(1) / m.sum(1))

    torch.manual_seed(0)
    return Classifier()


def _linear_names(model):
    from torch import nn

    return [n for n, m in model.named_modules() if isinstance(m, nn.Linear) and n.startswith("encoder.")]


def run_one(method: str, steps: int, bits: int) -> dict:
    """Runs in a child process: time `steps` training steps of one method."""
    import torch

    torch.set_num_threads(int(os.environ.get("BENCH_THREADS", os.cpu_count() or 1)))
    ids, mask, y = _batch()
    model = _model()
    hook = None
    if method == "torchdkm":
        import torchdkm

        rules = {n: torchdkm.DKMConfig(bits=bits, min_numel=0) for n in _linear_names(model)}
        torchdkm.prepare(model, torchdkm.DKMConfig(bits=bits), rules={**rules, "re:.*": None})
    elif method == "coremltools":
        from coremltools.optimize.torch.palettization import (
            DKMPalettizer, DKMPalettizerConfig, ModuleDKMPalettizerConfig)

        cfg = ModuleDKMPalettizerConfig(n_bits=bits, weight_threshold=0)
        config = DKMPalettizerConfig()
        for n in _linear_names(model):
            config.set_module_name(n, cfg)
        pal = DKMPalettizer(model, config)
        model = pal.prepare()
        hook = pal.step
    model.train()
    opt = torch.optim.AdamW(model.parameters(), lr=2e-5)
    times = []
    for _ in range(steps):
        t = time.perf_counter()
        opt.zero_grad(set_to_none=True)
        loss = torch.nn.functional.cross_entropy(model(ids, mask), y)
        loss.backward()
        opt.step()
        if hook is not None:
            hook()
        times.append(time.perf_counter() - t)
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024 / 1024  # Linux: KiB -> GiB
    return {"method": method, "first_s": times[0], "median_s": statistics.median(times[1:]), "steps": steps,
            "times": times, "peak_rss_gib": rss, "threads": torch.get_num_threads(), "loss": float(loss)}


def _child(method, steps, bits):
    cmd = [sys.executable, __file__, "--child", method, "--steps", str(steps), "--bits", str(bits)]
    out = subprocess.run(cmd, capture_output=True, text=True)
    if out.returncode != 0:
        raise SystemExit(f"{method} failed:\n{out.stderr[-3000:]}")
    return json.loads(out.stdout.strip().splitlines()[-1])


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--steps", type=int, default=6, help="steps for plain and torchdkm (first one is reported apart)")
    p.add_argument("--coreml-steps", type=int, default=3, help="steps for coremltools (0 skips it)")
    p.add_argument("--bits", type=int, default=4)
    p.add_argument("--out", help="also write the table to this markdown file")
    p.add_argument("--coreml-result", help="JSON line of an earlier `--child coremltools` run on this machine "
                                           "(its first step takes minutes); labelled as such in the table")
    p.add_argument("--child", help=argparse.SUPPRESS)
    a = p.parse_args()
    if a.child:
        print(json.dumps(run_one(a.child, a.steps, a.bits)))
        return
    methods = [("plain", a.steps), ("torchdkm", a.steps)]
    try:
        import coremltools  # noqa: F401

        if a.coreml_steps > 0:
            methods.append(("coremltools", a.coreml_steps))
    except ImportError:
        print("coremltools not installed: skipping its column", file=sys.stderr)
    res = {}
    if a.coreml_result:
        with open(a.coreml_result) as f:
            res["coremltools"] = dict(json.loads(f.read().strip().splitlines()[-1]), separate_run=True)
        methods = [(m, s) for m, s in methods if m != "coremltools"]
    for m, steps in methods:
        res[m] = _child(m, steps, a.bits)
        print(f"{m}: {json.dumps(res[m])}", file=sys.stderr)
    lines = [
        f"MiniLM-L6 + head, batch {BATCH}×{SEQ}, AdamW, every encoder Linear at {a.bits} bits; "
        f"{platform.machine()} {os.cpu_count()} CPUs, torch threads {res['plain']['threads']}",
        "",
        "| method | median step s | first step s | peak RSS GiB | steps |",
        "|---|---|---|---|---|",
    ]
    for m, r in sorted(res.items(), key=lambda kv: ["plain", "torchdkm", "coremltools"].index(kv[0])):
        lines.append(f"| {m}{' (separate run)' if r.get('separate_run') else ''} | {r['median_s']:.2f} | {r['first_s']:.1f} | {r['peak_rss_gib']:.2f} | {r['steps']} |")
    pl, td = res["plain"], res["torchdkm"]
    lines += ["", f"torchdkm / plain: step {td['median_s'] / pl['median_s']:.2f}x, "
                  f"RSS {td['peak_rss_gib'] / pl['peak_rss_gib']:.2f}x, "
                  f"first step - plain step = {td['first_s'] - pl['median_s']:.1f} s"]
    if "coremltools" in res:
        cm = res["coremltools"]
        lines.append(f"coremltools / torchdkm: step {cm['median_s'] / td['median_s']:.1f}x, "
                     f"RSS {cm['peak_rss_gib'] / td['peak_rss_gib']:.1f}x, first step {cm['first_s'] / td['first_s']:.0f}x")
    text = "\n".join(lines)
    print(text)
    if a.out:
        os.makedirs(os.path.dirname(a.out) or ".", exist_ok=True)
        with open(a.out, "w") as f:
            f.write(text + "\n")


if __name__ == "__main__":
    main()
