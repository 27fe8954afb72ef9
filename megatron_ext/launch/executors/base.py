"""The executor interface: what the recipe hands an executor, and what it gets back.

Why an interface: the recipe's steps (open the experiment, import the base model,
tokenize, fix the steps, train, evaluate, export) are the same wherever the training
runs; only the training's launch differs. An executor does four things: launch the
training (:meth:`Executor.run`), wait for it or detach (the :class:`Ran` it returns),
say how to follow it (:meth:`Executor.follow`), and resume after a preemption: the
trainer's flags make every launch resume from the experiment's latest checkpoint
(``--auto_resume``), and :attr:`Executor.resume` tells the user what brings that
launch about (rerunning the command; a requeued Slurm job by itself).

An executor is one file of this package defining ``EXECUTOR``, its class, whose
``name`` is the file's name (the ``--executor`` value).
"""

from __future__ import annotations

import importlib
import os
from abc import ABC, abstractmethod
from dataclasses import dataclass
from typing import TYPE_CHECKING, ClassVar

from megatron_ext.errors import ConfigError, UserError
from megatron_ext.launch.executors import executor_names

if TYPE_CHECKING:
    from megatron_ext.launch.experiment import Experiment
    from megatron_ext.launch.options import SFTConfig

# how a launch came back (Ran.state)
TRAINED = "trained"  # training reached its last step here: the recipe evaluates and exports
ENDED = "ended"  # the launch ran to its end, evaluation and export included where it got
# that far (a Slurm job followed with --wait): the experiment's record says how far
STOPPED = "stopped"  # stopped before the last step (a signal, --exit conditions)
SUBMITTED = "submitted"  # detached (or ended without completing): followed elsewhere


class TrainingFailed(UserError):
    """The trainer exited with an error (its log says why)."""


def refused(report: str, log: str) -> str:
    """What to tell the user when the trainer's ranks stopped on a user error whose message
    they wrote to ``report`` (``cli.ERROR_FILE``): that message, once; it is added to the
    launch's ``log`` too, and ``report`` removed."""
    with open(report, encoding="utf-8") as handle:
        message = handle.read().strip()
    os.remove(report)
    with open(log, "a", encoding="utf-8") as handle:
        handle.write(f"error: {message}\n")
    return f"the trainer stopped: {message}\n(its log: {log})"


@dataclass(frozen=True)
class Launch:
    """One launch of an experiment's training, as every executor gets it."""

    config: "SFTConfig"
    experiment: "Experiment"
    script: str  # the trainer (finetune.py)
    args: tuple[str, ...]  # its flags, the same for every launch (they resume)
    repo: str  # the repository: the run's working directory and PYTHONPATH
    # evaluates and exports the trained experiment (``sft.py --post_only``): for an
    # executor whose job does that itself, on the machine where the training ran
    post_command: tuple[str, ...]


@dataclass(frozen=True)
class Ran:
    """How a launch came back: ``state`` (one of the above) and what to tell the user."""

    state: str
    message: str = ""


class Executor(ABC):
    """Where the training runs (see the module's docstring)."""

    name: ClassVar[str]  # the --executor value: this executor's file name
    resume: ClassVar[str]  # how a stopped or preempted training resumes, said to the user
    # the launcher's settings (SFTConfig fields) that this executor alone reads: given to
    # another executor they would do nothing, and are refused (:meth:`unused_settings`)
    settings: ClassVar[tuple[str, ...]] = ()

    def unused_settings(self, config: "SFTConfig") -> dict[str, str]:
        """The settings of ``config`` that this launch does not read (the other executors'
        own), each with what would read it."""
        return {name: f"--executor {other}" for other in executor_names() if other != self.name
                for name in get_executor(other).settings if name not in self.settings}

    @abstractmethod
    def commands(self, launch: Launch) -> list[list[str]]:
        """The commands this launch runs, as ``--dry_run`` shows them."""

    @abstractmethod
    def run(self, launch: Launch) -> Ran:
        """Launch the training; wait for it (TRAINED, ENDED, STOPPED) or detach (SUBMITTED,
        the message saying how to follow it). A training that failed is a
        :class:`TrainingFailed` naming its log."""

    @abstractmethod
    def follow(self, launch: Launch, handle: str) -> str:
        """How to follow the launch ``handle`` (a log file, a job id) of ``launch``."""


def get_executor(name: str) -> Executor:
    """The executor called ``name`` (its file imported now)."""
    if name not in executor_names():
        raise ConfigError(f"--executor {name!r}: use one of {', '.join(executor_names())}")
    executor = importlib.import_module(f"megatron_ext.launch.executors.{name}").EXECUTOR()
    assert executor.name == name, f"executors/{name}.py's EXECUTOR is named {executor.name}"
    return executor
