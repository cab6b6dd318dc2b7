"""The LLM judge: scores every generated answer through an OpenAI-compatible endpoint."""
