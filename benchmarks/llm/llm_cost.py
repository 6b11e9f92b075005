"""What DKM fine-tuning of the whole SmolLM2-135M costs against plain distillation fine-tuning of the same model.

Both run the same loop (benchmarks/llm/llm_dkm.py's, without the schedule): the uncompressed model as teacher (its
forward is part of every step), KL per token, AdamW, gradient clipping; the same trainable weights (every Linear
and the tied embedding/head; norms frozen, as in whole.py), the same random windows of PTB train. An optimizer step
takes ``--micro`` micro-batches of --batch × --seq tokens (gradient accumulation).

* ``plain``: the model as it is.
* ``dkm``: torchdkm.prepare with whole.py's 4-bit layout (DKMConfig(bits=4, group_size=16, channel_scale=True) on
  all 210 Linears and the tied embedding/head: 134.5 M clustered weights); DKM runs in every forward.
* ``dkm-accumulate``: the same, each optimizer step's micro-batches inside ``torchdkm.accumulate(model)``: DKM runs
  once per optimizer step however many micro-batches it takes (the gradients are the one-batch ones).

Each (mode, micro) runs in its own process (1 torch thread). Step time: median [quartiles] of the steps after the
first --warmup (PyTorch's allocator and kernel warm-up, torchdkm's k-means initialisation). Peak RSS: the process
during the measured steps (VmHWM reset after loading; it holds the teacher and the student), and that peak above
the RSS right after loading (the training's own memory). Ratios: DKM over plain at the same tokens per step.

    python benchmarks/llm/llm_cost.py --threads 1
    python benchmarks/llm/llm_cost.py --micro 1 --steps 2 --warmup 1 --allow-dirty   # a quick look
"""
from __future__ import annotations

import argparse
import contextlib
import copy
import json
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # benchmarks/: the shared harness (common.py)
import common  # noqa: E402
import lm_common as lm  # noqa: E402

import torchdkm  # noqa: E402
from torchdkm.layers import is_supported  # noqa: E402

MODES = ("plain", "dkm", "dkm-accumulate")
LAYOUT = torchdkm.DKMConfig(bits=4, group_size=16, channel_scale=True, min_numel=0)


def rss_mib() -> float:
    import re

    return int(re.search(r"VmRSS:\s+(\d+) kB", Path("/proc/self/status").read_text()).group(1)) / 1024


def child(mode: str, micro: int, a) -> dict:
    """One (mode, micro) run in this process: per-step seconds and memory."""
    common.setup_threads(a.threads)
    teacher, tok = lm.load_smollm2(torch.float32)
    model = copy.deepcopy(teacher)
    held = {id(m.weight) for m in model.modules() if is_supported(m)}
    for p in model.parameters():
        p.requires_grad_(id(p) in held)
    if mode != "plain":
        torchdkm.prepare(model, LAYOUT)
    ids_all = lm.ptb("train", tok)
    teacher.eval()
    model.train()
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=1e-5, weight_decay=0.0)
    gen = torch.Generator().manual_seed(0)
    loaded = rss_mib()
    lm.reset_peak_rss()
    times, cpu = [], []
    for _ in range(a.warmup + a.steps):
        t0, c0 = time.perf_counter(), time.process_time()
        with torchdkm.accumulate(model) if mode == "dkm-accumulate" else contextlib.nullcontext():
            for _ in range(micro):
                starts = torch.randint(0, ids_all.numel() - a.seq, (a.batch,), generator=gen)
                ids = torch.stack([ids_all[s:s + a.seq] for s in starts.tolist()])
                with torch.no_grad():
                    target = teacher(ids).logits
                (torchdkm.distillation_loss(model(ids).logits, target) / micro).backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)
        if mode != "plain":
            torchdkm.step(model)
        times.append(time.perf_counter() - t0)
        cpu.append(time.process_time() - c0)
        print(f"  {mode} ×{micro}: step {len(times)} {times[-1]:.1f} s", file=sys.stderr, flush=True)
    return {"mode": mode, "micro": micro, "times": times, "cpu_times": cpu, "loaded_mib": loaded,
            "peak_mib": lm.peak_rss_mib()}


def steady(times, warmup):
    kept = times[warmup:]
    q = statistics.quantiles(kept, n=4, method="inclusive") if len(kept) > 1 else [kept[0]] * 3
    return {"median": q[1], "q1": q[0], "q3": q[2], "n": len(kept)}


