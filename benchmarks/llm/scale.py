"""DKM training at scale on one machine: step time and peak memory of LLaMA-shaped models from 135 M to 0.5 B
parameters, DKM (3 bits, groups of 16 output rows, per-row scale) against plain training of the same model.

Models: ``transformers.LlamaConfig`` with random weights (seed 0, nothing downloaded), built directly in bf16:

* ``135m``: SmolLM2-135M's shape (hidden 576, 30 layers, 9 heads / 3 kv heads, MLP 1536, vocab 49152, tied);
* ``360m``: SmolLM2-360M's shape (hidden 960, 32 layers, 15 / 5 heads, MLP 2560, vocab 49152, tied);
* ``0.5b``: Qwen2.5-0.5B's shape as a LLaMA (hidden 896, 24 layers, 14 / 2 heads, MLP 4864, vocab 151936, tied;
  no q/k/v biases).

Modes, each in a fresh process (its peak RSS is its own):

* ``plain``: next-token cross-entropy on random token ids, AdamW (lr 1e-5), bf16 parameters, gradients and
  optimizer state;
* ``dkm``: the same after ``torchdkm.prepare(model, DKMConfig(bits=3, group_size=16, channel_scale=True,
  min_numel=0), rules={"lm_head": None, "model.embed_tokens": None})`` - every Linear of the decoder; k-means init
  (``torchdkm.initialize``, timed apart) before the first step, ``torchdkm.step`` after each;
* ``dkm_all``: also the tied embedding/head (clustered once per step, read by both);
* ``dkm+pack``, ``dkm_all+pack``: the same with :class:`BF16Saved` saved-tensor hooks (float32 tensors saved for
  backward that are exact bf16 values kept as bf16; lossless, same losses).

Per run: ``--warmup`` untimed steps then ``--steps`` timed ones (step time = the median; the first steps of a CPU
process are slower, see DESIGN.md), one batch of ``--batch`` × ``--seq`` random ids (seed 0) used for every step and
mode. Memory: the process's peak RSS (the kernel's VmHWM, equal to getrusage's ru_maxrss that the parent also reads
with wait4) from start to the last timed step - model building and k-means init included - and the RSS after each
phase (model built, prepared and initialized, after the steps). glibc's malloc runs with its defaults, as a user's
process does (so RSS also holds freed heap memory; MALLOC_MMAP_THRESHOLD_=65536 would make RSS follow live
allocations but made DKM steps ~4× slower here, from mmap and page faults per temporary). Clustering share (DKM modes): after the timed steps,
one pass runs each DKM layer's forward (``module.weight`` in train mode) and backward alone, layer after layer, with
a unit upstream gradient; its time over the median step time is the share of a step spent in DKM itself.

    python benchmarks/llm/scale.py --threads 1 --models 135m,0.5b --skip 135m:dkm_all --wait-free 120 \
        --out benchmarks/llm/results/scale.md
    python benchmarks/llm/scale.py --threads 1 --models 135m --modes plain,dkm --warmup 1 --steps 1 --allow-dirty \\
        --out benchmarks/llm/results/scale.md     # a quick check (written under benchmarks/scratch/)
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

GIB = 1 << 30
MODELS = {  # LlamaConfig fields; all with tied embeddings
    "135m": dict(hidden_size=576, num_hidden_layers=30, num_attention_heads=9, num_key_value_heads=3,
                 intermediate_size=1536, vocab_size=49152, label="SmolLM2-135M shape"),
    "360m": dict(hidden_size=960, num_hidden_layers=32, num_attention_heads=15, num_key_value_heads=5,
                 intermediate_size=2560, vocab_size=49152, label="SmolLM2-360M shape"),
    "0.5b": dict(hidden_size=896, num_hidden_layers=24, num_attention_heads=14, num_key_value_heads=2,
                 intermediate_size=4864, vocab_size=151936, label="Qwen2.5-0.5B shape (no qkv bias)"),
}
MODES = ("plain", "dkm", "dkm_all", "dkm+pack", "dkm_all+pack")
SKIP_EMBEDDING = {"lm_head": None, "model.embed_tokens": None}


def _status_kib(field: str) -> int:
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) for line in f if line.startswith(field + ":"))


def _rss_gib() -> float:
    return _status_kib("VmRSS") / (1 << 20)


def _peak_gib() -> float:
    return _status_kib("VmHWM") / (1 << 20)


def build_model(name: str):
    """A LLaMA of MODELS[name]'s shape, random weights (seed 0), made directly in bf16 (no fp32 copy on the way)."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    spec = {k: v for k, v in MODELS[name].items() if k != "label"}
    cfg = LlamaConfig(**spec, tie_word_embeddings=True, max_position_embeddings=2048, use_cache=False,
                      attention_bias=False, mlp_bias=False)
    torch.manual_seed(0)
    old = torch.get_default_dtype()
    torch.set_default_dtype(torch.bfloat16)
    try:
        model = LlamaForCausalLM(cfg)
    finally:
        torch.set_default_dtype(old)
    assert model.lm_head.weight is model.model.embed_tokens.weight
    return model


