"""megatron_rpt.bridge: HF <-> Megatron names (name_maps), layout maths (layouts), the bucket plan
(buckets) and the weight bridge that streams the policy into rollout engines (resharding)."""

from megatron_rpt.bridge.resharding import SyncStats, WeightBridge

__all__ = ["SyncStats", "WeightBridge"]
