"""megatron_rpt.bridge"""
