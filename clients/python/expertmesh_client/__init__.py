"""A client for ExpertMesh's `expertmesh.v1.MoeLayer` service: one MoE layer of a model served by
a cluster, with numpy arrays in and out.

    from expertmesh_client import MoeLayerClient
    c = MoeLayerClient(["10.0.0.5:7500", "10.0.0.6:7500"])
    out = c.forward(layer=3, hidden_states=x)          # x: float32 [tokens, hidden]
    out.output, out.topk_indices, out.topk_weights     # numpy arrays

`Forward` is idempotent: on UNAVAILABLE, RESOURCE_EXHAUSTED or a broken connection the call
moves to the next entry worker, within one deadline. Mutual TLS: pass `tls=Tls(ca, cert, key)`
(a `client` certificate of the cluster CA; see docs/operations.md).
"""
from __future__ import annotations

import dataclasses
import time
from typing import Optional, Sequence

import grpc
import numpy as np

from expertmesh_client.v1 import common_pb2, moe_pb2, moe_pb2_grpc

__all__ = ["MoeLayerClient", "ForwardResult", "Tls", "MAX_MESSAGE_BYTES"]

#: Largest message either way (the workers' default limit is 64 MiB, `--max-message-mib`).
MAX_MESSAGE_BYTES = 256 << 20

_RETRY = {grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.RESOURCE_EXHAUSTED, grpc.StatusCode.ABORTED}


@dataclasses.dataclass
class Tls:
    """Mutual TLS: PEM files of the cluster CA, this client's certificate and its key. Give
    entries as `ID@HOST:PORT` to check that the worker there presents `worker.<ID>`; a plain
    `HOST:PORT` is checked against the host name or IP (certificates from `expertmesh certs`
    also name localhost and 127.0.0.1)."""

    ca: str
    cert: str
    key: str


@dataclasses.dataclass
class ForwardResult:
    output: np.ndarray  # float32 [tokens, hidden]: routed experts plus the shared expert
    topk_indices: np.ndarray  # int64 [tokens, k]
    topk_weights: np.ndarray  # float32 [tokens, k]
    epoch: int  # placement epoch that served the call


def _tensor(a: np.ndarray, dtype: int) -> common_pb2.Tensor:
    return common_pb2.Tensor(dtype=dtype, shape=list(a.shape), data=np.ascontiguousarray(a).tobytes())


def _array(t: common_pb2.Tensor, np_dtype) -> np.ndarray:
    return np.frombuffer(t.data, dtype=np.dtype(np_dtype).newbyteorder("<")).reshape(tuple(t.shape))


class MoeLayerClient:
    """Forward calls to a cluster through its entry workers (`HOST:PORT` each)."""

    def __init__(self, entries: Sequence[str], timeout_s: float = 30.0, tls: Optional[Tls] = None):
        if not entries:
            raise ValueError("no entry worker given; expected one or more HOST:PORT")
        opts = [
            ("grpc.max_send_message_length", MAX_MESSAGE_BYTES),
            ("grpc.max_receive_message_length", MAX_MESSAGE_BYTES),
        ]
        self._stubs = []
        for e in entries:
            worker_id, _, addr = e.rpartition("@")
            if tls is None:
                ch = grpc.insecure_channel(addr, options=opts)
            else:
                with open(tls.ca, "rb") as ca, open(tls.key, "rb") as key, open(tls.cert, "rb") as cert:
                    creds = grpc.ssl_channel_credentials(
                        root_certificates=ca.read(), private_key=key.read(), certificate_chain=cert.read()
                    )
                names = [("grpc.ssl_target_name_override", f"worker.{worker_id}")] if worker_id else []
                ch = grpc.secure_channel(addr, creds, options=opts + names)
            self._stubs.append((addr, moe_pb2_grpc.MoeLayerStub(ch)))
        self._timeout = timeout_s
        self._next = 0

    def describe(self) -> moe_pb2.ModelDescription:
        """The model's shape (hidden size, layers, experts, top-k), from the first entry that answers."""
        last = None
        for e, stub in self._stubs:
            try:
                return stub.Describe(moe_pb2.DescribeRequest(), timeout=min(self._timeout, 10.0))
            except grpc.RpcError as err:  # try the next entry
                last = err
        raise last

    def forward(
        self,
        layer: int,
        hidden_states: np.ndarray,
        input_ids: Optional[np.ndarray] = None,
        wire: str = "bf16",
    ) -> ForwardResult:
        """One MoE layer (the model's own layer index) on `hidden_states` (float32 [tokens,
        hidden]); `input_ids` (int64 [tokens]) for hash-routed layers; activations travel as
        `wire` (bf16 or f32) between the workers."""
        x = np.asarray(hidden_states, dtype=np.float32)
        if x.ndim != 2:
            raise ValueError(f"hidden_states has shape {x.shape}; expected [tokens, hidden]")
        wire_dtype = {"bf16": common_pb2.DTYPE_BF16, "f32": common_pb2.DTYPE_F32}.get(wire)
        if wire_dtype is None:
            raise ValueError(f"wire {wire!r}: expected bf16 or f32")
        req = moe_pb2.ForwardRequest(
            layer=layer,
            hidden_states=_tensor(x, common_pb2.DTYPE_F32),
            wire_dtype=wire_dtype,
        )
        if input_ids is not None:
            ids = np.asarray(input_ids, dtype=np.int64)
            req.input_ids.CopyFrom(_tensor(ids, common_pb2.DTYPE_I64))
        deadline = time.monotonic() + self._timeout
        n = len(self._stubs)
        first = self._next % n
        self._next += 1
        last = None
        for i in range(n):
            left = deadline - time.monotonic()
            if left <= 0:
                break
            _, stub = self._stubs[(first + i) % n]
            try:
                r = stub.Forward(req, timeout=left)
            except grpc.RpcError as err:
                if err.code() in _RETRY:
                    last = err
                    continue
                raise
            return ForwardResult(
                output=_array(r.output, np.float32),
                topk_indices=_array(r.topk_indices, np.int64),
                topk_weights=_array(r.topk_weights, np.float32),
                epoch=r.epoch,
            )
        if last is not None:
            raise last
        raise TimeoutError("no time left to try an entry worker")
