"""KV-cache quantization: packed quantized cache layers, layer-wise precision layouts, the KVTuner search."""
