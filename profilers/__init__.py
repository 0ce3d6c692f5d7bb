"""Measurement: latency, memory, energy, accuracy and effective bits per weight, wrapped around any backend."""
