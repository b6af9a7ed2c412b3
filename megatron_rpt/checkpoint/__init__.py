"""Checkpoint I/O and HF <-> Megatron conversion.

Modules: ``hf_io`` (streaming safetensors reader / shard writer), ``model_ckpt`` (Megatron
dist checkpoints of model weights), ``convert`` (the ``tools/convert.py`` engine), ``parity``
(transformers vs Megatron logits), ``atomic`` (all-or-nothing output directories).
"""
