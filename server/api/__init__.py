"""The HTTP layer: OpenAI-compatible routes over the engine (no tensors here)."""
