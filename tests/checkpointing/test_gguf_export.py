"""GGUF export (tools/megatron_to_gguf.py): our import of our f32 export is our checkpoint bit
for bit for every family (Gemma's ``1 + w`` norms within one rounding of ``1 + w``), q8_0
within its quantisation error; transformers' GGUF loader computes the source model's logits
and its tokenizer our ids; llama.cpp itself (node-llama-cpp) tokenizes a chat prompt to our
ids and greedy-generates our tokens; bad input is refused with nothing written.

One module fixture imports and exports every family once; every test reads it."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
from pathlib import Path

import numpy as np
import pytest
import torch

from megatron_ext.checkpointing.gguf_export import export_gguf
from megatron_ext.checkpointing.hf_import import ImportConfig, import_hf
from megatron_ext.checkpointing.options import GGUFExportConfig
from megatron_ext.models.gguf_checkpoint import transformers_reads_gguf_once
from megatron_ext.checkpointing.unsharded import UnshardedReader
from megatron_ext.errors import UserError
from tests.conftest import CHATML, REPO
from tests.tools.conftest import make_hf_model, with_hf_tokenizer

NODE_DIR = REPO / ".assets" / "node-llama-cpp"
CHECK_SCRIPT = Path(__file__).with_name("llama_cpp_check.mjs")
CHAT = [{"role": "system", "content": "You are a helpful assistant."},
        {"role": "user", "content": "Which three rivers meet at Passau? Köln 日本 42"}]
GREEDY_TOKENS = 6


def _families(root: Path, sp_model: str, hf_tokenizer_dir: str) -> dict[str, Path]:
    """A tiny random HF model per family the GGUF import reads (Llama with a byte-level
    BPE tokenizer.json, the others with SentencePiece)."""
    from tests.models.families.test_falcon import falcon_with_sentencepiece
    from tests.models.families.test_gemma3 import make_gemma3

    llama = make_hf_model(root / "llama-sp", sp_model)
    return {
        "llama": with_hf_tokenizer(llama, hf_tokenizer_dir, root / "llama"),
        "llama-tied": make_hf_model(root / "llama-tied", sp_model, tie_word_embeddings=True),
        "llama3.1": make_hf_model(root / "llama3.1", sp_model, rope_theta=500000.0,
                                  rope_scaling={"rope_type": "llama3", "factor": 8.0,
                                                "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                                                "original_max_position_embeddings": 8192}),
        "mistral": make_hf_model(root / "mistral", sp_model, "mistral", sliding_window=None),
        "qwen2": make_hf_model(root / "qwen2", sp_model, "qwen2"),
        "qwen3": make_hf_model(root / "qwen3", sp_model, "qwen3"),
        # llama.cpp's fixed Gemma 3 layout: a global layer every 6, the head size as scalar
        "gemma3": make_gemma3(root / "gemma3", sp_model, sliding_window_pattern=6,
                              query_pre_attn_scalar=32, rope_scaling=None),
        "falcon": falcon_with_sentencepiece(root / "falcon", "7b", sp_model),
    }


FAMILIES = ("llama", "llama-tied", "llama3.1", "mistral", "qwen2", "qwen3", "gemma3", "falcon")
# transformers' GGUF loader (5.x) drops three things llama.cpp reads, so those families are
# checked by llama.cpp below: Qwen3's head size (qwen3.attention.key_length; it takes hidden /
# heads), Llama 3.1's RoPE scaling (it builds rope_type "default"), Gemma 3's attention scale
# (query_pre_attn_scalar falls back to 256 instead of the head size)
TRANSFORMERS_CHECKED = ("llama", "llama-tied", "mistral", "qwen2", "falcon")


@pytest.fixture(scope="module")
def exported(tmp_path_factory, sp_model, hf_tokenizer_dir) -> dict:
    """{family: {"hf": source dir, "ckpt": our checkpoint, "f32"/"q8_0"(/"f16"): GGUF,
    "back": our import of the f32 GGUF, "summary": the f32 export's summary}}."""
    root = tmp_path_factory.mktemp("gguf_export")
    out = {}
    for name, hf in _families(root, sp_model, hf_tokenizer_dir).items():
        ckpt = root / f"{name}-ckpt"
        import_hf(ImportConfig(str(hf), str(ckpt), vocab_extra_ids_list=",".join(CHATML),
                               progress=False))
        entry = {"hf": hf, "ckpt": ckpt}
        for outtype in ("f32", "q8_0") + (("f16",) if name in ("llama", "qwen3") else ()):
            summary = export_gguf(GGUFExportConfig(load=str(ckpt), out=str(root / f"{name}-"
                                                   f"{outtype}.gguf"), outtype=outtype,
                                                   chat_format="chatml", progress=False))
            entry[outtype] = Path(summary.out)
            entry.setdefault("summary", summary)
        entry["back"] = root / f"{name}-back"
        import_hf(ImportConfig(str(entry["f32"]), str(entry["back"]), progress=False))
        out[name] = entry
    return out


@pytest.mark.parametrize("family", FAMILIES)
def test_f32_export_imports_back_bit_for_bit(exported, family):
    entry = exported[family]
    ours, back = UnshardedReader(str(entry["ckpt"])), UnshardedReader(str(entry["back"]))
    assert sorted(ours.names()) == sorted(back.names())
    for name in ours.names():
        want, got = ours.view(name), back.view(name)
        if family == "gemma3" and name.endswith("layernorm.weight"):
            # llama.cpp stores 1 + w: w comes back within one float32 rounding of 1 + w
            assert torch.allclose(got, want, rtol=0, atol=float(np.finfo(np.float32).eps)), name
        else:
            assert torch.equal(got, want), name
    model, again = (json.loads((entry[k] / "run_config.json").read_text())["model"]
                    for k in ("ckpt", "back"))
    # llama.cpp stores Mistral as llama without a window: it comes back as that family
    skip = {"model_name"} if family == "mistral" else set()
    skip |= {"init_method_std"}  # not a property of the weights
    assert {k: v for k, v in model.items() if k not in skip} == \
        {k: v for k, v in again.items() if k not in skip}
    summary = entry["summary"]
    assert summary.chat_format == "chatml" and summary.eos_ids[-1] > 0


@pytest.mark.parametrize("family", FAMILIES)
def test_q8_0_export_is_within_its_quantisation_error(exported, family, tmp_path):
    from megatron_ext.models.gguf_checkpoint import GGUFModel

    f32, q8 = GGUFModel(str(exported[family]["f32"])), GGUFModel(str(exported[family]["q8_0"]))
    assert q8.quantization().get("Q8_0", 0) > 0
    for name in f32.weights.names():
        want, got = f32.weights.get(name), q8.weights.get(name)
        if want.ndim == 1:
            assert torch.equal(got, want), name  # norms and biases stay f32
            continue
        # q8_0: per block of 32, scale = max|x| / 127 (stored f16): error <= scale / 2 + rounding
        blocks = want.reshape(-1, 32).abs().amax(dim=1, keepdim=True)
        bound = (blocks / 127 * 0.5 + blocks * 2e-3).expand(-1, 32).reshape(want.shape)
        assert ((got - want).abs() <= bound + 1e-7).all(), name


@pytest.mark.parametrize("family", TRANSFORMERS_CHECKED)
def test_transformers_gguf_loader_gives_the_models_logits(exported, family):
    import transformers

    entry = exported[family]
    source = transformers.AutoModelForCausalLM.from_pretrained(entry["hf"], dtype=torch.float32)
    tokens = torch.randint(3, source.config.vocab_size, (1, 24), generator=torch.Generator()
                           .manual_seed(0))
    with torch.no_grad():
        want = source.eval()(tokens).logits
        for outtype, tolerance in (("f32", 1e-5), ("f16", 2e-2)):
            if outtype not in entry:
                continue
            path = entry[outtype]
            with transformers_reads_gguf_once():  # the same values, the file parsed once
                model = transformers.AutoModelForCausalLM.from_pretrained(
                    str(path.parent), gguf_file=path.name, dtype=torch.float32).eval()
            got = model(tokens).logits[..., :want.shape[-1]]
            scale = want.abs().max()
            assert (got - want).abs().max() <= tolerance * scale, (outtype, family)


def _hf_export(entry) -> Path:
    """Our checkpoint exported to Hugging Face (once)."""
    from megatron_ext.checkpointing.hf_export import ExportConfig, export_hf

    hf_dir = entry["ckpt"].parent / (entry["ckpt"].name + "-hf")
    if not hf_dir.exists():
        export_hf(ExportConfig(load=str(entry["ckpt"]), out=str(hf_dir), chat_format="chatml",
                               progress=False))
    return hf_dir


def _our_chat_ids(entry) -> list[int]:
    """Our ids of the chat prompt: the checkpoint's own tokenizer and our ChatML format (the
    template the exports carry), as tools/generate.py builds a prompt."""
    from megatron_ext.checkpointing.run_config import tokenizer_config_from_run
    from megatron_ext.checkpointing.sources import read_run_config
    from megatron_ext.data.chat_formats import build_chat_format
    from megatron_ext.data.records import Message
    from megatron_ext.inference.prompts import PromptRecord, prompt_ids
    from megatron_ext.tokenizers import build_tokenizer

    load = str(entry["ckpt"])
    tokenizer = build_tokenizer(tokenizer_config_from_run(load, read_run_config(load)))
    conversation = tuple(Message(m["role"], m["content"]) for m in CHAT)
    return prompt_ids(build_chat_format("chatml", tokenizer), tokenizer,
                      PromptRecord("test", CHAT, conversation))


@pytest.mark.parametrize("family", FAMILIES)
def test_transformers_gguf_tokenizer_gives_our_chat_ids(exported, family):
    import transformers

    entry = exported[family]
    path = entry["f32"]
    with transformers_reads_gguf_once():
        theirs = transformers.AutoTokenizer.from_pretrained(str(path.parent),
                                                            gguf_file=path.name)
    text = theirs.apply_chat_template(CHAT, add_generation_prompt=True, tokenize=False)
    ours = _our_chat_ids(entry)
    assert theirs(text, add_special_tokens=False)["input_ids"] == ours


def _node_llama_cpp() -> Path:
    if not (NODE_DIR / "node_modules" / "node-llama-cpp").is_dir():
        if shutil.which("npm") is None:
            pytest.skip("npm is unreachable: llama.cpp (node-llama-cpp) cannot be installed")
        pytest.fail(f"node-llama-cpp is missing from {NODE_DIR}: run ./scripts/setup_env.sh")
    return NODE_DIR


def run_llama_cpp(jobs: list[dict], directory: Path) -> dict:
    """llama.cpp itself on GGUF files, in one node process: for each job ``{key, path, ids,
    tokens}``, {key: {"tokenized": its ids of the detokenized ``ids`` (special tokens parsed),
    "generated": its greedy continuation of ``ids``}}."""
    node_dir = _node_llama_cpp()
    request = directory / "llama_cpp_jobs.json"
    request.write_text(json.dumps(jobs))
    script = node_dir / CHECK_SCRIPT.name
    shutil.copy(CHECK_SCRIPT, script)  # node resolves node-llama-cpp from the script's folder
    done = subprocess.run(["node", str(script), str(request)], capture_output=True, text=True,
                          timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    return {job["key"]: job for job in json.loads(done.stdout.strip().splitlines()[-1])}


@pytest.fixture(scope="module")
def llama_cpp(exported, tmp_path_factory) -> dict:
    """llama.cpp's ids of each family's chat prompt (our rendering of it) and its greedy
    tokens from them, for every f32 and f16 file."""
    jobs = []
    for family in FAMILIES:
        ids = _our_chat_ids(exported[family])
        for outtype in ("f32", "f16"):
            if outtype in exported[family]:
                jobs.append({"key": f"{family}/{outtype}", "path": str(exported[family][outtype]),
                             "ids": ids, "tokens": GREEDY_TOKENS})
    return run_llama_cpp(jobs, tmp_path_factory.mktemp("llama_cpp"))


def _transformers_reference(family: str, entry: dict) -> tuple[Path, dict]:
    """Our model as transformers runs it: our HF export (bit-exact with our checkpoint), or
    for Qwen2, whose tiny SentencePiece tokenizer has no Hugging Face Qwen2 form (the export
    refuses it), transformers' GGUF loader on the f32 file (our logits: see above)."""
    if family == "qwen2":
        return entry["f32"].parent, {"gguf_file": entry["f32"].name}
    return _hf_export(entry), {}


def _greedy(hf_dir: Path, kwargs: dict, ids: list[int], n: int) -> list[int]:
    import transformers

    with transformers_reads_gguf_once():  # (a GGUF file's: the same values, parsed once)
        model = transformers.AutoModelForCausalLM.from_pretrained(hf_dir, dtype=torch.float32,
                                                                  **kwargs).eval()
    out = model.generate(torch.tensor([ids]), max_new_tokens=n, do_sample=False,
                         eos_token_id=None, pad_token_id=0)
    return out[0, len(ids):].tolist()


@pytest.mark.parametrize("family", FAMILIES)
def test_llama_cpp_tokenizes_and_generates_as_we_do(exported, llama_cpp, family):
    entry = exported[family]
    ids = _our_chat_ids(entry)
    want = _greedy(*_transformers_reference(family, entry), ids, GREEDY_TOKENS)
    for outtype in ("f32", "f16"):
        result = llama_cpp.get(f"{family}/{outtype}")
        if result is None:
            continue
        assert result["tokenized"] == ids, outtype
        if outtype == "f32":
            assert result["generated"] == want, outtype
        else:  # f16 rounding may flip a near tie late: the first tokens agree
            assert result["generated"][:2] == want[:2], outtype


# ---------------------------------------------------------------- bad input
def test_existing_output_needs_force_and_a_failed_export_leaves_nothing(exported, tmp_path,
                                                                        monkeypatch):
    import megatron_ext.checkpointing.gguf_export as module

    ckpt = exported["llama-tied"]["ckpt"]
    out = tmp_path / "model.gguf"
    out.write_bytes(b"old")
    with pytest.raises(UserError, match="--force"):
        export_gguf(GGUFExportConfig(load=str(ckpt), out=str(out), progress=False))
    calls = []
    real = module.stored_tensor

    def failing(*args, **kwargs):  # the fourth tensor fails, after the header is written
        calls.append(1)
        if len(calls) > 3:
            raise RuntimeError("disk full")
        return real(*args, **kwargs)

    monkeypatch.setattr(module, "stored_tensor", failing)
    with pytest.raises(RuntimeError, match="disk full"):
        export_gguf(GGUFExportConfig(load=str(ckpt), out=str(out), overwrite=True,
                                     progress=False))
    assert out.read_bytes() == b"old"
    assert os.listdir(tmp_path) == ["model.gguf"]  # no temporary left


def test_bad_type_family_and_missing_checkpoint_are_refused(exported, tmp_path):
    from megatron_ext.checkpointing.gguf_export import check_out
    from megatron_ext.models.gguf_checkpoint import export_layout

    with pytest.raises(UserError, match="outtype"):
        export_gguf(GGUFExportConfig(load=str(exported["llama"]["ckpt"]),
                                     out=str(tmp_path / "a.gguf"), outtype="q4_k"))
    with pytest.raises(UserError, match="GGUF export supports"):
        export_layout("gpt_bigcode")
    with pytest.raises(UserError, match=r"\.gguf"):
        check_out(str(tmp_path / "model.bin"), False)
    with pytest.raises(UserError, match="does not exist"):
        export_gguf(GGUFExportConfig(load=str(tmp_path / "missing"),
                                     out=str(tmp_path / "b.gguf")))
    assert not list(tmp_path.iterdir())


def test_cli_summary_says_how_to_run_it(exported, tmp_path, capsys):
    from tools.megatron_to_gguf import main

    out = tmp_path / "tied.gguf"
    assert main(["--load", str(exported["llama-tied"]["ckpt"]), "--out", str(out),
                 "--outtype", "q8_0", "--no_progress"]) == 0
    printed = capsys.readouterr().out
    assert f"llama-cli -m {out}" in printed and "FROM ./tied.gguf" in printed
    assert "q8_0" in printed and out.is_file()


def test_a_megatron_llm_legacy_checkpoint_exports_the_same_file(exported, tmp_path):
    """Another checkpoint form: the same weights as Megatron-LLM's per-rank files (TP=2 x
    PP=2, no tokenizer: --vocab_file) export to the same tensors and metadata."""
    from gguf import GGUFReader

    from megatron_ext.checkpointing.legacy import write_legacy_checkpoint

    entry = exported["llama"]  # (Megatron-LLM has neither a tied Llama nor Llama 3.1 RoPE)
    ours = UnshardedReader(str(entry["ckpt"]))
    state = {name: ours.view(name).clone() for name in ours.names()}
    model = json.loads((entry["ckpt"] / "run_config.json").read_text())["model"]
    padded = state["embedding.word_embeddings.weight"].shape[0]
    write_legacy_checkpoint(str(tmp_path / "legacy"), state, model, 2, 2, 7, padded,
                            extra_args={"vocab_extra_ids_list": ",".join(CHATML)})
    export_gguf(GGUFExportConfig(load=str(tmp_path / "legacy"), out=str(tmp_path / "llama-f32.gguf"),
                                 outtype="f32", chat_format="chatml", progress=False,
                                 vocab_file=str(entry["ckpt"] / "tokenizer")))
    want, got = GGUFReader(str(entry["f32"])), GGUFReader(str(tmp_path / "llama-f32.gguf"))
    assert [t.name for t in got.tensors] == [t.name for t in want.tensors]
    for a, b in zip(want.tensors, got.tensors):
        assert np.array_equal(a.data, b.data), a.name
    assert {k: v.contents() for k, v in got.fields.items() if not k.startswith("GGUF.")} == \
        {k: v.contents() for k, v in want.fields.items() if not k.startswith("GGUF.")}
