"""The policy model: HF architecture parsing, Megatron-Core GPTModel build, layer specs, CPU shim."""
