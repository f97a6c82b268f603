#!/usr/bin/env python3
"""The baselines of the GPU expert-FFN benchmark, on the same GPU in the same run as
`expertmesh backend bench` (scripts/gpu-check.sh runs both):

- a dense bf16 GEMM through cuBLAS (torch.matmul), M = 8192, N = K = 7168;
- the device copy bandwidth (a 1 GiB device-to-device copy: bytes read + written per second);
- PyTorch's bf16 expert FFN at the same shapes as ours: a per-expert loop, and
  `torch._grouped_mm` (one grouped GEMM for W1|W3, one for W2) where this GPU has it.

Shapes: one GPU holds 1/8 of the experts; a batch of T tokens routed top-k spread evenly gives
ceil(T k / E) rows to each expert. Prints JSON.
"""
import argparse
import json
import math

import torch
import torch.nn.functional as F

SHAPES = {
    "v4-pro": dict(hidden=7168, ffn=3072, experts=384, top_k=6),
    "v3": dict(hidden=7168, ffn=2048, experts=256, top_k=8),
    "bench": dict(hidden=2048, ffn=1024, experts=64, top_k=6),
}


def timeit(fn, min_s=0.5):
    """Median seconds of fn() over at least min_s, timed with CUDA events after a warm-up."""
    fn()
    torch.cuda.synchronize()
    times, total = [], 0.0
    while len(times) < 5 or total < min_s:
        a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        a.record()
        fn()
        b.record()
        b.synchronize()
        t = a.elapsed_time(b) / 1e3
        times.append(t)
        total += t
    times.sort()
    return times[len(times) // 2]


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--shapes", default="v4-pro,v3")
    ap.add_argument("--tokens", default="128,1024,8192")
    ap.add_argument("--share", type=int, default=8)
    ap.add_argument("--min-secs", type=float, default=0.5)
    a = ap.parse_args()
    dev = torch.device("cuda")
    out = {"device": torch.cuda.get_device_name(0), "torch": torch.__version__, "ffn": []}

    m, n, k = 8192, 7168, 7168
    x = torch.randn(m, k, device=dev, dtype=torch.bfloat16)
    w = torch.randn(k, n, device=dev, dtype=torch.bfloat16)
    t = timeit(lambda: torch.matmul(x, w), a.min_secs)
    out["dense_gemm"] = {"m": m, "n": n, "k": k, "seconds": t, "tflops": 2 * m * n * k / t / 1e12}
    del x, w

    nb = 1 << 30
    src = torch.empty(nb, dtype=torch.uint8, device=dev)
    dst = torch.empty_like(src)
    t = timeit(lambda: dst.copy_(src), a.min_secs)
    out["copy_gb_per_s"] = 2 * nb / t / 1e9
    del src, dst

    grouped = hasattr(torch, "_grouped_mm")
    for name in a.shapes.split(","):
        s = SHAPES[name]
        h, f, e = s["hidden"], s["ffn"], s["experts"] // a.share
        w13 = torch.randn(e, h, 2 * f, device=dev, dtype=torch.bfloat16) / math.sqrt(h)
        w2 = torch.randn(e, f, h, device=dev, dtype=torch.bfloat16) / math.sqrt(f)
        for tokens in [int(v) for v in a.tokens.split(",")]:
            rows = max(1, -(-tokens * s["top_k"] // s["experts"]))
            x = torch.randn(e * rows, h, device=dev, dtype=torch.bfloat16)

            def loop():
                ys = []
                for i in range(e):
                    xe = x[i * rows:(i + 1) * rows]
                    gu = xe @ w13[i]
                    ys.append((F.silu(gu[:, :f]) * gu[:, f:]) @ w2[i])
                return torch.cat(ys)

            offs = torch.arange(1, e + 1, device=dev, dtype=torch.int32) * rows

            def grouped_mm():
                gu = torch._grouped_mm(x, w13, offs=offs)
                return torch._grouped_mm(F.silu(gu[:, :f]) * gu[:, f:], w2, offs=offs)

            flops = 6 * e * rows * h * f
            point = {"shape": name, "tokens": tokens, "rows_per_expert": rows, "local_experts": e}
            t = timeit(loop, a.min_secs)
            point["loop"] = {"seconds": t, "tflops": flops / t / 1e12}
            if grouped:
                try:
                    ref = loop()
                    got = grouped_mm()
                    err = ((got.float() - ref.float()).norm() / ref.float().norm()).item()
                    t = timeit(grouped_mm, a.min_secs)
                    point["grouped_mm"] = {"seconds": t, "tflops": flops / t / 1e12, "rel_l2_vs_loop": err}
                except RuntimeError as ex:  # not on this GPU or this torch
                    point["grouped_mm"] = {"error": str(ex).splitlines()[0]}
            out["ffn"].append(point)
            del x
        del w13, w2
        torch.cuda.empty_cache()
    print(json.dumps(out))


if __name__ == "__main__":
    main()
