"""megatron_ext: what megatron-core lacks for instruction finetuning.

The library behind ``instruct/preprocess_instruct_data.py``, ``finetune.py`` and
``tools/``. Lower layers (``data``, ``tokenizers``) never import higher ones.
"""

__version__ = "0.1.0"
