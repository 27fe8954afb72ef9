"""The experiment folder: what the experiment is, where it stands, what it produced.

Why a record of its own (``experiment.json``): rerunning the same command must
resume, not start over, and must train the same number of steps even if a
later tokenization would count records differently; a command that changed
what the experiment *is* (base model, data, format, schedule, adapters) must be
refused, naming the difference, rather than silently mixing two experiments.

``EXPERIMENTS_DIR/NAME/``::

    experiment.json   the identity, the tokenized data's key and prefixes, the steps,
                      the status (training | finished) and the results
    checkpoints/      the trainer's --save (with metrics.jsonl)
    tensorboard/      TensorBoard events
    logs/             one log per launch
    metrics.jsonl     the trainer's metrics (a link into checkpoints/)
    loss.png          train and validation loss per step, drawn at the end
    eval/             test-split evaluation (summary and per-record predictions) of the
                      finetuned model (test.json) and of the pretrained base (baseline.json,
                      once per experiment, unless --no_baseline)
    hf/               the exported Hugging Face model (adapters merged; --export merged|both)
    adapter/          with --peft: the adapters in the Hugging Face PEFT layout (--export
                      adapter|both)

Shared by the experiments of EXPERIMENTS_DIR (content-keyed caches, kept by
``--restart``): ``.tokenized/`` (the tokenized data) and ``.imported/`` (the imports
of Hugging Face and GGUF base models).
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from typing import Optional

from megatron_ext.errors import ConfigError, UserError
from megatron_ext.io import write_json

RECORD = "experiment.json"
FORMAT = 1


@dataclass
class Experiment:
    root: str
    identity: dict
    data_key: Optional[str] = None
    prefixes: dict = field(default_factory=dict)
    records: dict = field(default_factory=dict)
    train_iters: Optional[int] = None
    status: str = "new"  # new | training | finished
    results: dict = field(default_factory=dict)

    def path(self, *parts: str) -> str:
        return os.path.join(self.root, *parts)

    @property
    def checkpoints(self) -> str:
        return self.path("checkpoints")

    def latest_iteration(self) -> Optional[int]:
        """The iteration of the latest checkpoint (None: none yet); checkpoints without a
        readable tracker are refused rather than silently trained over."""
        from megatron_ext.checkpointing.tracker import TRACKER, latest_iteration

        if not os.path.isdir(self.checkpoints):
            return None
        iteration = latest_iteration(self.checkpoints)
        if iteration is None and any(name.startswith("iter_")
                                     for name in os.listdir(self.checkpoints)):
            raise UserError(f"{self.checkpoints} holds checkpoints but no readable {TRACKER}: "
                            "the experiment will not silently start over; repair the tracker "
                            "or --restart")
        return iteration

    def save(self) -> None:
        os.makedirs(self.root, exist_ok=True)
        write_json(self.path(RECORD), {
            "format": FORMAT, "identity": self.identity, "data_key": self.data_key,
            "prefixes": self.prefixes, "records": self.records, "train_iters": self.train_iters,
            "status": self.status, "results": self.results})


def _differences(old: dict, new: dict, keys: tuple[str, ...] = ()) -> list[str]:
    """Each setting that differs, by its flag and its effective values. Within a section
    (the adapters), a setting on one side only follows from a difference reported beside
    it (--peft given or not)."""
    found = []
    for key in sorted(set(old) | set(new)):
        if keys and (key not in old or key not in new):
            continue
        a, b = old.get(key), new.get(key)
        if isinstance(a, dict) and isinstance(b, dict):
            found += _differences(a, b, (*keys, key))
        elif a != b:
            found.append(f"{_flag((*keys, key))}: experiment {_shown(a)}, this command "
                         f"{_shown(b)}")
    return found


def _flag(keys: tuple[str, ...]) -> str:
    """The launcher's flag of the identity's setting at ``keys`` (``("peft", "peft_dim")``:
    ``--peft_dim``)."""
    from megatron_ext.cli import flag_name, type_hints
    from megatron_ext.launch.options import SFTConfig

    cls = SFTConfig
    try:
        for key in keys[:-1]:
            cls = type_hints(cls)[key]
        return flag_name(cls, keys[-1])
    except (KeyError, StopIteration, TypeError):  # a setting of another version
        return "--" + keys[-1]


def _shown(value) -> str:
    if value is None:
        return "not given"
    if isinstance(value, list):
        return " ".join(map(str, value))
    return repr(value)


def _resolved(identity: dict) -> dict:
    """A saved identity resolved as this version resolves a command's (a record written
    before kept ``lr: None`` for the default, relative paths, ...)."""
    from megatron_ext.launch.options import SFTConfig

    try:
        return SFTConfig.from_identity(identity, "saved").identity()
    except (TypeError, ValueError):  # settings of another version: compared as they are
        return identity


def open_experiment(root: str, identity: dict) -> Experiment:
    """The experiment in ``root`` (a new one when absent); refused when made by a different
    configuration."""
    record = os.path.join(root, RECORD)
    if not os.path.exists(record):
        if os.path.isdir(os.path.join(root, "checkpoints")) and os.listdir(
                os.path.join(root, "checkpoints")):
            raise ConfigError(f"{root} holds checkpoints but no {RECORD}: not an experiment of "
                              "this launcher; choose another --experiment or remove the folder")
        return Experiment(root, identity)
    try:
        with open(record, encoding="utf-8") as handle:
            saved = json.load(handle)
    except (OSError, ValueError) as exc:
        raise ConfigError(f"{record} is unreadable ({exc}); fix or remove it, or --restart")
    differences = _differences(_resolved(saved["identity"]), identity)
    if differences:
        raise ConfigError(
            f"experiment {os.path.basename(root)} ({root}) was made by a different "
            "configuration:\n  - " + "\n  - ".join(differences)
            + "\nrerun with the experiment's settings, choose another --experiment, or "
              "--restart to start it over")
    return Experiment(root, saved["identity"], saved.get("data_key"), saved.get("prefixes", {}),
                      saved.get("records", {}), saved.get("train_iters"),
                      saved.get("status", "training"), saved.get("results", {}))


def move_aside(root: str) -> Optional[str]:
    """``--restart``: the old folder renamed ``NAME.old-N`` (kept, never deleted)."""
    if not os.path.exists(root):
        return None
    number = 1
    while os.path.exists(f"{root}.old-{number}"):
        number += 1
    os.rename(root, f"{root}.old-{number}")
    return f"{root}.old-{number}"


def steps_for(samples: int, epochs: float, global_batch_size: int) -> int:
    """Optimizer steps for ``epochs`` passes over an epoch of ``samples`` (records, or the
    rows they pack into; at least one)."""
    import math

    return max(1, math.ceil(samples * epochs / global_batch_size))
