"""neon: Neon (negative extrapolation from self-training) for generative-model checkpoints.

Importing this package is cheap: it never imports torch, scipy or any family plugin, because
shell completion runs ``neon`` on every TAB. Heavy modules are imported by the functions that
need them.

Paper: Alemohammad, Wang, Baraniuk, "Neon: Negative Extrapolation From Self-Training Improves
Image Generation", ICLR 2026.
"""

__version__ = "0.1.0"

#: Unit of every training budget in this project: images seen (one image = one training example
#: drawn into a batch). ``Mi`` in reports and docs means 2**20 images.
MI = 2**20
