"""One tokenizer interface over SentencePiece and Hugging Face ``tokenizers``.

Why this module exists: instruction data mixes ordinary text with *special
tokens* (``<|im_start|>``, ``<|eot_id|>``, ``</s>`` ...) that must always map
to one id, never be split into sub-words, and the preprocessor, the trainer
and the tools must all agree on the ids. Both tokenizer kinds get the same
contract here:

* ``special_tokens``: every string that is always encoded as a single id;
* ``encode_segments``: batch encoding of the pieces of many documents at once
  (the preprocessor's hot path);
* ``identity()``: what ``{prefix}-meta.json`` records so the trainer can refuse
  data made with another tokenizer.

``SentencePieceTokenizer`` reproduces Megatron-LLM's id layout exactly
(``<CLS> <SEP> <EOD> <MASK>``, pad/bos/eos, then ``--vocab_extra_ids_list``,
unless ``--no_new_tokens``), so data and checkpoints move between the two
projects unchanged. Those four additions belong to Megatron-LLM's own training
path: a pretrained model's ``tokenizer.model`` (what ``tools/hf_to_megatron.py``
imports) keeps its ids and gains only the missing ``--vocab_extra_ids_list``
tokens (``--no_megatron_llm_specials``).
"""

from __future__ import annotations

import dataclasses
import hashlib
import itertools
import os
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional, Sequence

import numpy as np

from megatron_ext.cli import option
from megatron_ext.errors import TokenizerError
from megatron_ext.io import read_json

SENTENCEPIECE = "SentencePieceTokenizer"
HUGGINGFACE = "HFTokenizer"
_TYPE_ALIASES = {
    "sentencepiecetokenizer": SENTENCEPIECE,
    "sentencepiece": SENTENCEPIECE,
    "llamatokenizer": SENTENCEPIECE,
    "hftokenizer": HUGGINGFACE,
    "huggingfacetokenizer": HUGGINGFACE,
    "pretrainedfromhf": HUGGINGFACE,
    "autotokenizer": HUGGINGFACE,
}
TOKENIZER_TYPES = (SENTENCEPIECE, HUGGINGFACE)

# The files of a tokenizer directory as Hugging Face lays it out, named once here for the
# importers, the chat-template reader and the exporter.
SENTENCEPIECE_FILE = "tokenizer.model"
TOKENIZER_JSON = "tokenizer.json"
TOKENIZER_CONFIG = "tokenizer_config.json"
SPECIAL_TOKENS_MAP = "special_tokens_map.json"
CHAT_TEMPLATE_FILE = "chat_template.jinja"
GENERATION_CONFIG = "generation_config.json"


def parse_extra_ids(value: Optional[str]) -> tuple[str, ...]:
    """Split ``--vocab_extra_ids_list "<|im_start|>,<|im_end|>"`` into tokens."""
    if not value:
        return ()
    return tuple(t for t in (s.strip() for s in value.split(",")) if t)


def canonical_tokenizer_type(name: str) -> str:
    key = name.replace("-", "").replace("_", "").lower()
    if key not in _TYPE_ALIASES:
        raise TokenizerError(
            f"unknown --tokenizer_type {name!r}: use {SENTENCEPIECE} (a tokenizer.model file) "
            f"or {HUGGINGFACE} (a tokenizer.json file or a Hugging Face model directory)"
        )
    return _TYPE_ALIASES[key]


def tokenizer_type_of_file(path: str) -> Optional[str]:
    """The tokenizer type a file or directory unambiguously holds (a ``.json`` file or a
    directory with only ``tokenizer.json``: Hugging Face's; a ``.model`` file or a directory
    with only ``tokenizer.model``: SentencePiece), else None (a directory with both, as a
    Llama 2 model has, or with neither)."""
    if os.path.isdir(path):
        has_json, has_model = (os.path.exists(os.path.join(path, name))
                               for name in (TOKENIZER_JSON, SENTENCEPIECE_FILE))
        if has_json != has_model:
            return HUGGINGFACE if has_json else SENTENCEPIECE
        return None
    if path.endswith(".json"):
        return HUGGINGFACE
    return SENTENCEPIECE if path.endswith(".model") else None