def count_params(model) -> dict:
    """Parameters (tied once), of which in the decoder's Linears, and in the embedding/head."""
    from torch import nn

    total = sum(p.numel() for p in model.parameters())  # parameters() yields a tied tensor once
    linears = sum(m.weight.numel() for n, m in model.named_modules()
                  if isinstance(m, nn.Linear) and n.startswith("model.layers."))
    return {"params": total, "decoder_linear_params": linears, "embedding_params": model.model.embed_tokens.weight.numel()}


class BF16Saved:
    """Saved-tensor hooks (``torch.autograd.graph.saved_tensors_hooks``) that keep a float32 tensor saved for
    backward as bf16 when that is lossless - it is the float32 copy of a bf16 tensor, as DKM's float32 compute
    makes of every bf16 weight (the weight itself, and its absolute value for the per-row max scale) - and
    float32 otherwise. Lossless: backward sees the same values, the training is bit for bit the same. A tensor
    saved by several ops is packed once (by identity, while it lives). The idea of eDKM's weight uniquification (a
    16-bit weight has at most 2^16 values, so what is derived from it needs no 32-bit copy), applied to the O(N)
    tensors that torchdkm's lean backward still keeps."""

    MIN_NUMEL = 1 << 16

    def __init__(self):
        import weakref

        self._weakref = weakref.ref
        self._seen = {}  # id(tensor) -> (weakref to it, packed)
        self.packed_bytes = self.kept_bytes = 0

    def pack(self, t):
        import torch

        if t.dtype != torch.float32 or t.numel() < self.MIN_NUMEL or t.is_sparse:
            return t
        hit = self._seen.get(id(t))
        if hit is not None and hit[0]() is t:
            return hit[1]
        b = t.to(torch.bfloat16)
        if not torch.equal(b.to(torch.float32), t):
            self.kept_bytes += t.numel() * 4
            return t
        self.packed_bytes += t.numel() * 4
        packed = ("bf16", b)
        self._seen = {k: v for k, v in self._seen.items() if v[0]() is not None}
        self._seen[id(t)] = (self._weakref(t), packed)
        return packed

    @staticmethod
    def unpack(p):
        import torch

        return p[1].to(torch.float32) if isinstance(p, tuple) else p


