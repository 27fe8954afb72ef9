"""tools/generate.py and tools/evaluate.py on a converted checkpoint, against transformers."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from megatron_ext.data.chat_formats import build_chat_format
from megatron_ext.inference.prompts import PromptRecord, conversation_ids, prompt_ids
from megatron_ext.data.records import ASSISTANT, USER, Message
from megatron_ext.tokenizers import TokenizerConfig, build_tokenizer
from tests.conftest import CHATML, REPO
from tests.tools.conftest import make_hf_model
from tests.tools.test_hf_conversion import tool_main
from tests.runs import child_env, start_runs, tool_job

pytestmark = pytest.mark.slow
QUESTIONS = ["What is the capital of France?", "Name three colours.",
             "Write a haiku about autumn leaves falling slowly"]


@pytest.fixture(scope="module")
def converted(tmp_path_factory, sp_model):
    """A tiny random Llama (init std 0.2: clear argmax margins) converted with ChatML tokens."""
    root = tmp_path_factory.mktemp("gen")
    hf = make_hf_model(root / "hf", sp_model, initializer_range=0.2)
    tool_main("hf_to_megatron.py")(["--model_path", str(hf), "--out", str(root / "ckpt"),
                                    "--vocab_extra_ids_list", ",".join(CHATML),
                                    "--no_progress"])
    # the model's own ids plus the ChatML tokens, as imported
    tokenizer = build_tokenizer(TokenizerConfig("SentencePieceTokenizer", sp_model, CHATML,
                                                megatron_llm_specials=False))
    return {"hf": hf, "ckpt": root / "ckpt", "tokenizer": tokenizer, "root": root}


def launch(tool: str, *args: str) -> subprocess.Popen:
    """Start a tool's command line: its subprocess smoke test."""
    return subprocess.Popen([sys.executable, str(REPO / "tools" / tool), *args, "--no_progress"],
                            env=child_env(), cwd=REPO, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)


def finished(process: subprocess.Popen) -> str:
    """A launched tool's standard output, once it has succeeded."""
    stdout, stderr = process.communicate(timeout=300)
    assert process.returncode == 0, stderr[-4000:]
    return stdout


@pytest.fixture(scope="module")
def generations(tmp_path_factory, converted) -> dict:
    """Every generate.py run of this module, started together: at TP=1 the command line
    (its smoke test), beside the TP=2 one and then the other TP=1 ones in the session's
    run_many.py workers (the tool's main); and evaluate.py's command line (its smoke test)
    on the model's own answers, as soon as they are there. {name: output file, stdout,
    or the evaluation's process and files}."""
    root = tmp_path_factory.mktemp("generations")
    prompts = root / "prompts.jsonl"
    prompts.write_text("".join(json.dumps({"question": q}) + "\n" for q in QUESTIONS))
    chat = ["--load", str(converted["ckpt"]), "--input", str(prompts), "--greedy",
            "--max_new_tokens", "24", "--chat_format", "chatml", "--batch_size", "2"]
    cli = launch("generate.py", *chat, "--output", str(root / "chat1.jsonl"),
                 "--tensor_model_parallel_size", "1")
    tp2 = start_runs(2, [tool_job("chat2", "generate.py", *chat, "--output",
                                  str(root / "chat2.jsonl"), "--tensor_model_parallel_size",
                                  "2")], root / "tp2")
    serial = start_runs(1, [
        tool_job("answers", "generate.py", "--load", str(converted["ckpt"]), "--input",
                 str(prompts), "--greedy", "--max_new_tokens", "12", "--output",
                 str(root / "answers.jsonl")),
        tool_job("raw", "generate.py", "--load", str(converted["ckpt"]), "--raw", "--prompt",
                 "Once upon a time", "--greedy", "--max_new_tokens", "8"),
    ], root / "serial")
    assert serial.result("answers").returncode == 0
    # references equal to the model's own greedy answers (generate.py --max_new_tokens 12)
    answers = [json.loads(line)["generated_text"].strip()
               for line in (root / "answers.jsonl").read_text().splitlines()]
    test = root / "test.jsonl"
    test.write_text("".join(json.dumps({"question": q, "answer": a}) + "\n"
                            for q, a in zip(QUESTIONS, answers)))
    evaluation = launch("evaluate.py", "--load", str(converted["ckpt"]), "--input", str(test),
                        "--max_new_tokens", "12", "--summary_json", str(root / "summary.json"),
                        "--output", str(root / "rows.jsonl"))
    results = {**serial.wait(), **tp2.wait()}
    assert all(r.returncode == 0 for r in results.values()), {
        name: r.log[-2000:] for name, r in results.items()}
    finished(cli)
    return {1: root / "chat1.jsonl", 2: root / "chat2.jsonl", "raw": results["raw"].stdout,
            "answers": answers, "evaluation": (evaluation, root / "summary.json")}


