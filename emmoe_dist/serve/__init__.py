"""Serving: vLLM engines behind an OpenAI-compatible route on Ray Serve (`app`), speaking the
chat-completions wire format (`protocol`). The same endpoint serves generation and a
self-hosted judge."""