def run_child(a) -> dict:
    """One model in one mode, in this process: build, (prepare + init), warm-up and timed steps, clustering pass."""
    import torch
    from torch import nn

    import torchdkm
    from torchdkm.parametrization import dkm_parametrization

    torch.set_num_threads(a.threads)
    try:  # on a shared machine the kernel's OOM killer takes this benchmark first, never a neighbour's job
        with open("/proc/self/oom_score_adj", "w") as f:
            f.write("1000")
    except OSError:
        pass
    out = {"loadavg_1min_before": os.getloadavg()[0], "model": a.model, "mode": a.mode, "label": MODELS[a.model]["label"], "batch": a.batch, "seq": a.seq}
    t0 = time.perf_counter()
    model = build_model(a.model)
    out.update(count_params(model))
    out["build_s"] = time.perf_counter() - t0
    out["rss_model_gib"] = _rss_gib()
    if a.mode != "plain":
        cfg = torchdkm.DKMConfig(bits=3, group_size=16, channel_scale=True, min_numel=0, chunk_rows=a.chunk_rows,
                                 save_attention=a.save_attention)
        out["config"] = repr(cfg)
        torchdkm.prepare(model, cfg, rules=None if a.mode.startswith("dkm_all") else SKIP_EMBEDDING)
        t0 = time.perf_counter()
        torchdkm.initialize(model)
        out["init_s"] = time.perf_counter() - t0
        out["dkm_layers"] = sum(1 for _ in torchdkm.parametrization.dkm_layers(model))
        out["dkm_params"] = sum(p.original.numel() for p in
                                {id(m.parametrizations.weight): m.parametrizations.weight for m in model.modules()
                                 if dkm_parametrization(m) is not None}.values())
        out["rss_prepared_gib"] = _rss_gib()
    model.train()
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=1e-5, weight_decay=0.0)
    ids = torch.randint(0, model.config.vocab_size, (a.batch, a.seq), generator=torch.Generator().manual_seed(0))
    hooks = BF16Saved() if a.mode.endswith("+pack") else None
    times, losses = [], []
    for step in range(a.warmup + a.steps):
        t0 = time.perf_counter()
        if hooks is None:
            loss = model(input_ids=ids, labels=ids).loss
        else:
            with torch.autograd.graph.saved_tensors_hooks(hooks.pack, hooks.unpack):
                loss = model(input_ids=ids, labels=ids).loss
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        if a.mode != "plain":
            torchdkm.step(model)
        dt = time.perf_counter() - t0
        losses.append(float(loss.detach()))
        del loss
        if step >= a.warmup:
            times.append(dt)
        print(f"  {a.model} {a.mode} step {step + 1}/{a.warmup + a.steps}: {dt:.1f} s, loss {losses[-1]:.3f}, "
              f"RSS {_rss_gib():.2f} GiB, peak {_peak_gib():.2f} GiB", file=sys.stderr, flush=True)
    if hooks is not None:
        n = a.warmup + a.steps
        out.update(saved_packed_gib_per_step=hooks.packed_bytes / n / GIB, saved_kept_gib_per_step=hooks.kept_bytes / n / GIB)
    out.update(step_s=statistics.median(times), step_times_s=times, losses=losses, peak_rss_gib=_peak_gib(),
               rss_after_steps_gib=_rss_gib())
    if a.mode != "plain":  # DKM alone: each layer's forward + backward, one layer at a time
        mods = {}
        for m in model.modules():
            p = dkm_parametrization(m)
            if p is not None and id(p) not in mods:
                mods[id(p)] = m
        t0 = time.perf_counter()
        for m in mods.values():
            w = m.weight
            w.backward(torch.ones_like(w))
            del w
        out["cluster_s"] = time.perf_counter() - t0
        out["cluster_share"] = out["cluster_s"] / out["step_s"]
        opt.zero_grad(set_to_none=True)
    return out


def estimate_gib(model: str, mode: str) -> float:
    """Peak RSS a run is expected to need (from this benchmark's 135 M rows and 0.5 B plain row: ~10.4 bytes per
    parameter for plain bf16 AdamW training; ~18 more per clustered weight for DKM before d4349fd, which stopped
    holding a float32 copy of the weight and |w| for backward: ~10 since, 12 assumed), to refuse runs that cannot
    fit."""
    spec = MODELS[model]
    h, n, v, f = spec["hidden_size"], spec["num_hidden_layers"], spec["vocab_size"], spec["intermediate_size"]
    kv = h // spec["num_attention_heads"] * spec["num_key_value_heads"]
    linears = n * (2 * h * h + 2 * h * kv + 3 * h * f)
    clustered = 0 if mode == "plain" else linears + (v * h if mode.startswith("dkm_all") else 0)
    return (10.4 * (linears + v * h) + 12 * clustered) / GIB + 0.3


