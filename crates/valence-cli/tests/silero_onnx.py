"""Reference speech probabilities from Silero VAD's own ONNX model (silero_vad.onnx in the
pinned silero-vad wheel), streamed as the wheel's OnnxWrapper does: 512-sample chunks after 64
samples of context, the state carried from chunk to chunk.

Usage: python silero_onnx.py WHEEL IN.f32 OUT.f32   (raw little-endian f32, 16 kHz mono)
Needs numpy and onnxruntime (the test venv: scripts/triton-venv.sh).
"""
import io
import sys
import zipfile

import numpy as np
import onnxruntime as ort

wheel, src, dst = sys.argv[1:4]
model = zipfile.ZipFile(wheel).read("silero_vad/data/silero_vad.onnx")
opts = ort.SessionOptions()
opts.intra_op_num_threads = 1
session = ort.InferenceSession(model, opts, providers=["CPUExecutionProvider"])
x = np.fromfile(src, dtype="<f4")
state = np.zeros((2, 1, 128), dtype=np.float32)
context = np.zeros((1, 64), dtype=np.float32)
sr = np.array(16000, dtype=np.int64)
out = []
for i in range(0, len(x) - 511, 512):
    chunk = np.concatenate([context, x[i : i + 512][None, :]], axis=1)
    prob, state = session.run(None, {"input": chunk, "state": state, "sr": sr})
    context = chunk[:, -64:]
    out.append(prob[0, 0])
np.asarray(out, dtype="<f4").tofile(dst)
