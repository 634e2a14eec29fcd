"""Silero VAD's own ONNX model in ONNX Runtime (one thread), streamed as the wheel's OnnxWrapper
streams it (512 new samples after 64 of context per call, the state carried), over 60 s of
noise: prints the median CPU milliseconds per second of audio over five runs.

Usage: python silero_reference.py WHEEL   (needs numpy and onnxruntime)
"""
import sys
import time
import zipfile

import numpy as np
import onnxruntime as ort

model = zipfile.ZipFile(sys.argv[1]).read("silero_vad/data/silero_vad.onnx")
opts = ort.SessionOptions()
opts.intra_op_num_threads = 1
opts.inter_op_num_threads = 1
session = ort.InferenceSession(model, opts, providers=["CPUExecutionProvider"])
x = (np.random.default_rng(0).standard_normal(16000 * 60) * 0.1).astype(np.float32)
sr = np.array(16000, dtype=np.int64)
runs = []
for _ in range(5):
    state = np.zeros((2, 1, 128), dtype=np.float32)
    context = np.zeros((1, 64), dtype=np.float32)
    t = time.process_time()
    for i in range(0, len(x) - 511, 512):
        chunk = np.concatenate([context, x[None, i : i + 512]], axis=1)
        _, state = session.run(None, {"input": chunk, "state": state, "sr": sr})
        context = chunk[:, -64:]
    runs.append((time.process_time() - t) * 1e3 / 60)
print(sorted(runs)[2])
