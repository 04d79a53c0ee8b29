"""Export of checkpoints to other ecosystems (Hugging Face)."""
