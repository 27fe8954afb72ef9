"""Run metrics: one JSON object per logged iteration, TensorBoard scalars, and W&B.

Why several: ``metrics.jsonl`` is what scripts, plots and tests read (flushed
after every line, so a crash loses nothing logged), TensorBoard and Weights &
Biases are what people watch (W&B only when asked for, ``wandb`` imported only
then). Only rank 0 writes; other ranks get a writer that does nothing.
"""

from __future__ import annotations

import json
import math
import os
from typing import Optional

from megatron_ext.io import atomic_write


class MetricsWriter:
    """Writes ``metrics.jsonl`` under ``directory`` and TensorBoard events under ``tensorboard_dir``."""

    def __init__(self, directory: Optional[str], tensorboard_dir: Optional[str] = None,
                 enabled: bool = True, wandb: Optional[dict] = None):
        self.enabled = enabled and (directory is not None or tensorboard_dir is not None)
        self._jsonl = None
        self._tb = None
        self._wandb = None
        if not self.enabled:
            return
        target = directory or tensorboard_dir
        os.makedirs(target, exist_ok=True)
        if wandb is not None:
            self._wandb = _start_wandb(target, **wandb)
        self.path = os.path.join(target, "metrics.jsonl")
        self._jsonl = open(self.path, "a", encoding="utf-8")
        if tensorboard_dir:
            try:
                from torch.utils.tensorboard import SummaryWriter
            except ImportError:  # tensorboard not installed: metrics.jsonl still has everything
                SummaryWriter = None
            if SummaryWriter is not None:
                self._tb = SummaryWriter(log_dir=tensorboard_dir)

    def truncate_after(self, iteration: int) -> None:
        """On resume: drop records logged after the checkpoint (they are re-run)."""
        if not self.enabled:
            return
        self._jsonl.close()
        kept = []
        with open(self.path, encoding="utf-8") as handle:
            for line in handle:
                try:
                    record = json.loads(line)
                except ValueError:  # a line cut short by the crash we are resuming from
                    break
                if record["iteration"] <= iteration:
                    kept.append(line if line.endswith("\n") else line + "\n")
        with atomic_write(self.path) as handle:
            handle.writelines(kept)
        self._jsonl = open(self.path, "a", encoding="utf-8")

    def write(self, iteration: int, values: dict, prefix: str = "train") -> None:
        if not self.enabled:
            return
        record = {"iteration": iteration, "split": prefix}
        for key, value in values.items():
            if isinstance(value, float) and not math.isfinite(value):
                value = str(value)
            record[key] = value
        self._jsonl.write(json.dumps(record) + "\n")
        self._jsonl.flush()
        if self._tb is not None:
            for key, value in values.items():
                if isinstance(value, (int, float)) and not isinstance(value, bool):
                    self._tb.add_scalar(f"{prefix}/{key}", value, iteration)
            self._tb.flush()
        if self._wandb is not None:  # the same scalars, under the same names
            self._wandb.log({f"{prefix}/{key}": value for key, value in values.items()
                             if isinstance(value, (int, float)) and not isinstance(value, bool)},
                            step=iteration)

    def close(self) -> None:
        if self._jsonl is not None:
            self._jsonl.close()
            self._jsonl = None
        if self._tb is not None:
            self._tb.close()
            self._tb = None
        if self._wandb is not None:
            self._wandb.finish()
            self._wandb = None


def _start_wandb(directory: str, project: str, name: Optional[str], config: dict):
    """A W&B run in ``directory``, continued on resume (its id is kept in a file there)."""
    import uuid

    from megatron_ext.errors import ConfigError

    try:
        import wandb
    except ImportError:
        raise ConfigError("--wandb_project needs the wandb package: pip install wandb (or drop "
                          "the flag; metrics.jsonl and TensorBoard have the same scalars)") from None
    id_file = os.path.join(directory, "wandb_run_id")
    if os.path.exists(id_file):
        with open(id_file, encoding="utf-8") as handle:
            run_id = handle.read().strip()
    else:
        run_id = uuid.uuid4().hex[:12]
        with atomic_write(id_file) as handle:
            handle.write(run_id + "\n")
    return wandb.init(project=project, name=name or os.path.basename(os.path.abspath(directory)),
                      id=run_id, resume="allow", dir=directory, config=config)

