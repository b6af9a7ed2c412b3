"""The model's weights in Hugging Face and Megatron formats: I/O, conversion, loading and parity.

Modules: ``hf_io`` (streaming safetensors reader / shard writer), ``megatron_ckpt`` (Megatron
dist checkpoints of model weights), ``interop`` (GPTModel / HybridModel checkpoints), ``load``
(HF or Megatron weights into the live Megatron chunks), ``convert`` (the ``tools/convert.py``
engine), ``parity`` (transformers vs Megatron logits).
"""
