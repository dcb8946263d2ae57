"""Instruction data: formats, quality checks, mixing, templates, tokenization, the Ray Data pipeline."""
