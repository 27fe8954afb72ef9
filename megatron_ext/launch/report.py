"""What a finished experiment tells its user: the summary, the loss curve, the folder's size.

Why here, apart from the steps: the summary is read by a person at the end of a long run
(and again each time the same command says the experiment is finished), so it gathers
what they look for in one place, from the experiment's own files: the pretrained base
and the finetuned model side by side on the test split (as ``scripts/demo.sh`` prints
them), the last train and validation losses, the time taken, where everything is, and
how to watch the curves. ``loss.png`` is drawn from ``metrics.jsonl`` with matplotlib
(imported only here, on the Agg backend: no display needed).
"""

from __future__ import annotations

import json
import logging
import math
import os
from typing import Optional

logger = logging.getLogger(__name__)

# (label, key of evaluate.py's summary, format) as scripts/demo.sh prints them
ROWS = (("answer loss", "answer_loss", "{:.4f}"), ("answer perplexity", "answer_perplexity",
                                                   "{:.2f}"),
        ("exact match", "exact_match", "{:.1%}"), ("token F1", "f1", "{:.1%}"))


def _records(metrics_path: str):
    """The records of ``metrics.jsonl``, the last of each (split, iteration) only (a
    resumed run logs the steps after its checkpoint again)."""
    found: dict[tuple[str, int], dict] = {}
    try:
        with open(metrics_path, encoding="utf-8") as handle:
            for line in handle:
                try:
                    record = json.loads(line)
                except ValueError:  # a line cut short by a crash
                    continue
                found[(record.get("split"), int(record["iteration"]))] = record
    except FileNotFoundError:
        pass
    return sorted(found.values(), key=lambda record: record["iteration"])


def read_losses(metrics_path: str) -> dict[str, list[tuple[int, float]]]:
    """(iteration, loss) of the train and the validation records of ``metrics.jsonl``."""
    found: dict[str, list[tuple[int, float]]] = {"train": [], "valid": []}
    for record in _records(metrics_path):
        split, loss = record.get("split"), record.get("loss")
        if split in found and isinstance(loss, (int, float)) and math.isfinite(loss):
            found[split].append((record["iteration"], float(loss)))
    return found


def train_seconds(metrics_path: str) -> float:
    """The training steps' time (their ``iter_time``s), restarts and evaluations aside."""
    return sum(record.get("iter_time", 0.0) for record in _records(metrics_path)
               if record.get("split") == "train")


def plot_losses(metrics_path: str, out: str) -> Optional[str]:
    """``out`` (a PNG): the train loss per step and the validation loss, from
    ``metrics.jsonl``; None when there is nothing to plot or matplotlib is missing."""
    losses = read_losses(metrics_path)
    if not losses["train"]:
        return None
    try:
        import matplotlib
    except ImportError:
        logger.warning("matplotlib is not installed: no %s (pip install matplotlib)", out)
        return None
    matplotlib.use("Agg")
    from matplotlib.figure import Figure

    from megatron_ext.io import atomic_write

    figure = Figure(figsize=(7, 4.2), dpi=100)
    axes = figure.add_subplot()
    for split, label, style in (("train", "train", "-"), ("valid", "validation", "o-")):
        if losses[split]:
            steps, values = zip(*losses[split])
            axes.plot(steps, values, style, label=label)
    from matplotlib.ticker import MaxNLocator

    axes.xaxis.set_major_locator(MaxNLocator(integer=True))  # steps, not 2.5
    axes.set_xlabel("step")
    axes.set_ylabel("loss")
    axes.set_title(os.path.basename(os.path.dirname(os.path.abspath(out))) or "loss")
    axes.grid(alpha=0.3)
    axes.legend()
    figure.tight_layout()
    with atomic_write(out, "wb", encoding=None) as handle:
        figure.savefig(handle, format="png")
    return out


def folder_size(path: str) -> int:
    """Bytes of the files under ``path`` (links not followed: a cache shared by reference
    is not counted)."""
    total = 0
    for root, _, files in os.walk(path):
        for name in files:
            try:
                total += os.lstat(os.path.join(root, name)).st_size
            except OSError:  # removed while walking
                pass
    return total


