"""The ``data`` section and its ``data.mixture`` corpora: where documents come from and how problems are drawn."""

from __future__ import annotations

from dataclasses import dataclass, field

from megatron_rpt.config.kinds import NonNegInt, PosFloat, PosInt, Template
from megatron_rpt.config_schema import ConfigError, Section


@dataclass
class CorpusConfig(Section):
    name: str = ""
    """Name of the corpus: prefixes its document ids (name/file:row) and labels it in the manifest and metrics."""
    paths: list[str] = field(default_factory=list)
    """JSONL / Parquet files or directories of them."""
    weight: PosFloat = 1.0
    """Sampling weight: the corpus's share of the mixture's documents is weight / (sum of the weights)."""
    text_fields: list[str] = field(default_factory=lambda: ["text"])
    """Row fields joined (in this order) into a document's text."""
    text_separator: str = "\n\n"
    """String placed between the text fields."""
    min_chars: NonNegInt = 0
    """Documents with fewer characters are dropped (length filter)."""
    max_chars: PosInt | None = None
    """Documents with more characters are dropped (length filter); null: no upper limit."""

    def check(self) -> None:
        if not self.name or any(c in self.name for c in "/:") or self.name != self.name.strip():
            raise ConfigError(f"data.mixture: corpus name {self.name!r} must be non-empty, without '/', ':' or "
                              "surrounding spaces (it prefixes document ids), e.g. name: gsm8k")
        if not self.paths:
            raise ConfigError(f"data.mixture corpus {self.name!r} has no paths; list its JSONL/Parquet files")
        if not self.text_fields:
            raise ConfigError(f"data.mixture corpus {self.name!r}: text_fields is empty; name the row field(s) "
                              "holding the text, e.g. [text]")
        if self.max_chars is not None and self.max_chars < self.min_chars:
            raise ConfigError(f"data.mixture corpus {self.name!r}: max_chars={self.max_chars} is below "
                              f"min_chars={self.min_chars}; raise max_chars or lower min_chars")


@dataclass
class DataConfig(Section):
    paths: list[str] = field(default_factory=list)
    """JSONL / Parquet files, directories of them, or one prepared directory (with manifest.json)."""
    hf_dataset: str | None = None
    """Hugging Face dataset name or local dataset directory, read when data.paths is empty."""
    hf_split: str = "train"
    """Split of data.hf_dataset to read."""
    hf_streaming: bool = True
    """Stream data.hf_dataset instead of downloading it whole."""
    text_fields: list[str] = field(default_factory=lambda: ["problem", "solution"])
    """Row fields joined (in this order) into a document's text."""
    text_separator: str = "\n\n"
    """String placed between the text fields."""
    prepared: str | None = None
    """Directory written by tools/prepare_data.py (documents tokenised and scored; preferred at scale)."""
    proxy_model: str | None = None
    """HF model scoring positions by entropy on the fly; null: positions drawn uniformly (seeded)."""
    entropy_top_k: PosInt = 16
    """The filter's entropy is over the proxy's renormalised top-k next-token probabilities."""
    entropy_threshold: float = 0.5
    """Only positions whose proxy entropy is above this become problems (when scored)."""
    difficulty_thresholds: list[float] = field(default_factory=lambda: [0.5, 1.0, 1.5])
    """Increasing entropy thresholds of the easy / medium / hard splits (metrics and evaluation)."""
    max_positions_per_doc: PosInt = 8
    """At most this many problems per document per epoch."""
    min_context_tokens: NonNegInt = 16
    """A position needs at least this many tokens of context before it."""
    max_prompt_tokens: PosInt = 4096
    """Longest prompt (template + context, the context cut from the left on a token boundary)."""
    target_tokens: PosInt | None = None
    """Ground-truth tokens kept per problem; null: the rest of the document (eq. 3: no prediction is cut short)."""
    template: Template = "v0"
    """Prompt template of the paper's table 10 (v0 is the one it trains with), or raw: the bare context."""
    use_chat_template: bool = True
    """Wrap the prompt in the tokenizer's chat template (R1-Distill: <｜User｜>...<｜Assistant｜><think>)."""
    val_documents: NonNegInt = 200
    """Documents held out for validation; the train split never sees them."""
    seed: int = 1234
    """Seed of position sampling, shuffling and the held-out split."""
    mixture: list[CorpusConfig] = field(default_factory=list)
    """Several corpora sampled by weight, instead of data.paths (the same list for prepare_data and on the fly)."""
    dedup: bool = True
    """Drop exact duplicate documents of data.mixture (same text, by sha256) after their first occurrence."""

    def check(self) -> None:
        if self.mixture and (self.paths or self.hf_dataset):
            raise ConfigError("data.mixture replaces data.paths / data.hf_dataset: list every corpus under "
                              "data.mixture and leave data.paths empty and data.hf_dataset null")
        names = [c.name for c in self.mixture]
        dup = sorted({n for n in names if names.count(n) > 1})
        if dup:
            raise ConfigError(f"data.mixture names corpus {dup[0]!r} twice; give every corpus its own name")
        if sorted(self.difficulty_thresholds) != self.difficulty_thresholds:
            raise ConfigError(f"data.difficulty_thresholds={self.difficulty_thresholds} must be increasing, "
                              "e.g. [0.5, 1.0, 1.5]")
        if self.template == "raw" and self.use_chat_template:
            raise ConfigError("data.template=raw is the bare context: set data.use_chat_template=false")
        if not self.text_fields:
            raise ConfigError("data.text_fields is empty; name the row field(s) holding the text, e.g. [text]")
