"""A small decoder-only transformer in plain torch, for the built-in rollout engine.

Owns: RMSNorm, rotary embeddings (theta, Llama 3 scaling), grouped-query attention over a
static KV cache, the SwiGLU MLP, and :class:`Decoder`, which holds its weights under the
Hugging Face names of the Llama, Qwen2 (QKV bias) and Qwen3 (per-head q/k norm) families.

Numerics follow ``transformers`` exactly (same op order and casts), so float32 logits
match ``LlamaForCausalLM`` / ``Qwen2ForCausalLM`` / ``Qwen3ForCausalLM`` to ~1e-6.

Layout choices, for speed: q/k/v live in one fused ``[q+k+v, hidden]`` matrix and
gate/up in one ``[2*inter, hidden]`` matrix (one matmul each per step); the HF names map
to row slices of them (:meth:`Decoder.hf_parameters`). The KV cache is one preallocated
``[layers, batch, kv_heads, max_len, head_dim]`` tensor per K and V. Each cache row has
its own length: a row's sequence starts at slot 0 and token t sits at slot t (= its
rotary position), so prompts of different lengths batch together without left padding.
"""

from __future__ import annotations

import math
from collections.abc import Iterable
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from megatron_rpt.model.hf_config import ArchConfig, UnsupportedArchitecture
from megatron_rpt.rollout.base import check_hf_tensor, hf_parameter_shapes

# Llama 3 rope scaling constants; hf_config.py rejects checkpoints that use other values.
_LLAMA3_LOW_FREQ_FACTOR = 1.0
_LLAMA3_HIGH_FREQ_FACTOR = 4.0
_LLAMA3_ORIGINAL_MAX_POSITIONS = 8192


def _empty_param(*shape: int, dtype: torch.dtype, device: torch.device | str) -> nn.Parameter:
    # No random init: real weights always arrive through load / update_weights.
    return nn.Parameter(torch.empty(*shape, dtype=dtype, device=device), requires_grad=False)


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float, dtype: torch.dtype, device: torch.device | str):
        super().__init__()
        self.eps = eps
        self.weight = _empty_param(dim, dtype=dtype, device=device)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        dtype = x.dtype
        x32 = x.float()
        x32 = x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * x32.to(dtype)


def rope_inv_freq(arch: ArchConfig) -> torch.Tensor:
    """Inverse frequencies [head_dim/2] in float32, with Llama 3 scaling when configured."""
    dim = arch.head_dim
    inv_freq = 1.0 / (arch.rope_theta ** (torch.arange(0, dim, 2, dtype=torch.int64).float() / dim))
    factor = arch.rope_scaling_factor
    if factor is None:
        return inv_freq
    low_freq_wavelen = _LLAMA3_ORIGINAL_MAX_POSITIONS / _LLAMA3_LOW_FREQ_FACTOR
    high_freq_wavelen = _LLAMA3_ORIGINAL_MAX_POSITIONS / _LLAMA3_HIGH_FREQ_FACTOR
    wavelen = 2 * math.pi / inv_freq
    scaled = torch.where(wavelen > low_freq_wavelen, inv_freq / factor, inv_freq)
    smooth = (_LLAMA3_ORIGINAL_MAX_POSITIONS / wavelen - _LLAMA3_LOW_FREQ_FACTOR) / (
        _LLAMA3_HIGH_FREQ_FACTOR - _LLAMA3_LOW_FREQ_FACTOR
    )
    smoothed = (1 - smooth) * scaled / factor + smooth * scaled
    is_medium = ~(wavelen < high_freq_wavelen) & ~(wavelen > low_freq_wavelen)
    return torch.where(is_medium, smoothed, scaled)


