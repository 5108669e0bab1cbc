"""Models out of the toolkit: ONNX graphs, safetensors, timm and Hugging Face Transformers layouts."""
