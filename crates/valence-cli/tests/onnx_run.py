"""Runs an exported valence ONNX graph with ONNX Runtime for the export tests.

usage: onnx_run.py MODEL.onnx WINDOWS.f32 BATCH
WINDOWS.f32 holds BATCH windows of one length as little-endian f32; prints the probabilities
as a JSON list of rows.
"""
import json
import sys

import numpy as np
import onnxruntime as ort

model, raw, batch = sys.argv[1], sys.argv[2], int(sys.argv[3])
x = np.fromfile(raw, dtype="<f4").reshape(batch, -1)
opts = ort.SessionOptions()
opts.intra_op_num_threads = 2
session = ort.InferenceSession(model, opts, providers=["CPUExecutionProvider"])
(probs,) = session.run(["probabilities"], {"samples": x})
print(json.dumps(probs.astype(float).tolist()))
