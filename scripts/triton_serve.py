"""Serves an exported valence model (`valence export triton`) with NVIDIA Triton Inference
Server through PyTriton, on loopback, for tests and benchmarks on machines without a GPU.

The real `tritonserver` binary that PyTriton ships does the serving (KServe v2 gRPC and HTTP,
dynamic batching with the exported config's `max_batch_size` and queue delay, statistics and
metrics); the model itself runs in a bound Python function with ONNX Runtime. Production
deployments point Triton's own ONNX Runtime or TensorRT backend at the same repository
(README.md, "Triton Inference Server").

usage: triton_serve.py --repo REPO --name NAME [--grpc-port 8001] [--http-port 8000]
       [--metrics-port 8002] [--threads 2]
"""
import argparse
import pathlib
import re
import sys

import numpy as np
import onnxruntime as ort
from pytriton.decorators import batch
from pytriton.model_config import DynamicBatcher, ModelConfig, Tensor
from pytriton.triton import Triton, TritonConfig, TritonSecurityConfig


def config_value(text, key, default):
    m = re.search(rf"^\s*{key}\s*:\s*(\d+)", text, re.MULTILINE)
    return int(m.group(1)) if m else default


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--repo", required=True, type=pathlib.Path)
    ap.add_argument("--name", default="valence")
    ap.add_argument("--grpc-port", type=int, default=8001)
    ap.add_argument("--http-port", type=int, default=8000)
    ap.add_argument("--metrics-port", type=int, default=8002)
    ap.add_argument("--threads", type=int, default=2, help="ONNX Runtime intra-op threads")
    args = ap.parse_args()

    model_dir = args.repo / args.name
    config = (model_dir / "config.pbtxt").read_text()
    max_batch = config_value(config, "max_batch_size", 64)
    delay_us = config_value(config, "max_queue_delay_microseconds", 2000)

    opts = ort.SessionOptions()
    opts.intra_op_num_threads = args.threads
    session = ort.InferenceSession(
        str(model_dir / "1" / "model.onnx"), opts, providers=["CPUExecutionProvider"]
    )
    n_labels = session.get_outputs()[0].shape[-1]

    @batch
    def infer(samples):
        (probs,) = session.run(["probabilities"], {"samples": samples.astype(np.float32)})
        return {"probabilities": probs.astype(np.float32)}

    triton_config = TritonConfig(
        grpc_address="127.0.0.1",
        grpc_port=args.grpc_port,
        http_address="127.0.0.1",
        http_port=args.http_port,
        metrics_address="127.0.0.1",
        metrics_port=args.metrics_port,
        allow_gpu_metrics=False,
        exit_on_error=True,
    )
    # PyTriton guards Triton's statistics API with a token; plain Triton leaves it open, and the
    # benchmarks read the server's batch sizes from it. The other guarded APIs stay guarded.
    security = TritonSecurityConfig(
        restricted_endpoints=["shared-memory", "model-repository", "trace", "logging"]
    )
    with Triton(config=triton_config, security_config=security) as triton:
        triton.bind(
            model_name=args.name,
            infer_func=infer,
            inputs=[Tensor(name="samples", dtype=np.float32, shape=(-1,))],
            outputs=[Tensor(name="probabilities", dtype=np.float32, shape=(n_labels,))],
            config=ModelConfig(
                max_batch_size=max_batch,
                batcher=DynamicBatcher(max_queue_delay_microseconds=delay_us),
            ),
            strict=True,
        )
        print(
            f"serving {args.name} on 127.0.0.1:{args.grpc_port} (gRPC), batch <= {max_batch}, "
            f"queue delay {delay_us} us",
            file=sys.stderr,
            flush=True,
        )
        triton.serve()


if __name__ == "__main__":
    main()
