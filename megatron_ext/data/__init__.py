"""Instruction data: records, chat formats, tokenization workers, indexed files."""
