"""GGUF files (llama.cpp's single-file format) as a model source, read like a Hugging Face
directory: an HF ``config.json`` dict rebuilt from the metadata, the tensors under their
HF names as floats, and the tokenizer files.

Why a sibling of :mod:`hf_checkpoint` rather than a converter to an HF directory: the
importer then reads a GGUF exactly as it reads a directory (one layer at a time, checked
before anything is written), and nothing the size of the model is ever written twice.

What a GGUF stores differently from ``transformers``, each undone here:

* names: ``blk.N.attn_q.weight`` for ``model.layers.N.self_attn.q_proj.weight`` and so
  on; the ``gguf`` package's own name table (``get_tensor_name_map``) says which is which;
* values: quantized blocks (Q4_0, Q4_K, Q8_0, ...), dequantized to float32 with the
  ``gguf`` package's ``quants.dequantize``, a slice of rows at a time so that its
  temporaries stay small; the file is memory-mapped (its pages are page cache the
  kernel can drop), so the memory a conversion holds follows the tensors being read,
  not the model;
* llama.cpp reorders the rows of each Llama query/key head for its interleaved RoPE
  (Qwen2/Qwen3 use the rotate-half RoPE there and are stored as they are): undone by
  :func:`unpermute_heads`;
* a tied output layer is simply absent (no ``output.weight``);
* Llama 3.1-style RoPE scaling survives only as a ``rope_freqs.weight`` tensor of
  per-frequency factors: the scaling factor is read back from it and checked against
  the formula (see :func:`llama3_rope_scaling`). ``transformers`` ignores that tensor,
  so its GGUF loader builds Llama 3.1/3.2 files without the scaling; here the model
  computes what llama.cpp computes.

Which architectures are read, and how, each family declares (``Family.gguf``, a
:class:`~megatron_ext.models.family.GGUFLayout`): the Llama-style ones (llama, qwen2,
qwen3) through :meth:`GGUFModel.llama_style_config`, the others with a config reading of
their own in their family file (Gemma 3's ``1 + w`` norms stored as ``1 + w`` and
llama.cpp's fixed window pattern; Falcon's all-q/all-k/all-v matrix, regrouped here by
:func:`grouped_qkv`).

A Mistral GGUF is stored as architecture ``llama`` with no sliding window, and llama.cpp
runs it without one: it is read as the Llama layout (the family then follows from its
RoPE base and norm epsilon, as for a ``config.json``).

``gguf`` is imported lazily: only GGUF imports need it (``pip install gguf``).
"""

from __future__ import annotations

import contextlib
import functools
import inspect
import math
import os
import re
from collections import Counter, OrderedDict
from typing import TYPE_CHECKING, Any, Iterator, Optional

import numpy as np

from megatron_ext.errors import TokenizerError
from megatron_ext.models.families import gguf_layouts
from megatron_ext.models.family import GGUFLayout as GGUFLayoutType
from megatron_ext.models.family import UnsupportedModelError
from megatron_ext.models.import_sources import HFCheckpointError
from megatron_ext.tokenizers import TOKENIZER_JSON
from megatron_ext.models.hf_llama import LLAMA3_SCALING_FIXED, QK_NORM_SUFFIXES, QKV_BIAS_SUFFIXES

if TYPE_CHECKING:
    import torch

GGUF_MAGIC = b"GGUF"


ROPE_FREQS = "rope_freqs.weight"  # Llama 3.1 RoPE scaling, folded into the config
# one expert's HF tensor (Mixtral's on-disk names, Qwen3-MoE's): (the experts' stem, the
# expert, the projection); llama.cpp stores a layer's experts stacked (ffn_gate_exps, ...)
EXPERT_STEM = re.compile(r"^(model\.layers\.\d+\.(?:block_sparse_moe|mlp)\.experts)\.(\d+)\."
                         r"(w1|w2|w3|gate_proj|up_proj|down_proj)$")
FLOAT_TYPES = ("F32", "F16", "BF16")
DEQUANT_CHUNK_ELEMENTS = 1 << 24  # elements dequantized at once (64 MiB of float32)
DEFAULT_ROPE_THETA = 10000.0  # llama.cpp's when a file states none


