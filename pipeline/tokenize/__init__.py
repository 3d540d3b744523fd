"""The tokenize stage: tokenizer loading, the pure core (texts in, Arrow out), the per-unit stage."""
