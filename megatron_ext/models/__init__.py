"""Model families and their megatron-core construction."""
