"""The Hugging Face backend's model side: any ``AutoModelForCausalLM`` loaded as it is
(no conversion), sharded with FSDP2 (and its ``tp_plan``) on one device mesh, with
activation checkpointing, peft adapters and torch.compile per decoder layer.

Imports no megatron family: a model that no file in ``models/families`` knows trains
here the day transformers knows it (``training/hf_trainer.py`` runs the loop)."""
