"""InternViT encoder: patch embedding + CLS + absolute positions, pre-norm blocks with
layer scale, bidirectional attention. Tiles are packed: every tile is one document of
the varlen attention kernel, so a batch of tiles never pads."""

from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F

from longvita.kernels import varlen_attention
from longvita.model.config import VisionConfig


class VisionAttention(nn.Module):
    def __init__(self, cfg: VisionConfig):
        super().__init__()
        self.num_heads = cfg.num_heads
        self.head_dim = cfg.head_dim
        self.q_proj = nn.Linear(cfg.hidden_size, cfg.hidden_size, bias=cfg.qkv_bias)
        self.k_proj = nn.Linear(cfg.hidden_size, cfg.hidden_size, bias=cfg.qkv_bias)
        self.v_proj = nn.Linear(cfg.hidden_size, cfg.hidden_size, bias=cfg.qkv_bias)
        self.proj = nn.Linear(cfg.hidden_size, cfg.hidden_size)

    def forward(self, x: torch.Tensor, cu_seqlens: torch.Tensor, max_seqlen: int) -> torch.Tensor:
        n = x.shape[0]  # x: (tiles * tokens_per_tile, hidden)
        q = self.q_proj(x).view(n, self.num_heads, self.head_dim)
        k = self.k_proj(x).view(n, self.num_heads, self.head_dim)
        v = self.v_proj(x).view(n, self.num_heads, self.head_dim)
        out = varlen_attention(q, k, v, cu_seqlens, cu_seqlens, max_seqlen, max_seqlen, causal=False)
        return self.proj(out.reshape(n, -1))


class VisionMLP(nn.Module):
    def __init__(self, cfg: VisionConfig):
        super().__init__()
        self.fc1 = nn.Linear(cfg.hidden_size, cfg.intermediate_size)
        self.fc2 = nn.Linear(cfg.intermediate_size, cfg.hidden_size)

    def forward(self, x):
        return self.fc2(F.gelu(self.fc1(x)))


# InternViT's layer_scale_init_value: the value a freshly built model starts from (real
# checkpoints overwrite it; transformers' InternVLVisionConfig uses the same default)
LAYER_SCALE_INIT = 0.1


class VisionBlock(nn.Module):
    def __init__(self, cfg: VisionConfig):
        super().__init__()
        self.norm1 = nn.LayerNorm(cfg.hidden_size, eps=cfg.layer_norm_eps)
        self.attn = VisionAttention(cfg)
        self.ls1 = nn.Parameter(torch.full((cfg.hidden_size,), LAYER_SCALE_INIT))
        self.norm2 = nn.LayerNorm(cfg.hidden_size, eps=cfg.layer_norm_eps)
        self.mlp = VisionMLP(cfg)
        self.ls2 = nn.Parameter(torch.full((cfg.hidden_size,), LAYER_SCALE_INIT))

    def forward(self, x, cu_seqlens, max_seqlen):
        x = x + self.ls1 * self.attn(self.norm1(x), cu_seqlens, max_seqlen)
        return x + self.ls2 * self.mlp(self.norm2(x))


class VisionEncoder(nn.Module):
    def __init__(self, cfg: VisionConfig):
        super().__init__()
        self.cfg = cfg
        self.patch_embed = nn.Conv2d(cfg.num_channels, cfg.hidden_size, cfg.patch_size, stride=cfg.patch_size)
        self.cls_token = nn.Parameter(torch.zeros(1, 1, cfg.hidden_size))
        self.pos_embed = nn.Parameter(torch.zeros(1, cfg.num_patches + 1, cfg.hidden_size))
        # only the layers up to select_layer run: the rest would be thrown away
        n_run = cfg.num_layers + 1 + cfg.select_layer if cfg.select_layer < 0 else cfg.select_layer
        if not 0 <= n_run <= cfg.num_layers:
            raise ValueError(f"vision.select_layer={cfg.select_layer} is out of range for {cfg.num_layers} layers")
        self.layers = nn.ModuleList(VisionBlock(cfg) for _ in range(cfg.num_layers))
        self.num_layers_run = n_run

    def _positions(self, grid_h: int, grid_w: int) -> torch.Tensor:
        """Absolute position embeddings, bicubically interpolated for another tile size."""
        side = int(round((self.pos_embed.shape[1] - 1) ** 0.5))
        if (grid_h, grid_w) == (side, side):
            return self.pos_embed
        cls_pos, patch_pos = self.pos_embed[:, :1], self.pos_embed[:, 1:]
        patch_pos = patch_pos.reshape(1, side, side, -1).permute(0, 3, 1, 2)
        patch_pos = F.interpolate(patch_pos.float(), size=(grid_h, grid_w), mode="bicubic", align_corners=False)
        patch_pos = patch_pos.to(self.pos_embed.dtype).permute(0, 2, 3, 1).reshape(1, grid_h * grid_w, -1)
        return torch.cat([cls_pos, patch_pos], dim=1)

    def forward(self, pixel_values: torch.Tensor) -> torch.Tensor:
        """pixel_values (tiles, 3, S, S), normalised float or uint8 pixels -> patch features
        without CLS (tiles, (S/p)^2, hidden)."""
        if pixel_values.dim() != 4 or pixel_values.shape[1] != self.cfg.num_channels:
            raise ValueError(
                f"pixel_values must be (tiles, {self.cfg.num_channels}, H, W), got {tuple(pixel_values.shape)}"
            )
        weight = self.patch_embed.weight
        if pixel_values.dtype == torch.uint8:  # raw pixels (video frames): normalise here, on the device
            pixels = pixel_values.to(weight.device, torch.float32)
            mean = torch.tensor(self.cfg.pixel_mean, dtype=torch.float32, device=weight.device).view(3, 1, 1)
            std = torch.tensor(self.cfg.pixel_std, dtype=torch.float32, device=weight.device).view(3, 1, 1)
            pixel_values = (pixels / 255.0 - mean) / std  # as longvita.data.image.normalize
        x = self.patch_embed(pixel_values.to(weight.device, weight.dtype))  # (tiles, hidden, gh, gw)
        tiles, hidden, gh, gw = x.shape
        x = x.flatten(2).transpose(1, 2)  # (tiles, gh*gw, hidden)
        x = torch.cat([self.cls_token.expand(tiles, -1, -1), x], dim=1) + self._positions(gh, gw)
        seq = x.shape[1]
        # every tile is one document: bidirectional attention within it, none across
        cu_seqlens = torch.arange(0, (tiles + 1) * seq, seq, dtype=torch.int32, device=x.device)
        x = x.reshape(tiles * seq, hidden)  # packed (tokens, hidden)
        for layer in self.layers[: self.num_layers_run]:
            x = layer(x, cu_seqlens, seq)
        return x.view(tiles, seq, hidden)[:, 1:]