@dataclass(frozen=True)
class TokenizerConfig:
    """Everything needed to rebuild the same tokenizer in another process."""

    tokenizer_type: str
    vocab_file: str
    extra_ids: tuple[str, ...] = ()
    new_tokens: bool = True
    megatron_llm_specials: bool = True  # SentencePiece only: <CLS> <SEP> <EOD> <MASK> <PAD>

    def __post_init__(self) -> None:
        object.__setattr__(self, "tokenizer_type", canonical_tokenizer_type(self.tokenizer_type))


@dataclass(frozen=True)
class TokenizerArgs:
    """The tokenizer flags as typed (Megatron-LLM's names), shared by the preprocessor and
    the trainer; also what a run's ``run_config.json`` records. :meth:`config` is the one
    conversion to the :class:`TokenizerConfig` that builds the tokenizer."""

    # None: not given (finetune.py then takes the type of the model --load imports)
    tokenizer_type: Optional[str] = option(
        SENTENCEPIECE, f"one of {', '.join(TOKENIZER_TYPES)} (SentencePiece .model file, or a "
                       "Hugging Face tokenizer.json / model directory)")
    vocab_file: Optional[str] = option(
        None, "tokenizer.model, tokenizer.json, or a directory holding one")
    vocab_extra_ids_list: Optional[str] = option(
        None, "comma-separated special tokens, e.g. \"<|im_start|>,<|im_end|>\": ids after the "
              "base vocabulary, never split")
    new_tokens: bool = option(
        True, "add no token to the vocabulary: extra ids must already exist (and "
              "SentencePiece gets no <CLS>/<SEP>/<EOD>/<MASK>/<PAD>)")
    megatron_llm_specials: bool = option(
        True, "SentencePiece only: do not append Megatron-LLM's <CLS> <SEP> <EOD> <MASK> (and "
              "<PAD> where the model has no pad piece); a pretrained model's own tokenizer.model "
              "keeps its ids (tools/hf_to_megatron.py imports it so), while Megatron-LLM's data "
              "has them")

    def config(self) -> TokenizerConfig:
        if not self.vocab_file:
            raise TokenizerError("--vocab_file is required (the tokenizer file or directory)")
        return TokenizerConfig(tokenizer_type=self.tokenizer_type or SENTENCEPIECE,
                               vocab_file=self.vocab_file,
                               extra_ids=parse_extra_ids(self.vocab_extra_ids_list),
                               new_tokens=self.new_tokens,
                               megatron_llm_specials=self.megatron_llm_specials)


def megatron_llm_specials_hint(recorded: dict, ours: dict) -> str:
    """Advice for two identities that differ only by Megatron-LLM's SentencePiece additions
    (data or a checkpoint made from a pretrained model's tokenizer.model, read with them)."""
    has = lambda identity: "<CLS>" in (identity.get("special_tokens") or {})  # noqa: E731
    if ours.get("type") != SENTENCEPIECE or has(recorded) == has(ours):
        return ""
    flag = "--no_megatron_llm_specials" if has(ours) else "no --no_megatron_llm_specials"
    return (f"; with {flag}, the SentencePiece tokenizer gets the other id layout (Megatron-LLM's "
            "<CLS> <SEP> <EOD> <MASK> <PAD> additions)")


def file_sha256(path: str) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


