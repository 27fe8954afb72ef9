"""A tokenizer as a Hugging Face ``tokenizers`` pipeline that gives the same ids.

Why: a model trained here is used with ``transformers`` (or vLLM, TGI ...),
whose tokenizer must give the ids the model was trained on. For a
SentencePiece ``.model`` this builds an equal ``tokenizers`` BPE pipeline
(special tokens split first, the dummy-prefix space only at the start of the
document, or before every piece for ``megatron-llm`` data); for a Hugging Face
tokenizer it takes its ``tokenizer.json`` with the added extra ids. A
special token that would get another id is refused, never shifted.

Floor 1: knows tokenizers only (the chat formats and the directory writer are
in :mod:`megatron_ext.checkpointing.hf_tokenizer`).
"""

from __future__ import annotations

import json

from megatron_ext.errors import TokenizerError
from megatron_ext.tokenizers.base import HFTokenizer, InstructTokenizer, SentencePieceTokenizer

_SPACE = "\u2581"  # SentencePiece's whitespace symbol
# sentencepiece_model.proto enums
_SP_NORMAL, _SP_UNKNOWN, _SP_USER_DEFINED = 1, 2, 4
_SP_BPE = 2


def dummy_prefix_mode(tokenizer: InstructTokenizer, every_piece: bool) -> str:
    if not isinstance(tokenizer, SentencePieceTokenizer):
        return "as the tokenizer.json does"
    return "before every piece between special tokens" if every_piece else "at document start"


def hf_backend(tokenizer: InstructTokenizer, every_piece: bool):
    """The ``tokenizers.Tokenizer`` to write, and its unknown token (or None)."""
    if isinstance(tokenizer, SentencePieceTokenizer):
        return _sentencepiece_backend(tokenizer, every_piece)
    if isinstance(tokenizer, HFTokenizer):
        from tokenizers import Tokenizer

        backend = Tokenizer.from_str(tokenizer._tok.to_str())
        model = json.loads(backend.to_str()).get("model", {})
        unk = model.get("unk_token")
        unk = unk if isinstance(unk, str) and backend.token_to_id(unk) is not None else None
        _check_ids(tokenizer, backend)
        return backend, unk
    raise TokenizerError(f"cannot export a {type(tokenizer).__name__} as a Hugging Face tokenizer")


