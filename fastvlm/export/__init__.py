"""Taking FastVLM off PyTorch: ONNX graphs (and their quantized variants) that onnxruntime and
Transformers.js run, an onnxruntime runner for them, and the Core ML vision encoder."""
