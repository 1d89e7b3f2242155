#!/usr/bin/env python
"""Train Medusa heads: `python train.py --config configs/NAME.yaml [key=value ...]` (dotted keys override the YAML).

Restarting the same command resumes from the run dir's latest checkpoint. See docs/TRAINING.md."""

from __future__ import annotations

import argparse
import os
import sys


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--config", required=True, help="YAML config (configs/*.yaml)")
    ap.add_argument("--distributed", action="store_true", help="call jax.distributed.initialize() first (multi-host)")
    ap.add_argument("--no-progress", action="store_true")
    ap.add_argument("overrides", nargs="*", help="dotted key=value overrides, e.g. train.steps=100")
    args = ap.parse_args(argv)
    from medusa_jax.train.config import ConfigError, load_config

    try:
        cfg = load_config(args.config, args.overrides)
    except ConfigError as e:
        print(f"train.py: error: {e}", file=sys.stderr)
        return 2
    import jax

    if args.distributed:
        jax.distributed.initialize()
    from medusa_jax.train.trainer import TrainingError, TrainingInterrupted, train

    try:
        train(cfg, progress=not args.no_progress)
    except TrainingInterrupted as e:
        print(f"train.py: {e}", file=sys.stderr)
        return 130
    except (ConfigError, TrainingError, ValueError, OSError) as e:
        print(f"train.py: error: {' '.join(str(e).split())}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
    sys.exit(main())
