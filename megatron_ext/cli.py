"""Shared command-line plumbing for the project's scripts.

Why: every CLI must accept Megatron-LLM's ``--snake_case`` flags and the
``--kebab-case`` spelling alike, derive its flags from the config dataclasses
it builds (one default, one help text, objects built by keyword), and turn a
:class:`UserError` into a one-line message and a non-zero exit instead of a
traceback; and show progress as a bar on a terminal but as plain log lines in a log file
(:class:`ProgressBar`). Floor 0: knows nothing of the project's configs, imports no torch.
"""

from __future__ import annotations

import argparse
import dataclasses
import functools
import logging
import os
import sys
import time
import types
import typing
import warnings
from dataclasses import MISSING, dataclass, field
from typing import Any, Callable, Iterator, Mapping, Optional, Sequence

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


# -- flags derived from config dataclasses -----------------------------------------------------
#
# Why: a default written once. A config dataclass declares each setting with its type, default
# and help (``option(...)``); the parser's flags are derived from those fields and the objects
# are built back by keyword, so reordering or adding a field cannot silently swap two flags.

FLAG = "flag"  # the key of a field's metadata that holds its :class:`Flag`


@dataclass(frozen=True)
class Flag:
    """How one dataclass field appears on the command line.

    Anything left unset is derived from the field: the flag ``--<field name>``,
    the type from the annotation (``Optional[X]`` takes X; ``tuple[X, ...]`` takes
    one or more values), a ``bool`` field is a switch (``--name`` when it defaults
    to False, ``--no_name`` when it defaults to True), and a field without a
    default is a required flag.
    """

    help: str = ""
    names: tuple[str, ...] = ()  # the spellings, first shown; default: ("--<field name>",)
    aliases: tuple[str, ...] = ()  # further spellings (e.g. Megatron-LM's longer names)
    # spellings that set a bool field to the opposite value (Megatron-LM's --untie_... for a
    # --tie_... field): one setting, the spellings of both projects
    negations: tuple[str, ...] = ()
    # spellings that each set the field to one value (TRL's ``--use_peft`` for ``--peft lora``):
    # (spelling, value) pairs
    presets: tuple[tuple[str, Any], ...] = ()
    choices: Optional[tuple] = None
    action: Optional[str] = None  # store_true | store_false; default from a bool's default
    nargs: Optional[str] = None  # default "+" for a tuple field
    metavar: Optional[str] = None
    group: Optional[str] = None  # help section; default: the one the dataclass is added to
    type: Optional[Callable[[str], Any]] = None  # default: from the annotation


def option(default: Any = MISSING, help: str = "", **flag: Any) -> Any:
    """A dataclass field together with its flag: ``lr: float = option(1e-5, "peak learning rate")``.

    ``flag`` takes :class:`Flag`'s other attributes (names, aliases, choices, ...).
    """
    return field(default=default, metadata={FLAG: Flag(help=help, **flag)})


def internal(default: Any = MISSING) -> Any:
    """A dataclass field that is not a flag (the CLI passes it to :func:`build_config`)."""
    return field(default=default, metadata={FLAG: None})


def _dest(f: dataclasses.Field) -> str:
    """The namespace attribute of a field's flag: named after the flag when the field
    has its own spelling (``--question_key`` -> ``question_key``), else the field's name."""
    flag = f.metadata.get(FLAG)
    if flag is not None and flag.names:
        return flag.names[0].lstrip("-").replace("-", "_")
    return f.name


def _unwrap_optional(hint: Any) -> Any:
    if typing.get_origin(hint) in (typing.Union, types.UnionType):
        args = [a for a in typing.get_args(hint) if a is not type(None)]
        if len(args) == 1:
            return args[0]
    return hint


@functools.cache
def type_hints(cls: type) -> dict[str, Any]:
    """``typing.get_type_hints(cls)``, worked out once per class: the configs' annotations
    are strings (``from __future__ import annotations``), each evaluated anew on every call,
    and a command line is parsed, built and checked through every config class several
    times (a third of ``parse_config``'s time). The same dict for every caller: read it,
    never change it."""
    return typing.get_type_hints(cls)


def _is_config(hint: Any) -> bool:
    return dataclasses.is_dataclass(hint) and isinstance(hint, type)


def _tuple_item(hint: Any) -> Optional[Any]:
    """X for ``tuple[X, ...]``, else None."""
    if typing.get_origin(hint) is tuple:
        args = typing.get_args(hint)
        if len(args) == 2 and args[1] is Ellipsis:
            return args[0]
    return None