def markdown(res: dict) -> str:
    s = res["settings"]
    rows = []
    plain = {r["micro"]: r for r in res["runs"] if r["mode"] == "plain"}
    for r in res["runs"]:
        st, cs, ref = r["step"], r["cpu_step"], plain.get(r["micro"])
        tokens = r["micro"] * s["batch"] * s["seq"]
        ratio = "-" if r["mode"] == "plain" or ref is None else \
            f"{st['median'] / ref['step']['median']:.2f}× / {cs['median'] / ref['cpu_step']['median']:.2f}× / " \
            f"{r['peak_mib'] / ref['peak_mib']:.2f}×"
        rows.append([r["mode"], f"{r['micro']} × {s['batch']}×{s['seq']} = {tokens:,}",
                     f"{st['median']:.1f} [{st['q1']:.1f}–{st['q3']:.1f}]",
                     f"{cs['median']:.1f} [{cs['q1']:.1f}–{cs['q3']:.1f}]", f"{r['peak_mib'] / 1024:.2f}",
                     f"{(r['peak_mib'] - r['loaded_mib']) / 1024:.2f}", ratio])
    head = ["mode", "tokens per optimizer step (micro-batches × batch×seq)", "step s, median [quartiles]",
            "step CPU s", "peak RSS GiB", "peak above loaded GiB", "DKM / plain: step, step CPU, peak RSS"]
    return "\n".join([
        "# SmolLM2-135M: DKM fine-tuning against plain distillation fine-tuning, per optimizer step", "",
        common.provenance_md(res["provenance"]), "",
        "Same loop for every row: the uncompressed model as teacher (its forward counted), KL per token, AdamW, "
        "clipping; trainable: every Linear and the tied embedding/head (norms frozen). dkm: whole.py's 4-bit layout "
        "(g16 + channel scale on all 210 Linears and the tied embedding/head, 134.5 M clustered weights); "
        "dkm-accumulate: the micro-batches of a step inside torchdkm.accumulate (DKM once per optimizer step). "
        f"Step time: median [quartiles] of {s['steps']} steps after {s['warmup']} warm-up step(s), each row in its "
        "own process, 1 torch thread, on a 2-core CPU; step CPU s: the process's CPU time per step (the same "
        "statistic), which other processes on the machine disturb less than wall time. Peak RSS: the process during those steps (teacher and "
        "student held); above loaded: minus the RSS after loading.", "",
        common.markdown_table(head, rows)]) + "\n"


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--micro", default="1,8", help="micro-batches per optimizer step, comma-separated (default 1,8)")
    p.add_argument("--modes", default=",".join(MODES))
    p.add_argument("--batch", type=int, default=4)
    p.add_argument("--seq", type=int, default=128)
    p.add_argument("--steps", type=int, default=3)
    p.add_argument("--warmup", type=int, default=1)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--child", default=None, help=argparse.SUPPRESS)
    p.add_argument("--out", type=Path, default=None, help="results stem (default benchmarks/llm/results/llm_cost)")
    common.harness_args(p)
    a = p.parse_args(argv)
    if a.child:
        mode, micro = a.child.split(",")
        print(json.dumps(child(mode, int(micro), a)))
        return
    argv = list(sys.argv[1:] if argv is None else argv)
    common.setup_threads(a.threads)
    common.start(__file__, a, argv)
    out = common.output_path(a.out or common.results_dir(__file__) / "llm_cost", a.allow_dirty)
    modes = [m for m in a.modes.split(",") if m]
    bad = [m for m in modes if m not in MODES]
    if bad:
        p.error(f"--modes {bad}: known are {list(MODES)}")
    res = dict(settings=dict(batch=a.batch, seq=a.seq, steps=a.steps, warmup=a.warmup, threads=a.threads), runs=[])
    for micro in [int(m) for m in a.micro.split(",")]:
        for mode in modes:
            if mode == "dkm" and micro > 1 and "dkm-accumulate" in modes:
                continue  # DKM per micro-batch: micro × the DKM work of dkm-accumulate's one run
            if mode == "dkm-accumulate" and micro == 1:
                continue  # one micro-batch: the same as dkm
            cmd = [sys.executable, __file__, "--child", f"{mode},{micro}", "--batch", str(a.batch), "--seq",
                   str(a.seq), "--steps", str(a.steps), "--warmup", str(a.warmup), "--threads", str(a.threads)]
            got = subprocess.run(cmd, capture_output=True, text=True)
            if got.returncode != 0:
                raise SystemExit(f"{mode} ×{micro} failed:\n{got.stderr[-3000:]}")
            run = json.loads(got.stdout.strip().splitlines()[-1])
            run["step"] = steady(run["times"], a.warmup)
            run["cpu_step"] = steady(run["cpu_times"], a.warmup)
            res["runs"].append(run)
            print(f"{mode} ×{micro}: {run['step']['median']:.1f} s/step, peak {run['peak_mib']:.0f} MiB", flush=True)
            common.write_results(out, res, markdown)
    print(markdown(res))


if __name__ == "__main__":
    main()
