"""Checkpoint I/O: streaming HF safetensors, Megatron dist checkpoints of model weights, HF <-> Megatron conversion."""
