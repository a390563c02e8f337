"""Train the ``gaussian-ddpm`` base model theta_r (paper App. B.11) on 1,000 real samples.

    python -m neon_gaussian.train_ddpm [-o plugins/neon_gaussian/weights/ddpm-base.safetensors]
                                       [--epochs 10000] [--lr 1e-4] [--anneal-epochs 4000] [--batch 1000] [--seed 0]

The paper: "trained for a long duration (10,000 epochs) on a small dataset of 1,000 real samples
with a learning rate of 1e-4 to ensure it has converged". Trained through the loop ``neon
finetune`` uses (neon_cli.train.train_loop) with the family's recipe (epsilon-MSE, Adam), full
batch by default: 10,000 epochs = 10,000 steps = 10 M samples seen. At a constant learning rate
Adam does not settle: the mean gradient of the loss on the base's own training samples stays
comparable to the one on fresh real samples (measured: cosine 0.78), and then any synthetic set's
gradient is aligned with the real one whatever the sampler (``neon align`` sees that residual,
not the sampler). So ``--anneal-epochs`` more epochs follow, half at lr / 10 and half at lr / 100
(each phase a fresh Adam), to bring theta_r close to a stationary point of its training risk, as
the paper's analysis assumes. Deterministic on one machine for a given seed. Prints the base's W2
at zeta = 1 on 20,000 samples.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

DEFAULT_OUT = Path(__file__).resolve().parent / "weights" / "ddpm-base.safetensors"


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("-o", "--out", type=Path, default=DEFAULT_OUT)
    ap.add_argument("--n", type=int, default=1000, help="real training samples (default 1,000)")
    ap.add_argument("--epochs", type=int, default=10_000)
    ap.add_argument("--lr", type=float, default=1e-4)
    ap.add_argument("--anneal-epochs", type=int, default=4000, help="epochs after --epochs: half at lr/10, half at lr/100")
    ap.add_argument("--batch", type=int, default=1000)
    ap.add_argument("--width", type=int, default=128)
    ap.add_argument("--depth", type=int, default=3)
    ap.add_argument("--seed", type=int, default=0, help="seed of the real samples, the initialisation and the training noise")
    args = ap.parse_args(argv)

    import torch

    from neon_cli.fsutil import atomic_path
    from neon_cli.train import TrainConfig, train_loop
    from neon_gaussian import ddpm_family
    from neon_gaussian.ddpm import TRAIN_STREAM, EpsNet, real_samples, save

    torch.manual_seed(args.seed)
    data = torch.from_numpy(real_samples(args.n, args.seed, stream=TRAIN_STREAM)).to(torch.float32)
    model = EpsNet(args.width, args.depth, 20)
    phases = [(args.epochs, args.lr), (args.anneal_epochs // 2, args.lr / 10), (args.anneal_epochs - args.anneal_epochs // 2, args.lr / 100)]
    phases = [(e, lr) for e, lr in phases if e > 0]
    budget = sum(e for e, _ in phases) * args.n
    last = [0]
    weights = model
    for k, (epochs, lr) in enumerate(phases):
        cfg = TrainConfig(budget=epochs * args.n, lr=lr, batch=args.batch, seed=args.seed + k)

        def progress(task, done, total=None, **info):
            if done - last[0] >= max(total // 5, 1) or done == total:
                last[0] = done if done < total else 0
                print(f"{task} (lr {lr:g}): {done}/{total} samples, loss {info.get('loss', float('nan')):.4f}", flush=True)

        weights = train_loop(ddpm_family, weights, data, None, cfg, progress=progress, task=f"base phase {k + 1}")
    meta = {"train_images": str(budget), "n": str(args.n), "data_seed": str(args.seed),
            "recipe": f"eps-MSE, Adam, batch {args.batch}, (epochs, lr) phases {phases} on {args.n} real samples, seed {args.seed}",
            "data": "N(0, [[2, 1], [1, 2]]) (paper App. B.11)"}
    args.out.parent.mkdir(parents=True, exist_ok=True)
    with atomic_path(args.out) as tmp:
        save(weights, str(tmp), meta)
    seeds = torch.arange(20_000)
    m = ddpm_family.score(ddpm_family.sample(weights, seeds, None, {"zeta": 1.0}), None)
    print(f"wrote {args.out}: w2 at zeta = 1 on 20,000 samples {m['w2']:.4f} (trace ratio {m['trace_ratio']:.4f})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
