"""The policy model: HF architecture parsing, Megatron-Core HybridModel / GPTModel build, layer specs,
megatron-core version switches, CPU shim."""
