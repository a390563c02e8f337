"""Rebuild the ``autoregressive`` family's shipped base model theta_r.

    python -m neon_autoregressive.train [--out plugins/neon_autoregressive/weights] [--budget 196608] [--seed 0]

Trains :class:`neon_autoregressive.model.PixelTransformer` on the 1,600-digit training split
(``split_indices``; 197 digits are held out for ``neon align``) with the family's recipe
(next-token cross-entropy, label dropout 0.1, AdamW betas (0.9, 0.95)) through the loop ``neon
finetune`` uses (``neon_cli.train.train_loop``): linear warm-up over 5 % of the budget, then a
constant learning rate, EMA of the weights (the EMA is what is shipped). Defaults: 196,608 images
seen (3,072 steps of 64, about 120 epochs), lr 1e-3, EMA half-life 20,000 images; about 10
minutes on two shared CPU cores with one torch thread. Its metadata records ``train_images``
(the budget). Deterministic on one machine for a given seed. Prints the metrics of 2,000 samples
at the default settings.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", type=Path, default=Path(__file__).resolve().parent / "weights")
    ap.add_argument("--budget", type=int, default=3072 * 64, help="training budget in images seen (default 196,608)")
    ap.add_argument("--lr", type=float, default=1e-3)
    ap.add_argument("--batch", type=int, default=64)
    ap.add_argument("--levels", type=int, default=6)
    ap.add_argument("--width", type=int, default=64)
    ap.add_argument("--depth", type=int, default=3)
    ap.add_argument("--heads", type=int, default=4)
    ap.add_argument("--ema-halflife", type=int, default=20_000, help="EMA half-life in images")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--threads", type=int, default=1, help="torch CPU threads (1 is fastest on a busy 2-core machine)")
    ap.add_argument("--eval-samples", type=int, default=2000)
    args = ap.parse_args(argv)

    import torch

    from neon_autoregressive import family
    from neon_autoregressive.model import PixelTransformer, real_digits, split_indices
    from neon_cli.fsutil import atomic_path
    from neon_cli.train import TrainConfig, train_loop

    torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)
    images, labels = real_digits()
    train_idx, held_idx = split_indices()
    model = PixelTransformer(args.levels, args.width, args.depth, args.heads)
    cfg = TrainConfig(budget=args.budget, lr=args.lr, batch=args.batch, warmup=args.budget // 20,
                      ema_halflife=args.ema_halflife, seed=args.seed)
    t0 = time.perf_counter()
    last = [0]

    def progress(task, done, total=None, **info):
        if done - last[0] >= args.budget // 8 or done == total:
            last[0] = done
            print(f"{task}: {done}/{total} images, loss {info.get('loss', float('nan')):.4f}, "
                  f"{time.perf_counter() - t0:.0f} s", flush=True)

    weights = train_loop(family, model, images[train_idx], labels[train_idx], cfg, progress=progress, task="base")
    with torch.no_grad():
        gen = torch.Generator().manual_seed(0)
        held = float(family.loss(weights, images[held_idx], labels[held_idx], gen))
    meta = {"train_images": str(args.budget),
            "recipe": f"cross-entropy, AdamW(0.9, 0.95) lr {args.lr}, batch {args.batch}, warmup {cfg.warmup} img, "
                      f"EMA half-life {args.ema_halflife} img, seed {args.seed}",
            "data": "sklearn.datasets.load_digits: 1600-image training split of neon_autoregressive.model.split_indices",
            "heldout_loss": f"{held:.5f}"}
    args.out.mkdir(parents=True, exist_ok=True)
    with atomic_path(args.out / "base.safetensors") as tmp:
        family.save(weights, str(tmp), meta)
    print(f"wrote {args.out / 'base.safetensors'} ({time.perf_counter() - t0:.0f} s); held-out loss {held:.4f} nats/pixel")
    if args.eval_samples:
        from neon_cli.evaluate import Evaluator
        from neon_cli.family import resolve_settings

        ev = Evaluator(family, resolve_settings(family), args.eval_samples, seed=0, batch=500)
        m = ev.score_model(weights)
        print("metrics at the default settings: " + ", ".join(f"{k} {v:.4f}" for k, v in m.items()))
    return 0


if __name__ == "__main__":
    sys.exit(main())
