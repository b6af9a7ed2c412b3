"""megatron_rpt.rl"""