@dataclass
class InstructTokenizer:
    """Common part of both tokenizer kinds; subclasses fill the fields."""

    config: TokenizerConfig
    source_file: str = ""
    vocab_size: int = 0
    special_tokens: dict[str, int] = field(default_factory=dict)
    bos_token: Optional[str] = None
    eos_token: Optional[str] = None
    pad_id: Optional[int] = None
    base_vocab_size: int = 0  # the tokenizer file's own tokens, before any we appended

    def _finish_init(self) -> None:
        # Alternation in insertion order: at equal positions the earlier token
        # wins, which is exactly Megatron-LLM's min-by-index search.
        if self.special_tokens:
            pattern = "|".join(re.escape(t) for t in self.special_tokens)
            self._split_re = re.compile(f"({pattern})")
        else:
            self._split_re = None
        self._special_ids = frozenset(self.special_tokens.values())

    # -- ids -------------------------------------------------------------
    @property
    def bos_id(self) -> Optional[int]:
        return None if self.bos_token is None else self.special_tokens.get(self.bos_token)

    @property
    def eos_id(self) -> Optional[int]:
        return None if self.eos_token is None else self.special_tokens.get(self.eos_token)

    @property
    def adds_bos(self) -> bool:
        """Whether the tokenizer's own convention starts a document with its BOS (what
        ``transformers`` does with ``add_special_tokens=True`` and llama.cpp with GGUF's
        ``add_bos_token``): for SentencePiece, as Llama 1/2 do, whenever it has a BOS."""
        return self.bos_id is not None

    def token_id(self, token: str) -> int:
        """Id of a special token; a clear error if the tokenizer lacks it."""
        if token not in self.special_tokens:
            raise TokenizerError(
                f"the tokenizer {self.source_file} has no special token {token!r}: "
                f"add it with --vocab_extra_ids_list {token!r}"
            )
        return self.special_tokens[token]

    # -- encode / decode --------------------------------------------------
    def encode(self, text: str) -> list[int]:
        """Encode one whole text that starts a document."""
        return self.encode_segments([text], [True])[0]

    def encode_segments(
        self, texts: Sequence[str], doc_start: Sequence[bool], megatron_llm: bool = False
    ) -> list[list[int]]:  # pragma: no cover - abstract
        raise NotImplementedError

    def encode_flat(self, texts: Sequence[str], doc_start: Sequence[bool],
                    megatron_llm: bool = False) -> tuple[np.ndarray, np.ndarray]:
        """All segments' ids back to back (int32) and each segment's length.

        The preprocessor's hot path: no per-token Python work after encoding.
        """
        return _flatten(self.encode_segments(texts, doc_start, megatron_llm))

    def encode_with_offsets(self, texts: Sequence[str]) -> list[tuple[list[int], np.ndarray]]:
        """Each whole text's ids and their ``[start, end)`` character offsets (an int64
        array of shape ``(n, 2)``), for chat templates tokenized as one text."""
        raise TokenizerError(
            f"the tokenizer {self.source_file} gives no character offsets: a model's own chat "
            f"template (--chat_format hf) needs --tokenizer_type {HUGGINGFACE} (its tokenizer.json)"
        )

    def decode(self, ids: Sequence[int]) -> str:  # pragma: no cover - abstract
        raise NotImplementedError

    # -- identity --------------------------------------------------------
    def identity(self) -> dict:
        """What meta.json records; two tokenizers with equal identity encode alike."""
        return {
            "type": self.config.tokenizer_type,
            "file": os.path.basename(self.source_file),
            "sha256": file_sha256(self.source_file),
            "vocab_size": self.vocab_size,
            "extra_ids": list(self.config.extra_ids),
            "new_tokens": self.config.new_tokens,
            "special_tokens": dict(self.special_tokens),
            "bos_token": self.bos_token,
            "eos_token": self.eos_token,
            "pad_id": self.pad_id,
            # only when off, so that the identities recorded before the switch existed still match
            **({} if self.config.megatron_llm_specials or self.config.tokenizer_type != SENTENCEPIECE
               else {"megatron_llm_specials": False}),
        }


