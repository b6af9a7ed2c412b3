"""The built-in rollout engine: batched sampling with the plain-torch :class:`Decoder`.

Owns: :class:`BuiltinEngine` -- continuous batching over a static KV cache (a finished
row is retired and refilled with the next queued sample right away), temperature / top-p
sampling with a seeded ``torch.Generator``, stop token ids and stop strings, per-token
log-probabilities, in-place weight updates under HF names, and sleep / wake-up.

Scheduling in one paragraph: the ``n`` samples of every prompt are queued in order. Free
cache rows are filled from the queue; a prompt is prefilled once and its KV rows are
copied to the other samples of the same prompt (from an active row when one still holds
it). Active rows always occupy cache rows ``[0, n_active)``: a finished row is replaced
by the last active row (one row copy), so every decode step runs on a contiguous view
with one matmul per projection.
"""

from __future__ import annotations

import json
from collections import Counter, deque
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from safetensors import safe_open

from megatron_rpt.model.dtypes import DTYPES
from megatron_rpt.model.hf_config import ArchConfig, load_hf_config
from megatron_rpt.rollout.base import Generation, SamplingParams, hf_parameter_shapes
from megatron_rpt.rollout.torch_decoder import Decoder, KVCache


def resolve_dtype(dtype: str | torch.dtype) -> torch.dtype:
    if isinstance(dtype, torch.dtype):
        return dtype
    if dtype not in DTYPES:
        raise ValueError(f"dtype {dtype!r} is not one of {sorted(DTYPES)}")
    return DTYPES[dtype]


@dataclass
class _Row:
    """One sample being generated in one KV-cache row."""

    prompt_index: int
    sample_index: int
    prompt: list[int]
    token_ids: list[int] = field(default_factory=list)
    logprobs: list[float] = field(default_factory=list)
    finish_reason: str | None = None
    stopped_by_string: bool = False

    @property
    def cache_len(self) -> int:
        """Tokens whose K/V are in the cache (the newest sampled token is not fed yet)."""
        return len(self.prompt) + len(self.token_ids) - 1


def sample_tokens(logits: torch.Tensor, temperature: float, top_p: float,
                  generator: torch.Generator | None) -> tuple[torch.Tensor, torch.Tensor]:
    """Sample one token per row of float32 ``logits`` [B, V].

    Returns (tokens [B], logprobs [B]): ``log_softmax(logits / temperature)`` of the sampled
    tokens, before top-p (the GRPO old-policy log-probability; see rollout/base.py), and
    ``log_softmax(logits)`` when greedy.
    """
    logprobs = torch.log_softmax(logits if temperature in (0, 1.0) else logits / temperature, dim=-1)
    if temperature == 0:
        tokens = logits.argmax(dim=-1)
    else:
        probs = logprobs.exp()
        if top_p < 1.0:
            sorted_probs, order = probs.sort(dim=-1, descending=True)
            mass_before = sorted_probs.cumsum(dim=-1) - sorted_probs
            sorted_probs[mass_before >= top_p] = 0.0  # smallest prefix whose mass reaches top_p
            probs = torch.zeros_like(probs).scatter_(-1, order, sorted_probs)
        tokens = _inverse_cdf_sample(probs, generator)
    return tokens, logprobs.gather(1, tokens.unsqueeze(1)).squeeze(1)


def _inverse_cdf_sample(probs: torch.Tensor, generator: torch.Generator | None) -> torch.Tensor:
    # One uniform per row against a float64 CDF: much cheaper than torch.multinomial, which
    # draws an exponential variate for every vocabulary entry. Zero-probability tokens have
    # a flat CDF step and can never be chosen.
    cdf = probs.double().cumsum(dim=-1)
    total = cdf[:, -1:]
    u = torch.rand(probs.shape[0], 1, generator=generator, dtype=torch.float64, device=probs.device) * total
    u = torch.minimum(u, torch.nextafter(total, torch.zeros_like(total)))  # rounding must not reach the end
    return torch.searchsorted(cdf, u, right=True).squeeze(1)


