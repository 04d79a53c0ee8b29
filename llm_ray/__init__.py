"""llm-ray: raw text to a trained, served GPT-style model on a Ray cluster."""

__version__ = "0.1.0"
