"""The policy model: HF architecture parsing, Megatron-Core HybridModel / GPTModel build, layer specs, version switches, CPU shim."""
