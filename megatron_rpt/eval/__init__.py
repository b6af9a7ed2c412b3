"""Evaluation of RPT models: the paper's next-token accuracy table, scaling fit and pattern analysis.

Modules: ``next_token`` (standard next-token prediction), ``reasoning`` (next-token reasoning,
Random@1 / Pass@k), ``report`` (buckets, tables, JSON/Markdown), ``runner`` (validation set,
both modes, the trainer hook), ``engine_loading`` (HF / Megatron checkpoints into an engine),
``__main__`` (the ``python -m megatron_rpt.eval`` command line), ``solve`` (problem-solving responses),
``scaling`` (FLOPs and the power-law fit), ``plots`` (figures), ``patterns`` (section 4.5).
"""

from megatron_rpt.eval.runner import evaluate_during_training, run_evaluation

__all__ = ["evaluate_during_training", "run_evaluation"]