def human_size(size: float) -> str:
    for unit in ("B", "KB", "MB", "GB"):
        if size < 1024 or unit == "GB":
            return f"{size:.0f} {unit}" if unit == "B" else f"{size:.1f} {unit}"
        size /= 1024
    raise AssertionError


def duration(seconds: float) -> str:
    if seconds < 60:
        return f"{seconds:.1f} s"
    seconds = int(round(seconds))
    return f"{seconds // 3600}:{seconds // 60 % 60:02d}:{seconds % 60:02d}"


def comparison(baseline: Optional[dict], finetuned: dict) -> list[str]:
    """The test split's table: pretrained and finetuned side by side (finetuned alone
    without a baseline)."""
    columns = ([("pretrained", baseline)] if baseline else []) + [("finetuned", finetuned)]
    records = finetuned.get("records")
    title = "test split" + (f" ({records} records)" if records is not None else "")
    lines = [f"{title:<26}" + "".join(f"{name:>12}" for name, _ in columns)]
    for label, key, fmt in ROWS:
        cells = [fmt.format(values[key]) if isinstance(values.get(key), (int, float)) else "-"
                 for _, values in columns]
        lines.append(f"  {label:<24}" + "".join(f"{cell:>12}" for cell in cells))
    return lines


def adapter_loading(adapter: str) -> list[str]:
    """How to open the exported adapter with ``peft`` (its base is what its
    ``adapter_config.json`` records: a Hugging Face directory transformers opens)."""
    try:
        with open(os.path.join(adapter, "adapter_config.json"), encoding="utf-8") as handle:
            base = json.load(handle).get("base_model_name_or_path")
    except (OSError, ValueError):
        return []
    return [f"base: {base}",
            f"load: peft.AutoPeftModelForCausalLM.from_pretrained({adapter!r}) (the base "
            "comes with it; the tokenizer: transformers.AutoTokenizer.from_pretrained of the "
            "same folder)"]


def finished_text(root: str, results: dict, already: bool) -> str:
    """The end summary of the experiment in ``root`` from its recorded ``results``."""
    r = results
    lines = [f"experiment {os.path.basename(root)} is {'already ' if already else ''}"
             f"finished: {r.get('iteration')} steps ({root})"]
    if r.get("test"):
        lines += ["  " + line for line in comparison(r.get("baseline"), r["test"])]
    losses = []
    if r.get("train_loss") is not None:
        losses.append(f"train {r['train_loss']:.4f}")
    if r.get("valid_loss") is not None:
        losses.append(f"validation {r['valid_loss']:.4f}")
    if losses:
        lines.append(f"  final loss: {', '.join(losses)}")
    if r.get("seconds") is not None:
        lines.append(f"  time: {duration(r['seconds'])} from the first launch to the end"
                     + (f" (training {duration(r['train_seconds'])})"
                        if r.get("train_seconds") else ""))
    if r.get("hf"):
        lines.append(f"  Hugging Face model: {r['hf']}")
    if r.get("adapter"):
        lines.append(f"  PEFT adapter: {r['adapter']}")
        lines += ["    " + line for line in adapter_loading(r["adapter"])]
    if r.get("gguf"):
        name = os.path.basename(r["gguf"])
        lines += [f"  GGUF (llama.cpp, Ollama, LM Studio): {r['gguf']}",
                  f"    run: llama-cli -m {r['gguf']} -cnv; Ollama: 'FROM ./{name}' in a "
                  "Modelfile beside it"]
    if r.get("loss_png"):
        lines.append(f"  loss curve: {r['loss_png']}")
    if r.get("tensorboard"):
        lines.append(f"  TensorBoard: tensorboard --logdir {r['tensorboard']}")
    lines.append(f"  folder: {root} ({human_size(folder_size(root))})")
    if already:
        lines.append("  (--restart trains it again from the start)")
    return "\n".join(lines)
