"""A small class-conditional causal transformer over pixel tokens of scikit-learn's 8x8 digits.

Tokens: each digit's 64 pixels (0..16 in scikit-learn) quantised to ``levels`` grey levels (the
nearest level, ``floor(v (levels - 1) / 16 + 1/2)``), in raster order, preceded by a class token (10 classes and
a null class 10 for classifier-free guidance). Images on disk and in synthetic sets are uint8
[N, 1, 8, 8] with values ``round(token * 255 / (levels - 1))``; any uint8 digit (e.g. a real one,
0..16 scaled to 0..255) maps back to the same tokens with ``round(u8 (levels - 1) / 255)``.

Sources followed:

* architecture: a GPT-2 style pre-LayerNorm decoder (Radford et al. 2019), learned absolute
  positions, causal self-attention through ``torch.nn.functional.scaled_dot_product_attention``;
* training: next-token cross-entropy with teacher forcing and class-label dropout 0.1 to the null
  class, AdamW with betas (0.9, 0.95), as VAR (Tian et al. 2024, FoundationVision/VAR ``train.py``);
* sampling: classifier-free guidance on the logits as VAR's ``autoregressive_infer_cfg``:
  ``logits = (1 + g) * cond - g * uncond`` (g = 0: conditional only), with g constant or ramped
  linearly over the token positions (VAR ramps over its scales, ``g * si / (n - 1)``); then
  temperature, top-k and top-p (nucleus, Holtzman et al. 2020) in the order of Hugging Face's
  ``generate`` warpers; the token is drawn by inverse-CDF from a uniform that comes from the
  image's own seed, so image i depends only on (seed i, label i, settings).
"""

from __future__ import annotations

import math
from typing import Any, Mapping

import torch
from torch import nn
from torch.nn import functional as F

NUM_CLASSES = 10
PIXELS = 64
LABEL_DROPOUT = 0.1


def real_digits() -> tuple[torch.Tensor, torch.Tensor]:
    """scikit-learn's 1,797 real digits as uint8 [1797, 1, 8, 8] (0..16 scaled to 0..255) and int64 labels."""
    from neon_digits.model import real_digits as _real

    return _real()


