"""One MoE layer through a running ExpertMesh cluster, from Python.

    python3 example.py --entry 127.0.0.1:7500 --layer 3 --input in.safetensors --output out.safetensors

`--input` holds `hidden_states` (f32 [T, hidden]) and, for hash-routed layers, `input_ids` (i64
[T]), as `expertmesh gen-input` writes it; `--output` gets `output`, `topk_indices` and
`topk_weights`, as `expertmesh forward` writes them. With `--tls-ca/--tls-cert/--tls-key` the call
goes over mutual TLS.
"""
import argparse

import numpy as np
from safetensors.numpy import load_file, save_file

from expertmesh_client import MoeLayerClient, Tls


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--entry", required=True, help="entry workers, HOST:PORT (or ID@HOST:PORT), comma-separated")
    p.add_argument("--layer", type=int, required=True, help="the model's own layer index")
    p.add_argument("--input", required=True, help="safetensors with hidden_states (and input_ids)")
    p.add_argument("--output", required=True, help="safetensors to write")
    p.add_argument("--wire", default="bf16", choices=["bf16", "f32"], help="activations dtype between workers")
    p.add_argument("--timeout-s", type=float, default=30.0, help="deadline of the call, retries included")
    p.add_argument("--tls-ca", help="PEM of the cluster CA (mutual TLS)")
    p.add_argument("--tls-cert", help="PEM client certificate (a `client` identity)")
    p.add_argument("--tls-key", help="PEM key of --tls-cert")
    a = p.parse_args()
    tls = Tls(a.tls_ca, a.tls_cert, a.tls_key) if a.tls_ca else None
    client = MoeLayerClient(a.entry.split(","), timeout_s=a.timeout_s, tls=tls)
    desc = client.describe()
    t = load_file(a.input)
    x = t["hidden_states"].astype(np.float32)
    if x.shape[1] != desc.hidden:
        raise SystemExit(f"{a.input}: hidden_states is {x.shape}; the cluster's model has hidden {desc.hidden}")
    ids = t.get("input_ids")
    r = client.forward(a.layer, x, input_ids=ids, wire=a.wire)
    save_file({"output": r.output, "topk_indices": r.topk_indices, "topk_weights": r.topk_weights}, a.output)
    print(
        f"layer {a.layer}: {x.shape[0]} tokens -> {a.output} through the cluster "
        f"(model {desc.model_type}, placement epoch {r.epoch}, top-{r.topk_indices.shape[1]})"
    )


if __name__ == "__main__":
    main()