class SentencePieceTokenizer(InstructTokenizer):
    """A SentencePiece ``.model`` file, laid out as Megatron-LLM lays it out.

    Plain text between special tokens is encoded with SentencePiece. Only a
    piece that starts a document gets SentencePiece's dummy-prefix space, so
    ``"<|im_start|>user"`` encodes ``user`` as Hugging Face's Llama tokenizer
    does; ``megatron_llm=True`` instead gives every piece the prefix, which is
    what Megatron-LLM's ``tokenize`` does and what its data contains.
    """

    def __init__(self, config: TokenizerConfig):
        super().__init__(config=config, source_file=config.vocab_file)
        try:
            import sentencepiece as spm
            from sentencepiece import sentencepiece_model_pb2

            with open(config.vocab_file, "rb") as handle:
                blob = handle.read()
            self._sp = spm.SentencePieceProcessor(model_proto=blob)
            proto = sentencepiece_model_pb2.ModelProto()
            proto.ParseFromString(blob)
            proto.normalizer_spec.add_dummy_prefix = False
            self._sp_plain = spm.SentencePieceProcessor(model_proto=proto.SerializeToString())
        except FileNotFoundError:
            raise TokenizerError(
                f"tokenizer file {config.vocab_file} does not exist: pass the SentencePiece "
                "tokenizer.model with --vocab_file"
            ) from None
        except Exception as exc:  # sentencepiece raises RuntimeError/DecodeError/...
            raise TokenizerError(
                f"cannot read {config.vocab_file} as a SentencePiece model ({exc}); "
                f"for a Hugging Face tokenizer.json use --tokenizer_type {HUGGINGFACE}"
            ) from None

        vocab = {self._sp.id_to_piece(i): i for i in range(self._sp.get_piece_size())}
        specials: dict[str, int] = {}

        def add(token: str, required: bool = False) -> None:
            if token not in vocab:
                if not config.new_tokens:
                    if required:
                        raise TokenizerError(
                            f"--no_new_tokens: {token!r} is not in the vocabulary of "
                            f"{config.vocab_file}; drop --no_new_tokens to append it, or "
                            "remove it from --vocab_extra_ids_list"
                        )
                    return
                vocab[token] = len(vocab)
            specials[token] = vocab[token]

        def piece(index: int, fallback: str) -> str:
            return self._sp.id_to_piece(index) if 0 <= index < len(self._sp) else fallback

        if config.megatron_llm_specials:
            for token in ("<CLS>", "<SEP>", "<EOD>", "<MASK>"):
                add(token)
        pad = piece(self._sp.pad_id(), "<PAD>")
        if config.megatron_llm_specials or pad in vocab:
            add(pad)
        bos = piece(self._sp.bos_id(), "<BOS>")
        eos = piece(self._sp.eos_id(), "<EOS>")
        for token in (bos, eos):  # a pretrained model's vocabulary gains no BOS/EOS of ours
            if config.megatron_llm_specials or token in vocab:
                add(token)
        for token in config.extra_ids:
            add(token, required=True)

        self.vocab_size = len(vocab)
        self.special_tokens = specials
        self.bos_token = bos if bos in specials else None
        self.eos_token = eos if eos in specials else None
        self.pad_id = specials.get(pad)
        self._base_size = len(self._sp)
        self.base_vocab_size = len(self._sp)
        self._special_lists = {token: [index] for token, index in specials.items()}
        self._finish_init()

    def _encode_parts(self, texts, doc_start, megatron_llm):
        """Per segment, its list of id lists (special tokens as one-id lists)."""
        parts: list = []
        counts: list[int] = []
        slots = ([], [])  # (with dummy prefix, without): positions in parts
        pieces = ([], [])
        specials = self._special_lists
        split = self._split_re.split if self._split_re is not None else None
        for text, starts_doc in zip(texts, doc_start):
            first = len(parts)
            for j, piece in enumerate(split(text) if split else (text,)):
                if j & 1:
                    parts.append(specials[piece])
                elif piece:
                    kind = 0 if megatron_llm or (starts_doc and j == 0) else 1
                    slots[kind].append(len(parts))
                    pieces[kind].append(piece)
                    parts.append(None)
            counts.append(len(parts) - first)
        for kind, processor in ((0, self._sp), (1, self._sp_plain)):
            if pieces[kind]:
                for slot, ids in zip(slots[kind], processor.encode(pieces[kind], num_threads=1)):
                    parts[slot] = ids
        return parts, counts

    def encode_segments(self, texts, doc_start, megatron_llm=False):
        parts, counts = self._encode_parts(texts, doc_start, megatron_llm)
        out, index = [], 0
        for count in counts:
            out.append(list(itertools.chain.from_iterable(parts[index:index + count])))
            index += count
        return out

    def encode_flat(self, texts, doc_start, megatron_llm=False):
        parts, counts = self._encode_parts(texts, doc_start, megatron_llm)
        part_lengths = np.fromiter(map(len, parts), dtype=np.int64, count=len(parts))
        tokens = np.fromiter(itertools.chain.from_iterable(parts), dtype=np.int32,
                             count=int(part_lengths.sum()))
        bounds = np.zeros(len(counts) + 1, dtype=np.int64)
        np.cumsum(counts, out=bounds[1:])
        cumulative = np.zeros(len(parts) + 1, dtype=np.int64)
        np.cumsum(part_lengths, out=cumulative[1:])
        return tokens, cumulative[bounds[1:]] - cumulative[bounds[:-1]]

    def decode(self, ids, doc_start: bool = False, megatron_llm: bool = False) -> str:
        """Inverse of :meth:`encode_segments` for one segment or document."""
        inverse = {v: k for k, v in self.special_tokens.items()}
        pieces: list[str] = []
        run: list[int] = []
        first_run = True

        def flush() -> None:
            nonlocal first_run
            if run:
                with_prefix = megatron_llm or (doc_start and first_run and not pieces)
                processor = self._sp if with_prefix else self._sp_plain
                pieces.append(processor.decode([int(i) for i in run]))
                run.clear()
            first_run = False

        for token in ids:
            token = int(token)
            if token in inverse:
                flush()
                pieces.append(inverse[token])
            elif token >= self._base_size:
                flush()
                pieces.append(f"<id_{token}>")  # padding ids have no text
            else:
                run.append(token)
        flush()
        return "".join(pieces)


