"""Routing data: schema, readers, TFDS builders, tokenizer and the grain pipeline."""
