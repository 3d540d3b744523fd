"""Packed (unpadded) against padded forward on MiniLM, and the per-row attention candidates, on the CPU.

    python benchmarks/packed_forward.py --lengths 20 256 --threads 1 --rounds 3

One batch of about 2,048 real tokens (rows of uniformly drawn lengths), all MiniLM (hidden 384, 12 heads,
6 layers). Prints the minimum over interleaved rounds (on shared cores medians drift with others' load) of:
today's padded transformers forward of the batch (padded to its longest row rounded up to 8), the packed
forward with each attention candidate, and one layer's attention alone: row by row (what packed.py uses),
padded to the longest row with a key mask, a block-diagonal boolean mask over all T x T scores. Nested
(jagged) tensors are not among them: their SDPA has no CPU kernel under inference mode, nor a causal one.
"""

from __future__ import annotations

import argparse
import time

import torch
import torch.nn.functional as F

from pipeline.encode import packed as P
from pipeline.encode.cpu_linear import pack_linear_layers
from pipeline.encode.models import load_encoder, resolve_model_dir


def blockdiag_attention(q, k, v, seqs: P.Segments, causal: bool, scale: float) -> torch.Tensor:
    lengths = torch.diff(torch.tensor(seqs.bounds))
    row = torch.repeat_interleave(torch.arange(len(lengths)), lengths)
    mask = row[:, None] == row[None, :]
    if causal:
        mask &= torch.ones_like(mask).tril()
    out = F.scaled_dot_product_attention(*(t.transpose(0, 1)[None] for t in (q, k, v)), attn_mask=mask, scale=scale)
    return out[0].transpose(0, 1)


def padded_attention(q, k, v, seqs: P.Segments, causal: bool, scale: float) -> torch.Tensor:
    lengths = torch.diff(torch.tensor(seqs.bounds))
    keep = torch.arange(seqs.max_seqlen)[None] < lengths[:, None]

    def pad(t):
        out = t.new_zeros(len(lengths), seqs.max_seqlen, *t.shape[1:])
        out[keep] = t
        return out.transpose(1, 2)

    mask = keep[:, None, None, :]
    if causal:
        mask = mask & torch.ones(seqs.max_seqlen, seqs.max_seqlen, dtype=torch.bool).tril()
    return F.scaled_dot_product_attention(pad(q), pad(k), pad(v), attn_mask=mask, scale=scale).transpose(1, 2)[keep]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--lengths", type=int, nargs=2, default=(20, 256), metavar=("LO", "HI"))
    parser.add_argument("--tokens", type=int, default=2048)
    parser.add_argument("--threads", type=int, default=torch.get_num_threads())
    parser.add_argument("--rounds", type=int, default=3)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    lengths: list[int] = []
    while sum(lengths) < args.tokens:
        lengths.append(int(torch.randint(args.lengths[0], args.lengths[1] + 1, ())))
    lens = torch.tensor(lengths)
    seqs = P.segments(lens)
    width = -(-int(lens.max()) // 8) * 8
    rows = [torch.randint(1000, 30000, (n,)) for n in lengths]
    ids = torch.zeros(len(rows), width, dtype=torch.long)
    mask = torch.zeros_like(ids)
    for i, row in enumerate(rows):
        ids[i, :len(row)], mask[i, :len(row)] = row, 1
    flat, positions = torch.cat(rows), torch.cat([torch.arange(n) for n in lengths])
    print(f"{len(rows)} rows of {args.lengths[0]}-{args.lengths[1]} tokens: {int(lens.sum())} real tokens, "
          f"padded width {width} ({len(rows) * width} padded tokens); {args.threads} thread(s)")

    model_dir = resolve_model_dir("minilm")
    plain, onednn = load_encoder(model_dir), load_encoder(model_dir)
    pack_linear_layers(onednn)
    attentions = {"row by row": P.rowwise_attention, "padded + key mask": padded_attention,
                  "block-diagonal mask": blockdiag_attention}
    runs = {}
    for linears, model in (("torch", plain), ("oneDNN", onednn)):
        runs[f"[{linears} linears] padded transformers forward"] = lambda m=model: m(ids, attention_mask=mask)
        for name in ("row by row", "padded + key mask"):
            runs[f"[{linears} linears] packed, attention {name}"] = (
                lambda m=model, a=attentions[name]: P.packed_hidden_states(m, flat, seqs, positions, None, -1,
                                                                           False, attention=a))
    q, k, v = (torch.randn(len(flat), 12, 32) for _ in range(3))
    for name, attention in attentions.items():
        for causal in (False, True):
            runs[f"one layer's attention, {name}{', causal' if causal else ''}"] = (
                lambda a=attention, c=causal: a(q, k, v, seqs, c, 32 ** -0.5))
    best = dict.fromkeys(runs, float("inf"))
    with torch.inference_mode():
        for _ in range(args.rounds):
            for name, run in runs.items():
                start = time.perf_counter()
                run()
                best[name] = min(best[name], time.perf_counter() - start)
    for name, seconds in best.items():
        print(f"  {name}: {seconds * 1000:.1f} ms")


if __name__ == "__main__":
    main()
