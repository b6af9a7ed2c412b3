"""megatron_rpt.rollout"""
