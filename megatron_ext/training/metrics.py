"""Run metrics: one JSON object per logged iteration, and TensorBoard scalars.

Why both: ``metrics.jsonl`` is what scripts, plots and tests read (flushed
after every line, so a crash loses nothing logged), TensorBoard is what people
watch. Only rank 0 writes; other ranks get a writer that does nothing.
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
                 enabled: bool = True):
        self.enabled = enabled and (directory is not None or tensorboard_dir is not None)
        self._jsonl = None
        self._tb = None
        if not self.enabled:
            return
        target = directory or tensorboard_dir
        os.makedirs(target, exist_ok=True)
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

    def close(self) -> None:
        if self._jsonl is not None:
            self._jsonl.close()
            self._jsonl = None
        if self._tb is not None:
            self._tb.close()
            self._tb = None

