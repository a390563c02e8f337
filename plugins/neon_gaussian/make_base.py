"""Make a ``gaussian`` base model theta_r (paper App. B.1): the maximum-likelihood Gaussian of n
real samples of the fixed D-dimensional truth.

    python -m neon_gaussian.make_base --dim 10 --n 100 --seed 3 -o base.safetensors

``--seed`` picks the draw of the n real samples (one point of the paper's average "over draws");
the truth itself depends only on D. Prints the base's exact metrics. The file is written under a
temporary name and renamed; an existing output is not overwritten unless ``--force``.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--dim", type=int, default=10, help="dimension D (default 10)")
    ap.add_argument("--n", type=int, default=100, help="number of real samples n (default 100; must exceed D)")
    ap.add_argument("--seed", type=int, default=0, help="seed of the draw of the n real samples")
    ap.add_argument("-o", "--out", type=Path, required=True, help="output .safetensors")
    ap.add_argument("--force", action="store_true", help="overwrite an existing output")
    args = ap.parse_args(argv)

    from neon_cli.errors import NeonError
    from neon_cli.fsutil import atomic_path
    from neon_gaussian.mle import exact_metrics, make_base, save

    if args.out.exists() and not args.force:
        print(f"make_base: error: -o {args.out} exists (use --force)", file=sys.stderr)
        return 2
    try:
        model = make_base(args.dim, args.n, args.seed)
    except NeonError as exc:
        print(f"make_base: error: {exc}", file=sys.stderr)
        return 2
    meta = {"train_images": str(args.n), "n": str(args.n), "data_seed": str(args.seed),
            "recipe": "maximum likelihood (sample mean, 1/n scatter) of n real samples (paper App. B.1)"}
    args.out.parent.mkdir(parents=True, exist_ok=True)
    with atomic_path(args.out) as tmp:
        save(model, str(tmp), meta)
    m = exact_metrics(model.mu.detach().numpy(), model.covariance().detach().numpy(), 1.0)
    print(f"wrote {args.out}: D = {args.dim}, n = {args.n}, seed = {args.seed}; "
          f"population nll {m['nll']:.6f}, kl {m['kl']:.6f}, w2 {m['w2']:.6f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