class BuiltinEngine:
    """Rollouts with the plain-torch decoder; CPU default, works on one GPU too.

    Weights start empty: load them with :meth:`update_weights` (or :meth:`from_hf_dir`).
    ``tokenizer`` (anything with ``decode(ids, skip_special_tokens=...)``) is needed for
    ``Generation.text`` and stop strings; without it ``text`` is empty.
    """

    def __init__(self, arch: ArchConfig, dtype: str | torch.dtype = "float32", device: str | torch.device = "cpu",
                 max_batch_size: int = 64, max_seq_len: int = 4096, eos_token_ids: Iterable[int] = (),
                 tokenizer: Any = None, seed: int = 0, prefill_chunk_tokens: int = 16384):
        if max_batch_size < 1 or max_seq_len < 2:
            raise ValueError(f"max_batch_size={max_batch_size} must be >= 1 and max_seq_len={max_seq_len} >= 2")
        self.arch = arch
        self.device = torch.device(device)
        self.dtype = resolve_dtype(dtype)
        self.max_batch_size, self.max_seq_len = max_batch_size, max_seq_len
        self.eos_token_ids = sorted(set(eos_token_ids))
        self.tokenizer = tokenizer
        self.prefill_chunk_tokens = prefill_chunk_tokens
        self.model = Decoder(arch, self.dtype, self.device)
        self._generator = torch.Generator(self.device).manual_seed(seed)
        self._missing = set(hf_parameter_shapes(arch))  # names never written yet
        self._kv: KVCache | None = None
        self._sleeping = False

    # ------------------------------------------------------------------ construction

    @classmethod
    def from_hf_dir(cls, path: str | Path, *, dtype: str | torch.dtype = "float32", device: str | torch.device = "cpu",
                    max_batch_size: int = 32, max_seq_len: int | None = None, tokenizer: Any = None,
                    seed: int = 0) -> BuiltinEngine:
        """Engine with the weights of a Hugging Face model directory (safetensors)."""
        path = Path(path)
        arch = load_hf_config(path)
        files = sorted(path.glob("*.safetensors"))
        if not files:
            raise FileNotFoundError(f"no *.safetensors files in {path}; save the model with safe_serialization=True")
        engine = cls(arch, dtype, device, max_batch_size, max_seq_len or arch.max_position_embeddings,
                     eos_token_ids=_eos_ids(arch, path), tokenizer=tokenizer, seed=seed)

        def tensors():
            for f in files:
                with safe_open(str(f), framework="pt") as sf:
                    for name in sf.keys():
                        if not name.endswith("rotary_emb.inv_freq"):  # old checkpoints store this buffer
                            yield name, sf.get_tensor(name)

        engine.update_weights(tensors())
        return engine

    # ------------------------------------------------------------------ RolloutEngine protocol

    retains_pushed_tensors = False  # every pushed tensor is copied before the next is requested

    def update_weights(self, stream: Iterable[tuple[str, torch.Tensor]]) -> None:
        self._missing -= self.model.load_hf_weights(stream)

    @torch.inference_mode()
    def prompt_logprobs(self, sequences: list[list[int]]) -> list[list[float]]:
        self._check_ready(sequences, SamplingParams())
        out = []
        for seq in sequences:  # one at a time: no padding, and no cache to size
            tokens = torch.tensor([seq], device=self.device)
            logprobs = self.model(tokens)[0, :-1].log_softmax(dim=-1)
            out.append(logprobs.gather(1, tokens[0, 1:].unsqueeze(1)).squeeze(1).tolist())
        return out

    def sleep(self) -> None:
        self._kv = None
        if self.device.type == "cuda":
            self.model.to("cpu")
            torch.cuda.empty_cache()
        self._sleeping = True

    def wake_up(self) -> None:
        if self._sleeping and self.device.type == "cuda":
            self.model.to(self.device)
        self._sleeping = False

    @torch.inference_mode()
    def generate(self, prompts: list[list[int]], params: SamplingParams) -> list[list[Generation]]:
        if not prompts:
            return []
        self._check_ready(prompts, params)
        self.wake_up()
        generator = self._generator if params.seed is None else torch.Generator(self.device).manual_seed(params.seed)
        stop_ids = set(self.eos_token_ids) | set(params.stop_token_ids)
        total = len(prompts) * params.n
        cache = self._cache(min(self.max_batch_size, total),
                            min(self.max_seq_len, max(map(len, prompts)) + params.max_tokens))

        queue = deque((i, j) for i in range(len(prompts)) for j in range(params.n))
        pending = Counter(i for i, _ in queue)  # samples not admitted yet, per prompt
        prompt_logits: dict[int, torch.Tensor] = {}  # last-prompt-token logits, while samples are pending
        active: list[_Row] = []
        results: list[list[Generation | None]] = [[None] * params.n for _ in prompts]
        while queue or active:
            if queue and len(active) < cache.batch:
                tasks = [queue.popleft() for _ in range(min(cache.batch - len(active), len(queue)))]
                start = len(active)
                self._admit(tasks, prompts, active, cache, prompt_logits)
                new_rows = active[start:]
                for row in new_rows:
                    pending[row.prompt_index] -= 1
                logits = torch.stack([prompt_logits[r.prompt_index] for r in new_rows])
                for pi in {r.prompt_index for r in new_rows if pending[r.prompt_index] == 0}:
                    del prompt_logits[pi]
            else:
                new_rows = active
                tokens = torch.tensor([[r.token_ids[-1]] for r in active], device=self.device)
                logits = self.model(tokens, [r.cache_len for r in active], cache, rows=slice(0, len(active)))[:, 0]
            sampled, logprobs = sample_tokens(logits, params.temperature, params.top_p, generator)
            for row, token, logprob in zip(new_rows, sampled.tolist(), logprobs.tolist()):
                row.token_ids.append(token)
                row.logprobs.append(logprob)
                self._check_finished(row, params, stop_ids, cache.max_len)
            self._retire_finished(active, cache, results, params.stop)
        return results  # type: ignore[return-value]

    # ------------------------------------------------------------------ scheduling

    def _admit(self, tasks: list[tuple[int, int]], prompts: list[list[int]], active: list[_Row],
               cache: KVCache, prompt_logits: dict[int, torch.Tensor]) -> None:
        """Append rows for ``tasks`` to ``active``: prefill each new prompt once, copy the rest."""
        holder = {row.prompt_index: r for r, row in enumerate(active)}  # rows whose cache holds the prompt
        fresh, copies = [], []
        for pi, si in tasks:
            (copies if pi in holder or any(f.prompt_index == pi for f in fresh) else fresh).append(
                _Row(pi, si, list(prompts[pi]))
            )
        start = len(active)
        active.extend(fresh)
        self._prefill(fresh, start, cache, prompt_logits)
        for r, row in enumerate(fresh, start):
            holder[row.prompt_index] = r
        dst_start = len(active)
        active.extend(copies)
        if copies:
            cache.copy_rows([holder[row.prompt_index] for row in copies],
                            list(range(dst_start, dst_start + len(copies))),
                            max(len(row.prompt) for row in copies))

    def _prefill(self, rows: list[_Row], start: int, cache: KVCache, prompt_logits: dict[int, torch.Tensor]) -> None:
        """Run the prompts of ``rows`` (cache rows start, start+1, ...) in right-padded chunks."""
        i = 0
        while i < len(rows):
            j, longest = i, 0
            budget = self.prefill_chunk_tokens
            while j < len(rows) and (j == i or (j + 1 - i) * max(longest, len(rows[j].prompt)) <= budget):
                longest = max(longest, len(rows[j].prompt))
                j += 1
            chunk = rows[i:j]
            tokens = torch.zeros(len(chunk), longest, dtype=torch.long)
            for b, row in enumerate(chunk):
                tokens[b, : len(row.prompt)] = torch.tensor(row.prompt)
            last = torch.tensor([len(row.prompt) - 1 for row in chunk], device=self.device)
            logits = self.model(tokens.to(self.device), None, cache, rows=slice(start + i, start + j),
                                logits_index=last)
            for row, row_logits in zip(chunk, logits):
                prompt_logits[row.prompt_index] = row_logits
            i = j

    def _check_finished(self, row: _Row, params: SamplingParams, stop_ids: set[int], max_len: int) -> None:
        if row.token_ids[-1] in stop_ids:
            row.finish_reason = "stop"
        elif params.stop and self._hits_stop_string(row, params.stop):
            row.finish_reason, row.stopped_by_string = "stop", True
        elif len(row.token_ids) >= params.max_tokens or len(row.prompt) + len(row.token_ids) >= max_len:
            row.finish_reason = "length"

    def _hits_stop_string(self, row: _Row, stop: list[str]) -> bool:
        # Decode only a tail long enough to hold any stop string: a character takes at most
        # 4 byte-level tokens, so 4 tokens per character (+1 for a leading partial token).
        window = 4 * max(map(len, stop)) + 1
        tail = self._decode(row.token_ids[-window:])
        return any(s in tail for s in stop)

    def _retire_finished(self, active: list[_Row], cache: KVCache, results: list[list[Generation | None]],
                         stop: list[str]) -> None:
        for r in range(len(active) - 1, -1, -1):  # descending: the row moved into r is never finished
            row = active[r]
            if row.finish_reason is None:
                continue
            results[row.prompt_index][row.sample_index] = self._to_generation(row, stop)
            last = len(active) - 1
            if r != last:
                cache.copy_rows([last], [r], active[last].cache_len)
                active[r] = active[last]
            active.pop()

    def _to_generation(self, row: _Row, stop: list[str]) -> Generation:
        text = ""
        if self.tokenizer is not None:
            ids = row.token_ids if row.stopped_by_string or row.finish_reason == "length" else row.token_ids[:-1]
            text = self._decode(ids)
            if row.stopped_by_string:  # like vLLM's include_stop_str_in_output=True
                text = text[: min(text.find(s) + len(s) for s in stop if s in text)]
        return Generation(row.prompt_index, row.sample_index, row.token_ids, text, row.logprobs, row.finish_reason)

    def _decode(self, ids: list[int]) -> str:
        return self.tokenizer.decode(ids, skip_special_tokens=True)

    # ------------------------------------------------------------------ checks and memory

    def _check_ready(self, prompts: list[list[int]], params: SamplingParams) -> None:
        if self._missing:
            example = sorted(self._missing)[:3]
            raise RuntimeError(
                f"BuiltinEngine has no weights for {len(self._missing)} parameters (e.g. {example}); "
                "call update_weights() with the full model first, or build it with BuiltinEngine.from_hf_dir()"
            )
        if params.stop and self.tokenizer is None:
            raise ValueError("stop strings need a tokenizer: pass tokenizer= to BuiltinEngine")
        for i, prompt in enumerate(prompts):
            if not prompt:
                raise ValueError(f"prompt {i} is empty; every prompt needs at least one token")
            if len(prompt) >= self.max_seq_len:
                raise ValueError(
                    f"prompt {i} has {len(prompt)} tokens but the engine's max_seq_len is {self.max_seq_len}; "
                    "shorten prompts (data.max_prompt_tokens) or raise the engine's max_seq_len"
                )
            low, high = min(prompt), max(prompt)
            if low < 0 or high >= self.arch.vocab_size:
                bad = low if low < 0 else high
                raise ValueError(f"prompt {i} has token id {bad} outside [0, {self.arch.vocab_size})")

    def _cache(self, batch: int, max_len: int) -> KVCache:
        """Reuse the cache when it is big enough, else allocate one just big enough."""
        kv = self._kv
        if kv is None or kv.batch < batch or kv.max_len < max_len:
            self._kv = None  # free the old one before allocating
            kv = self._kv = KVCache(self.arch, batch, max_len, self.dtype, self.device)
        return kv


def _eos_ids(arch: ArchConfig, path: Path) -> list[int]:
    """EOS ids from config.json and generation_config.json (either may hold an int or a list)."""
    ids: set[int] = set()

    def add(value: Any) -> None:
        if isinstance(value, int):
            ids.add(value)
        elif isinstance(value, list):
            ids.update(v for v in value if isinstance(v, int))

    add(arch.eos_token_id)
    gen_cfg = path / "generation_config.json"
    if gen_cfg.is_file():
        add(json.loads(gen_cfg.read_text()).get("eos_token_id"))
    return sorted(ids)
