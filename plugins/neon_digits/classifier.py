"""The digits feature network: a small MLP classifier whose penultimate layer gives the features
of the family's FID (the role Inception-v3 plays for ImageNet-scale FID).

Trained on the same 1,797 real digits (``python -m neon_digits.train``); weights ship in
``weights/classifier.safetensors``. Features: float32 [N, 64] (pre-activation of the penultimate
layer, dense, so its covariance is well conditioned).
"""

from __future__ import annotations

import torch
from torch import nn

FEATURES = 64


class DigitClassifier(nn.Module):
    """uint8 [N, 1, 8, 8] -> (features float32 [N, 64], logits float32 [N, 10])."""

    def __init__(self) -> None:
        super().__init__()
        self.fc1 = nn.Linear(64, 256)
        self.fc2 = nn.Linear(256, FEATURES)
        self.head = nn.Linear(FEATURES, 10)
        self.drop = nn.Dropout(0.2)

    def forward(self, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        x = images.reshape(images.shape[0], 64).to(torch.float32) / 255.0
        feats = self.fc2(self.drop(torch.relu(self.fc1(x))))
        return feats, self.head(self.drop(torch.relu(feats)))


def train_classifier(images: torch.Tensor, labels: torch.Tensor, steps: int = 3000, seed: int = 0) -> DigitClassifier:
    """Adam, batch 128, cross-entropy, light pixel noise as augmentation. Returns the net in eval mode."""
    gen = torch.Generator().manual_seed(seed)
    torch.manual_seed(seed)
    net = DigitClassifier()
    opt = torch.optim.Adam(net.parameters(), lr=1e-3, weight_decay=1e-4)
    n = images.shape[0]
    for _ in range(steps):
        idx = torch.randint(0, n, (128,), generator=gen)
        x = images[idx].to(torch.float32) + torch.randn(128, 1, 8, 8, generator=gen) * 12.0
        x = x.clamp(0, 255)
        _, logits = net(x)
        loss = nn.functional.cross_entropy(logits, labels[idx])
        opt.zero_grad()
        loss.backward()
        opt.step()
    return net.eval()