def hf_greedy(converted, prompts: list[list[int]], new_tokens: int, stop: list[int]):
    import transformers

    model = transformers.AutoModelForCausalLM.from_pretrained(converted["hf"],
                                                              dtype=torch.float32).eval()
    vocab = model.config.vocab_size
    model.resize_token_embeddings(converted["tokenizer"].vocab_size)  # the ChatML rows
    from megatron_ext.checkpointing.unsharded import UnshardedReader

    reader = UnshardedReader(str(converted["ckpt"]))
    with torch.no_grad():  # the new rows as the converter initialised them
        model.get_input_embeddings().weight[vocab:] = reader.view(
            "embedding.word_embeddings.weight")[vocab:]
        model.get_output_embeddings().weight[vocab:] = reader.view("output_layer.weight")[vocab:]
    out = []
    for ids in prompts:
        generated = model.generate(torch.tensor([ids]), max_new_tokens=new_tokens,
                                   do_sample=False, eos_token_id=stop, pad_token_id=0)
        tokens = generated[0, len(ids):].tolist()
        out.append(tokens[:-1] if tokens and tokens[-1] in stop else tokens)
    return out, model


@pytest.mark.parametrize("nproc", [1, 2])
def test_greedy_generation_equals_transformers_generate(converted, generations, nproc):
    output = generations[nproc]
    rows = [json.loads(line) for line in output.read_text().splitlines()]
    tokenizer = converted["tokenizer"]
    fmt = build_chat_format("chatml", tokenizer)
    ids = [prompt_ids(fmt, tokenizer, PromptRecord("", q, (Message(USER, q),))) for q in QUESTIONS]
    stop = [tokenizer.token_id("<|im_end|>"), tokenizer.eos_id]
    want, _ = hf_greedy(converted, ids, 24, stop)
    assert [r["generated_ids"] for r in rows] == want
    assert [r["prompt"] for r in rows] == QUESTIONS
    assert any(len(set(w)) >= 5 for w in want)  # non-trivial continuations
    for row in rows:
        assert row["generated_text"] == tokenizer.decode(row["generated_ids"])


def test_raw_prompt_skips_the_chat_format(converted, generations):
    row = json.loads(generations["raw"].strip().splitlines()[-1])
    tokenizer = converted["tokenizer"]
    ids = [tokenizer.bos_id] + tokenizer.encode_segments(["Once upon a time"], [True])[0]
    want, _ = hf_greedy(converted, [ids], 8, [tokenizer.eos_id])
    assert row["generated_ids"] == want[0] and row["prompt_tokens"] == len(ids)


def test_evaluate_scores_loss_and_answers(converted, generations):
    """References equal to the model's own greedy answers: EM = F1 = 1, and the answer loss
    equals the one transformers computes for the same tokens."""
    answers = generations["answers"]
    evaluation, summary_file = generations["evaluation"]
    stdout = finished(evaluation)
    assert "exact match" in stdout and "answer perplexity" in stdout
    summary = json.loads(summary_file.read_text())
    assert summary["exact_match"] == 1.0 and summary["f1"] == 1.0
    # the same loss from transformers' logits
    tokenizer = converted["tokenizer"]
    fmt = build_chat_format("chatml", tokenizer)
    _, model = hf_greedy(converted, [], 1, [0])
    nll, count = 0.0, 0
    for q, a in zip(QUESTIONS, answers):
        ids, roles = conversation_ids(fmt, tokenizer, (Message(USER, q), Message(ASSISTANT, a)))
        with torch.no_grad():
            logits = model(torch.tensor([ids])).logits[0]
        losses = torch.nn.functional.cross_entropy(logits[:-1], torch.tensor(ids[1:]),
                                                   reduction="none")
        mask = torch.tensor(roles[1:]) == 2
        nll, count = nll + losses[mask].sum().item(), count + int(mask.sum())
    assert summary["answer_tokens"] == count
    assert summary["answer_loss"] == pytest.approx(nll / count, rel=1e-4)


def test_raw_prompts_follow_the_tokenizers_own_bos_convention(hf_tokenizer_dir):
    """--raw: the BOS only where the tokenizer itself adds one (Llama 3's post-processor),
    not for a tokenizer that defines a BOS but adds none (SmolLM2-like): the ids
    transformers gives with add_special_tokens=True."""
    import transformers

    from megatron_ext.tokenizers import HUGGINGFACE, TokenizerConfig, build_tokenizer
    from tests.conftest import REPO

    llama3 = REPO / ".assets" / "tokenizer-llama3_1" / "package" / "models"
    if not (llama3 / "tokenizer.json").is_file():
        pytest.fail(f"{llama3} is missing: run ./scripts/setup_env.sh")
    text = "Which three rivers meet at Passau?"
    for directory, adds in ((llama3, True), (Path(hf_tokenizer_dir), False)):
        ours = build_tokenizer(TokenizerConfig(HUGGINGFACE, str(directory)))
        theirs = transformers.AutoTokenizer.from_pretrained(str(directory))
        ids = prompt_ids(None, ours, PromptRecord("", text, ()))
        assert ours.adds_bos is adds
        assert ids == theirs(text)["input_ids"], directory
        assert (ids[0] == ours.bos_id) is adds
