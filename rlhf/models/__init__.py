"""Model loading (transformers + peft), offline tiny models, and per-token forward passes."""
