"""Install with ``pip install -e .`` (after ``pip install torch==2.13.0`` on CPU machines)."""

import re
from pathlib import Path

from setuptools import find_packages, setup

version = re.search(r'__version__ = "([^"]+)"',
                    Path(__file__).with_name("megatron_ext").joinpath("__init__.py").read_text()).group(1)

setup(
    name="megatron-instruct",
    version=version,
    description="Instruction finetuning on megatron-core: preprocessing, training, conversion tools",
    long_description=Path(__file__).with_name("README.md").read_text(encoding="utf-8"),
    long_description_content_type="text/markdown",
    python_requires=">=3.10",
    packages=find_packages(include=["megatron_ext", "megatron_ext.*", "instruct", "tools"]),
    install_requires=[
        "torch>=2.1",
        "megatron-core>=0.16.1,<0.17",  # compat/ and models/ rely on 0.16 internals
        "psutil",  # megatron-core's checkpoint saving needs it
        "numpy",
        "sentencepiece>=0.2",
        "protobuf",  # to read SentencePiece model protos
        "tokenizers>=0.19",
        "tqdm",
        "tensorboard",  # training scalars (metrics.jsonl has the same figures)
        "matplotlib",  # the launcher's loss.png
    ],
    extras_require={
        "hf": ["transformers>=4.40", "safetensors", "gguf>=0.17"],  # gguf: GGUF imports
        "gpu": ["flash-attn", "transformer-engine"],
        # transformers reads GGUF files with gguf and accelerate: the tests compare with it
        "test": ["pytest", "pytest-timeout", "transformers>=4.40", "safetensors", "gguf>=0.17",
                 "accelerate", "peft>=0.13", "wandb"],  # peft: exported adapters are checked against it
    },
    entry_points={
        "console_scripts": [
            "preprocess-instruct-data=instruct.preprocess_instruct_data:console_main",
            "megatron-sft=instruct.sft:console_main",
        ],
    },
)
