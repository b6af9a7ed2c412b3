"""megatron_rpt.data"""
