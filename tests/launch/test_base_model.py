"""The launcher's base-model step (``launch/base_model.py``), in-process, nothing trained: a
plain SentencePiece base without a chat template gains ChatML's tokens (mean rows; the
export carries them and the template), and experiments share one content-keyed import."""

from __future__ import annotations

import json
import logging
import os
from pathlib import Path

import pytest
import torch

from tests.conftest import CHATML


@pytest.fixture(scope="module")
def plain_base(tmp_path_factory, sp_model) -> Path:
    """A Llama base as Llama 2 / Mistral ship it: tokenizer.model, no chat template, no
    ChatML tokens, untied output layer."""
    from tests.tools.conftest import make_hf_model

    model = make_hf_model(tmp_path_factory.mktemp("plain") / "llama", sp_model,
                          num_hidden_layers=1)
    assert not (model / "tokenizer_config.json").exists()
    assert not (model / "chat_template.jinja").exists()
    return model


def sft_config(name: str, base: Path, root: Path, **settings):
    from megatron_ext.launch.options import SFTConfig

    return SFTConfig(experiment=name, dataset_path=str(root / "data"), hf_model_id=str(base),
                     experiments_dir=str(root), progress=False, **settings)


@pytest.fixture(scope="module")
def launched(tmp_path_factory, plain_base) -> dict:
    """Experiments "a" then "b" on the same base and experiments folder; "b"'s log."""
    from megatron_ext.launch.base_model import prepare_base

    root = tmp_path_factory.mktemp("experiments")
    a = prepare_base(sft_config("a", plain_base, root))
    handler, logger = _Records(), logging.getLogger("megatron_ext")
    level = logger.level
    logger.addHandler(handler)
    logger.setLevel(logging.INFO)
    try:
        b = prepare_base(sft_config("b", plain_base, root))
    finally:
        logger.removeHandler(handler)
        logger.setLevel(level)
    return {"root": root, "a": a, "b": b, "b_log": "\n".join(handler.lines)}


class _Records(logging.Handler):
    def __init__(self):
        super().__init__(logging.INFO)
        self.lines: list[str] = []

    def emit(self, record):
        self.lines.append(record.getMessage())


def test_chatml_tokens_are_added_to_a_base_without_them(launched, plain_base):
    from safetensors.torch import load_file

    from megatron_ext.data.chat_formats import build_chat_format
    from megatron_ext.tokenizers import build_tokenizer

    base = launched["a"]
    assert base.extra_ids == ",".join(CHATML)
    tokenizer = build_tokenizer(base.tokenizer)
    build_chat_format("chatml", tokenizer).check()  # what used to ask for the flag
    hf_rows = json.loads((plain_base / "config.json").read_text())["vocab_size"]
    ids = [tokenizer.token_id(token) for token in CHATML]
    assert ids == [hf_rows, hf_rows + 1] and tokenizer.vocab_size == hf_rows + 2
    assert tokenizer.encode("<|im_start|>")[-1:] == ids[:1]  # one id, not pieces
    hf = load_file(str(plain_base / "model.safetensors"))
    ours = {}
    for shard in Path(base.imported).glob("*.safetensors"):
        ours.update(load_file(str(shard)))
    for name, hf_name in (("embedding.word_embeddings.weight", "model.embed_tokens.weight"),
                          ("output_layer.weight", "lm_head.weight")):
        rows, mean = ours[name], hf[hf_name].mean(dim=0)
        assert torch.equal(rows[:hf_rows], hf[hf_name])
        for new in ids:
            torch.testing.assert_close(rows[new], mean)


def test_the_export_carries_the_tokens_and_a_chatml_template(launched, tmp_path):
    import transformers

    from megatron_ext.checkpointing.hf_export import export_hf
    from megatron_ext.checkpointing.options import ExportConfig
    from megatron_ext.data.chat_formats import build_chat_format
    from megatron_ext.data.records import Message
    from megatron_ext.tokenizers import build_tokenizer

    base = launched["a"]
    export_hf(ExportConfig(load=base.imported, out=str(tmp_path / "hf"), progress=False))
    exported = transformers.AutoTokenizer.from_pretrained(tmp_path / "hf")
    ours = build_tokenizer(base.tokenizer)
    assert [exported.convert_tokens_to_ids(t) for t in CHATML] == \
        [ours.token_id(t) for t in CHATML]
    conversation = (Message("system", "Be brief."), Message("user", "What is 2 + 2?"),
                    Message("assistant", "It is 4."))
    fmt = build_chat_format("chatml", ours)
    tokens, _, _ = fmt.encode([fmt.render(conversation)])
    messages = [{"role": m.role, "content": m.content} for m in conversation]
    assert exported.apply_chat_template(messages, tokenize=True, return_dict=False) \
        == tokens.tolist()
    model = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "hf")
    assert model.get_input_embeddings().weight.shape[0] == ours.vocab_size


def test_experiments_share_one_import_and_the_trainer_reuses_it(launched, plain_base):
    from megatron_ext.launch.experiment import Experiment
    from megatron_ext.launch.recipe import trainer_config
    from megatron_ext.training.plan import resolve

    root, a, b = launched["root"], launched["a"], launched["b"]
    assert b.imported == a.imported and b.extra_ids == a.extra_ids
    cache = root / ".imported"
    assert Path(a.imported).parent == cache
    assert not (root / "a").exists() and not (root / "b").exists()  # not in an experiment
    assert f"reusing its import cached in {a.imported}" in launched["b_log"]
    assert "importing" not in launched["b_log"]
    # the trainer of "b" (the flags the launcher gives it) loads the same entry, importing
    # nothing: the same cache folder, the same added tokens
    exp = Experiment(str(root / "b"), {}, prefixes={"training": str(root / "data" / "t")},
                     train_iters=2)
    plan = resolve(trainer_config(sft_config("b", plain_base, root), exp, b), world_size=1)
    assert plan.config.checkpoint.load == a.imported
    entry = os.path.basename(a.imported)
    assert sorted(os.listdir(cache)) == [entry, entry + ".lock"]


def test_only_the_tokens_the_format_lacks_are_added(plain_base):
    from megatron_ext.launch.base_model import tokens_to_add

    assert tokens_to_add(str(plain_base), None, "alpaca") is None
    assert tokens_to_add(str(plain_base), "<x>", "alpaca") == "<x>"
    assert tokens_to_add(str(plain_base), "<|im_end|>", None) == "<|im_end|>,<|im_start|>"
