#!/usr/bin/env python3
"""GGUF export: time and peak memory of ``tools/megatron_to_gguf.py`` (f16, q8_0) against
our Hugging Face export of the same checkpoint.

The checkpoint is the real SmolLM2-135M-Instruct, imported here from its Q4_1 GGUF file
(``.assets/smollm2``, installed by ``scripts/setup_env.sh``) into an unsharded fp32
checkpoint. Each export runs in a fresh child process (libraries imported before the
clock), so that one measurement's memory cannot hide in another's: seconds, peak
resident memory (``VmHWM``) and the peak of anonymous memory above the baseline
(sampled every 20 ms: file pages the kernel can drop are not the exporter's cost), and
the size of what it wrote. The baseline is our Hugging Face export (safetensors, the
model's dtype): llama.cpp's own ``convert_hf_to_gguf.py`` is not on the package
registries (it ships with llama.cpp's sources), so it is not measured here.

The claim to check: the GGUF export streams (its peak memory is a few tensors, not the
model) and costs about what the Hugging Face export costs; q8_0 is about a quarter of
the f32 bytes. Ratios only: absolute figures depend on the machine.

  python bench/gguf_export.py                # ~1 minute on 2 cores
"""

from __future__ import annotations

import argparse
import glob
import json
import os
import shutil
import subprocess
import sys
import tempfile

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from hf_import import SMOLLM2_GLOB, measured, mib  # noqa: E402

KINDS = ("hf", "gguf-f16", "gguf-q8_0")


def _child(kind: str, load: str, out: str) -> None:
    """Run one export in this process and print its figures as JSON."""
    sys.path.insert(0, REPO)
    import torch  # noqa: F401 - before the clock (as the hf_import bench does)

    from megatron_ext.checkpointing.gguf_export import export_gguf
    from megatron_ext.checkpointing.hf_export import export_hf
    from megatron_ext.checkpointing.options import ExportConfig, GGUFExportConfig

    def work() -> None:
        if kind == "hf":
            export_hf(ExportConfig(load=load, out=out, progress=False))
        else:
            export_gguf(GGUFExportConfig(load=load, out=out, outtype=kind.split("-", 1)[1],
                                         progress=False))

    figures = measured(work)
    figures["bytes"] = (sum(os.path.getsize(p) for p in glob.glob(os.path.join(out, "*")))
                        if os.path.isdir(out) else os.path.getsize(out))
    print(json.dumps(figures))


def measure(kind: str, load: str, workdir: str) -> dict:
    out = os.path.join(workdir, "out-hf" if kind == "hf" else f"out-{kind}.gguf")
    env = dict(os.environ, OMP_NUM_THREADS=os.environ.get("OMP_NUM_THREADS", "2"),
               PYTHONPATH=REPO)
    result = subprocess.run([sys.executable, os.path.abspath(__file__), "--child", kind, load,
                             out], capture_output=True, text=True, env=env)
    if result.returncode != 0:
        raise SystemExit(f"the {kind} export failed:\n{result.stderr[-3000:]}")
    shutil.rmtree(out, ignore_errors=True) if os.path.isdir(out) else os.remove(out)
    return json.loads(result.stdout.strip().splitlines()[-1])


def main() -> int:
    if len(sys.argv) == 5 and sys.argv[1] == "--child":
        _child(*sys.argv[2:])
        return 0
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter,
                                     epilog=__doc__.split("\n\n", 1)[1])
    parser.add_argument("--repeat", type=int, default=2,
                        help="runs of each export, alternated; the fastest counts")
    args = parser.parse_args()
    found = sorted(glob.glob(SMOLLM2_GLOB, recursive=True))
    if not found:
        raise SystemExit("the SmolLM2 GGUF is missing from .assets/smollm2: run "
                         "./scripts/setup_env.sh")
    workdir = tempfile.mkdtemp(prefix="bench-gguf-export-")
    try:
        ckpt = os.path.join(workdir, "smollm2")
        print(f"importing {os.path.basename(found[0])} into {ckpt} ...", flush=True)
        subprocess.run([sys.executable, os.path.join(REPO, "tools", "hf_to_megatron.py"),
                        "--model_path", found[0], "--out", ckpt, "--no_progress"], check=True,
                       capture_output=True)
        rows: dict[str, dict] = {}
        for _ in range(args.repeat):
            for kind in KINDS:
                row = measure(kind, ckpt, workdir)
                if kind not in rows or row["seconds"] < rows[kind]["seconds"]:
                    rows[kind] = row
        print(f"\n== SmolLM2-135M-Instruct (fp32 checkpoint), fastest of {args.repeat}")
        print(f"   {'':12}{'seconds':>9}{'written':>12}{'peak RSS':>12}{'peak anon':>12}")
        for kind, row in rows.items():
            anon = row["peak_anon_kib"] - row["base_anon_kib"]
            print(f"   {kind:12}{row['seconds']:9.1f}{mib(row['bytes'], 'b'):>12}"
                  f"{mib(row['peak_rss_kib']):>12}{mib(anon):>12}")
        hf = rows["hf"]
        for kind in KINDS[1:]:
            row = rows[kind]
            print(f"   {kind} / hf: time {row['seconds'] / hf['seconds']:.2f}x, peak anonymous "
                  f"memory {(row['peak_anon_kib'] - row['base_anon_kib']) / max(1, hf['peak_anon_kib'] - hf['base_anon_kib']):.2f}x, "
                  f"bytes {row['bytes'] / hf['bytes']:.2f}x")
    finally:
        shutil.rmtree(workdir, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
