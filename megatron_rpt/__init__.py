"""megatron-rpt: Reinforcement Pre-Training (arXiv 2506.08007) on Megatron-Core."""

__version__ = "0.1.0"