def available_gib() -> float:
    with open("/proc/meminfo") as f:
        return next(int(line.split()[1]) for line in f if line.startswith("MemAvailable:")) / (1 << 20)


def fmt_gib(x: float) -> str:
    return f"{x:.2f}"


def render(rows, run) -> str:
    plain = {r["model"]: r for r in rows if r["mode"] == "plain" and "step_s" in r}
    head = ["model", "parameters (decoder Linears / embedding)", "mode", "step s, median [min–max]", "× plain step",
            "DKM share of step", "k-means init s", "peak RSS GiB", "× plain peak", "RSS: model → prepared → after steps GiB"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for r in rows:
        if "error" in r or "skipped" in r:
            why = f"failed: {r['error']}" if "error" in r else f"not run: {r['skipped']}"
            lines.append(f"| {MODELS[r['model']]['label']} | | {r['mode']} | {why} | | | | | | |")
            continue
        p = plain.get(r["model"])
        ts = r["step_times_s"]
        mode = {"plain": "plain", "dkm": "DKM, decoder Linears", "dkm_all": "DKM, + tied embedding/head"}[
            r["mode"].split("+")[0]] + (", saved float32 as bf16" if r["mode"].endswith("+pack") else "")
        cells = [f"{r['label']}", f"{r['params'] / 1e6:.1f} M ({r['decoder_linear_params'] / 1e6:.1f} M / "
                 f"{r['embedding_params'] / 1e6:.1f} M)", mode,
                 f"{r['step_s']:.2f} [{min(ts):.2f}–{max(ts):.2f}]",
                 f"{r['step_s'] / p['step_s']:.2f}" if p else "",
                 f"{100 * r['cluster_share']:.0f} %" if "cluster_share" in r else "",
                 f"{r['init_s']:.1f}" if "init_s" in r else "",
                 fmt_gib(r["peak_rss_gib"]), f"{r['peak_rss_gib'] / p['peak_rss_gib']:.2f}" if p else "",
                 " → ".join(fmt_gib(r[k]) for k in ("rss_model_gib", "rss_prepared_gib", "rss_after_steps_gib") if k in r)]
        lines.append("| " + " | ".join(cells) + " |")
    growth = []
    for mode in ("plain", "dkm", "dkm_all"):
        got = sorted((r for r in rows if r["mode"] == mode and "step_s" in r), key=lambda r: r["params"])
        if len(got) >= 2:
            lo, hi = got[0], got[-1]
            per = (hi["peak_rss_gib"] - lo["peak_rss_gib"]) * GIB / (hi["params"] - lo["params"])
            growth.append(f"{mode}: {lo['peak_rss_gib']:.2f} → {hi['peak_rss_gib']:.2f} GiB from {lo['params'] / 1e6:.0f} M "
                          f"to {hi['params'] / 1e6:.0f} M parameters ({per:.1f} bytes per added parameter, "
                          f"step {lo['step_s']:.1f} → {hi['step_s']:.1f} s)")
    if growth:
        lines += ["", "Growth of peak RSS and step time: " + "; ".join(growth) + "."]
    return "\n".join(lines)


def main(argv=None):
    sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))
    import common  # the shared harness (benchmarks/common.py)

    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--models", default=",".join(MODELS), help=f"of {', '.join(MODELS)}")
    p.add_argument("--modes", default="plain,dkm,dkm_all", help=f"of {', '.join(MODES)}")
    p.add_argument("--skip", default="", help="model:mode pairs not to run, e.g. 135m:dkm_all")
    p.add_argument("--batch", type=int, default=1)
    p.add_argument("--seq", type=int, default=128)
    p.add_argument("--warmup", type=int, default=1)
    p.add_argument("--steps", type=int, default=2)
    p.add_argument("--threads", type=int, default=1, help="torch threads per process")
    p.add_argument("--chunk-rows", type=int, default=None, help="DKMConfig.chunk_rows (default: automatic)")
    p.add_argument("--save-attention", action="store_true", help="DKMConfig.save_attention")
    p.add_argument("--wait-free", type=float, default=0.0,
                   help="seconds to wait for enough free memory (MemAvailable over the run's estimate + 1 GiB) before "
                        "giving a run up as not run")
    p.add_argument("--out", type=Path, default=None, help="the .md (the .json goes beside it)")
    p.add_argument("--child", nargs=2, metavar=("MODEL", "MODE"), help=argparse.SUPPRESS)
    common.harness_args(p)
    a = p.parse_args(argv)
    if a.child:
        a.model, a.mode = a.child
        print(json.dumps(run_child(a)))
        return None
    common.setup_threads(a.threads)
    run = common.start(__file__, a, argv)
    models, modes = a.models.split(","), a.modes.split(",")
    for m in models:
        if m not in MODELS:
            raise SystemExit(f"--models: unknown {m!r}; give some of {', '.join(MODELS)}")
    for m in modes:
        if m not in MODES:
            raise SystemExit(f"--modes: unknown {m!r}; give some of {', '.join(MODES)}")
    rows = []
    for model in models:
        for mode in modes:
            if f"{model}:{mode}" in a.skip.split(","):
                continue
            cmd = [sys.executable, os.path.abspath(__file__), "--child", model, mode, "--threads", str(a.threads),
                   "--batch", str(a.batch), "--seq", str(a.seq), "--warmup", str(a.warmup), "--steps", str(a.steps)]
            if a.chunk_rows:
                cmd += ["--chunk-rows", str(a.chunk_rows)]
            if a.save_attention:
                cmd.append("--save-attention")
            need, deadline = estimate_gib(model, mode), time.time() + a.wait_free
            while available_gib() < need + 1 and time.time() < deadline:
                time.sleep(10)
            if available_gib() < need + 1:  # the machine is shared: never push a neighbour's job into the OOM killer
                rows.append({"model": model, "mode": mode, "skipped": f"needs ~{need:.1f} GiB, {available_gib():.1f} "
                                                                       f"GiB were available on the shared machine"})
                print(f"{model} {mode}: {rows[-1]['skipped']}", file=sys.stderr, flush=True)
                continue
            print(f"{model} {mode} (expected peak ~{need:.1f} GiB) ...", file=sys.stderr, flush=True)
            t0 = time.perf_counter()
            with open(os.devnull, "rb") as devnull:
                proc = subprocess.Popen(cmd, stdin=devnull, stdout=subprocess.PIPE, text=True)
                stdout = proc.stdout.read()
                _, status, usage = os.wait4(proc.pid, 0)
                proc.returncode = os.waitstatus_to_exitcode(status)
            if proc.returncode != 0:
                rows.append({"model": model, "mode": mode, "error": f"exit {proc.returncode}"})
                print(f"  failed: exit {proc.returncode}", file=sys.stderr)
                continue
            row = json.loads(stdout.strip().splitlines()[-1])
            row["wall_s"] = time.perf_counter() - t0
            row["loadavg_1min_after"] = os.getloadavg()[0]  # other jobs on the machine slow every step
            row["ru_maxrss_gib"] = usage.ru_maxrss / (1 << 20)  # KiB on Linux: the child's lifetime peak
            rows.append(row)
            print(f"  {row['step_s']:.2f} s/step, peak RSS {row['peak_rss_gib']:.2f} GiB "
                  f"(lifetime {row['ru_maxrss_gib']:.2f}), {row['wall_s']:.0f} s", file=sys.stderr, flush=True)
    table = render(rows, run)
    text = "\n".join([f"# DKM at scale on one machine: {a.batch}×{a.seq} tokens per step, "
                      f"{a.threads} torch thread(s)", "", table, "", common.provenance_md(run), ""])
    print(text)
    if a.out is not None:
        a.out.parent.mkdir(parents=True, exist_ok=True)
        common.write_text_atomic(a.out, text)
        common.write_json(a.out.with_suffix(".json"), {"rows": rows, "models": MODELS})
    return rows


if __name__ == "__main__":
    main()