def _gguf():
    try:
        import gguf
    except ImportError:
        raise HFCheckpointError("reading a .gguf file needs the gguf package: pip install gguf "
                                "(or pip install megatron-instruct[hf])") from None
    return gguf


_READERS: "OrderedDict[tuple, Any]" = OrderedDict()
READERS_KEPT = 4


def _reader(path: str, reader_class=None):
    """``gguf.GGUFReader(path)``, shared by the GGUFModels of one process that open the same
    unchanged file (same inode, size and modification time).

    Why: the reader parses every metadata field into numpy views on opening, one per
    string of the tokenizer's vocabulary: ~0.3 s for a 32k-token file, paid again each
    time a process opens it (a launch checks the tokenizer, plans, then imports; the
    tests open each file many times). The reader is read-only (mode "r") and memory-mapped,
    so sharing it shares nothing mutable; a file rewritten atomically has a new inode."""
    stat = os.stat(path)
    key = (os.path.realpath(path), stat.st_ino, stat.st_size, stat.st_mtime_ns)
    if key in _READERS:
        _READERS.move_to_end(key)
        return _READERS[key]
    reader = _quick_reader_class(reader_class or _gguf().GGUFReader)(path, "r")
    _READERS[key] = reader
    while len(_READERS) > READERS_KEPT:
        _READERS.popitem(last=False)
    return reader


_GET_PARAMETERS = ["self", "offset", "dtype", "count", "override_order"]


@functools.lru_cache(maxsize=None)
def _quick_reader_class(base: type) -> type:
    """``base`` (``gguf.GGUFReader``) slicing a plain ``ndarray`` view of its memory map
    instead of the ``np.memmap`` itself; ``base`` as it is where its ``_get`` is not the
    one this mirrors.

    Why: the reader parses every metadata field when it opens a file, one ``_get`` slice
    per value, and a tokenizer's vocabulary and merges are ~100k values. Each slice of an
    ``np.memmap`` goes through its Python ``__getitem__`` and ``__array_finalize__``;
    a slice of a plain view of the same mapping stays in C. SmolLM2-135M's Q4_1 file opens
    in 0.7 s of CPU instead of 2.1 s. The values are the same, read from the same
    mapping, which every array they come from keeps alive (the view's base is the
    ``np.memmap``)."""
    get = getattr(base, "_get", None)
    try:
        parameters = list(inspect.signature(get).parameters)
    except (TypeError, ValueError):
        return base
    if parameters != _GET_PARAMETERS:
        return base

    class QuickReader(base):
        def _get(self, offset, dtype, count=1, override_order=None):
            plain = self.__dict__.get("_plain")
            if plain is None:
                plain = self._plain = self.data.view(np.ndarray)
            count = int(count)
            end = offset + np.dtype(dtype).itemsize * count
            values = plain[offset:end].view(dtype=dtype)[:count]
            order = self.byte_order if override_order is None else override_order
            return values.view(values.dtype.newbyteorder(order))

    return QuickReader


def is_gguf_path(path: str) -> bool:
    """Whether ``--model_path`` names a GGUF file (a ``.gguf`` name or any plain file)
    rather than a Hugging Face directory."""
    return str(path).lower().endswith(".gguf") or os.path.isfile(path)


def unpermute_heads(weight: "torch.Tensor", num_heads: int) -> "torch.Tensor":
    """Undo llama.cpp's per-head row order of a Llama query/key matrix.

    llama.cpp stores the two rotate-half halves of each head interleaved (row
    ``2j`` holds HF row ``j``, row ``2j+1`` HF row ``j + head_dim/2``); HF keeps
    them as halves.
    """
    rows = weight.shape[0]
    rest = tuple(weight.shape[1:])
    half = rows // num_heads // 2
    return (weight.reshape(num_heads, half, 2, *rest).transpose(1, 2)
            .reshape(rows, *rest).contiguous())


def permute_heads(weight: "torch.Tensor", num_heads: int) -> "torch.Tensor":
    """llama.cpp's per-head row order of a Llama query/key matrix (the inverse of
    :func:`unpermute_heads`): per head, the two rotate-half halves interleaved."""
    rows = weight.shape[0]
    rest = tuple(weight.shape[1:])
    half = rows // num_heads // 2
    return (weight.reshape(num_heads, 2, half, *rest).transpose(1, 2)
            .reshape(rows, *rest).contiguous())


