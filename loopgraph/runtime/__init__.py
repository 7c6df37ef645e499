"""Running models with ONNX Runtime. Needs neither torch nor transformers."""
