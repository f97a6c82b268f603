#!/usr/bin/env python3
"""One table from the JSON files scripts/gpu-check.sh writes: ours (`expertmesh backend bench`),
the baselines (benches/gpu_baselines.py), and `expertmesh bench` with a GPU worker and with a
CPU worker. Each row names the target of issue 10 it is checked against.

    gpu_table.py OURS.json BASELINES.json BENCH_CUDA.json BENCH_CPU.json
"""
import json
import sys


def load(p):
    try:
        with open(p) as f:
            return json.load(f)
    except (OSError, ValueError) as e:
        print(f"(no {p}: {e})")
        return None


def main():
    ours, base, gpu, cpu = (load(p) for p in sys.argv[1:5])
    rows = []
    if ours and base:
        copy = base["copy_gb_per_s"]
        dense = base["dense_gemm"]["tflops"]
        rows.append(("device", f"{base['device']}, torch {base['torch']}", "", ""))
        rows.append(("dense bf16 cuBLAS GEMM 8192x7168x7168", f"{dense:.0f} TFLOP/s", "baseline", ""))
        rows.append(("device copy (read+write)", f"{copy:.0f} GB/s", "baseline", ""))
        peers = {(p["shape"], p["tokens"]): p for p in base["ffn"]}
        for p in ours["ffn"]:
            peer = peers.get((p["shape"], p["tokens"]))
            if not peer:
                continue
            best = max(peer["loop"]["tflops"], peer.get("grouped_mm", {}).get("tflops", 0.0))
            what = f"{p['shape']} {p['weights']} {p['tokens']} tok ({p['rows_per_expert']} rows x {p['local_experts']})"
            got = f"{p['tflops']:.1f} TFLOP/s, {p['weight_gb_per_s']:.0f} GB/s weights"
            if p["weights"] == "bf16":
                r = p["tflops"] / best
                rows.append((what, got, f"{r:.2f}x best PyTorch (>= 1.0)", "yes" if r >= 1.0 else "NO"))
                if p["tokens"] >= 8192:
                    r = p["tflops"] / dense
                    rows.append(("", "", f"{r:.2f}x dense cuBLAS (>= 0.75)", "yes" if r >= 0.75 else "NO"))
                if p["tokens"] <= 1024:
                    r = p["weight_gb_per_s"] / copy
                    rows.append(("", "", f"{r:.2f}x copy bandwidth (>= 0.9)", "yes" if r >= 0.9 else "NO"))
            elif p["weights"] == "f8_e4m3" and p["tokens"] <= 1024:
                r = p["tflops"] / best
                rows.append((what, got, f"{r:.2f}x best bf16 PyTorch (>= 1.7)", "yes" if r >= 1.7 else "NO"))
            else:
                rows.append((what, got, "", ""))
        x = ours.get("device_figures") or {}
        for k in ("permute_gb_per_s", "combine_gb_per_s"):
            if k in x:
                r = x[k] / copy
                rows.append((k.replace("_gb_per_s", ""), f"{x[k]:.0f} GB/s", f"{r:.2f}x copy (>= 0.5)", "yes" if r >= 0.5 else "NO"))
        for k in ("upload_gb_per_s", "download_gb_per_s"):
            if k in x:
                rows.append((k.replace("_gb_per_s", ""), f"{x[k]:.1f} GB/s", "pinned staging", ""))
    if gpu and cpu:
        c = {r["tokens_per_batch"]: r for r in cpu["results"]}
        for r in gpu["results"]:
            b = r["tokens_per_batch"]
            if b in c:
                g, k = r["distributed"]["tokens_per_s"], c[b]["distributed"]["tokens_per_s"]
                chk = r.get("check") or {}
                err = f", rel L2 {chk['distributed_rel_l2']:.1e}" if chk else ""
                rows.append((f"bench worker cuda vs cpu, {b} tok", f"{g:.0f} vs {k:.0f} tok/s{err}", f"{g / k:.2f}x", ""))
    w = [max(len(str(r[i])) for r in rows) if rows else 0 for i in range(4)]
    for r in rows:
        print("  ".join(str(v).ljust(w[i]) for i, v in enumerate(r)))


if __name__ == "__main__":
    main()
