"""megatron_rpt.bridge: the Hugging Face <-> Megatron name map and the weight bridge to rollout engines."""

from megatron_rpt.bridge.resharding import SyncStats, WeightBridge, hf_from_tp_shards, hf_slice_of_shard

__all__ = ["SyncStats", "WeightBridge", "hf_from_tp_shards", "hf_slice_of_shard"]
