"""Hugging Face interchange: which HF architecture is the same model, its config.json, and tokenizer files
that `AutoTokenizer` loads."""