def ungrouped_qkv(qkv: "torch.Tensor", num_heads: int, num_kv_heads: int) -> "torch.Tensor":
    """Falcon's fused query/key/value rows (per group: its query heads, key head, value
    head) as llama.cpp's ``attn_qkv`` stores them: all query heads, all key heads, all
    value heads (the inverse of :func:`grouped_qkv`)."""
    import torch

    head_dim = qkv.shape[0] // (num_heads + 2 * num_kv_heads)
    rest = tuple(qkv.shape[1:])
    groups = qkv.reshape(num_kv_heads, num_heads // num_kv_heads + 2, head_dim, *rest)
    q, k, v = groups[:, :-2], groups[:, -2], groups[:, -1]
    return torch.cat([q.reshape(-1, *rest), k.reshape(-1, *rest), v.reshape(-1, *rest)]
                     ).contiguous()


def grouped_qkv(qkv: "torch.Tensor", num_heads: int, num_kv_heads: int) -> "torch.Tensor":
    """llama.cpp's Falcon ``attn_qkv`` (all query heads, all key heads, all value heads) in
    Falcon's own order: per key/value group, its query heads, its key head, its value
    head (the same for one group, Falcon-7B)."""
    import torch

    head_dim = qkv.shape[0] // (num_heads + 2 * num_kv_heads)
    rest = tuple(qkv.shape[1:])
    q, k, v = qkv.split([num_heads * head_dim, num_kv_heads * head_dim,
                         num_kv_heads * head_dim])
    q = q.reshape(num_kv_heads, num_heads // num_kv_heads, head_dim, *rest)
    k = k.reshape(num_kv_heads, 1, head_dim, *rest)
    v = v.reshape(num_kv_heads, 1, head_dim, *rest)
    return torch.cat([q, k, v], dim=1).reshape(qkv.shape).contiguous()


def llama3_rope_factors(factor: float, theta: float, head_dim: int) -> list[float]:
    """Per-frequency divisors of Llama 3.1's RoPE scaling (the values of ``rope_freqs``),
    with megatron-core's fixed low/high frequency factors and original context."""
    low = LLAMA3_SCALING_FIXED["low_freq_factor"]
    high = LLAMA3_SCALING_FIXED["high_freq_factor"]
    original = LLAMA3_SCALING_FIXED["original_max_position_embeddings"]
    out = []
    for i in range(0, head_dim, 2):
        wavelength = 2 * math.pi * theta ** (i / head_dim)
        if wavelength < original / high:
            out.append(1.0)
        elif wavelength > original / low:
            out.append(factor)
        else:
            smooth = (original / wavelength - low) / (high - low)
            out.append(1.0 / ((1 - smooth) / factor + smooth))
    return out


def llama3_rope_scaling(factors, theta: float, head_dim: int, source: str) -> dict:
    """The HF ``rope_scaling`` whose factors ``rope_freqs.weight`` holds; refuses factors
    that are not Llama 3.1's scaling (another shape could only be approximated)."""
    values = [float(v) for v in factors]
    factor = max(values)
    expected = llama3_rope_factors(factor, theta, head_dim)
    if len(values) != len(expected) or any(
            abs(a - b) > 1e-5 * max(1.0, abs(b)) for a, b in zip(values, expected)):
        raise UnsupportedModelError(
            f"{source}: {ROPE_FREQS} holds RoPE frequency factors that are not Llama 3.1's "
            f"scaling (low_freq_factor 1, high_freq_factor 4, original context 8192); "
            "this RoPE cannot be built exactly")
    return {"rope_type": "llama3", "factor": factor,
            **{k: (int(v) if k.startswith("original") else v)
               for k, v in LLAMA3_SCALING_FIXED.items()}}


class GGUFModel:
    """One GGUF file: its HF config (:attr:`config`), weights (:attr:`weights`, a
    :class:`~megatron_ext.models.hf_checkpoint.WeightSource` like a directory's) and
    tokenizer (:meth:`write_tokenizer`).

    Everything is checked on opening (magic, completeness, architecture, tensor types,
    the tensors the layout needs and no others), before any output is written.
    """

    def __init__(self, path: str):
        self.path = path
        gguf = _gguf()
        if not os.path.isfile(path):
            raise HFCheckpointError(f"--model_path {path}: no such GGUF file")
        with open(path, "rb") as handle:
            magic = handle.read(4)
        if magic != GGUF_MAGIC:
            raise HFCheckpointError(
                f"{path} is not a GGUF file (it starts with {magic!r}, not {GGUF_MAGIC!r}); "
                "--model_path takes a Hugging Face model directory or a .gguf file")
        try:
            self.reader = _reader(path)  # memory-mapped: tensors are read when used
        except Exception as exc:  # noqa: BLE001 - any failure means a damaged file
            raise HFCheckpointError(
                f"{path} is truncated or damaged ({type(exc).__name__}: {str(exc)[:160]}); "
                "re-download or re-convert it") from None
        self.architecture = str(self.value("general.architecture", required=True))
        layouts = gguf_layouts()
        if self.architecture not in layouts:
            raise UnsupportedModelError(
                f"{path}: GGUF architecture {self.architecture!r} is not supported; this tool "
                f"imports {', '.join(layouts)}")
        self.layout = layouts[self.architecture]
        self._tensors = {tensor.name: tensor for tensor in self.reader.tensors}
        self._check_types()
        self.config = self._hf_config()
        self.weights = GGUFWeights(self)

    # ------------------------------------------------------------------ metadata
    def value(self, key: str, default: Any = None, required: bool = False) -> Any:
        field = self.reader.get_field(key)
        if field is None:
            if required:
                raise HFCheckpointError(f"{self.path}: the metadata lacks {key}; the file is "
                                        "incomplete or was not written by llama.cpp's converter")
            return default
        value = field.contents()
        if field.types == [_gguf().GGUFValueType.FLOAT32]:
            # the shortest decimal of this float32: 1e-05, not 9.999999747378752e-06
            value = float(str(np.float32(value)))
        return value

    def arch_value(self, name: str, default: Any = None, required: bool = False) -> Any:
        """``<architecture>.<name>``; one value for a per-layer list whose layers agree
        (a model whose layers differ in shape is refused)."""
        value = self.value(f"{self.architecture}.{name}", default, required)
        if isinstance(value, list):
            if len(set(value)) != 1:
                raise UnsupportedModelError(
                    f"{self.path}: {self.architecture}.{name} differs between layers "
                    f"({value[:8]}{'...' if len(value) > 8 else ''}); only models whose "
                    "layers all have one shape are imported")
            value = value[0]
        return value

    def _check_types(self) -> None:
        """Refuse tensor types the ``gguf`` package cannot dequantize, before reading any."""
        gguf = _gguf()
        unsupported = set()
        for kind in {tensor.tensor_type for tensor in self.reader.tensors}:
            if kind.name in FLOAT_TYPES:
                continue
            _, block_bytes = gguf.GGML_QUANT_SIZES[kind]
            try:  # the library's own answer, on one zero block
                gguf.quants.dequantize(np.zeros((1, block_bytes), np.uint8), kind)
            except (NotImplementedError, ValueError):
                unsupported.add(kind.name)
        if unsupported:
            raise HFCheckpointError(
                f"{self.path} holds tensors of type {', '.join(sorted(unsupported))}, which the "
                f"gguf package cannot dequantize; supported: {', '.join(FLOAT_TYPES)} and the "
                "block types gguf.quants dequantizes (Q4_0, Q4_1, Q5_0, Q5_1, Q8_0, Q2_K-Q6_K, "
                "IQ*)")

    def quantization(self) -> dict[str, int]:
        """Tensor count per stored type, e.g. ``{"Q4_1": 210, "F32": 61, "Q8_0": 1}``."""
        return dict(Counter(t.tensor_type.name for t in self.reader.tensors).most_common())

    def record(self) -> dict:
        """What a converted checkpoint's ``run_config["source"]`` says about this file."""
        record = {"gguf_path": os.path.abspath(self.path),
                  "model_type": self.config["model_type"], "quantization": self.quantization()}
        name = self.value("general.name")
        if name:
            record["name"] = str(name)
        return record

    def tensor_shape(self, gguf_name: str) -> tuple[int, ...]:
        """A tensor's shape in torch order (GGUF lists the fastest dimension first)."""
        return tuple(int(d) for d in reversed(self._tensors[gguf_name].shape.tolist()))

    def has_tensor(self, gguf_name: str) -> bool:
        return gguf_name in self._tensors

    def tensor_names(self) -> list[str]:
        """The GGUF names of the file's tensors, in file order."""
        return list(self._tensors)

    def _hf_config(self) -> dict:
        """``config.json`` for transformers, from the metadata and the tensor shapes: the
        family's own reading (``GGUFLayout.config``), else the Llama-style one."""
        if self.layout.config is not None:
            return self.layout.config(self)
        return self.llama_style_config()

    def llama_style_config(self) -> dict:
        """The config of a Llama-style file (``attn_q``/``attn_k``/``attn_v``, RMSNorm,
        SwiGLU), which a family's own reading may start from.

        The head size comes from the query matrix (key_length and rope.dimension_count,
        when stated, must agree with it); the vocabulary size from the embedding rows.
        """
        layout = self.layout
        for name in ("token_embd.weight", "blk.0.attn_q.weight"):
            if name not in self._tensors:
                raise HFCheckpointError(f"{self.path} has no {name} tensor; it is incomplete "
                                        f"or not a {self.architecture} model")
        heads = int(self.arch_value("attention.head_count", required=True))
        head_dim = self.tensor_shape("blk.0.attn_q.weight")[0] // heads
        for key in ("attention.key_length", "attention.value_length", "rope.dimension_count"):
            stated = self.arch_value(key)
            if stated is not None and int(stated) != head_dim:
                raise UnsupportedModelError(
                    f"{self.path}: {self.architecture}.{key} is {stated} but the heads are "
                    f"{head_dim} wide; partial RoPE or unequal key/value sizes are not built")
        theta = float(self.arch_value("rope.freq_base", DEFAULT_ROPE_THETA))
        config = {
            "architectures": [layout.hf_class],
            "model_type": layout.model_type,
            "hidden_size": int(self.arch_value("embedding_length", required=True)),
            "intermediate_size": int(self.arch_value("feed_forward_length", required=True)),
            "num_hidden_layers": int(self.arch_value("block_count", required=True)),
            "num_attention_heads": heads,
            "num_key_value_heads": int(self.arch_value("attention.head_count_kv", heads)),
            "head_dim": head_dim,
            "hidden_act": "silu",
            "max_position_embeddings": int(self.arch_value("context_length", required=True)),
            "rms_norm_eps": float(self.arch_value("attention.layer_norm_rms_epsilon",
                                                   required=True)),
            "rope_theta": theta,
            "vocab_size": self.tensor_shape("token_embd.weight")[0],
            # llama.cpp writes the output layer only when it is not the embedding matrix
            "tie_word_embeddings": "output.weight" not in self._tensors,
            "bos_token_id": self.value("tokenizer.ggml.bos_token_id"),
            "eos_token_id": self.value("tokenizer.ggml.eos_token_id"),
            "pad_token_id": self.value("tokenizer.ggml.padding_token_id"),
        }
        scaling = self._rope_scaling(theta, head_dim)
        if scaling:
            config["rope_scaling"] = scaling
        experts = int(self.arch_value("expert_count", 0) or 0)
        if experts:  # a mixture of experts: llama.cpp stores Mixtral as architecture llama
            if self.architecture == "llama":
                config.update(architectures=["MixtralForCausalLM"], model_type="mixtral",
                              num_local_experts=experts)
            config.update(self.moe_fields(experts))
        return config

    def moe_fields(self, experts: int) -> dict:
        """A mixture of experts' config fields: top-k, each expert's width (its stacked
        ``ffn_gate_exps`` rows), the routing weights renormalised unless the file says not
        (``expert_weights_norm``)."""
        used = self.arch_value("expert_used_count", required=True)
        width = self.tensor_shape("blk.0.ffn_gate_exps.weight")[1]
        return {"num_experts_per_tok": int(used), "intermediate_size": width,
                "moe_intermediate_size": width,
                "norm_topk_prob": bool(self.arch_value("expert_weights_norm", True))}

    def _rope_scaling(self, theta: float, head_dim: int) -> Optional[dict]:
        """The HF ``rope_scaling`` the file states, if any (the importer refuses what it
        cannot build, as for a ``config.json``)."""
        if ROPE_FREQS in self._tensors:
            return llama3_rope_scaling(self.read(ROPE_FREQS).flatten().tolist(), theta,
                                       head_dim, self.path)
        kind = self.arch_value("rope.scaling.type")
        if kind in (None, "none"):
            return None
        scaling = {"rope_type": str(kind), "factor": self.arch_value("rope.scaling.factor")}
        original = self.arch_value("rope.scaling.original_context_length")
        if original:
            scaling["original_max_position_embeddings"] = int(original)
        return scaling

    # ------------------------------------------------------------------ tensors
    def read(self, gguf_name: str) -> "torch.Tensor":
        """One tensor as float32, dequantized a slice of rows at a time into the result."""
        import torch

        gguf = _gguf()
        tensor = self._tensors[gguf_name]
        shape = self.tensor_shape(gguf_name)
        out = torch.empty(shape, dtype=torch.float32)
        target = out.numpy().reshape(-1, shape[-1])
        stored = tensor.data.reshape(-1, tensor.data.shape[-1])  # rows of values or blocks
        step = max(1, DEQUANT_CHUNK_ELEMENTS // shape[-1])
        for start in range(0, stored.shape[0], step):
            target[start:start + step] = gguf.quants.dequantize(stored[start:start + step],
                                                                tensor.tensor_type)
        return out

    # ------------------------------------------------------------------ tokenizer
    def write_tokenizer(self, out_dir: str) -> list[str]:
        """``tokenizer.json``, ``tokenizer_config.json`` (BOS/EOS/pad) and
        ``chat_template.jinja`` (``tokenizer.chat_template``) in ``out_dir``, by
        ``transformers``' own GGUF tokenizer conversion; returns the file names.

        The file is shown to ``transformers`` alone in a folder of its own, so that no
        tokenizer file lying beside it is mixed in.
        """
        import tempfile

        if self.value("tokenizer.ggml.model") is None:
            raise TokenizerError(f"{self.path} holds no tokenizer (no tokenizer.ggml.model); "
                                 "pass the model's tokenizer with --vocab_file")
        try:
            from transformers import AutoTokenizer
        except ImportError:
            raise TokenizerError("rebuilding a GGUF file's tokenizer needs transformers: pip "
                                 "install transformers (or pass --vocab_file)") from None
        with tempfile.TemporaryDirectory(prefix="gguf-tokenizer-") as alone:
            link = os.path.join(alone, "model.gguf")
            os.symlink(os.path.abspath(self.path), link)
            try:
                with transformers_reads_gguf_once():
                    tokenizer = AutoTokenizer.from_pretrained(alone, gguf_file="model.gguf")
            except Exception as exc:  # noqa: BLE001 - the library's message, with the file
                raise TokenizerError(
                    f"transformers cannot rebuild the tokenizer of {self.path} "
                    f"({type(exc).__name__}: {str(exc)[:200]}); pass the model's tokenizer "
                    "with --vocab_file") from None
        os.makedirs(out_dir, exist_ok=True)
        tokenizer.save_pretrained(out_dir)
        self._drop_tokens_beyond_the_vocabulary(os.path.join(out_dir, TOKENIZER_JSON))
        return sorted(os.listdir(out_dir))

    def _drop_tokens_beyond_the_vocabulary(self, tokenizer_json: str) -> None:
        """Remove added tokens the file does not have.

        transformers' byte-level builder adds GPT-2's ``<|endoftext|>`` whenever the
        vocabulary lacks it (Llama 3's does): one id past the model's embedding rows,
        which no text of the model contains.
        """
        import json

        size = len(self.reader.get_field("tokenizer.ggml.tokens").data)
        with open(tokenizer_json, encoding="utf-8") as handle:
            spec = json.load(handle)
        kept = [token for token in spec.get("added_tokens", []) if token["id"] < size]
        if len(kept) == len(spec.get("added_tokens", [])):
            return
        spec["added_tokens"] = kept
        with open(tokenizer_json, "w", encoding="utf-8") as handle:
            json.dump(spec, handle, ensure_ascii=False, indent=2)


class GGUFWeights:
    """The tensors of a :class:`GGUFModel` under their HF names, float32, read one at a
    time (a :class:`~megatron_ext.models.hf_checkpoint.WeightSource`).

    Every tensor of the file must have an HF name in the layout (``rope_freqs.weight``
    aside, which the config took): a tensor this reader would drop means a model it
    would convert wrongly.
    """

    format = "gguf"

    def __init__(self, model: GGUFModel):
        self.model = model
        self.model_dir = model.path  # named in messages, like HFWeights'
        from megatron_ext.models.hf_config import hf_adapter

        layout = model.layout
        self._permuted = layout.permuted_qk
        self._norm_offset = layout.norm_offset
        self._split_qkv = layout.split_qkv
        self._kv_heads = int(model.config.get("num_key_value_heads")
                             or model.config.get("num_kv_heads") or 1)
        layers = int(model.config["num_hidden_layers"])
        self._heads = {"q_proj": int(model.config["num_attention_heads"]),
                       "k_proj": self._kv_heads}
        adapter = hf_adapter(model.config, model.path)  # the family's own tensor names
        names = list(adapter.embedding_names())
        for layer in range(layers):
            names += adapter.layer_names(layer)
        self._cache: dict = {}  # the stacked expert tensors of one layer
        self._cached_layer: Optional[str] = None
        self._to_gguf = {}
        self._expert = {}  # HF name of one expert's tensor -> its index in the stacked one
        table = _gguf_name_table(model.architecture, layers)
        for name in names:
            stem, suffix = name.rsplit(".", 1)
            expert = EXPERT_STEM.match(stem)  # llama.cpp stacks the experts of a layer
            if expert:
                stem = f"{expert.group(1)}.{expert.group(3)}"
            gguf_name = table.get_name(stem)
            if gguf_name and model.has_tensor(f"{gguf_name}.{suffix}"):
                self._to_gguf[name] = f"{gguf_name}.{suffix}"
                if expert:
                    self._expert[name] = int(expert.group(2))
        read = set(self._to_gguf.values()) | {ROPE_FREQS}
        unread = [name for name in model.tensor_names() if name not in read]
        if unread:
            extra = QKV_BIAS_SUFFIXES + QK_NORM_SUFFIXES
            raise UnsupportedModelError(
                f"{model.path}: {len(unread)} tensors do not belong to the "
                f"{model.architecture} layout ({', '.join(unread[:4])}"
                f"{'...' if len(unread) > 4 else ''}); biases or norms beyond "
                f"{', '.join(s.split('.')[-2] for s in extra)} are not built")

    def names(self) -> list[str]:
        return list(self._to_gguf)

    def shape(self, name: str) -> tuple[int, ...]:
        shape = self.model.tensor_shape(self._to_gguf[name])
        return shape[1:] if name in self._expert else shape

    def get(self, name: str) -> "torch.Tensor":
        """Tensor ``name``, dequantized to float32 (a new tensor each call; an expert's
        slice of its layer's stacked tensor, the layer's experts read once and kept until
        another layer's are asked for)."""
        if name in self._expert:
            return self._stacked(self._to_gguf[name])[self._expert[name]].clone()
        tensor = self.model.read(self._to_gguf[name])
        projection = name.rsplit(".", 2)[-2]
        if self._permuted and projection in self._heads and name.endswith(".weight"):
            tensor = unpermute_heads(tensor, self._heads[projection])
        if self._norm_offset and name.endswith("norm.weight"):
            tensor = tensor - self._norm_offset
        if self._split_qkv and projection == "query_key_value":
            tensor = grouped_qkv(tensor, self._heads["q_proj"], self._kv_heads)
        return tensor

    def _stacked(self, gguf_name: str) -> "torch.Tensor":
        """A stacked expert tensor (``blk.N.ffn_*_exps``), dequantized once per layer."""
        layer = gguf_name.split(".")[1]
        if self._cached_layer != layer:
            self._cache, self._cached_layer = {}, layer
        if gguf_name not in self._cache:
            self._cache[gguf_name] = self.model.read(gguf_name)
        return self._cache[gguf_name]

    def require(self, names: list[str]) -> None:
        missing = [n for n in names if n not in self._to_gguf]
        if missing:
            raise HFCheckpointError(
                f"{self.model.path}: {len(missing)} expected tensors are missing "
                f"({', '.join(missing[:4])}{'...' if len(missing) > 4 else ''}); the file is "
                f"incomplete or not a {self.model.architecture} model")


def stored_tensor(layout, name: str, tensor: "torch.Tensor", num_heads: int,
                  num_kv_heads: int) -> "torch.Tensor":
    """HF tensor ``name`` as ``layout`` stores it in a GGUF (the inverse of
    :meth:`GGUFWeights.get`): Llama q/k rows permuted, Gemma's norms plus the offset,
    Falcon's fused q/k/v ungrouped."""
    projection = name.rsplit(".", 2)[-2]
    heads = {"q_proj": num_heads, "k_proj": num_kv_heads}
    if layout.permuted_qk and projection in heads and name.endswith(".weight"):
        tensor = permute_heads(tensor, heads[projection])
    if layout.norm_offset and name.endswith("norm.weight"):
        tensor = tensor + layout.norm_offset
    if layout.split_qkv and projection == "query_key_value":
        tensor = ungrouped_qkv(tensor, num_heads, num_kv_heads)
    return tensor


def export_layout(model_type: str) -> GGUFLayoutType:
    """The GGUF layout a model of HF ``model_type`` is written in (its family's own, or the
    architecture llama.cpp stores it under); refuses a type no layout takes."""
    for layout in gguf_layouts().values():
        if model_type == layout.model_type or model_type in layout.also_exports:
            return layout
    takes = sorted({t for layout in gguf_layouts().values()
                    for t in (layout.model_type, *layout.also_exports)})
    raise UnsupportedModelError(
        f"a {model_type!r} model has no GGUF layout llama.cpp runs; GGUF export supports "
        f"{', '.join(takes)} models (export it as a Hugging Face model with "
        "tools/megatron_to_hf.py instead)")


def gguf_name_table(architecture: str, layers: int):
    """The ``gguf`` package's HF <-> GGUF tensor name table for ``architecture``, used
    both ways (import: GGUF names of the family's HF names; export: the same lookup)."""
    return _gguf_name_table(architecture, layers)


_SHARING = False
"""Is a :func:`transformers_reads_gguf_once` block open (its swap is process-wide)?"""


@contextlib.contextmanager
def transformers_reads_gguf_once() -> Iterator[None]:
    """Within the block, transformers' GGUF loading (``from_pretrained(gguf_file=...)`` of
    a config, model or tokenizer) parses each file once and builds the ``gguf`` package's
    tensor-name table once.

    Why: transformers opens the file anew for the config, for the weights and for the
    tokenizer (``gguf.GGUFReader``: a numpy view per tokenizer string, ~4 s for SmolLM2's
    49k tokens and merges), and builds ``gguf.get_tensor_name_map`` again for every
    submodule of the model (~14 ms each, 397 times for SmolLM2-135M). Both are pure and
    only read: within the block the reader is :func:`_reader`'s shared one and the table
    is cached, so the values are the same (measured on SmolLM2-135M Q4_1:
    ``AutoModelForCausalLM.from_pretrained`` 15.8 -> 7.6 s of CPU). transformers looks
    both names up in the ``gguf`` module when it loads, which is what is swapped here,
    for the block only (one loading thread at a time, as ours are). Without the gguf
    package there is nothing to share (and transformers loads no GGUF file).
    """
    global _SHARING
    try:
        import gguf
    except ImportError:
        gguf = None
    if gguf is None or _SHARING:  # nothing to share, or the outer block shares already
        yield
        return
    reader_class, name_map = gguf.GGUFReader, gguf.get_tensor_name_map

    def shared_reader(path, mode="r"):
        if mode != "r":
            return reader_class(path, mode)
        return _reader(os.fspath(path), reader_class)

    _SHARING = True
    gguf.GGUFReader = shared_reader
    gguf.get_tensor_name_map = functools.lru_cache(maxsize=8)(name_map)
    try:
        yield
    finally:
        gguf.GGUFReader, gguf.get_tensor_name_map = reader_class, name_map
        _SHARING = False


@functools.lru_cache(maxsize=16)
def _gguf_name_table(architecture: str, layers: int):
    """The ``gguf`` package's HF -> GGUF tensor name table for ``architecture`` (built once
    per process: ~0.1 s each, and only read)."""
    gguf = _gguf()
    arch = next(key for key, value in gguf.MODEL_ARCH_NAMES.items() if value == architecture)
    return gguf.get_tensor_name_map(arch, layers)
