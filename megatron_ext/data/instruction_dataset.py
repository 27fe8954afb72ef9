"""Reading preprocessed instruction data: token and role streams of one prefix.

Why: the trainer's first arrow. It opens ``{prefix}-text`` and
``{prefix}-role`` with megatron-core's ``IndexedDataset``, checks that they
belong together, and accepts datasets written by Megatron-LLM's own
preprocessor, whose ``.idx`` has no per-record document index (megatron-core
asserts on that by default; ``fast_cache_load`` skips the assertion and our
own checks take its place). ``{prefix}-meta.json``, when present, lets the
trainer refuse data made with another tokenizer.
"""

from __future__ import annotations

import os
import struct
from typing import Optional

import numpy as np

from megatron_ext.data.indexed import dataset_paths, read_meta
from megatron_ext.errors import DataError
from megatron_ext.tokenizers import megatron_llm_specials_hint

TOKENIZER_FIELDS = ("type", "sha256", "vocab_size", "special_tokens")


class InstructionDataset:
    """``(tokens, roles)`` per record of one preprocessed prefix."""

    def __init__(self, prefix: str):
        from megatron.core.datasets.indexed_dataset import IndexedDataset

        paths = dataset_paths(prefix)
        missing = [paths[k] for k in ("text_bin", "text_idx", "role_bin", "role_idx")
                   if not os.path.exists(paths[k])]
        if missing:
            raise DataError(
                f"dataset {prefix} is incomplete: {', '.join(missing)} missing; create it with "
                "instruct/preprocess_instruct_data.py --output_prefix " + prefix
            )
        self.prefix = prefix
        try:
            self.text = IndexedDataset(f"{prefix}-text", fast_cache_load=True)
            self.role = IndexedDataset(f"{prefix}-role", fast_cache_load=True)
        except (AssertionError, ValueError, OSError, struct.error) as exc:
            raise DataError(f"cannot read dataset {prefix}: {exc or type(exc).__name__}") from None
        if not np.array_equal(self.text.sequence_lengths, self.role.sequence_lengths):
            raise DataError(
                f"{prefix}-text and {prefix}-role do not match (different record counts or "
                "lengths): they were not written by the same preprocessing run"
            )
        self.meta: Optional[dict] = read_meta(prefix)

    def __len__(self) -> int:
        return len(self.text)

    @property
    def lengths(self) -> np.ndarray:
        return self.text.sequence_lengths

    def __getitem__(self, index: int) -> tuple[np.ndarray, np.ndarray]:
        # copies: the views die with the memory map
        return (np.array(self.text[index], dtype=np.int64),
                np.array(self.role[index], dtype=np.uint8))

    def check_tokenizer(self, identity: dict) -> None:
        """Refuse data tokenized with another tokenizer than ``identity``."""
        if self.meta is None:
            return  # Megatron-LLM data carries no tokenizer identity
        recorded = self.meta.get("tokenizer", {})
        differences = [
            f"{field}: data {recorded.get(field)!r} vs trainer {identity.get(field)!r}"
            for field in TOKENIZER_FIELDS
            if recorded.get(field) != identity.get(field)
        ]
        if differences:
            shown = "; ".join(d if len(d) < 200 else d[:200] + "..." for d in differences)
            raise DataError(
                f"dataset {self.prefix} was tokenized with a different tokenizer ({shown}); "
                "pass the same --tokenizer_type/--vocab_file/--vocab_extra_ids_list as when "
                "preprocessing, or preprocess the data again with this tokenizer"
                + megatron_llm_specials_hint(recorded, identity)
            )
