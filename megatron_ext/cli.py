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

from megatron_ext.errors import ConfigError, UserError


class FlagParser(argparse.ArgumentParser):
    """ArgumentParser that accepts ``--a_b`` and ``--a-b`` for every long flag.

    Flags are declared (and shown in ``--help``) in Megatron's snake_case; a
    kebab-case spelling on the command line is rewritten before parsing.
    """

    def __init__(self, *args, **kwargs):
        kwargs.setdefault("formatter_class", argparse.RawDescriptionHelpFormatter)
        super().__init__(*args, **kwargs)

    def parse_known_args(self, args=None, namespace=None):
        args = sys.argv[1:] if args is None else list(args)
        return super().parse_known_args([self._canonical(a) for a in args], namespace)

    def _canonical(self, arg: str) -> str:
        if not arg.startswith("--") or arg in self._option_string_actions:
            return arg
        flag, sep, value = arg.partition("=")
        snake = flag[:2] + flag[2:].replace("-", "_")
        return snake + sep + value if snake in self._option_string_actions else arg


def setup_logging(verbose: bool = False) -> None:
    logging.basicConfig(
        level=logging.DEBUG if verbose else logging.INFO,
        format="%(asctime)s %(levelname)s %(message)s",
        datefmt="%H:%M:%S",
        stream=sys.stderr,
    )
    # megatron-core announces missing GPU packages at import; that is expected here
    logging.getLogger("megatron").setLevel(logging.WARNING)
    for message in (".*Transformer Engine and Apex are not installed.*",
                    "Apex is not installed.*",
                    # megatron-core 0.16's own calls into torch; nothing a user can change
                    "full scope is deprecated.*", "`load_state_dict` is deprecated.*",
                    "torch.distributed is disabled.*"):
        warnings.filterwarnings("ignore", message=message)


def run_cli(main: Callable[[], int]) -> None:
    """Run ``main`` and exit: 0 ok, 1 user error, 130 interrupted."""
    try:
        code = main()
    except UserError as err:
        print(f"error: {err}", file=sys.stderr)
        sys.exit(1)
    except KeyboardInterrupt:
        print("interrupted: unfinished outputs were removed", file=sys.stderr)
        sys.exit(130)
    sys.exit(code or 0)


UNITS = {"KB": 2**10, "MB": 2**20, "GB": 2**30, "TB": 2**40}


def parse_size(text: str) -> int:
    """``2GB``, ``500MB`` or a byte count, for ``--max_shard_size``."""
    text = text.strip().upper()
    for unit, factor in UNITS.items():
        if text.endswith(unit):
            try:
                return int(float(text[: -len(unit)]) * factor)
            except ValueError:
                break
    if text.isdigit():
        return int(text)
    raise ConfigError(f"--max_shard_size {text!r}: use a size like 2GB or 500MB")
