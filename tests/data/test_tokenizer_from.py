"""``--tokenizer_from MODEL``: the preprocessor takes the tokenizer the trainer uses with a
Hugging Face directory, a GGUF file or a checkpoint of ours, so the data passes the
trainer's tokenizer check and holds the ids of that model's import."""

from __future__ import annotations

import contextlib
import io
import json
from pathlib import Path

import pytest

from instruct.preprocess_instruct_data import main
from megatron_ext.errors import ConfigError
from tests.conftest import CHATML, qa_records, write_jsonl

EXTRA = ",".join(CHATML)


def preprocess(tmp_path: Path, name: str, *flags: str) -> tuple[Path, bytes]:
    source = tmp_path / "records.jsonl"
    if not source.exists():
        write_jsonl(source, qa_records(12))
    prefix = tmp_path / name
    with contextlib.redirect_stdout(io.StringIO()):
        assert main(["--input", str(source), "--output_prefix", str(prefix), "--workers", "1",
                     "--no_progress", *flags]) == 0
    return prefix, Path(f"{prefix}-text.bin").read_bytes()


def model_of(kind: str, tmp_path: Path, sp_model: str, hf_tokenizer_dir: str) -> Path:
    from tests.tools.conftest import make_hf_model, with_hf_tokenizer

    if kind == "gguf":
        from tests.checkpointing.gguf_files import write_gguf

        return write_gguf(tmp_path / "model.gguf", "llama-tied",
                          Path(hf_tokenizer_dir) / "tokenizer.json")[0]
    model = make_hf_model(tmp_path / "model", sp_model, num_hidden_layers=1)
    if kind == "tokenizer.json":
        return with_hf_tokenizer(model, hf_tokenizer_dir, tmp_path / "model-bpe")
    return model


@pytest.mark.parametrize("kind", ["tokenizer.model", "tokenizer.json", "gguf"])
def test_tokenizer_from_a_model_gives_the_ids_of_its_import(tmp_path, sp_model,
                                                            hf_tokenizer_dir, kind):
    from megatron_ext.checkpointing.hf_import import ImportConfig, import_hf
    from megatron_ext.checkpointing.run_config import load_run_config, tokenizer_config_from_run
    from megatron_ext.data.instruction_dataset import InstructionDataset
    from megatron_ext.tokenizers import build_tokenizer

    model = model_of(kind, tmp_path, sp_model, hf_tokenizer_dir)
    prefix, ids = preprocess(tmp_path, "from_model", "--tokenizer_from", str(model),
                             "--vocab_extra_ids_list", EXTRA)
    # what the trainer uses with that model: the tokenizer of its import
    imported = tmp_path / "imported"
    import_hf(ImportConfig(model_path=str(model), out=str(imported), vocab_extra_ids_list=EXTRA,
                           progress=False))
    run_config = load_run_config(str(imported))
    trainer = build_tokenizer(tokenizer_config_from_run(str(imported), run_config))
    InstructionDataset(str(prefix)).check_tokenizer(trainer.identity())  # the trainer's check
    assert json.loads(Path(f"{prefix}-meta.json").read_text())["tokenizer"] == \
        trainer.identity() == run_config["tokenizer_identity"]
    # the same ids as the flags a user had to find for it
    tok = run_config["tokenizer"]
    explicit = ["--tokenizer_type", tok["tokenizer_type"], "--vocab_file",
                str(imported / tok["vocab_file"]), "--vocab_extra_ids_list", EXTRA]
    if kind == "tokenizer.model":
        explicit.append("--no_megatron_llm_specials")
    assert preprocess(tmp_path, "explicit", *explicit)[1] == ids
    # and a checkpoint of ours gives the tokenizer it was made with
    assert preprocess(tmp_path, "from_checkpoint", "--tokenizer_from", str(imported))[1] == ids


def test_tokenizer_from_refuses_the_flags_it_replaces(tmp_path, sp_model):
    from tests.tools.conftest import make_hf_model

    model = make_hf_model(tmp_path / "model", sp_model, num_hidden_layers=1)
    with pytest.raises(ConfigError, match="leave out --vocab_file, --no_megatron_llm_specials"):
        preprocess(tmp_path, "x", "--tokenizer_from", str(model), "--vocab_file", sp_model,
                   "--no_megatron_llm_specials")
    with pytest.raises(ConfigError, match="give the tokenizer: --tokenizer_from MODEL"):
        preprocess(tmp_path, "x")
    with pytest.raises(ConfigError, match="neither a Hugging Face model directory"):
        preprocess(tmp_path, "x", "--tokenizer_from", str(tmp_path / "records.jsonl"))


def test_the_type_of_a_tokenizer_file_is_read_from_what_is_there(tmp_path):
    """A checkpoint that records no usable type (Megatron-LLM's legacy files say
    SentencePiece whatever was given) takes it from the --vocab_file given: unambiguous
    files and directories only."""
    from megatron_ext.tokenizers import HUGGINGFACE, SENTENCEPIECE, tokenizer_type_of_file

    for name in ("json", "sp", "both", "none"):
        (tmp_path / name).mkdir()
    (tmp_path / "json" / "tokenizer.json").write_text("{}")
    (tmp_path / "sp" / "tokenizer.model").write_bytes(b"")
    for name in ("tokenizer.json", "tokenizer.model"):
        (tmp_path / "both" / name).write_text("")
    assert tokenizer_type_of_file(str(tmp_path / "json")) == HUGGINGFACE
    assert tokenizer_type_of_file(str(tmp_path / "json" / "tokenizer.json")) == HUGGINGFACE
    assert tokenizer_type_of_file(str(tmp_path / "sp")) == SENTENCEPIECE
    assert tokenizer_type_of_file(str(tmp_path / "sp" / "tokenizer.model")) == SENTENCEPIECE
    assert tokenizer_type_of_file(str(tmp_path / "both")) is None  # e.g. Llama 2: the record
    assert tokenizer_type_of_file(str(tmp_path / "none")) is None
