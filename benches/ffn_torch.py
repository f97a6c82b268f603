#!/usr/bin/env python3
"""Expert FFN baselines a user would pick, at ExpertMesh's bench shapes, printed as JSON.

PyTorch bf16 (a per-expert loop, and torch._grouped_mm where this torch has it) and numpy's
f32 GEMM (OpenBLAS) peak. Run it in the same session as ExpertMesh's own figures:

    python3 -m venv /tmp/tv && /tmp/tv/bin/pip install torch numpy   # benchmark only
    /tmp/tv/bin/python benches/ffn_torch.py --rows 24,384,1536
    cargo run --release -p expertmesh-kernels --example ffn_rate -- 24,384,1536 bf16,f8_e4m3,f32 bf16

torch and numpy are never test dependencies.
"""
import argparse
import json
import time

import numpy as np
import torch


def median_seconds(fn, min_secs=1.0):
    fn()
    times = []
    start = time.time()
    while len(times) < 3 or time.time() - start < min_secs:
        t = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t)
    times.sort()
    return times[len(times) // 2]


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--rows", default="24,384,1536")
    p.add_argument("--hidden", type=int, default=2048)
    p.add_argument("--ffn", type=int, default=1024)
    p.add_argument("--experts", type=int, default=4)
    p.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's default)")
    a = p.parse_args()
    if a.threads:
        torch.set_num_threads(a.threads)
    h, f, n = a.hidden, a.ffn, a.experts
    g = torch.Generator().manual_seed(0)
    w1 = torch.randn(n, f, h, generator=g).div(h**0.5).bfloat16()
    w3 = torch.randn(n, f, h, generator=g).div(h**0.5).bfloat16()
    w2 = torch.randn(n, h, f, generator=g).div(f**0.5).bfloat16()
    out = {"benchmark": "expert_ffn_baselines", "torch": torch.__version__, "threads": torch.get_num_threads(),
           "hidden": h, "ffn": f, "experts": n, "results": []}
    for rows in [int(r) for r in a.rows.split(",")]:
        x = torch.randn(n * rows, h, generator=g).bfloat16()
        flops = 6.0 * n * rows * h * f

        def loop():
            for e in range(n):
                xe = x[e * rows:(e + 1) * rows]
                (torch.nn.functional.silu(xe @ w1[e].t()) * (xe @ w3[e].t())) @ w2[e].t()

        r = {"rows_per_expert": rows, "loop_bf16_gflops": flops / median_seconds(loop) / 1e9}
        if hasattr(torch, "_grouped_mm"):
            offs = torch.arange(rows, n * rows + 1, rows, dtype=torch.int32)
            w13 = torch.cat([w1, w3], dim=1).transpose(1, 2)  # [n, h, 2f]
            w2t = w2.transpose(1, 2)  # [n, f, h]

            def grouped():
                gu = torch._grouped_mm(x, w13, offs=offs)
                a_ = torch.nn.functional.silu(gu[:, :f]) * gu[:, f:]
                torch._grouped_mm(a_, w2t, offs=offs)

            try:
                r["grouped_mm_bf16_gflops"] = flops / median_seconds(grouped) / 1e9
            except Exception as e:  # noqa: BLE001 - report why the baseline is missing
                r["grouped_mm_error"] = str(e).splitlines()[0]
        r["best_torch_bf16_gflops"] = max(v for k, v in r.items() if k.endswith("_gflops"))
        out["results"].append(r)
    m = 2048
    A = np.random.rand(m, m).astype(np.float32)
    B = np.random.rand(m, m).astype(np.float32)
    out["numpy_f32_gemm_gflops"] = 2 * m**3 / median_seconds(lambda: A @ B) / 1e9
    print(json.dumps(out, indent=2))


if __name__ == "__main__":
    main()
