#!/usr/bin/env python3
"""PyTorch side of `valence bench`: runs the same models on the same input sizes, on request.

    python bench/torch_reference.py xlsr OUT_DIR                # random xlsr-53-sized Wav2Vec2, saved for candle
    python bench/torch_reference.py whisper ENCODER_DIR         # the imported Whisper base encoder
    python bench/torch_reference.py whisper-upto-4 ENCODER_DIR  # its first 4 layers only
    python bench/torch_reference.py products -                  # single products "f32:M:K:N", "int8:M:K:N"
    python bench/torch_reference.py xlsr-onnx-int8 OUT_DIR      # the saved xlsr model in ONNX Runtime, int8 MatMuls

A worker: it builds the model, prints one JSON line ({"ready": true, ...}), then for every line
it reads on stdin naming an input ("10s", "3s") runs the model once on it and prints
{"seconds": ...}. `valence bench` alternates these runs with candle's, so that the machine's
changing load (it is shared) hits both sides alike.

An input key may name a batch: "3s@32" is 32 windows of 3 s. BENCH_DEVICE (cpu, cuda) and
BENCH_DTYPE (f32, f16, bf16) choose where and in what precision the model runs; on CUDA each
run ends with a synchronize, so the time is the GPU's work, not its launch.
"""
import json
import os
import sys
import time

import torch

torch.set_num_threads(int(os.environ.get("BENCH_THREADS", "2")))
torch.manual_seed(0)
DEVICE = torch.device(os.environ.get("BENCH_DEVICE", "cpu"))
DTYPE = {"f32": torch.float32, "f16": torch.float16, "bf16": torch.bfloat16}[os.environ.get("BENCH_DTYPE", "f32")]


def batched_inputs(shape_for_seconds):
    """Inputs by key ("3s", "3s@8"), made on first use on DEVICE in DTYPE."""
    cache = {}

    def get(key):
        if key not in cache:
            secs, _, batch = key.partition("@")
            shape = shape_for_seconds(int(secs.rstrip("s")))
            cache[key] = torch.randn(int(batch or 1), *shape).to(DEVICE, DTYPE)
        return cache[key]

    return get


def xlsr_model(out_dir):
    """A random xlsr-53-sized Wav2Vec2 in f32 on the CPU: saved to OUT_DIR for candle the first
    time, read back from there afterwards (so every engine runs the same weights)."""
    from transformers import Wav2Vec2Config, Wav2Vec2Model
    cfg = Wav2Vec2Config(hidden_size=1024, num_hidden_layers=24, num_attention_heads=16, intermediate_size=4096,
                         feat_extract_norm="layer", do_stable_layer_norm=True, conv_bias=True,
                         conv_dim=(512,) * 7, conv_kernel=(10, 3, 3, 3, 3, 2, 2), conv_stride=(5, 2, 2, 2, 2, 2, 2),
                         num_conv_pos_embeddings=128, num_conv_pos_embedding_groups=16, hidden_act="gelu",
                         feat_extract_activation="gelu")
    model = Wav2Vec2Model(cfg).eval()
    if not os.path.exists(os.path.join(out_dir, "model.safetensors")):
        model.save_pretrained(out_dir, safe_serialization=True)
        with open(os.path.join(out_dir, "preprocessor_config.json"), "w") as f:
            json.dump({"do_normalize": True, "sampling_rate": 16000}, f)
    else:
        from safetensors.torch import load_file
        model.load_state_dict(load_file(os.path.join(out_dir, "model.safetensors")), strict=False)
    return model


def xlsr(out_dir):
    model = xlsr_model(out_dir)
    params = sum(p.numel() for p in model.parameters())
    model = model.to(DEVICE, DTYPE)
    inputs = batched_inputs(lambda secs: (16000 * secs,))
    return (lambda key: model(inputs(key))), {"params": params}


