#!/usr/bin/env python3
"""Fine-tune the Whisper base layers the default model runs, together with an MLP head, and
write a valence model directory that carries the adapted layers (valence.json `encoder.adapted`).

Pinned reference stack (training only, never the runtime): torch==2.15.0, numpy, safetensors,
soundfile. Set up with `bash crates/valence-train/scripts/finetune-venv.sh`.

The recipe (issue "Adapt the encoder"): log-mels exactly as the element computes them (real
length, no padding to 30 s, per-input dynamic range); Whisper's conv stem, positions and the
transformer layers below the deepest feature layer; features = mean over unpadded frames of
hidden states 2 and 3 (the outputs of transformer layers 2 and 3, counted from 1, as valence.json
counts them), concatenated; MLP head 1024-256-3; a random 3 s crop of every clip per epoch
(shorter clips whole, padded and masked in attention and pooling); AdamW (head 1e-3, encoder
1e-5), one-cycle schedule, label smoothing 0.1, class weights, batch 16, 3 epochs.
`--frozen` trains the head alone on the same crops: the paired baseline.

Splits: `--holdout-corpus NAME` (leave one corpus out) or `--fold K --folds N` (grouped by
speaker); the held-out clips are written as a manifest beside the model so that
`valence eval --manifest OUT/holdout.csv --root DATA --model OUT` measures the model as the
element runs it (the project's loader, 8-bit kernels and all).

    python finetune_encoder.py --data ../shared/data --base ~/.cache/valence/encoders/whisper-base \
        --holdout-corpus emospeech --out /tmp/ft-emospeech
"""

import argparse
import csv
import hashlib
import json
import math
import os
import random
import sys
import time

import numpy as np
import soundfile as sf
import torch
import torch.nn.functional as F
from safetensors.numpy import save_file
from safetensors.torch import load_file

LABELS = ["negative", "neutral", "positive"]
SR, N_FFT, HOP = 16000, 400, 160
CROP = 3 * SR


# ---- log-mel, as crates/valence-model/src/encoders/whisper.rs LogMel computes it ----

def hz_to_mel(f):
    f = np.asarray(f, dtype=np.float64)
    mel = 3.0 * f / 200.0
    log = 27.0 / math.log(6.4)
    return np.where(f >= 1000.0, 15.0 + np.log(np.maximum(f, 1e-10) / 1000.0) * log, mel)


def mel_to_hz(m):
    m = np.asarray(m, dtype=np.float64)
    log = math.log(6.4) / 27.0
    return np.where(m >= 15.0, 1000.0 * np.exp(log * (m - 15.0)), 200.0 * m / 3.0)


def slaney_filters(n_mels=80, n_fft=N_FFT, sr=SR):
    n_bins = n_fft // 2 + 1
    fft_freqs = np.linspace(0, sr / 2, n_bins)
    mel_pts = mel_to_hz(np.linspace(0, hz_to_mel(sr / 2.0), n_mels + 2))
    fdiff = np.diff(mel_pts)
    ramps = mel_pts[:, None] - fft_freqs[None, :]
    lower = -ramps[:-2] / fdiff[:-1, None]
    upper = ramps[2:] / fdiff[1:, None]
    w = np.maximum(0, np.minimum(lower, upper))
    enorm = 2.0 / (mel_pts[2:n_mels + 2] - mel_pts[:n_mels])
    return w * enorm[:, None]  # [n_mels, n_bins]


class LogMel(torch.nn.Module):
    def __init__(self, n_mels=80):
        super().__init__()
        n = torch.arange(N_FFT, dtype=torch.float64)
        self.register_buffer("window", 0.5 - 0.5 * torch.cos(2 * math.pi * n / N_FFT))
        self.register_buffer("filters", torch.from_numpy(slaney_filters(n_mels)))

    def forward(self, x, lengths):
        """x [B, S] float32 (zero-padded), lengths [B] samples -> [B, 80, S // 160] and frames."""
        out, frames = [], []
        t_max = x.shape[1] // HOP
        for b in range(x.shape[0]):
            s = x[b, : lengths[b]].double()
            spec = torch.stft(s, N_FFT, HOP, window=self.window, center=True,
                              pad_mode="reflect", return_complex=True)
            t = lengths[b] // HOP
            power = spec[:, :t].abs() ** 2
            mel = torch.clamp(self.filters @ power, min=1e-10).log10()
            mel = torch.maximum(mel, mel.max() - 8.0)
            mel = ((mel + 4.0) / 4.0).float()
            out.append(F.pad(mel, (0, t_max - t)))
            frames.append(t)
        return torch.stack(out), torch.tensor(frames)


