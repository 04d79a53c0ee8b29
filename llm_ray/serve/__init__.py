"""Serving: the built-in generator (plain PyTorch) and its Ray Serve app with an OpenAI-compatible API."""
