"""Hugging Face folder / GGUF file / built-in model -> ONNX through Optimum (needs the [export] extra)."""
