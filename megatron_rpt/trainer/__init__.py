"""The RPT trainer: Megatron policy wrapper, rollout phase, metrics, checkpoints and the loop."""
