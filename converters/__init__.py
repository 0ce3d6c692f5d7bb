"""Everything that writes a model: one pass per method (merge, carve, prune, PTQ) and the GGUF/ONNX writers.

Converters never import the CLI; ``edgerun export`` chains them.
"""
