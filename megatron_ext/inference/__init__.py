"""Inference: text generation with a KV cache, and answer metrics for evaluation."""
