"""Each Medusa head's top-1 accuracy by answer position, on the model's own greedy answers :
do heads trained on answers capped at N tokens guess worse past N?

    PYTHONPATH=. python experiments/heads_by_position.py --prompts-file ../shared/data/dev_prompts.jsonl --num-prompts 48 \\
        --max-new-tokens 128 --split 64 [--heads DIR_OR_NAME]
"""

import argparse
import json
import os
import sys

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--heads", default=None, help="heads dir or shipped name (default: the shipped default heads)")
    ap.add_argument("--prompts-file", required=True)
    ap.add_argument("--num-prompts", type=int, default=48)
    ap.add_argument("--max-new-tokens", type=int, default=128)
    ap.add_argument("--split", type=int, default=64, help="answer position where the second bucket starts")
    args = ap.parse_args()

    import medusa_jax
    from medusa_jax.prompts import read_prompts

    m = medusa_jax.load(heads=args.heads)
    res = m.generate(read_prompts(args.prompts_file, args.num_prompts), max_new_tokens=args.max_new_tokens,
                     mode="ar", batch_size=16)  # fmt: skip
    k = m.heads_config.num_heads
    hits, total = np.zeros((2, k)), np.zeros((2, k))
    for r in res:
        seq = list(r.prompt_ids) + list(r.output_ids)
        n_p = len(r.prompt_ids)
        guess = np.asarray(m.forward([seq]).medusa_logits[:, 0]).argmax(-1)  # [K, T]: head h guesses t + h + 2
        for h in range(k):
            t = np.arange(n_p - 1, len(seq) - h - 2)  # from the last prompt token on
            ok = guess[h, t] == np.asarray(seq)[t + h + 2]
            late = (t - (n_p - 1)) >= args.split
            for b, sel in enumerate((~late, late)):
                hits[b, h] += ok[sel].sum()
                total[b, h] += sel.sum()
    out = {f"positions < {args.split}": (hits[0] / np.maximum(total[0], 1)).round(3).tolist(),
           f"positions >= {args.split}": (hits[1] / np.maximum(total[1], 1)).round(3).tolist(),
           "counts": total.astype(int).tolist(), "prompts": len(res)}  # fmt: skip
    print(json.dumps(out))


if __name__ == "__main__":
    main()
