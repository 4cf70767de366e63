"""`gen-dist sample`, `export` and `ema`: trained models on disk."""

from __future__ import annotations

import argparse
from pathlib import Path

from gen_dist.commands.options import fail, sampler_overrides


def cmd_sample(args: argparse.Namespace) -> None:
    from gen_dist.sampling import sample_checkpoint

    overrides = [*sampler_overrides(args), *args.overrides]
    prompts = list(args.prompt)
    if args.prompts:
        try:
            prompts += [line.strip() for line in Path(args.prompts).read_text().splitlines() if line.strip()]
        except OSError as e:
            fail(f"--prompts {args.prompts}: {e.strerror}")
    out = sample_checkpoint(Path(args.checkpoint), args.n, Path(args.out), seed=args.seed, use_ema=not args.raw,
                            overrides=overrides, only_class=args.class_, prompts=prompts)
    print(f"wrote {out}")


def cmd_export(args: argparse.Namespace) -> None:
    if args.format == "gen-dist":
        from gen_dist.artifact import export

        if args.raw:
            fail("--raw: the gen-dist format holds both the raw (model.*) and EMA (ema.*) weights")
        print(f"wrote {export(Path(args.checkpoint), Path(args.out))}")
        return
    from gen_dist.formats import export as export_as

    print(f"wrote {export_as(Path(args.checkpoint), args.format, Path(args.out), use_ema=not args.raw)}")


def cmd_ema(args: argparse.Namespace) -> None:
    from gen_dist import posthoc

    out, info = posthoc.export(Path(args.run_dir), args.std, Path(args.out) if args.out else None, args.step)
    print(f"ema std {info['sigma_rel']} at step {info['step']} from {info['snapshots']} snapshots (profile error "
          f"{info['profile_error']:.2%}) -> {out}")


def cmd_pipeline(args: argparse.Namespace) -> None:
    from gen_dist.formats.assemble import new_pipeline

    print(f"wrote {new_pipeline(Path(args.spec), Path(args.out))}")