def _flag_fields(cls: type) -> Iterator[tuple[dataclasses.Field, Any, Optional[Flag]]]:
    """(field, resolved type, Flag or None) of each field that the command line sets."""
    hints = type_hints(cls)
    for f in dataclasses.fields(cls):
        hint = _unwrap_optional(hints[f.name])
        if FLAG in f.metadata and f.metadata[FLAG] is None or _is_config(hint):
            continue  # an internal value, or a nested config built on its own
        yield f, hint, f.metadata.get(FLAG)


class ConfigParser(FlagParser):
    """A :class:`FlagParser` whose flags come from config dataclasses.

    ``add_config(cls)`` adds one flag per field (see :class:`Flag`), so that
    ``build_config(cls, namespace)`` builds the object back by keyword. Each flag's
    namespace attribute is the field's name (or its own flag's, see ``_dest``) and
    is unique across the configs of a parser.
    """

    def __init__(self, *args: Any, **kwargs: Any):
        super().__init__(*args, **kwargs)
        self._groups: dict[str, argparse._ArgumentGroup] = {}
        self._dests: dict[str, type] = {}

    def section(self, title: Optional[str]):
        """The help section ``title`` (created on first use; sections show in that order)."""
        if title is None:
            return self
        if title not in self._groups:
            self._groups[title] = self.add_argument_group(title)
        return self._groups[title]

    def add_config(self, cls: type, title: Optional[str] = None,
                   overrides: Optional[Mapping[str, Mapping[str, Any]]] = None) -> None:
        """One flag per field of ``cls``, in field order, in the help section ``title``.

        ``overrides`` changes, for this command only, a field's ``default``,
        ``required`` or any :class:`Flag` attribute: ``{"workers": {"default": 8}}``.
        """
        overrides = dict(overrides or {})
        for f, hint, flag in _flag_fields(cls):
            changes = dict(overrides.pop(f.name, {}))
            default = changes.pop("default", f.default if f.default is not MISSING else (
                f.default_factory() if f.default_factory is not MISSING else None))
            required = changes.pop("required", f.default is MISSING
                                   and f.default_factory is MISSING)
            flag = dataclasses.replace(flag or Flag(), **changes)
            dest = _dest(f)
            if dest in self._dests:
                raise TypeError(f"{cls.__name__}.{f.name}: {dest!r} is already the flag of a "
                                f"field of {self._dests[dest].__name__}")
            self._dests[dest] = cls
            kwargs: dict[str, Any] = {"dest": dest,
                                      "help": _help_text(flag, None if required else default)}
            names = flag.names
            if hint is bool:
                action = flag.action or ("store_false" if default else "store_true")
                kwargs.update(action=action, default=default)
                names = names or ((f"--no_{f.name}",) if action == "store_false"
                                  else (f"--{f.name}",))
            else:
                item = _tuple_item(hint)
                kind = flag.type or (item if item is not None else hint)
                if kind is not str:
                    kwargs["type"] = kind
                if item is not None or flag.nargs:
                    kwargs["nargs"] = flag.nargs or "+"
                kwargs.update(default=default, required=required)
                if flag.choices is not None:
                    kwargs["choices"] = flag.choices
                if flag.metavar:
                    kwargs["metavar"] = flag.metavar
            names = names or (f"--{f.name}",)
            section = self.section(flag.group or title)
            section.add_argument(*names, *flag.aliases, **kwargs)
            if flag.negations:
                if hint is not bool:
                    raise TypeError(f"{cls.__name__}.{f.name}: negations need a bool field")
                section.add_argument(*flag.negations, dest=dest, default=default,
                                     action="store_true" if kwargs["action"] == "store_false"
                                     else "store_false", help=f"the opposite of {names[0]}")
            for spelling, value in flag.presets:
                section.add_argument(spelling, dest=dest, default=default, action="store_const",
                                     const=value, help=f"the same as {names[0]} {value}")
        if overrides:
            raise TypeError(f"{cls.__name__} has no flag field {', '.join(overrides)}")

    def parse_config(self, cls: type, argv: Optional[Sequence[str]] = None) -> Any:
        """Parse ``argv`` and build ``cls`` (nested configs too) by keyword."""
        return build_config(cls, self.parse_args(argv))

    def to_argv(self, config: Any) -> list[str]:
        """The flags that this parser reads back as ``config``: :meth:`parse_config`'s inverse.

        Only the values that differ from this parser's defaults (overrides included) are
        written, field by field in field order, nested configs in place; each in its first
        long spelling (a switch as the flag whose action sets that value: ``--name``,
        ``--no_name`` or a negation). Internal fields are not flags: a caller passes them
        to :func:`build_config` as before. A value that no flag of this parser can give
        back (None where the default is not, a value outside the choices, an empty
        list) is a ``ValueError`` rather than a command that means something else.
        """
        actions: dict[str, list[argparse.Action]] = {}
        for action in self._actions:  # a field's own flag first, then its negations
            if action.option_strings:
                actions.setdefault(action.dest, []).append(action)
        argv: list[str] = []
        hints = type_hints(type(config))
        for f in dataclasses.fields(config):
            hint = _unwrap_optional(hints[f.name])
            if FLAG in f.metadata and f.metadata[FLAG] is None:
                continue
            value = getattr(config, f.name)
            if _is_config(hint):
                argv += self.to_argv(value)
            elif _dest(f) not in actions:
                raise TypeError(f"{type(config).__name__}.{f.name} has no flag in this parser")
            else:
                argv += _flag_words(f"{type(config).__name__}.{f.name}", value,
                                    actions[_dest(f)])
        return argv


