"""The torchdkm command line."""
from __future__ import annotations

import argparse
import sys


def _demo(args) -> int:
    from .demo import run_demo

    run_demo(out_dir=args.out, quick=args.quick)
    return 0


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="torchdkm", description="Train-time weight clustering (DKM) for PyTorch.",
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    sub = p.add_subparsers(dest="command", required=True)
    d = sub.add_parser("demo", help="compress a small model end to end and print the table",
                       formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    d.add_argument("--out", default="out/demo", help="output folder")
    d.add_argument("--quick", action="store_true", help="fewer epochs (a smoke run)")
    d.set_defaults(func=_demo)
    return p


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    return args.func(args)


if __name__ == "__main__":
    sys.exit(main())
