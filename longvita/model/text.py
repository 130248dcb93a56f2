"""Qwen2 / Qwen2.5 decoder over packed tokens: GQA, RoPE from per-token position ids,
SwiGLU MLP, RMSNorm. Module and parameter names follow transformers' Qwen2 so that
checkpoints map one to one.

The memory-bound pieces run as longvita's fused kernels (``kernels.rms_norm`` with the
residual add folded into the second norm of a layer, ``kernels.apply_rope_qk``,
``kernels.swiglu``): one pass over the activations each instead of eager's 6-8 kernels and
their fp32 intermediates. On CPU tensors their torch paths compute the same formulas.
``apply_rope`` below is the eager definition they replace (the tests compare them)."""

from __future__ import annotations

import torch
import torch.nn as nn

from longvita.kernels import apply_rope_qk, rms_norm, swiglu
from longvita.model.attention import DecoderAttention
from longvita.model.config import TextConfig


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dim))
        self.eps = eps

    def forward(self, x, residual=None):
        """``weight * normalise(x)``; with ``residual``: ``(norm(x + residual), x + residual)``."""
        return rms_norm(x, self.weight, self.eps, residual=residual)


def rope_cos_sin(position_ids: torch.Tensor, head_dim: int, theta: float, dtype: torch.dtype):
    """cos/sin tables (tokens, head_dim) for per-token positions, computed in fp32."""
    inv_freq = 1.0 / (theta ** (torch.arange(0, head_dim, 2, device=position_ids.device, dtype=torch.float32) / head_dim))
    freqs = position_ids.float()[:, None] * inv_freq[None, :]  # (tokens, head_dim/2)
    emb = torch.cat([freqs, freqs], dim=-1)
    return emb.cos().to(dtype), emb.sin().to(dtype)


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """x (tokens, heads, head_dim); rotate-half convention as Qwen2."""
    half = x.shape[-1] // 2
    rotated = torch.cat([-x[..., half:], x[..., :half]], dim=-1)
    return x * cos[:, None, :] + rotated * sin[:, None, :]


class Attention(nn.Module):
    def __init__(self, cfg: TextConfig):
        super().__init__()
        self.num_heads, self.num_kv_heads, self.head_dim = cfg.num_heads, cfg.num_kv_heads, cfg.head_dim
        self.q_proj = nn.Linear(cfg.hidden_size, cfg.num_heads * self.head_dim, bias=cfg.qkv_bias)
        self.k_proj = nn.Linear(cfg.hidden_size, cfg.num_kv_heads * self.head_dim, bias=cfg.qkv_bias)
        self.v_proj = nn.Linear(cfg.hidden_size, cfg.num_kv_heads * self.head_dim, bias=cfg.qkv_bias)
        self.o_proj = nn.Linear(cfg.num_heads * self.head_dim, cfg.hidden_size, bias=False)

    def forward(self, x, cos, sin, attention: DecoderAttention, layer_idx: int):
        n = x.shape[0]
        v = self.v_proj(x).view(n, self.num_kv_heads, self.head_dim)  # (tokens, kv_heads, head_dim)
        q = self.q_proj(x).view(n, self.num_heads, self.head_dim)  # (tokens, heads, head_dim)
        k = self.k_proj(x).view(n, self.num_kv_heads, self.head_dim)
        # RoPE computed in fp32 and returned in the projections' dtype (the tables may be
        # fp32 under autocast), as eager's apply_rope(...).to(v.dtype)
        q, k = apply_rope_qk(q, k, cos, sin)
        out = attention.attend(layer_idx, q, k, v)  # (tokens, heads, head_dim)
        return self.o_proj(out.reshape(n, -1))


class MLP(nn.Module):
    def __init__(self, cfg: TextConfig):
        super().__init__()
        self.gate_proj = nn.Linear(cfg.hidden_size, cfg.intermediate_size, bias=False)
        self.up_proj = nn.Linear(cfg.hidden_size, cfg.intermediate_size, bias=False)
        self.down_proj = nn.Linear(cfg.intermediate_size, cfg.hidden_size, bias=False)

    def forward(self, x):
        return self.down_proj(swiglu(self.gate_proj(x), self.up_proj(x)))  # silu(gate) * up, fused


class DecoderLayer(nn.Module):
    def __init__(self, cfg: TextConfig):
        super().__init__()
        self.input_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.self_attn = Attention(cfg)
        self.post_attention_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.mlp = MLP(cfg)

    def forward(self, x, cos, sin, attention: DecoderAttention, layer_idx: int):
        h = self.self_attn(self.input_layernorm(x), cos, sin, attention, layer_idx)
        normed, x = self.post_attention_layernorm(h, residual=x)  # x = x + h; normed = norm(x), one pass
        return x + self.mlp(normed)


class TextDecoder(nn.Module):
    """Embeddings -> decoder layers -> final norm. Returns hidden states; the LM head
    lives in ``LongVITA`` so that only the rows that need logits reach it."""

    def __init__(self, cfg: TextConfig):
        super().__init__()
        self.cfg = cfg
        # nn.Embedding initialises N(0, 1) itself; on the meta device (how a checkpoint's
        # model is built before its weights are assigned) that normal_ runs through a
        # decomposition that imports torch._dynamo, 1.4 s of `longvita generate`'s load.
        # So the table is created empty and initialised here only when it has storage.
        weight = torch.empty(cfg.vocab_size, cfg.hidden_size)
        if not weight.is_meta:
            nn.init.normal_(weight)
        self.embed_tokens = nn.Embedding(cfg.vocab_size, cfg.hidden_size, _weight=weight)
        self.layers = nn.ModuleList(DecoderLayer(cfg) for _ in range(cfg.num_layers))
        self.norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)

    def forward(self, inputs_embeds: torch.Tensor, position_ids: torch.Tensor, attention: DecoderAttention):
        """inputs_embeds (tokens, hidden), position_ids (tokens,) -> final-norm hidden states.
        ``attention`` serves every layer of this forward (see ``attention.py``)."""
        # RoPE tables are the same for every layer: build them once
        cos, sin = rope_cos_sin(position_ids, self.cfg.head_dim, self.cfg.rope_theta, inputs_embeds.dtype)
        x = inputs_embeds
        for i, layer in enumerate(self.layers):
            x = layer(x, cos, sin, attention, i)
        attention.finish()
        return self.norm(x)