# ---- Whisper's encoder (HF names), run up to the deepest layer the features read ----

class Layer(torch.nn.Module):
    def __init__(self, d, heads, ffn):
        super().__init__()
        self.heads = heads
        self.self_attn_layer_norm = torch.nn.LayerNorm(d)
        self.q_proj = torch.nn.Linear(d, d)
        self.k_proj = torch.nn.Linear(d, d, bias=False)
        self.v_proj = torch.nn.Linear(d, d)
        self.out_proj = torch.nn.Linear(d, d)
        self.final_layer_norm = torch.nn.LayerNorm(d)
        self.fc1 = torch.nn.Linear(d, ffn)
        self.fc2 = torch.nn.Linear(ffn, d)

    def forward(self, x, key_mask):
        b, t, d = x.shape
        h = self.self_attn_layer_norm(x)
        split = lambda y: y.view(b, t, self.heads, d // self.heads).transpose(1, 2)
        q, k, v = split(self.q_proj(h)), split(self.k_proj(h)), split(self.v_proj(h))
        a = F.scaled_dot_product_attention(q, k, v, attn_mask=key_mask)
        x = x + self.out_proj(a.transpose(1, 2).reshape(b, t, d))
        return x + self.fc2(F.gelu(self.fc1(self.final_layer_norm(x))))


class Encoder(torch.nn.Module):
    def __init__(self, cfg, n_layers):
        super().__init__()
        d = cfg["d_model"]
        self.conv1 = torch.nn.Conv1d(cfg["num_mel_bins"], d, 3, padding=1)
        self.conv2 = torch.nn.Conv1d(d, d, 3, stride=2, padding=1)
        self.register_buffer("embed_positions", torch.zeros(cfg["max_source_positions"], d))
        self.layers = torch.nn.ModuleList(
            Layer(d, cfg["encoder_attention_heads"], cfg["encoder_ffn_dim"]) for _ in range(n_layers))

    def forward(self, mel, frames):
        x = F.gelu(self.conv2(F.gelu(self.conv1(mel)))).transpose(1, 2)
        t = x.shape[1]
        x = x + self.embed_positions[:t]
        enc_frames = (frames + 1) // 2  # conv2's stride 2 with padding 1
        valid = torch.arange(t)[None, :] < enc_frames[:, None]  # [B, T]
        key_mask = torch.zeros(valid.shape, dtype=x.dtype).masked_fill(~valid, float("-inf"))
        key_mask = key_mask[:, None, None, :]
        states = [x]
        for layer in self.layers:
            x = layer(x, key_mask)
            states.append(x)
        return states, valid


def hf_name(name):
    """Our module names -> the checkpoint's (encoder.layers.N.self_attn.q_proj.weight, ...)."""
    if name == "embed_positions":
        return "encoder.embed_positions.weight"
    parts = name.split(".")
    if parts[0] == "layers" and parts[2] in ("q_proj", "k_proj", "v_proj", "out_proj"):
        parts.insert(2, "self_attn")
    return "encoder." + ".".join(parts)


def load_base(base_dir, n_layers):
    cfg = json.load(open(os.path.join(base_dir, "config.json")))
    tensors = {k.removeprefix("model."): v for k, v in load_file(os.path.join(base_dir, "model.safetensors")).items()}
    enc = Encoder(cfg, n_layers)
    state = {}
    for name, _ in enc.state_dict().items():
        state[name] = tensors[hf_name(name)].float()
    enc.load_state_dict(state)
    return enc, cfg, tensors


def fingerprint(base, names):
    """crates/valence-model/src/encoders/adapted.rs `fingerprint`."""
    h = hashlib.sha256()
    for n in sorted(names):
        h.update(n.encode())
        h.update(base[n].float().numpy().astype("<f4").tobytes())
    return h.hexdigest()


# ---- data ----

def read_clips(data, max_clips, seed):
    rows = [r for r in csv.DictReader(open(os.path.join(data, "manifest.csv"))) if r["valence"] in LABELS]
    if max_clips:
        random.Random(seed).shuffle(rows)
        rows = rows[:max_clips]
    return rows


def load_audio(data, rows, cache):
    os.makedirs(cache, exist_ok=True)
    out = []
    for r in rows:
        key = os.path.join(cache, hashlib.sha1(r["path"].encode()).hexdigest() + ".npy")
        if os.path.exists(key):
            out.append(np.load(key))
            continue
        x, sr = sf.read(os.path.join(data, r["path"]), dtype="float32", always_2d=True)
        if sr != SR:
            sys.exit(f"{r['path']}: {sr} Hz (the shared data is 16 kHz)")
        x = x.mean(axis=1)
        np.save(key, x)
        out.append(x)
    return out


def split(rows, args):
    if args.holdout_corpus:
        held = [r["corpus"] == args.holdout_corpus for r in rows]
        if not any(held):
            sys.exit(f"no clips of corpus {args.holdout_corpus}")
    elif args.fold is not None:
        speakers = sorted({r["speaker"] for r in rows})
        random.Random(0).shuffle(speakers)
        fold_of = {s: i % args.folds for i, s in enumerate(speakers)}
        held = [fold_of[r["speaker"]] == args.fold for r in rows]
    else:
        held = [False] * len(rows)
    return held


def batch(audio, idx, rng, crop):
    xs = []
    for i in idx:
        a = audio[i]
        if crop and len(a) > CROP:
            s = rng.randrange(len(a) - CROP + 1)
            a = a[s:s + CROP]
        xs.append(a[: 30 * SR])
    n = max(len(a) for a in xs)
    x = torch.zeros(len(xs), n)
    for j, a in enumerate(xs):
        x[j, : len(a)] = torch.from_numpy(a)
    return x, torch.tensor([len(a) for a in xs])


class Model(torch.nn.Module):
    def __init__(self, enc, feature_layers, hidden, dropout):
        super().__init__()
        self.mel = LogMel()
        self.enc = enc
        self.feature_layers = feature_layers
        d = enc.conv1.out_channels * len(feature_layers)
        self.head = torch.nn.Sequential(torch.nn.Linear(d, hidden), torch.nn.ReLU(),
                                        torch.nn.Dropout(dropout), torch.nn.Linear(hidden, 3))
        # Standardisation of the pooled features (valence.json `scaler`), fixed once fitted.
        self.register_buffer("mean", torch.zeros(d))
        self.register_buffer("scale", torch.ones(d))

    def pooled(self, x, lengths):
        mel, frames = self.mel(x, lengths)
        states, valid = self.enc(mel, frames)
        m = valid.float()[:, :, None]
        return torch.cat([(states[l] * m).sum(1) / m.sum(1) for l in self.feature_layers], dim=1)

    def forward(self, x, lengths):
        return self.head((self.pooled(x, lengths) - self.mean) / self.scale)


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--data", required=True)
    p.add_argument("--base", required=True, help="the imported Whisper base directory (valence setup)")
    p.add_argument("--out", required=True)
    p.add_argument("--holdout-corpus")
    p.add_argument("--fold", type=int)
    p.add_argument("--folds", type=int, default=5)
    p.add_argument("--frozen", action="store_true", help="train the head only (paired baseline)")
    p.add_argument("--epochs", type=int, default=3)
    p.add_argument("--batch", type=int, default=16)
    p.add_argument("--lr-head", type=float, default=1e-3)
    p.add_argument("--lr-encoder", type=float, default=1e-5)
    p.add_argument("--feature-layers", default="2,3")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--scaler", action="store_true",
                   help="standardise the pooled features with statistics of the untrained encoder "
                        "on the training clips (written as the model's scaler)")
    p.add_argument("--max-clips", type=int, default=0, help="a random subset (smoke runs)")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--cache", default=os.path.expanduser("~/.cache/valence/finetune-audio"))
    p.add_argument("--probabilities", help="also write the trained model's probabilities of every "
                   "held-out clip (whole, at most 30 s) as JSON, for a parity check with valence eval")
    args = p.parse_args()

    torch.manual_seed(args.seed)
    rng = random.Random(args.seed)
    feature_layers = [int(v) for v in args.feature_layers.split(",")]
    n_layers = max(feature_layers)
    enc, cfg, base = load_base(args.base, n_layers)
    model = Model(enc, feature_layers, 256, 0.2).to(args.device)
    model.enc.embed_positions.requires_grad_(False)

    rows = read_clips(args.data, args.max_clips, args.seed)
    audio = load_audio(args.data, rows, args.cache)
    held = split(rows, args)
    train = [i for i, h in enumerate(held) if not h]
    y = torch.tensor([LABELS.index(r["valence"]) for r in rows])
    counts = torch.bincount(y[train], minlength=3).float()
    weights = (counts.sum() / (3 * counts.clamp(min=1))).to(args.device)
    loss_fn = torch.nn.CrossEntropyLoss(weight=weights, label_smoothing=0.1)

    if args.scaler:
        feats = []
        model.eval()
        with torch.no_grad():
            for s in range(0, len(train), args.batch):
                x, lengths = batch(audio, train[s:s + args.batch], rng, crop=True)
                feats.append(model.pooled(x.to(args.device), lengths).cpu())
        f = torch.cat(feats)
        model.mean.copy_(f.mean(0).to(args.device))
        model.scale.copy_(f.std(0).clamp(min=1e-6).to(args.device))

    enc_params = [q for q in model.enc.parameters() if q.requires_grad]
    if args.frozen:
        for q in enc_params:
            q.requires_grad_(False)
        groups = [{"params": model.head.parameters(), "lr": args.lr_head}]
    else:
        groups = [{"params": model.head.parameters(), "lr": args.lr_head},
                  {"params": enc_params, "lr": args.lr_encoder}]
    opt = torch.optim.AdamW(groups, weight_decay=0.01)
    steps = args.epochs * math.ceil(len(train) / args.batch)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=[g["lr"] for g in groups], total_steps=steps)
    t0 = time.time()
    for epoch in range(args.epochs):
        model.train()
        rng.shuffle(train)
        total = 0.0
        for s in range(0, len(train), args.batch):
            idx = train[s:s + args.batch]
            x, lengths = batch(audio, idx, rng, crop=True)
            logits = model(x.to(args.device), lengths)
            loss = loss_fn(logits, y[idx].to(args.device))
            opt.zero_grad()
            loss.backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
            opt.step()
            sched.step()
            total += loss.item() * len(idx)
        print(f"epoch {epoch + 1}/{args.epochs}: loss {total / len(train):.4f} "
              f"({time.time() - t0:.0f} s)", flush=True)

    model = model.cpu().eval()
    write_model(args, model, cfg, base, feature_layers, rows, held, len(train), time.time() - t0)
    if args.probabilities:
        out = {}
        with torch.no_grad():
            for i in [i for i, h in enumerate(held) if h]:
                x, lengths = batch(audio, [i], rng, crop=False)
                out[rows[i]["path"]] = torch.softmax(model(x, lengths), dim=1)[0].tolist()
        json.dump(out, open(args.probabilities, "w"), indent=1)