def flag_name(cls: type, name: str) -> str:
    """How field ``name`` of config ``cls`` is spelled on the command line (its first long
    spelling), for messages about a value: ``--peft_dim``, ``--global_batch_size``."""
    f = next(f for f in dataclasses.fields(cls) if f.name == name)
    flag = f.metadata.get(FLAG)
    spellings = [n for n in (flag.names if flag is not None else ()) if n.startswith("--")]
    if spellings:
        return spellings[0]
    if f.default is True:
        return f"--no_{name}"
    return f"--{name}"


def _long(action: argparse.Action) -> str:
    return next((s for s in action.option_strings if s.startswith("--")),
                action.option_strings[0])


def _flag_words(where: str, value: Any, actions: list[argparse.Action]) -> list[str]:
    """The words that give ``value`` to the field whose flags are ``actions``."""
    main = actions[0]
    many = main.nargs is not None and main.nargs not in ("?", 0)
    if many and value is not None:
        value = tuple(value)
        default = None if main.default is None else tuple(main.default)
    else:
        default = main.default
    if value == default and not main.required:
        return []
    if isinstance(main, (argparse._StoreTrueAction, argparse._StoreFalseAction)):
        for action in actions:
            if action.const == value:
                return [_long(action)]
        raise ValueError(f"{where} = {value!r}: no flag of {_long(main)} sets it")
    if value is None:
        raise ValueError(f"{where} = None: {_long(main)} has no spelling for 'not given' "
                         f"(its default is {default!r})")
    items = value if many else (value,)
    if main.choices is not None and any(item not in main.choices for item in items):
        raise ValueError(f"{where} = {value!r}: not one of {_long(main)}'s choices")
    words = [str(item) for item in items]
    if not words:
        raise ValueError(f"{where}: {_long(main)} takes at least one value")
    if not many and words[0].startswith("-"):  # would read as a flag: --name=-1
        return [f"{_long(main)}={words[0]}"]
    return [_long(main), *words]


def _help_text(flag: Flag, default: Any) -> str:
    """The field's help, with its default when that says something and the help does not."""
    text = flag.help
    if "(default" in text or default is None or isinstance(default, bool) or default == ():
        return text
    return f"{text} (default: %(default)s)" if text else "default: %(default)s"


def build_config(cls: type, namespace: argparse.Namespace, **given: Any) -> Any:
    """``cls`` by keyword from parsed flags: each flag field from the attribute of its name,
    each nested config field built the same way, ``given`` values as they are.

    Internal fields not given keep their defaults; a flag field missing from the namespace
    is a programming error, reported instead of silently taking the default.
    """
    names = {f.name for f in dataclasses.fields(cls)}
    unknown = set(given) - names
    if unknown:
        raise TypeError(f"{cls.__name__} has no field {', '.join(sorted(unknown))}")
    hints = type_hints(cls)
    kwargs = dict(given)
    for f in dataclasses.fields(cls):
        if f.name in given:
            continue
        hint = _unwrap_optional(hints[f.name])
        if FLAG in f.metadata and f.metadata[FLAG] is None:
            continue
        if _is_config(hint):
            kwargs[f.name] = build_config(hint, namespace)
            continue
        if not hasattr(namespace, _dest(f)):
            raise TypeError(f"{cls.__name__}.{f.name} has no flag in this parser")
        value = getattr(namespace, _dest(f))
        if _tuple_item(hint) is not None and value is not None:
            value = tuple(value)
        kwargs[f.name] = value
    return cls(**kwargs)


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


# where the process that started this one wants a UserError's message, instead of this
# process's stderr: the launcher sets it for the trainer's ranks, so that a configuration
# error is said once (by the launcher), not by every rank and then torchrun's traceback
ERROR_FILE = "MEGATRON_EXT_ERROR_FILE"