def split_indices(n: int = 1797, holdout: int = 197, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """(train, held-out) index tensors int64: a fixed permutation of range(n); the last ``holdout``
    are held out (never trained on), for ``neon align``'s real-data gradient."""
    perm = torch.randperm(n, generator=torch.Generator().manual_seed(seed))
    return perm[: n - holdout].sort().values, perm[n - holdout:].sort().values


def to_tokens(images: torch.Tensor, levels: int) -> torch.Tensor:
    """uint8 [N, 1, 8, 8] (0..255) -> int64 tokens [N, 64] in 0..levels-1 (raster order)."""
    x = images.reshape(images.shape[0], PIXELS).to(torch.float32)
    return torch.round(x * (levels - 1) / 255.0).clamp(0, levels - 1).to(torch.int64)


def to_images(tokens: torch.Tensor, levels: int) -> torch.Tensor:
    """int64 tokens [N, 64] -> uint8 [N, 1, 8, 8] with values round(token * 255 / (levels - 1))."""
    return torch.round(tokens.to(torch.float32) * 255.0 / (levels - 1)).to(torch.uint8).reshape(-1, 1, 8, 8)


class Block(nn.Module):
    """Pre-LN transformer block: x + attn(ln1(x)), then x + mlp(ln2(x)) (GELU, 4x width)."""

    def __init__(self, width: int, heads: int):
        super().__init__()
        self.heads = heads
        self.ln1 = nn.LayerNorm(width)
        self.qkv = nn.Linear(width, 3 * width)
        self.proj = nn.Linear(width, width)
        self.ln2 = nn.LayerNorm(width)
        self.fc1 = nn.Linear(width, 4 * width)
        self.fc2 = nn.Linear(4 * width, width)

    def _split(self, t: torch.Tensor) -> torch.Tensor:
        n, length, width = t.shape
        return t.reshape(n, length, self.heads, width // self.heads).transpose(1, 2)  # [N, H, L, d]

    def forward(self, x: torch.Tensor, cache: dict[str, torch.Tensor] | None = None) -> torch.Tensor:
        """x float [N, L, width]. Without ``cache``: causal attention over the L positions. With a
        ``cache`` dict: x holds the next position(s); their keys/values are appended to the cache and
        they attend to everything cached (incremental decoding)."""
        q, k, v = self.qkv(self.ln1(x)).chunk(3, dim=-1)
        q, k, v = self._split(q), self._split(k), self._split(v)
        if cache is None:
            a = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        else:
            if "k" in cache:
                k = torch.cat([cache["k"], k], dim=2)
                v = torch.cat([cache["v"], v], dim=2)
            cache["k"], cache["v"] = k, v
            a = F.scaled_dot_product_attention(q, k, v, is_causal=False)
        n, _, length, d = a.shape
        x = x + self.proj(a.transpose(1, 2).reshape(n, length, self.heads * d))
        return x + self.fc2(F.gelu(self.fc1(self.ln2(x))))


class PixelTransformer(nn.Module):
    """p(pixel_t | class, pixels_<t) over ``levels`` grey levels.

    forward(tokens int64 [N, 64], labels int64 [N] in 0..10 (10 = null)) -> logits float32
    [N, 64, levels]: position t predicts pixel t from the class token and pixels 0..t-1.
    """

    def __init__(self, levels: int = 6, width: int = 64, depth: int = 3, heads: int = 4):
        super().__init__()
        if width % heads:
            raise ValueError(f"width {width} must be divisible by heads {heads}")
        self.levels, self.width, self.depth, self.heads = levels, width, depth, heads
        self.tok_emb = nn.Embedding(levels, width)
        self.cls_emb = nn.Embedding(NUM_CLASSES + 1, width)
        self.pos_emb = nn.Parameter(torch.zeros(PIXELS, width))
        self.blocks = nn.ModuleList(Block(width, heads) for _ in range(depth))
        self.ln_f = nn.LayerNorm(width)
        self.head = nn.Linear(width, levels)
        self.apply(self._init)
        nn.init.normal_(self.pos_emb, std=0.02)

    @staticmethod
    def _init(m: nn.Module) -> None:
        if isinstance(m, (nn.Linear, nn.Embedding)):
            nn.init.normal_(m.weight, std=0.02)
        if isinstance(m, nn.Linear) and m.bias is not None:
            nn.init.zeros_(m.bias)

    def forward(self, tokens: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        x = torch.cat([self.cls_emb(labels)[:, None], self.tok_emb(tokens[:, : PIXELS - 1])], dim=1) + self.pos_emb
        for block in self.blocks:
            x = block(x)
        return self.head(self.ln_f(x))

    def step(self, inp: torch.Tensor, pos: int, caches: list[dict[str, torch.Tensor]]) -> torch.Tensor:
        """Incremental decoding: ``inp`` float [N, 1, width] embedding at position ``pos`` -> logits [N, levels]."""
        x = inp + self.pos_emb[pos]
        for block, cache in zip(self.blocks, caches):
            x = block(x, cache)
        return self.head(self.ln_f(x))[:, 0]


def ar_loss(model: Any, images: torch.Tensor, labels: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
    """Mean next-token cross-entropy (nats per pixel, float32 scalar) of uint8 digits [N, 1, 8, 8].

    Labels are replaced by the null class 10 with probability LABEL_DROPOUT (draws from
    ``generator``). ``model`` may be wrapped (DistributedDataParallel): the loss calls its forward.
    """
    levels = getattr(model, "module", model).levels
    tokens = to_tokens(images, levels)
    drop = torch.rand(labels.shape[0], generator=generator) < LABEL_DROPOUT
    lab = torch.where(drop, torch.full_like(labels, NUM_CLASSES), labels)
    logits = model(tokens, lab)
    return F.cross_entropy(logits.reshape(-1, logits.shape[-1]), tokens.reshape(-1))


def seeded_uniforms(seeds: torch.Tensor, count: int = PIXELS) -> torch.Tensor:
    """float64 [N, count]: row i is ``torch.rand(count)`` from a generator seeded with seeds[i] alone."""
    out = torch.empty(len(seeds), count, dtype=torch.float64)
    gen = torch.Generator()
    for i, s in enumerate(seeds.tolist()):
        gen.manual_seed(int(s))
        out[i] = torch.rand(count, generator=gen, dtype=torch.float64)
    return out


def filter_logits(logits: torch.Tensor, temperature: float, top_k: int, top_p: float) -> torch.Tensor:
    """Temperature, then top-k (k > 0 keeps the k largest), then top-p (keeps the smallest set of
    largest-probability tokens whose mass reaches p; the most likely token is always kept), as the
    Hugging Face ``TemperatureLogitsWarper``/``TopKLogitsWarper``/``TopPLogitsWarper``.
    logits float [N, V] -> float64 [N, V] with removed entries at -inf."""
    x = logits.to(torch.float64) / temperature
    v = x.shape[-1]
    if 0 < top_k < v:
        kth = torch.topk(x, top_k, dim=-1).values[:, -1:]
        x = x.masked_fill(x < kth, -math.inf)
    if top_p < 1.0:
        srt, idx = torch.sort(x, dim=-1, descending=True)
        probs = torch.softmax(srt, dim=-1)
        before = torch.cumsum(probs, dim=-1) - probs  # mass of the tokens ranked above
        remove = before >= top_p
        remove[:, 0] = False
        x = x.masked_fill(torch.zeros_like(remove).scatter(1, idx, remove), -math.inf)
    return x


def draw(logits: torch.Tensor, u: torch.Tensor) -> torch.Tensor:
    """Inverse-CDF draw: int64 [N] with P(token = j) = softmax(logits)[j], using uniforms u float64 [N]."""
    probs = torch.softmax(logits.to(torch.float64), dim=-1)
    cdf = torch.cumsum(probs, dim=-1)
    idx = torch.searchsorted(cdf, (u * cdf[:, -1]).unsqueeze(1)).squeeze(1)
    return idx.clamp(max=logits.shape[-1] - 1)


@torch.no_grad()
def ar_sample(model: PixelTransformer, seeds: torch.Tensor, labels: torch.Tensor, settings: Mapping[str, Any]) -> torch.Tensor:
    """Sample uint8 digits [N, 1, 8, 8] for ``labels`` int64 [N] (see the module docstring).

    settings: ``temperature`` (> 0), ``top_k`` (0 = off), ``top_p`` (1 = off), ``guidance`` g
    (0 = conditional only; logits (1 + g) cond - g uncond), ``guidance_schedule`` ("constant" or
    "linear": g * t / 63 at pixel t). Uses a key/value cache: 64 incremental steps, twice the batch
    when g != 0.
    """
    tau = float(settings["temperature"])
    top_k, top_p = int(settings["top_k"]), float(settings["top_p"])
    g = float(settings["guidance"])
    ramp = settings.get("guidance_schedule", "constant") == "linear"
    n = len(seeds)
    u = seeded_uniforms(seeds)
    cfg = g != 0.0
    lab = torch.cat([labels, torch.full_like(labels, NUM_CLASSES)]) if cfg else labels
    caches: list[dict[str, torch.Tensor]] = [{} for _ in model.blocks]
    inp = model.cls_emb(lab)[:, None]
    tokens = torch.empty(n, PIXELS, dtype=torch.int64)
    for t in range(PIXELS):
        logits = model.step(inp, t, caches).to(torch.float64)
        if cfg:
            gt = g * t / (PIXELS - 1) if ramp else g
            cond, unc = logits[:n], logits[n:]
            logits = (1 + gt) * cond - gt * unc
        tok = draw(filter_logits(logits, tau, top_k, top_p), u[:, t])
        tokens[:, t] = tok
        emb = model.tok_emb(tok)[:, None]
        inp = torch.cat([emb, emb]) if cfg else emb
    return to_images(tokens, model.levels)