class HFTokenizer(InstructTokenizer):
    """A Hugging Face fast tokenizer (``tokenizer.json``), via ``tokenizers``.

    Extra tokens that the file lacks are appended after its vocabulary
    (added tokens included); tokens it already has keep their ids and are
    marked special so they are never split.
    """

    def __init__(self, config: TokenizerConfig):
        path = Path(config.vocab_file)
        json_file = path / TOKENIZER_JSON if path.is_dir() else path
        super().__init__(config=config, source_file=str(json_file))
        if not json_file.exists():
            hint = ""
            if path.is_dir() and (path / "tokenizer.model").exists():
                hint = (f"; it has a tokenizer.model: use --tokenizer_type {SENTENCEPIECE} "
                        f"--vocab_file {path / 'tokenizer.model'}")
            raise TokenizerError(f"no Hugging Face tokenizer file at {json_file}{hint}")
        try:
            from tokenizers import AddedToken, Tokenizer

            tok = Tokenizer.from_file(str(json_file))
        except Exception as exc:
            raise TokenizerError(
                f"cannot read {json_file} as a Hugging Face tokenizer.json ({exc}); for a "
                f"SentencePiece tokenizer.model use --tokenizer_type {SENTENCEPIECE}"
            ) from None

        settings = read_tokenizer_config(str(json_file.parent))
        vocab = tok.get_vocab(with_added_tokens=True)
        self.base_vocab_size = max(vocab.values()) + 1
        specials = {
            added.content: index
            for index, added in sorted(tok.get_added_tokens_decoder().items())
            if added.special
        }
        to_add = []
        for token in config.extra_ids:
            if token in specials:
                continue
            if token not in vocab and not config.new_tokens:
                raise TokenizerError(
                    f"--no_new_tokens: {token!r} is not in the vocabulary of {json_file}; "
                    "drop --no_new_tokens to append it, or remove it from --vocab_extra_ids_list"
                )
            to_add.append(AddedToken(token, special=True, normalized=False))
        if to_add:
            tok.add_special_tokens(to_add)
            vocab = tok.get_vocab(with_added_tokens=True)
            for token in config.extra_ids:
                specials[token] = vocab[token]
        self._tok = tok
        self.vocab_size = max(vocab.values()) + 1
        self.special_tokens = specials
        self.bos_token = _pick_token(settings.get("bos_token"), specials,
                                     ("<s>", "<|begin_of_text|>", "<BOS>"))
        self.eos_token = _pick_token(settings.get("eos_token"), specials,
                                     ("</s>", "<|end_of_text|>", "<|endoftext|>", "<EOS>"))
        pad = _pick_token(settings.get("pad_token"), specials, ("<pad>", "<PAD>", "<|pad|>"))
        self.pad_id = specials.get(pad) if pad else None
        self._finish_init()

    @property
    def adds_bos(self) -> bool:
        """``add_bos_token`` of tokenizer_config.json where it says; else whether the
        tokenizer.json post-processor puts the BOS first (Llama 3's does, SmolLM2's and
        Qwen's have none)."""
        if self.bos_id is None:
            return False
        stated = read_tokenizer_config(os.path.dirname(self.source_file)).get("add_bos_token")
        if stated is not None:
            return bool(stated)
        return self._tok.encode("", add_special_tokens=True).ids[:1] == [self.bos_id]

    def encode_segments(self, texts, doc_start, megatron_llm=False):
        if not texts:
            return []
        return [e.ids for e in self._tok.encode_batch(list(texts), add_special_tokens=False)]

    def encode_with_offsets(self, texts):
        if not texts:
            return []
        return [(e.ids, np.array(e.offsets, dtype=np.int64).reshape(-1, 2))
                for e in self._tok.encode_batch(list(texts), add_special_tokens=False)]

    def decode(self, ids, doc_start: bool = False, megatron_llm: bool = False) -> str:
        return self._tok.decode([int(i) for i in ids], skip_special_tokens=False)


