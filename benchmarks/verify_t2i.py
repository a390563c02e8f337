"""Check that ``neon synth t2i`` makes the images diffusers' own pipeline call makes, bit for bit (CPU).

For every image i of a synthetic set: ``pipe(prompt_i, negative_prompt=..., generator=
torch.Generator().manual_seed(i), num_inference_steps=STEPS, guidance_scale=GAMMA, output_type="pil")``
converted to an array, against neon's uint8 image i (prompt i mod P). neon is run twice, with
``--batch 1`` (one image per pipeline call: expected bit-identical) and with ``--batch B`` (several
images per call; a batched UNet may round differently from a batch of one: the largest difference
is printed). Without --model, a tiny random StableDiffusionPipeline is built (tests/t2i_tiny.py).

    python benchmarks/verify_t2i.py                          # tiny pipeline, 6 images
    python benchmarks/verify_t2i.py --model PIPE --prompts prompts.txt -n 4 --steps 20 --gamma 7.5
"""

from __future__ import annotations

import argparse
import sys
import tempfile
from pathlib import Path


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", type=Path, help="a local StableDiffusion(XL)Pipeline folder (default: a tiny random one)")
    ap.add_argument("--prompts", type=Path, help="prompt file (default: three prompts, one with a negative prompt)")
    ap.add_argument("-n", type=int, default=6, help="images")
    ap.add_argument("--steps", type=int, default=4)
    ap.add_argument("--gamma", type=float, default=3.0, help="guidance_scale")
    ap.add_argument("--batch", type=int, default=4, help="the batched run's --batch")
    ap.add_argument("--threads", type=int, default=1)
    args = ap.parse_args()

    import numpy as np
    import torch

    torch.set_num_threads(args.threads)
    from neon_cli.report import Report
    from neon_cli.synth import load_synthetic, synthesize
    from neon_t2i.pipeline import load_pipeline
    from neon_t2i.prompts import read_prompts

    work = Path(tempfile.mkdtemp(prefix="verify_t2i-"))
    model = args.model
    if model is None:
        sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests"))
        from t2i_tiny import build_sd

        model = build_sd(work / "sd")
    prompts_file = args.prompts
    if prompts_file is None:
        prompts_file = work / "prompts.txt"
        prompts_file.write_text('a red cat\nthe blue dog\n{"prompt": "a green tree", "negative_prompt": "blurry"}\n')
    prompts = read_prompts(prompts_file)
    sets = [f"prompts={prompts_file}", f"steps={args.steps}", f"guidance={args.gamma}"]

    pipe = load_pipeline(model)
    ref = []
    for i in range(args.n):
        p = prompts[i % len(prompts)]
        img = pipe(p["prompt"], negative_prompt=p["negative_prompt"] or None, generator=torch.Generator().manual_seed(i),
                   num_inference_steps=args.steps, guidance_scale=args.gamma).images[0]
        ref.append(np.asarray(img).transpose(2, 0, 1))
    ref_t = torch.from_numpy(np.stack(ref))

    ok = True
    for batch in (1, args.batch):
        out = work / f"S-b{batch}"
        synthesize("t2i", Path(model), num=args.n, out_dir=out, set_pairs=sets, batch=batch, shard_size=args.n,
                   report=Report("synth"))
        images, labels, _ = load_synthetic(out)
        equal = [bool(torch.equal(images[i], ref_t[i])) for i in range(args.n)]
        diff = int((images.int() - ref_t.int()).abs().max())
        print(f"--batch {batch}: {sum(equal)}/{args.n} images bit-identical to pipe(prompt, generator=manual_seed(i)); "
              f"max |difference| {diff} levels; labels {labels.tolist()}")
        ok &= all(equal) if batch == 1 else True
    print("model:", model, "| device: cpu | torch", torch.__version__)
    return 0 if ok else 1


if __name__ == "__main__":
    raise SystemExit(main())
