"""LoRA / DoRA adapters around megatron-core's parallel linear layers (floor 5).

``config``: the flags and target names (no torch); ``adapters``: the modules, their
sharding, DoRA, and folding them into the base weights; ``merge``: the same fold on
unsharded tensors (export, ``merge_lora``).
"""
