"""Network definitions (torch): base classifier, RRISE surrogate, and the meta-learner of Beta priors.

All image networks take pixels in [0, 1] (N, C, H, W) and normalize inside the model, so an exported ONNX file
has the same input contract as the bundle's manifest.
"""

from __future__ import annotations

import torch
from torch import nn

from models.priors import FEATURE_NAMES


class SmallCNN(nn.Module):
    """Two 3x3 conv blocks + two dense layers; per-channel normalization built in. Used for base and surrogate."""

    def __init__(self, in_channels: int, num_classes: int, height: int, width: int, mean: float = 0.5,
                 std: float = 0.5, width_mult: int = 32, hidden: int = 128):
        super().__init__()
        self.register_buffer("mean", torch.full((1, in_channels, 1, 1), float(mean)))
        self.register_buffer("std", torch.full((1, in_channels, 1, 1), float(std)))
        c1, c2 = width_mult, 2 * width_mult
        self.features = nn.Sequential(
            nn.Conv2d(in_channels, c1, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),
            nn.Conv2d(c1, c2, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),
        )
        self.head = nn.Sequential(nn.Flatten(), nn.Linear(c2 * (height // 4) * (width // 4), hidden), nn.ReLU(),
                                  nn.Linear(hidden, num_classes))

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # logits
        return self.head(self.features((x - self.mean) / self.std))




class MetaPrior(nn.Module):
    """Clean-input features -> Beta(a, b) prior on pA (the hit rate of the fixed class under noise).

    Parameterized by mean mu = sigmoid(.) and strength kappa = min_strength + softplus(.), capped at
    ``max_strength`` so that even a badly wrong prior costs bounded power (it can never cost validity).
    Output (N, 2) = (a, b) = (mu * kappa, (1 - mu) * kappa).
    """

    def __init__(self, num_features: int = len(FEATURE_NAMES), hidden: int = 32, min_strength: float = 1.0,
                 max_strength: float = 2000.0):
        super().__init__()
        self.net = nn.Sequential(nn.Linear(num_features, hidden), nn.Tanh(), nn.Linear(hidden, hidden), nn.Tanh(),
                                 nn.Linear(hidden, 2))
        self.min_strength = float(min_strength)
        self.max_strength = float(max_strength)

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        out = self.net(features)
        mu = torch.sigmoid(out[:, 0]).clamp(1e-4, 1 - 1e-4)
        kappa = (self.min_strength + nn.functional.softplus(out[:, 1])).clamp(max=self.max_strength)
        return torch.stack([mu * kappa, (1 - mu) * kappa], dim=1)