def xlsr_onnx_int8(out_dir):
    """The model `xlsr` saved, exported to ONNX and quantized the way ONNX Runtime's own tool
    does it for a CPU (dynamic: int8 weights per tensor, MatMuls only, activations quantized per
    call), run by ONNX Runtime's CPU provider on BENCH_THREADS threads. The files stay in
    OUT_DIR beside the weights they were made from."""
    import warnings
    import numpy as np
    import onnxruntime as ort
    from onnxruntime.quantization import QuantType, quantize_dynamic
    warnings.filterwarnings("ignore")
    f32_path, int8_path = os.path.join(out_dir, "xlsr.onnx"), os.path.join(out_dir, "xlsr-int8.onnx")
    if not os.path.exists(int8_path):
        model = xlsr_model(out_dir)
        with torch.inference_mode():
            torch.onnx.export(model, (torch.randn(1, 16000),), f32_path, input_names=["samples"],
                              output_names=["hidden"], dynamic_axes={"samples": {0: "batch", 1: "time"}},
                              opset_version=17, dynamo=False)
        quantize_dynamic(f32_path, int8_path, weight_type=QuantType.QInt8, op_types_to_quantize=["MatMul"])
        os.remove(f32_path)
    opts = ort.SessionOptions()
    opts.intra_op_num_threads = torch.get_num_threads()
    opts.inter_op_num_threads = 1
    session = ort.InferenceSession(int8_path, opts, providers=["CPUExecutionProvider"])
    cache = {}

    def run(key):
        if key not in cache:
            secs, _, batch = key.partition("@")
            shape = (int(batch or 1), 16000 * int(secs.rstrip("s")))
            cache[key] = np.random.RandomState(0).randn(*shape).astype(np.float32)
        return session.run(None, {"samples": cache[key]})

    return run, {"onnxruntime": ort.__version__}


def whisper(enc_dir, upto=None):
    from safetensors.torch import load_file
    from transformers import WhisperConfig
    from transformers.models.whisper.modeling_whisper import WhisperEncoder
    c = json.load(open(os.path.join(enc_dir, "config.json")))
    cfg = WhisperConfig(num_mel_bins=c["num_mel_bins"], d_model=c["d_model"], encoder_layers=c["encoder_layers"],
                        encoder_attention_heads=c["encoder_attention_heads"], encoder_ffn_dim=c["encoder_ffn_dim"],
                        max_source_positions=c["max_source_positions"])
    enc = WhisperEncoder(cfg).eval()
    sd = {k[len("model.encoder."):]: v.float() for k, v in load_file(os.path.join(enc_dir, "model.safetensors")).items()}
    enc.load_state_dict(sd, strict=False)
    enc = enc.to(DEVICE, DTYPE)
    # 100 mel frames a second, real length (not padded to 30 s)
    inputs = batched_inputs(lambda secs: (c["num_mel_bins"], 100 * secs))

    def run(key):
        x = torch.nn.functional.gelu(enc.conv1(inputs(key)))
        x = torch.nn.functional.gelu(enc.conv2(x)).permute(0, 2, 1)
        x = x + enc.embed_positions.weight[: x.shape[1]]
        layers = enc.layers if upto is None else enc.layers[:upto]
        for layer in layers:
            y = layer(x, attention_mask=None)
            x = y[0] if isinstance(y, tuple) else y
        return enc.layer_norm(x) if upto is None else x

    return run, {}


def products():
    """x [M, K] times a [K, N] Linear: f32, or int8 with PyTorch's dynamic quantization (int8
    weights per tensor, activations quantized per call: fbgemm, the same scheme as ONNX
    Runtime's dynamic-quantized MatMul)."""
    import warnings
    warnings.filterwarnings("ignore")
    cache = {}

    def run(key):
        if key not in cache:
            kind, m, k, n = key.split(":")
            lin = torch.nn.Linear(int(k), int(n)).eval()
            if kind == "int8":
                lin = torch.ao.quantization.quantize_dynamic(torch.nn.Sequential(lin), {torch.nn.Linear},
                                                             dtype=torch.qint8)
            cache[key] = (lin, torch.randn(int(m), int(k)))
        lin, x = cache[key]
        return lin(x)

    return run, {"engine": torch.backends.quantized.engine}


def main():
    what, path = sys.argv[1], sys.argv[2]
    if what == "xlsr":
        run, info = xlsr(path)
    elif what == "xlsr-onnx-int8":
        run, info = xlsr_onnx_int8(path)
    elif what.startswith("whisper-upto-"):  # only the layers a head reads, as candle runs it
        run, info = whisper(path, int(what[len("whisper-upto-"):]))
    elif what == "whisper":
        run, info = whisper(path)
    elif what == "products":
        run, info = products()
    else:
        sys.exit(f"unknown model {what!r}")
    info.update({"ready": True, "torch": torch.__version__, "threads": torch.get_num_threads(),
                 "cpu_capability": torch.backends.cpu.get_cpu_capability(), "device": str(DEVICE),
                 "device_name": torch.cuda.get_device_name(DEVICE) if DEVICE.type == "cuda" else "cpu"})
    print(json.dumps(info), flush=True)
    with torch.inference_mode():
        for line in sys.stdin:
            key = line.strip()
            t0 = time.perf_counter()
            run(key)
            if DEVICE.type == "cuda":
                torch.cuda.synchronize(DEVICE)
            print(json.dumps({"seconds": time.perf_counter() - t0}), flush=True)


if __name__ == "__main__":
    main()
