"""Time the attention kernels' tiles on this GPU: for each kernel (fwd, dkdv, dq) and head dim, every
candidate (BLOCK_M, BLOCK_N, num_warps, num_stages) against the tiles in kernels.py, the others held
fixed. Prints one table a kernel: forward+backward TFLOP/s (forward only for fwd) per shape, and the
ratio of the geometric mean to the current tiles'. A candidate that does not compile here (shared
memory, registers) says so and is skipped. At the end it prints the winners as the table entry to paste
into kernels.py: `_ATTN_TILES_SM90` on Hopper and later (which overrides `_ATTN_TILES` there, so the
tiles are timed in the table kernels.py reads on this GPU), else `_ATTN_TILES`. Needs CUDA; the
winner still has to pass `python kernels.py --check` before it goes into kernels.py.

    python scripts/tune_attention.py                 # D = 64 (the course's head size) and 128, every kernel
    python scripts/tune_attention.py --head_dims 128 --kernels dkdv dq
"""
import argparse
import math
import os
import sys
import time

import torch

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))
import kernels  # noqa: E402

CANDIDATES = {
    "fwd": [(128, 64, 8, 3), (128, 128, 8, 2), (128, 32, 4, 3), (64, 64, 4, 3), (128, 64, 4, 3),
            (64, 128, 4, 2), (128, 64, 8, 4)],
    "dkdv": [(32, 64, 8, 2), (32, 64, 4, 2), (32, 64, 4, 3), (64, 64, 4, 2), (64, 64, 8, 2), (64, 64, 8, 3),
             (32, 128, 8, 2), (64, 128, 8, 2), (16, 64, 4, 3), (32, 128, 4, 3)],
    "dq": [(128, 32, 8, 3), (64, 64, 4, 2), (64, 64, 4, 3), (128, 64, 8, 2), (128, 64, 8, 3), (64, 32, 4, 3),
           (32, 64, 4, 2)],
}
SHAPES = [(2048, 1), (8192, 1), (2048, 4)]  # (T, query heads per key/value head); B*T = 16384, H*D = 2048


def tflops(T, D, group, dtype, backward):
    B, H = 16384 // T, 2048 // D
    q = torch.randn(B, H, T, D, device="cuda", dtype=dtype, requires_grad=True)
    k, v = (torch.randn(B, H // group, T, D, device="cuda", dtype=dtype, requires_grad=True) for _ in range(2))
    do = torch.randn_like(q)
    fwd_flops = 4 * B * H * T * T * D / 2
    attn = lambda: kernels._FlashAttention.apply(q, k, v, True)  # noqa: E731
    if backward:
        return 3.5 * fwd_flops / kernels._median_ms(lambda: torch.autograd.grad(attn(), (q, k, v), do)) / 1e9
    with torch.no_grad():
        return fwd_flops / kernels._median_ms(attn) / 1e9


def tile_table(D):
    """The dict kernels.py reads this GPU's bf16 tiles for head dim D from: on sm_90 and later its
    entries in _ATTN_TILES_SM90 override _ATTN_TILES, so a tile written only to _ATTN_TILES would
    never run there (the bug that left the first D = 128 tuning timing one tile over and over)."""
    if kernels._CAPABILITY >= 90:
        return kernels._ATTN_TILES_SM90.setdefault(D, {})
    return kernels._ATTN_TILES[D]


def set_tile(D, kernel, tile, dtype):
    """Make `tile` the one kernels.py launches for `kernel` at head dim D, and check that it is."""
    tile_table(D)[kernel] = tile
    used = kernels._attn_tiles(D, dtype)[kernel]
    if used != tile:
        raise RuntimeError(f"kernels.py would launch {used}, not the tile under test {tile}")


def tune(D, kernel, dtype):
    current = kernels._attn_tiles(D, dtype)[kernel]
    print(f"\nD = {D}, kernel {kernel} (current {current}), {dtype}: TFLOP/s "
          f"{'fwd' if kernel == 'fwd' else 'fwd+bwd'} at (T, group) " + " ".join(f"{s}" for s in SHAPES), flush=True)
    rows, base = [], None
    for tile in [current] + [c for c in CANDIDATES[kernel] if c != current]:
        set_tile(D, kernel, tile, dtype)
        start = time.time()
        try:
            rates = [tflops(T, D, g, dtype, kernel != "fwd") for T, g in SHAPES]
        except Exception as e:  # noqa: BLE001  (a tile that does not fit this GPU is a result, not a failure)
            print(f"  {str(tile):<18} does not run here: {type(e).__name__}: {str(e).splitlines()[0][:80]}")
            continue
        geo = math.exp(sum(math.log(r) for r in rates) / len(rates))
        base = base or geo
        rows.append((geo, tile))
        print(f"  {str(tile):<18} " + " ".join(f"{r:>7.0f}" for r in rates)
              + f"   x{geo / base:.3f}  ({time.time() - start:.0f}s)", flush=True)
    best = max(rows)[1]
    set_tile(D, kernel, best, dtype)  # later kernels are timed with this one's best
    print(f"  best {best}: x{max(rows)[0] / base:.3f} of the current tiles", flush=True)


def make_parser():
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--head_dims", type=int, nargs="+", default=[64, 128])
    parser.add_argument("--kernels", nargs="+", default=["dkdv", "dq", "fwd"], choices=list(CANDIDATES))
    return parser


def main():
    args = make_parser().parse_args()
    if not torch.cuda.is_available():
        sys.exit("tune_attention.py times kernels on a GPU, and this machine has none.")
    print(torch.cuda.get_device_name(), "torch", torch.__version__)
    for D in args.head_dims:
        for kernel in args.kernels:
            tune(D, kernel, torch.bfloat16)
    name = "_ATTN_TILES_SM90" if kernels._CAPABILITY >= 90 else "_ATTN_TILES"
    print(f"\nthe winners, for kernels.py's {name} (after `python kernels.py --check` passes with them):")
    for D in args.head_dims:
        tiles = kernels._attn_tiles(D, torch.bfloat16)
        print(f"    {D}: dict(" + ", ".join(f"{k}={tiles[k]}" for k in args.kernels) + "),", flush=True)


if __name__ == "__main__":
    main()