def _flatten(segments: list[list[int]]) -> tuple[np.ndarray, np.ndarray]:
    lengths = np.fromiter(map(len, segments), dtype=np.int64, count=len(segments))
    tokens = np.fromiter(itertools.chain.from_iterable(segments), dtype=np.int32,
                         count=int(lengths.sum()))
    return tokens, lengths


def read_tokenizer_config(directory: str, error: type = TokenizerError) -> dict:
    """``directory``'s ``tokenizer_config.json`` as a dict ({} when there is none); an
    unreadable file or one that is not a JSON object raises ``error`` naming it."""
    path = os.path.join(directory, TOKENIZER_CONFIG)
    if not os.path.exists(path):
        return {}
    config = read_json(path, error)
    if not isinstance(config, dict):
        raise error(f"{path} is not a JSON object")
    return config


def _pick_token(configured, specials: dict[str, int], candidates: tuple[str, ...]) -> Optional[str]:
    if isinstance(configured, dict):
        configured = configured.get("content")
    if isinstance(configured, str) and configured in specials:
        return configured
    return next((c for c in candidates if c in specials), None)


def build_tokenizer(config: TokenizerConfig) -> InstructTokenizer:
    """Load the tokenizer named by ``config`` (raises :class:`TokenizerError`)."""
    if not config.vocab_file:
        raise TokenizerError("--vocab_file is required: the tokenizer.model or tokenizer.json to use")
    if config.tokenizer_type == SENTENCEPIECE:
        if os.path.isdir(config.vocab_file):
            candidate = os.path.join(config.vocab_file, "tokenizer.model")
            if os.path.exists(candidate):
                config = dataclasses.replace(config, vocab_file=candidate)
        return SentencePieceTokenizer(config)
    return HFTokenizer(config)