class RotaryTable(nn.Module):
    """cos/sin for every position up to ``length``, grown on demand."""

    def __init__(self, arch: ArchConfig, device: torch.device | str):
        super().__init__()
        self.register_buffer("inv_freq", rope_inv_freq(arch).to(device), persistent=False)
        self.register_buffer("cos", torch.empty(0, arch.head_dim, device=device), persistent=False)
        self.register_buffer("sin", torch.empty(0, arch.head_dim, device=device), persistent=False)

    def ensure(self, length: int) -> None:
        if length <= self.cos.shape[0]:
            return
        length = max(length, 2 * self.cos.shape[0])
        freqs = torch.outer(torch.arange(length, device=self.inv_freq.device).float(), self.inv_freq)
        emb = torch.cat((freqs, freqs), dim=-1)
        self.cos, self.sin = emb.cos(), emb.sin()

    def forward(self, positions: torch.Tensor, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
        """positions [B, T] (all < the length given to :meth:`ensure`) -> cos, sin [B, 1, T, head_dim]."""
        return self.cos[positions].unsqueeze(1).to(dtype), self.sin[positions].unsqueeze(1).to(dtype)


def _rotate_half(x: torch.Tensor) -> torch.Tensor:
    half = x.shape[-1] // 2
    return torch.cat((-x[..., half:], x[..., :half]), dim=-1)


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    return x * cos + _rotate_half(x) * sin


class KVCache:
    """Static K/V storage ``[layers, batch, kv_heads, max_len, head_dim]``; rows are sequences."""

    def __init__(self, arch: ArchConfig, batch: int, max_len: int, dtype: torch.dtype, device: torch.device | str):
        shape = (arch.num_layers, batch, arch.num_key_value_heads, max_len, arch.head_dim)
        self.k = torch.zeros(shape, dtype=dtype, device=device)
        self.v = torch.zeros(shape, dtype=dtype, device=device)

    @property
    def batch(self) -> int:
        return self.k.shape[1]

    @property
    def max_len(self) -> int:
        return self.k.shape[3]

    def copy_rows(self, src: list[int], dst: list[int], length: int) -> None:
        """Copy the first ``length`` slots of rows ``src`` into rows ``dst`` (all layers)."""
        if not src:
            return
        s = torch.tensor(src, device=self.k.device)
        d = torch.tensor(dst, device=self.k.device)
        self.k[:, d, :, :length] = self.k[:, s, :, :length]
        self.v[:, d, :, :length] = self.v[:, s, :, :length]


@dataclass
class _AttentionPlan:
    """Per-forward facts every layer shares (computed once, not per layer)."""

    rows: slice
    from_zero: bool  # every row starts at slot 0: plain causal attention over the new tokens
    kv_len: int = 0  # cache slots attended to (cached mode)
    same_start: int | None = None  # all rows start at this slot: plain slice writes
    row_index: torch.Tensor | None = None  # [B, T] cache row of each new token (rows start apart)
    slots: torch.Tensor | None = None  # [B, T] cache slot of each new token
    mask: torch.Tensor | None = None  # [B, 1, T, kv_len] True = may attend; None = causal / all


class Attention(nn.Module):
    def __init__(self, arch: ArchConfig, layer_index: int, dtype: torch.dtype, device: torch.device | str):
        super().__init__()
        self.layer_index = layer_index
        self.num_heads, self.num_kv_heads = arch.num_attention_heads, arch.num_key_value_heads
        self.head_dim = arch.head_dim
        q_dim, kv_dim = self.num_heads * self.head_dim, self.num_kv_heads * self.head_dim
        self.split_sizes = [q_dim, kv_dim, kv_dim]
        self.qkv_weight = _empty_param(q_dim + 2 * kv_dim, arch.hidden_size, dtype=dtype, device=device)
        self.qkv_bias = _empty_param(q_dim + 2 * kv_dim, dtype=dtype, device=device) if arch.qkv_bias else None
        self.o_weight = _empty_param(arch.hidden_size, q_dim, dtype=dtype, device=device)
        self.q_norm = RMSNorm(self.head_dim, arch.rms_norm_eps, dtype, device) if arch.qk_norm else None
        self.k_norm = RMSNorm(self.head_dim, arch.rms_norm_eps, dtype, device) if arch.qk_norm else None

    def forward(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor,
                cache: KVCache | None, plan: _AttentionPlan) -> torch.Tensor:
        B, T, _ = x.shape
        q, k, v = F.linear(x, self.qkv_weight, self.qkv_bias).split(self.split_sizes, dim=-1)
        q = q.view(B, T, self.num_heads, self.head_dim)
        k = k.view(B, T, self.num_kv_heads, self.head_dim)
        if self.q_norm is not None:
            q, k = self.q_norm(q), self.k_norm(k)
        q = apply_rope(q.transpose(1, 2), cos, sin)
        k = apply_rope(k.transpose(1, 2), cos, sin)
        v = v.view(B, T, self.num_kv_heads, self.head_dim).transpose(1, 2)
        if cache is not None:
            k_cache, v_cache = cache.k[self.layer_index, plan.rows], cache.v[self.layer_index, plan.rows]
            if plan.from_zero:
                k_cache[:, :, :T] = k
                v_cache[:, :, :T] = v
            elif plan.same_start is not None:
                k_cache[:, :, plan.same_start : plan.kv_len] = k
                v_cache[:, :, plan.same_start : plan.kv_len] = v
                k, v = k_cache[:, :, : plan.kv_len], v_cache[:, :, : plan.kv_len]
            else:
                # Advanced indices split by a slice put the indexed dims first: [B, T, kv_heads, hd].
                k_cache[plan.row_index, :, plan.slots] = k.transpose(1, 2)
                v_cache[plan.row_index, :, plan.slots] = v.transpose(1, 2)
                k, v = k_cache[:, :, : plan.kv_len], v_cache[:, :, : plan.kv_len]
        # New tokens of a row starting at slot 0 attend causally; a single new token after
        # a cache with no per-row differences attends to everything (mask None).
        out = F.scaled_dot_product_attention(
            q, k, v, attn_mask=plan.mask, is_causal=plan.mask is None and plan.from_zero and T > 1,
            enable_gqa=self.num_heads != self.num_kv_heads,
        )
        return F.linear(out.transpose(1, 2).reshape(B, T, -1), self.o_weight)


class MLP(nn.Module):
    def __init__(self, arch: ArchConfig, dtype: torch.dtype, device: torch.device | str):
        super().__init__()
        self.inter = arch.intermediate_size
        self.gate_up_weight = _empty_param(2 * self.inter, arch.hidden_size, dtype=dtype, device=device)
        self.down_weight = _empty_param(arch.hidden_size, self.inter, dtype=dtype, device=device)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        gate, up = F.linear(x, self.gate_up_weight).split(self.inter, dim=-1)
        return F.linear(F.silu(gate) * up, self.down_weight)


class DecoderLayer(nn.Module):
    def __init__(self, arch: ArchConfig, layer_index: int, dtype: torch.dtype, device: torch.device | str):
        super().__init__()
        self.input_layernorm = RMSNorm(arch.hidden_size, arch.rms_norm_eps, dtype, device)
        self.self_attn = Attention(arch, layer_index, dtype, device)
        self.post_attention_layernorm = RMSNorm(arch.hidden_size, arch.rms_norm_eps, dtype, device)
        self.mlp = MLP(arch, dtype, device)

    def forward(self, x, cos, sin, cache, plan):
        x = x + self.self_attn(self.input_layernorm(x), cos, sin, cache, plan)
        return x + self.mlp(self.post_attention_layernorm(x))


class Decoder(nn.Module):
    """Llama / Qwen2 / Qwen3 causal LM. ``forward`` returns float32 logits."""

    def __init__(self, arch: ArchConfig, dtype: torch.dtype = torch.float32, device: torch.device | str = "cpu"):
        super().__init__()
        if arch.num_experts:
            raise UnsupportedArchitecture(
                f"the built-in rollout engine has no MoE layers ({arch.hf_architecture}); set rollout.engine=vllm"
            )
        self.arch, self.dtype = arch, dtype
        self.embed_weight = _empty_param(arch.vocab_size, arch.hidden_size, dtype=dtype, device=device)
        self.layers = nn.ModuleList(DecoderLayer(arch, i, dtype, device) for i in range(arch.num_layers))
        self.norm = RMSNorm(arch.hidden_size, arch.rms_norm_eps, dtype, device)
        self.lm_head_weight = (
            None if arch.tie_word_embeddings
            else _empty_param(arch.vocab_size, arch.hidden_size, dtype=dtype, device=device)
        )
        self.rotary = RotaryTable(arch, device)

    @property
    def device(self) -> torch.device:
        return self.embed_weight.device

    def hf_parameters(self) -> dict[str, torch.Tensor]:
        """HF name -> tensor view into this model's storage (copy_ into it to load)."""
        params: dict[str, torch.Tensor] = {"model.embed_tokens.weight": self.embed_weight}
        for i, layer in enumerate(self.layers):
            p, attn, mlp = f"model.layers.{i}.", layer.self_attn, layer.mlp
            params[p + "input_layernorm.weight"] = layer.input_layernorm.weight
            params[p + "post_attention_layernorm.weight"] = layer.post_attention_layernorm.weight
            for proj, w in zip("qkv", attn.qkv_weight.split(attn.split_sizes, dim=0)):
                params[p + f"self_attn.{proj}_proj.weight"] = w
            if attn.qkv_bias is not None:
                for proj, b in zip("qkv", attn.qkv_bias.split(attn.split_sizes, dim=0)):
                    params[p + f"self_attn.{proj}_proj.bias"] = b
            params[p + "self_attn.o_proj.weight"] = attn.o_weight
            if attn.q_norm is not None:
                params[p + "self_attn.q_norm.weight"] = attn.q_norm.weight
                params[p + "self_attn.k_norm.weight"] = attn.k_norm.weight
            gate, up = mlp.gate_up_weight.split(mlp.inter, dim=0)
            params[p + "mlp.gate_proj.weight"] = gate
            params[p + "mlp.up_proj.weight"] = up
            params[p + "mlp.down_proj.weight"] = mlp.down_weight
        params["model.norm.weight"] = self.norm.weight
        if self.lm_head_weight is not None:
            params["lm_head.weight"] = self.lm_head_weight
        return params

    @torch.no_grad()
    def load_hf_weights(self, stream: Iterable[tuple[str, torch.Tensor]]) -> set[str]:
        """Copy HF-named tensors in place (cast to this model's dtype/device on the fly).

        Returns the names written. Unknown names raise ``KeyError``, wrong shapes ``ValueError``;
        with tied embeddings ``lm_head.weight`` is written into the embedding.
        """
        params, shapes = self.hf_parameters(), hf_parameter_shapes(self.arch)
        written: set[str] = set()
        for name, tensor in stream:
            check_hf_tensor(name, tensor, shapes, self.arch)
            target = "model.embed_tokens.weight" if name not in params else name
            params[target].copy_(tensor)
            written.add(target)
        return written

    def _plan(self, start_pos: list[int], T: int, cache: KVCache | None,
              rows: slice) -> tuple[_AttentionPlan, torch.Tensor]:
        device = self.device
        steps = torch.arange(T, device=device)
        positions = torch.tensor(start_pos, device=device).unsqueeze(1) + steps  # [B, T]
        if not any(start_pos):
            return _AttentionPlan(rows=rows, from_zero=True), positions
        if cache is None:
            raise ValueError("start_pos > 0 needs a KV cache holding the earlier tokens")
        kv_len = max(start_pos) + T
        if kv_len > cache.max_len:
            raise ValueError(f"sequence of {kv_len} tokens does not fit the KV cache (max_len={cache.max_len})")
        same_start = start_pos[0] if min(start_pos) == max(start_pos) else None
        mask = None
        if same_start is None or T > 1:  # rows in lock-step decoding one token attend to every slot
            mask = torch.arange(kv_len, device=device).view(1, 1, 1, kv_len) <= positions.view(len(start_pos), 1, T, 1)
        if same_start is not None:
            return _AttentionPlan(rows, False, kv_len, same_start=same_start, mask=mask), positions
        row_index = torch.arange(len(start_pos), device=device).unsqueeze(1).expand(-1, T)
        return _AttentionPlan(rows, False, kv_len, row_index=row_index, slots=positions, mask=mask), positions

    def forward(self, tokens: torch.Tensor, start_pos: list[int] | None = None, cache: KVCache | None = None,
                rows: slice = slice(None), logits_index: torch.Tensor | None = None) -> torch.Tensor:
        """Logits for ``tokens`` [B, T] whose first token sits at slot ``start_pos[b]`` of cache row
        ``rows.start + b``; K/V of the new tokens are written into ``cache`` when given.

        Rows starting at 0 may be right-padded (padding only affects padded positions).
        ``logits_index`` [B] picks one position per row -> [B, vocab], [B, K] K positions per row ->
        [B, K, vocab]; else [B, T, vocab].
        """
        B, T = tokens.shape
        start_pos = [0] * B if start_pos is None else list(start_pos)
        if len(start_pos) != B:
            raise ValueError(f"start_pos has {len(start_pos)} entries for a batch of {B}")
        plan, positions = self._plan(start_pos, T, cache, rows)
        self.rotary.ensure(max(start_pos) + T)
        cos, sin = self.rotary(positions, self.dtype)
        x = F.embedding(tokens, self.embed_weight)
        for layer in self.layers:
            x = layer(x, cos, sin, cache, plan)
        if logits_index is not None:
            rows = torch.arange(B, device=x.device)
            x = x[rows, logits_index] if logits_index.dim() == 1 else x[rows.unsqueeze(1), logits_index]
        x = self.norm(x)
        head = self.embed_weight if self.lm_head_weight is None else self.lm_head_weight
        return F.linear(x, head).float()
