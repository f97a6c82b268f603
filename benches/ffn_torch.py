#!/usr/bin/env python3
"""Expert FFN: ExpertMesh's CPU backend against the baselines a user would pick, same shapes,
same run, printed as JSON.

Baselines: PyTorch bf16 (a per-expert loop, and torch._grouped_mm where this torch has it); for
the f32 path, numpy (OpenBLAS) and torch per-expert loops with f32 weights, and numpy's f32 GEMM
peak (a square 2048 product). With --ours, ExpertMesh's own rates (the `ffn_rate` example) are
measured in the same rounds, alternating with the baselines, and the medians over the rounds are
compared: this machine is shared, and a quiet minute and a busy one differ by 2x.

    python3 -m venv /tmp/tv && /tmp/tv/bin/pip install torch numpy   # benchmark only
    cargo build --release -p expertmesh-kernels --example ffn_rate
    /tmp/tv/bin/python benches/ffn_torch.py --rows 24,384,1536 --rounds 5 \
        --ours target/release/examples/ffn_rate

torch and numpy are never test dependencies.
"""
import argparse
import json
import re
import statistics
import subprocess
import time

import numpy as np
import torch


def median_seconds(fn, min_secs):
    fn()
    times = []
    start = time.time()
    while len(times) < 3 or time.time() - start < min_secs:
        t = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t)
    times.sort()
    return times[len(times) // 2]


def baselines(a, g):
    """One round of every baseline: {rows: {name: GFLOP/s}} and numpy's GEMM peak."""
    h, f, n = a.hidden, a.ffn, a.experts
    w1 = torch.randn(n, f, h, generator=g).div(h**0.5).bfloat16()
    w3 = torch.randn(n, f, h, generator=g).div(h**0.5).bfloat16()
    w2 = torch.randn(n, h, f, generator=g).div(f**0.5).bfloat16()
    out = {}
    for rows in a.rows:
        x = torch.randn(n * rows, h, generator=g).bfloat16()
        flops = 6.0 * n * rows * h * f
        rate = lambda fn: flops / median_seconds(fn, a.min_secs) / 1e9  # noqa: E731

        def loop():
            for e in range(n):
                xe = x[e * rows:(e + 1) * rows]
                (torch.nn.functional.silu(xe @ w1[e].t()) * (xe @ w3[e].t())) @ w2[e].t()

        r = {"torch_loop_bf16": rate(loop)}
        if hasattr(torch, "_grouped_mm"):
            offs = torch.arange(rows, n * rows + 1, rows, dtype=torch.int32)
            w13 = torch.cat([w1, w3], dim=1).transpose(1, 2)  # [n, h, 2f]
            w2t = w2.transpose(1, 2)  # [n, f, h]

            def grouped():
                gu = torch._grouped_mm(x, w13, offs=offs)
                torch._grouped_mm(torch.nn.functional.silu(gu[:, :f]) * gu[:, f:], w2t, offs=offs)

            try:
                r["torch_grouped_mm_bf16"] = rate(grouped)
            except Exception as e:  # noqa: BLE001 - report why the baseline is missing
                r["torch_grouped_mm_error"] = str(e).splitlines()[0]
        xf = x.float().numpy()
        w1f, w3f, w2f = (w.float().numpy() for w in (w1, w3, w2))

        def numpy_loop():
            for e in range(n):
                xe = xf[e * rows:(e + 1) * rows]
                gt = xe @ w1f[e].T
                ((gt / (1.0 + np.exp(-gt))) * (xe @ w3f[e].T)) @ w2f[e].T

        r["numpy_loop_f32"] = rate(numpy_loop)
        xt, w1t, w3t, w2t = x.float(), w1.float(), w3.float(), w2.float()

        def torch_f32_loop():
            for e in range(n):
                xe = xt[e * rows:(e + 1) * rows]
                (torch.nn.functional.silu(xe @ w1t[e].t()) * (xe @ w3t[e].t())) @ w2t[e].t()

        r["torch_loop_f32"] = rate(torch_f32_loop)
        out[rows] = r
    m = 2048
    A = np.random.rand(m, m).astype(np.float32)
    B = np.random.rand(m, m).astype(np.float32)
    peak = 2 * m**3 / median_seconds(lambda: A @ B, a.min_secs) / 1e9
    return out, peak


def ours(a):
    """One round of ExpertMesh's rates: {rows: {name: GFLOP/s}} and the backend's name."""
    out = {r: {} for r in a.rows}
    rows = ",".join(str(r) for r in a.rows)
    backend = ""
    for weights, act in [("bf16,f8_e4m3", "bf16"), ("f32", "f32")]:
        p = subprocess.run([a.ours, rows, weights, act], capture_output=True, text=True, check=True)
        backend = p.stderr.strip().splitlines()[-1] if p.stderr.strip() else backend
        for line in p.stdout.splitlines():
            m = re.match(r"(\S+)\s+(\d+) rows:\s+([\d.]+) GFLOP/s", line)
            if m:
                out[int(m.group(2))][f"expertmesh_{m.group(1)}_weights_{act}_act"] = float(m.group(3))
    return out, backend


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--rows", default="24,384,1536")
    p.add_argument("--hidden", type=int, default=2048)
    p.add_argument("--ffn", type=int, default=1024)
    p.add_argument("--experts", type=int, default=4)
    p.add_argument("--rounds", type=int, default=1)
    p.add_argument("--min-secs", type=float, default=1.0)
    p.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's default)")
    p.add_argument("--ours", help="path of ExpertMesh's ffn_rate example, measured in the same rounds")
    a = p.parse_args()
    a.rows = [int(r) for r in a.rows.split(",")]
    if a.threads:
        torch.set_num_threads(a.threads)
    g = torch.Generator().manual_seed(0)
    rounds, peaks, backend = [], [], None
    for _ in range(a.rounds):
        base, peak = baselines(a, g)
        peaks.append(peak)
        if a.ours:
            mine, backend = ours(a)
            for r in a.rows:
                base[r].update(mine[r])
        rounds.append(base)
    results = []
    for r in a.rows:
        names = sorted({k for rd in rounds for k in rd[r] if not k.endswith("_error")})
        med = {k: statistics.median(rd[r][k] for rd in rounds if k in rd[r]) for k in names}
        row = {"rows_per_expert": r, "median_gflops": med, "per_round": [rd[r] for rd in rounds]}
        best_bf16 = max(v for k, v in med.items() if k.startswith("torch_") and k.endswith("bf16"))
        row["best_torch_bf16"] = best_bf16
        if "expertmesh_bf16_weights_bf16_act" in med:
            row["expertmesh_bf16_over_best_torch_bf16"] = med["expertmesh_bf16_weights_bf16_act"] / best_bf16
            row["expertmesh_f32_over_numpy_peak"] = med["expertmesh_f32_weights_f32_act"] / statistics.median(peaks)
            row["expertmesh_f32_over_best_f32_loop"] = med["expertmesh_f32_weights_f32_act"] / max(
                med["numpy_loop_f32"], med["torch_loop_f32"])
        results.append(row)
    print(json.dumps({
        "benchmark": "expert_ffn", "torch": torch.__version__, "threads": torch.get_num_threads(),
        "hidden": a.hidden, "ffn": a.ffn, "experts": a.experts, "rounds": a.rounds,
        "expertmesh_backend": backend, "numpy_f32_gemm_peak_gflops": statistics.median(peaks),
        "numpy_f32_gemm_peak_per_round": peaks, "results": results,
    }, indent=2))


if __name__ == "__main__":
    main()
