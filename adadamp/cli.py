"""The ``adadamp`` command: ``train``, ``compare`` and ``simulate``.

Each subcommand lives in its own module, which provides
``add_arguments(parser)`` and ``run(args) -> int``; they are imported only when
used so that ``adadamp --help`` stays fast.
"""

from __future__ import annotations

import argparse
import importlib
import sys

from .exceptions import MissingExtraError

#: The top-level help text; the docstring above is reStructuredText, this is
#: what a terminal shows.
DESCRIPTION = (
    "Grow the batch size while training: run the experiments, or simulate a run's wall-clock time."
)

EPILOG = 'train and compare need the experiments extra: pip install "adadamp[experiments]"'

#: Subcommand -> (module, help text). Help texts are plain text.
SUBCOMMANDS = {
    "train": (
        "adadamp.experiments.train",
        "train one model on an embedded default and print the per-epoch table",
    ),
    "compare": (
        "adadamp.experiments.compare",
        "train one model under the Smith et al. schedules and plot them",
    ),
    "simulate": ("adadamp.simulate.cli", "estimate the wall-clock time of a run under a network"),
}


def build_parser(argv: list[str]) -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="adadamp", description=DESCRIPTION, epilog=EPILOG)
    sub = parser.add_subparsers(dest="command", required=True)
    for name, (module_name, help_text) in SUBCOMMANDS.items():
        p = sub.add_parser(name, help=help_text, description=help_text)
        # Only the chosen subcommand's module is imported.
        if name in argv:
            importlib.import_module(module_name).add_arguments(p)
    return parser


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    try:
        args = build_parser(argv).parse_args(argv)
    except MissingExtraError as err:
        # A subcommand of an optional extra: say what to install, no traceback.
        command = next((a for a in argv if a in SUBCOMMANDS), "")
        print(f"adadamp {command}: error: {err}", file=sys.stderr)
        return 1
    module_name = SUBCOMMANDS[args.command][0]
    return int(importlib.import_module(module_name).run(args) or 0)


if __name__ == "__main__":
    sys.exit(main())
