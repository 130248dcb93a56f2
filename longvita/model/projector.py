"""Pixel-shuffle projector: ViT patch features -> LLM embeddings, 4 patches per token."""

from __future__ import annotations

import torch
import torch.nn as nn

from longvita.model.config import ProjectorConfig


class Projector(nn.Module):
    def __init__(self, cfg: ProjectorConfig, vision_hidden: int, text_hidden: int):
        super().__init__()
        self.cfg = cfg
        inv = round(1 / cfg.scale_factor)
        in_features = vision_hidden * inv * inv
        self.norm = nn.LayerNorm(in_features, eps=cfg.layer_norm_eps)
        self.fc1 = nn.Linear(in_features, cfg.intermediate_size, bias=cfg.bias)
        self.fc2 = nn.Linear(cfg.intermediate_size, text_hidden, bias=cfg.bias)

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        """features (tiles, h*w, C) -> (tiles, h*w*s^2, text_hidden), one fused kernel call."""
        from longvita.kernels import pixel_shuffle_project

        return pixel_shuffle_project(
            features, self.norm.weight, self.norm.bias, self.fc1.weight, self.fc1.bias,
            self.fc2.weight, self.fc2.bias, scale_factor=self.cfg.scale_factor, eps=self.cfg.layer_norm_eps,
        )