def run_cli(main: Callable[[], int]) -> None:
    """Run ``main`` and exit: 0 ok, 1 user error, 130 interrupted. A user error is printed
    without a traceback, or written to the file named by ``$MEGATRON_EXT_ERROR_FILE``."""
    try:
        code = main()
    except UserError as err:
        report = os.environ.get(ERROR_FILE)
        if report:
            try:  # the first process to fail says it (the reader waits for them all to end)
                with open(report, "x", encoding="utf-8") as handle:
                    handle.write(f"{err}\n")
            except FileExistsError:
                pass
        else:
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


def on_terminal(stream=None) -> bool:
    """Whether ``stream`` (default: stderr, where logs and bars go) is a terminal."""
    stream = sys.stderr if stream is None else stream
    try:
        return bool(stream.isatty())
    except (AttributeError, ValueError):  # no isatty, or closed
        return False


def elapsed_eta(elapsed: float, done: float, total: Optional[float]) -> str:
    """``elapsed 01:05 | ETA 02:10``: the ETA at the rate so far (``?`` before any progress
    or without a total)."""
    from tqdm import tqdm

    text = f"elapsed {tqdm.format_interval(elapsed)}"
    if total is not None:
        left = max(0.0, total - done)
        eta = tqdm.format_interval(elapsed / done * left) if done > 0 else "?"
        text += f" | ETA {eta}"
    return text


class ProgressBar:
    """A tqdm bar on a terminal; elsewhere (a log file, a pipe, a Slurm job's output) a plain
    log line every ``every`` seconds and one at the end, never a ``\\r``.

    Why: tqdm redraws its bar with carriage returns, which in a log file make one endless
    line of copies. ``enabled=False`` (``--no_progress``, or a rank that does not log) shows
    nothing; ``every=None`` shows the bar on a terminal and nothing elsewhere (for a loop
    that logs lines of its own). Use as an iterator wrapper (:meth:`wrap`) or with
    :meth:`update`; :meth:`close` (or the ``with`` block) ends it.
    """

    def __init__(self, total: Optional[float] = None, desc: str = "", unit: str = "it",
                 enabled: bool = True, every: Optional[float] = 30.0, unit_scale: bool = False,
                 initial: int = 0, stream=None, log: Optional[logging.Logger] = None):
        from tqdm import tqdm

        self.terminal = enabled and on_terminal(stream)
        self.plain = enabled and not self.terminal and every is not None
        self.total, self.desc, self.unit, self.unit_scale = total, desc, unit, unit_scale
        self.every = every
        self.n = self.initial = initial
        self.postfix: dict = {}
        self.log = log or logging.getLogger(__name__)
        self.start = self.last_line = time.monotonic()
        self.logged_n = initial
        self.bar = tqdm(total=total, desc=desc, unit=unit, unit_scale=unit_scale,
                        initial=initial, dynamic_ncols=True, disable=not self.terminal,
                        file=stream)

    def __enter__(self) -> "ProgressBar":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def wrap(self, iterable):
        """``iterable``'s items, counted one unit each; closes the bar at the end."""
        try:
            for item in iterable:
                yield item
                self.update(1)
        finally:
            self.close()

    def set_postfix(self, **values) -> None:
        self.postfix = values
        self.bar.set_postfix(refresh=False, **values)

    def update(self, n: float = 1) -> None:
        self.n += n
        self.bar.update(n)
        if self.plain and time.monotonic() - self.last_line >= self.every:
            self.log_line()

    def _amount(self, value: float) -> str:
        from tqdm import tqdm

        return tqdm.format_sizeof(value) if self.unit_scale else f"{value:,}"

    def text(self) -> str:
        """The plain line: ``desc: 5/10 prompt (50%) | elapsed 00:12 | ETA 00:12 | k=v``."""
        elapsed = time.monotonic() - self.start
        done = self._amount(self.n)
        if self.total:
            done += f"/{self._amount(self.total)} {self.unit} ({100 * self.n / self.total:.0f}%)"
        else:
            done += f" {self.unit}"
        total = None if not self.total else self.total - self.initial
        parts = [f"{self.desc}: {done}" if self.desc else done,
                 elapsed_eta(elapsed, self.n - self.initial, total)]
        parts += [f"{key} {value}" for key, value in self.postfix.items()]
        return " | ".join(parts)

    def log_line(self) -> None:
        """A plain line now (when not on a terminal and enabled)."""
        if self.plain:
            self.log.info("%s", self.text())
            self.last_line, self.logged_n = time.monotonic(), self.n

    def close(self) -> None:
        if self.plain and self.n != self.logged_n:
            self.log_line()
        self.bar.close()