def _sentencepiece_backend(tokenizer: SentencePieceTokenizer, every_piece: bool):
    """A ``tokenizers`` pipeline that encodes like ``tokenizer``.

    Supported: Llama-like models (BPE, identity normalization, whitespace
    kept, with or without byte fallback and dummy prefix); anything else is a
    :class:`TokenizerError` rather than an approximation.
    """
    from sentencepiece import sentencepiece_model_pb2
    from tokenizers import (
        AddedToken,
        Tokenizer,
        decoders,
        models,
        normalizers,
        pre_tokenizers,
    )

    proto = sentencepiece_model_pb2.ModelProto()
    with open(tokenizer.source_file, "rb") as handle:
        proto.ParseFromString(handle.read())
    trainer, norm = proto.trainer_spec, proto.normalizer_spec
    unsupported = []
    if trainer.model_type != _SP_BPE:
        unsupported.append("it is not a BPE model (Llama/Mistral tokenizers are)")
    if norm.remove_extra_whitespaces:
        unsupported.append("it removes extra whitespace (remove_extra_whitespaces)")
    if trainer.treat_whitespace_as_suffix:
        unsupported.append("it puts whitespace at the end of pieces (treat_whitespace_as_suffix)")
    if not norm.escape_whitespaces:
        unsupported.append("it does not escape whitespace")
    if norm.precompiled_charsmap:
        unsupported.append(f"its normalization ({norm.name or 'a precompiled rule'}) is not "
                           "reproduced exactly by Hugging Face; only 'identity' (Llama's) is")
    loose = [p.piece for p in proto.pieces
             if p.type == _SP_USER_DEFINED and p.piece not in tokenizer.special_tokens]
    if loose:
        shown = ", ".join(repr(t) for t in loose[:10]) + (" ..." if len(loose) > 10 else "")
        unsupported.append(
            f"it has user-defined symbols that are not special tokens here ({shown}): "
            "SentencePiece matches them inside plain text, which a tokenizer.json cannot do "
            "exactly (a text that starts with one gets an extra dummy-prefix token); adding them "
            "to --vocab_extra_ids_list makes them special tokens, split off first, as Hugging "
            "Face does (data preprocessed without that may differ where a text starts with one)")
    if unsupported:
        raise TokenizerError(f"cannot export the SentencePiece model {tokenizer.source_file} as an "
                             f"exact Hugging Face tokenizer: {'; '.join(unsupported)}")

    pieces = proto.pieces
    vocab = {p.piece: index for index, p in enumerate(pieces)}
    unk = pieces[trainer.unk_id].piece if 0 <= trainer.unk_id < len(pieces) else None
    backend = Tokenizer(models.BPE(vocab=vocab, merges=_bpe_merges(pieces), unk_token=unk,
                                   fuse_unk=True, byte_fallback=trainer.byte_fallback))
    dummy = norm.add_dummy_prefix
    steps = []
    if dummy and every_piece:  # special tokens are split off first: every piece gets it
        steps.append(normalizers.Prepend(_SPACE))
    steps.append(normalizers.Replace(" ", _SPACE))
    backend.normalizer = normalizers.Sequence(steps)
    if dummy and not every_piece:
        # The prefix only on the piece at offset 0. Metaspace("first") skips it when the
        # piece already starts with the replacement, which SentencePiece does not: so
        # prefix a plain space (the normalizer left none), then turn it into the symbol.
        backend.pre_tokenizer = pre_tokenizers.Sequence([
            pre_tokenizers.Metaspace(replacement=" ", prepend_scheme="first", split=False),
            pre_tokenizers.Metaspace(replacement=_SPACE, prepend_scheme="never", split=False),
        ])
    steps = [decoders.ByteFallback(), decoders.Fuse()]
    if dummy and every_piece:  # the prefix of the piece after each special token
        steps += [decoders.Replace(token + _SPACE, token) for token in tokenizer.special_tokens]
    steps.append(decoders.Replace(_SPACE, " "))
    if dummy:
        steps.append(decoders.Strip(" ", 1, 0))
    backend.decoder = decoders.Sequence(steps)

    # Specials in id order: those the model lacks get the next ids, as ours do.
    added = sorted(tokenizer.special_tokens.items(), key=lambda item: item[1])
    if unk is not None and unk not in tokenizer.special_tokens:
        added.insert(0, (unk, trainer.unk_id))
    backend.add_special_tokens([AddedToken(t, special=True, normalized=False) for t, _ in added])
    _check_ids(tokenizer, backend)
    return backend, unk


def _bpe_merges(pieces) -> list[tuple[str, str]]:
    """Merges giving Hugging Face BPE SentencePiece's order: SentencePiece merges the
    adjacent pair whose joined piece has the highest score; here a lower rank wins."""
    normal = {p.piece: index for index, p in enumerate(pieces) if p.type == _SP_NORMAL}
    ranked = []
    for index, p in enumerate(pieces):
        if p.type != _SP_NORMAL:
            continue
        text = p.piece
        for cut in range(1, len(text)):
            left, right = text[:cut], text[cut:]
            if left in normal and right in normal:
                ranked.append((-p.score, index, normal[left], normal[right], left, right))
    ranked.sort()
    return [(left, right) for *_, left, right in ranked]


def _check_ids(tokenizer: InstructTokenizer, backend) -> None:
    """Refuse before writing anything if a special token would get another id."""
    shifted = [f"{token!r}: ours {index}, Hugging Face {backend.token_to_id(token)}"
               for token, index in tokenizer.special_tokens.items()
               if backend.token_to_id(token) != index]
    size = backend.get_vocab_size(with_added_tokens=True)
    if size != tokenizer.vocab_size:
        shifted.append(f"vocabulary size: ours {tokenizer.vocab_size}, Hugging Face {size}")
    if shifted:
        raise TokenizerError(
            f"cannot export {tokenizer.source_file} as a Hugging Face tokenizer: these special-"
            f"token ids cannot be reproduced (Hugging Face numbers added tokens consecutively "
            f"after the vocabulary), and a tokenizer with shifted ids is never written: "
            + "; ".join(shifted)
        )

