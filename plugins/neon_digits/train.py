"""Rebuild the digits family's shipped weights: the feature classifier and the base model theta_r.

    python -m neon_digits.train --out plugins/neon_digits/weights [--budget 1048576] [--seed 0]

The base model is trained on the 1,797 real digits with the family's own recipe through the same
loop ``neon finetune`` uses (neon_cli.train.train_loop): EDM loss, Adam, batch 256, EMA. Its
metadata records ``train_images`` (the base training budget in images seen), which ``neon demo``
uses to express the self-training budget as a fraction of it. Deterministic on one machine for a
given seed (CPU float32).
"""

from __future__ import annotations

import argparse
from pathlib import Path

import torch

from neon_cli.fsutil import atomic_path


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", type=Path, default=Path(__file__).resolve().parent / "weights")
    ap.add_argument("--budget", type=int, default=2**20, help="base training budget in images seen (default 1 Mi = 1,048,576)")
    ap.add_argument("--lr", type=float, default=1e-3)
    ap.add_argument("--batch", type=int, default=256)
    ap.add_argument("--width", type=int, default=256)
    ap.add_argument("--depth", type=int, default=3)
    ap.add_argument("--ema-halflife", type=int, default=50_000, help="EMA half-life in images")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--skip-classifier", action="store_true")
    args = ap.parse_args(argv)

    from neon_cli.checkpoint import save_safetensors
    from neon_cli.train import TrainConfig, train_loop
    from neon_digits import family
    from neon_digits.classifier import train_classifier
    from neon_digits.model import Denoiser, real_digits

    torch.manual_seed(args.seed)
    images, labels = real_digits()
    args.out.mkdir(parents=True, exist_ok=True)
    if not args.skip_classifier:
        net = train_classifier(images, labels, seed=args.seed)
        with torch.no_grad():
            acc = (net(images)[1].argmax(1) == labels).double().mean().item()
        print(f"classifier train accuracy {acc:.4f}")
        with atomic_path(args.out / "classifier.safetensors") as tmp:
            save_safetensors(net.state_dict(), tmp, {"train_accuracy": f"{acc:.4f}"})

    torch.manual_seed(args.seed)  # the denoiser's init does not depend on whether the classifier was trained
    model = Denoiser(width=args.width, depth=args.depth)
    cfg = TrainConfig(budget=args.budget, lr=args.lr, batch=args.batch, warmup=args.budget // 20,
                      ema_halflife=args.ema_halflife, seed=args.seed)
    last = [0]

    def progress(task, done, total=None, **info):
        if done - last[0] >= 2**18 or done == total:
            last[0] = done
            print(f"{task}: {done}/{total} images, loss {info.get('loss', float('nan')):.4f}", flush=True)

    weights = train_loop(family, model, images, labels, cfg, progress=progress, task="base")
    meta = {"train_images": str(args.budget), "recipe": f"EDM loss, Adam lr {args.lr}, batch {args.batch}, "
            f"warmup {cfg.warmup} img, EMA half-life {args.ema_halflife} img, seed {args.seed}",
            "data": "sklearn.datasets.load_digits (1797 real 8x8 digits)"}
    with atomic_path(args.out / "base.safetensors") as tmp:
        family.save(weights, str(tmp), meta)
    print(f"wrote {args.out / 'base.safetensors'}")


if __name__ == "__main__":
    main()
