"""Shared command-line plumbing for the project's scripts.

Why: every CLI must accept Megatron-LLM's ``--snake_case`` flags and the
``--kebab-case`` spelling alike, and turn a :class:`UserError` into a
one-line message and a non-zero exit instead of a traceback.
"""

from __future__ import annotations

import argparse
import logging
import sys
import warnings
from typing import Callable

from megatron_ext.errors import UserError


class FlagParser(argparse.ArgumentParser):
    """ArgumentParser that registers ``--a_b`` and ``--a-b`` for every long flag."""

    def __init__(self, *args, **kwargs):
        kwargs.setdefault("formatter_class", argparse.RawDescriptionHelpFormatter)
        super().__init__(*args, **kwargs)

    def add_argument_group(self, *args, **kwargs):
        group = super().add_argument_group(*args, **kwargs)
        original = group.add_argument

        def add_argument(*flags, **options):
            return original(*_both_spellings(flags), **options)

        group.add_argument = add_argument
        return group

    def add_argument(self, *flags, **options):
        return super().add_argument(*_both_spellings(flags), **options)


def _both_spellings(flags):
    out = list(flags)
    for flag in flags:
        if flag.startswith("--"):
            body = flag[2:]
            for other in (body.replace("_", "-"), body.replace("-", "_")):
                if f"--{other}" not in out:
                    out.append(f"--{other}")
    return out


def setup_logging(verbose: bool = False) -> None:
    logging.basicConfig(
        level=logging.DEBUG if verbose else logging.INFO,
        format="%(asctime)s %(levelname)s %(message)s",
        datefmt="%H:%M:%S",
        stream=sys.stderr,
    )
    # megatron-core announces missing GPU packages at import; that is expected here
    logging.getLogger("megatron").setLevel(logging.WARNING)
    warnings.filterwarnings("ignore", message=".*Transformer Engine and Apex are not installed.*")


def run_cli(main: Callable[[], int]) -> None:
    """Run ``main`` and exit: 0 ok, 1 user error, 130 interrupted."""
    try:
        code = main()
    except UserError as err:
        print(f"error: {err}", file=sys.stderr)
        sys.exit(1)
    except KeyboardInterrupt:
        print("interrupted: nothing was written (temporary files removed)", file=sys.stderr)
        sys.exit(130)
    sys.exit(code or 0)