def write_model(args, model, cfg, base, feature_layers, rows, held, n_train, seconds):
    os.makedirs(args.out, exist_ok=True)
    manifest = {
        "format_version": 1,
        "name": "valence-whisper-finetuned" if not args.frozen else "valence-whisper-frozen",
        "labels": LABELS,
        "sample_rate": SR,
        "encoder": {"kind": "whisper", "path": "@cache/encoders/whisper-base", "quantize": "int8"},
        "features": {"source": "hidden_states", "layers": feature_layers, "combine": "concat", "pooling": "mean"},
        "head": {"config": "head_config.json", "weights": "head.safetensors"},
        "dtype": "f32",
        "speech_detector": "@cache/detectors/silero_vad_16k.safetensors",
        "notes": {
            "trained_by": "crates/valence-train/scripts/finetune_encoder.py",
            "args": {k: v for k, v in vars(args).items() if k not in ("out", "cache")},
            "clips": n_train,
            "seconds": round(seconds),
            "torch": torch.__version__,
        },
    }
    if not args.frozen:
        adapted = {hf_name(k): v.detach().numpy().astype(np.float16)
                   for k, v in model.enc.state_dict().items() if k != "embed_positions"}
        save_file(adapted, os.path.join(args.out, "adapted.safetensors"))
        manifest["encoder"]["adapted"] = {
            "weights": "adapted.safetensors",
            "layers": list(range(len(model.enc.layers))),
            "base_sha256": fingerprint(base, list(adapted)),
        }
    if args.scaler:
        manifest["scaler"] = "scaler.safetensors"
        save_file({"mean": model.mean.numpy(), "scale": model.scale.numpy()},
                  os.path.join(args.out, "scaler.safetensors"))
    head = model.head
    save_file({"classifier.0.weight": head[0].weight.detach().numpy(), "classifier.0.bias": head[0].bias.detach().numpy(),
               "classifier.1.weight": head[3].weight.detach().numpy(), "classifier.1.bias": head[3].bias.detach().numpy()},
              os.path.join(args.out, "head.safetensors"))
    json.dump({"kind": "mlp", "input_dim": head[0].in_features, "hidden": [head[0].out_features],
               "dropout": 0.2, "head_activation": "relu", "num_classes": 3},
              open(os.path.join(args.out, "head_config.json"), "w"), indent=2)
    json.dump(manifest, open(os.path.join(args.out, "valence.json"), "w"), indent=2)
    if any(held):
        with open(os.path.join(args.out, "holdout.csv"), "w", newline="") as f:
            w = csv.DictWriter(f, fieldnames=list(rows[0].keys()))
            w.writeheader()
            w.writerows(r for r, h in zip(rows, held) if h)
    print(f"model written to {args.out}")


if __name__ == "__main__":
    main()
