"""Train a small GPT-style byte-level language model on Python's standard library and export it to ONNX.

The text is on every machine: the `.py` files of the running interpreter's standard library
(sources with their docstrings; `site-packages` left out), read as raw bytes (vocabulary 256) in
sorted path order. Split by file (crc32 of the relative path): 1 file in 20 is held out.

Writes into --out (default ~/.cache/onnxopt/lm/<name>/; created):
  checkpoint.pt     config + weights + training log (export re-runs from it: --export-only)
  model.onnx        the LM with KV cache, exported the way exporters ship decoder LMs:
                    inputs  input_ids [batch,sequence_length] int64,
                            attention_mask [batch,total_sequence_length] int64,
                            position_ids [batch,sequence_length] int64,
                            past_key_values.{i}.key/.value [batch,heads,past_sequence_length,head_dim] float32;
                    outputs logits [batch,sequence_length,256], present.{i}.key/.value
                            [batch,heads,total_sequence_length,head_dim]
  heldout.bin       held-out bytes (the evaluation text), calib.npz (training-split windows with
                    the model's input names, empty past), heldout.npz (held-out windows, same keys)
  info.json         config, steps, seconds, held-out loss / perplexity / bits per byte (torch and ORT)

Usage (from the repo root; torch is used only by tools/):
  /work/venv-tools/bin/python tools/train_lm.py --preset small --minutes 15       # 6 x 256, cached
  /work/venv-tools/bin/python tools/train_lm.py --preset tiny --minutes 4 --name lm_tiny \
      --sample-bytes 16384 --ship models                                              # shipped
  /work/venv-tools/bin/python tools/train_lm.py --preset gpt2-small                 # random weights
  ... --export-only   re-export (and re-evaluate) from the saved checkpoint without training

Training is seeded (torch, numpy) but steps are capped by wall time (--minutes) as well as by
--max-steps, so the number of steps (and the weights) depend on the machine's speed; the checkpoint
records them. The model: learned token and position embeddings, pre-LayerNorm blocks with
multi-head causal attention written op by op (MatMul, Softmax) and a GELU MLP (4x), final
LayerNorm, an untied output projection. The ONNX graph keeps weights as MatMul initializers [K,N]
(constant folding on), TorchScript exporter (dynamo=False), opset 17.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import random
import platform
import shutil
import sys
import sysconfig
import time
import zlib
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import torch
from torch import nn
from torch.nn import functional as F

sys.path.insert(0, str(Path(__file__).resolve().parent))
from benchmarks_md import write_section  # noqa: E402  (tools/ helper: replaces one `## ` section)

SEED = 0
OPSET = 17
CACHE = Path(os.path.expanduser("~/.cache/onnxopt/lm"))


@dataclass
class Config:
    vocab: int = 256
    layers: int = 6
    width: int = 256
    heads: int = 4
    context: int = 256


PRESETS = {
    "small": Config(layers=6, width=256, heads=4, context=256),
    "tiny": Config(layers=2, width=64, heads=2, context=256),
    "gpt2-small": Config(vocab=50257, layers=12, width=768, heads=12, context=1024),
}


# ----------------------------------------------------------------- data

def stdlib_files() -> list[Path]:
    """The interpreter's standard-library .py files, sorted by relative path, site-packages left out."""
    root = Path(sysconfig.get_paths()["stdlib"])
    files = [p for p in root.rglob("*.py") if "site-packages" not in p.relative_to(root).parts]
    return sorted(files, key=lambda p: p.relative_to(root).as_posix())


def is_heldout(rel: str) -> bool:
    return zlib.crc32(rel.encode()) % 20 == 0


def load_text() -> tuple[np.ndarray, np.ndarray, dict]:
    """(train bytes, held-out bytes, description): files joined in sorted order, split by file."""
    root = Path(sysconfig.get_paths()["stdlib"])
    train, held = [], []
    for path in stdlib_files():
        rel = path.relative_to(root).as_posix()
        (held if is_heldout(rel) else train).append(path.read_bytes())
    join = lambda parts: np.frombuffer(b"\n".join(parts), dtype=np.uint8)
    tr, he = join(train), join(held)
    info = {"stdlib": str(root), "files_train": len(train), "files_heldout": len(held),
            "bytes_train": int(tr.size), "bytes_heldout": int(he.size)}
    return tr, he, info


# ----------------------------------------------------------------- model

class Block(nn.Module):
    def __init__(self, cfg: Config) -> None:
        super().__init__()
        self.heads, self.hd = cfg.heads, cfg.width // cfg.heads
        self.ln1, self.ln2 = nn.LayerNorm(cfg.width), nn.LayerNorm(cfg.width)
        self.q, self.k, self.v = (nn.Linear(cfg.width, cfg.width) for _ in range(3))
        self.proj = nn.Linear(cfg.width, cfg.width)
        self.fc1, self.fc2 = nn.Linear(cfg.width, 4 * cfg.width), nn.Linear(4 * cfg.width, cfg.width)

    def split(self, x: torch.Tensor) -> torch.Tensor:
        b, s, _ = x.shape
        return x.view(b, s, self.heads, self.hd).transpose(1, 2)  # [b, h, s, hd]

    def forward(self, x, mask, past_k, past_v):
        h = self.ln1(x)
        q, k, v = self.split(self.q(h)), self.split(self.k(h)), self.split(self.v(h))
        k = torch.cat([past_k, k], dim=2)
        v = torch.cat([past_v, v], dim=2)
        scores = torch.matmul(q, k.transpose(2, 3)) * (1.0 / math.sqrt(self.hd)) + mask
        att = torch.matmul(torch.softmax(scores, dim=-1), v)  # [b, h, s, hd]
        b, _, s, _ = att.shape
        x = x + self.proj(att.transpose(1, 2).reshape(b, s, self.heads * self.hd))
        x = x + self.fc2(F.gelu(self.fc1(self.ln2(x))))
        return x, k, v


class GPT(nn.Module):
    def __init__(self, cfg: Config) -> None:
        super().__init__()
        self.cfg = cfg
        self.wte, self.wpe = nn.Embedding(cfg.vocab, cfg.width), nn.Embedding(cfg.context, cfg.width)
        self.blocks = nn.ModuleList(Block(cfg) for _ in range(cfg.layers))
        self.ln_f = nn.LayerNorm(cfg.width)
        self.head = nn.Linear(cfg.width, cfg.vocab, bias=False)
        for name, p in self.named_parameters():
            if p.dim() == 2:
                std = 0.02 / math.sqrt(2 * cfg.layers) if name.endswith(("proj.weight", "fc2.weight")) else 0.02
                nn.init.normal_(p, 0.0, std)

    def forward(self, input_ids, attention_mask, position_ids, *past):
        seq = input_ids.shape[1]
        total = attention_mask.shape[1]
        # query i (absolute position total - seq + i) sees key j when j <= its position and the key is not padding
        q_pos = torch.arange(seq, device=input_ids.device) + (total - seq)
        k_pos = torch.arange(total, device=input_ids.device)
        allowed = (k_pos[None, :] <= q_pos[:, None])[None, None] & (attention_mask[:, None, None, :] > 0)
        mask = torch.where(allowed, torch.zeros((), dtype=torch.float32),
                           torch.full((), -1e9, dtype=torch.float32))
        x = self.wte(input_ids) + self.wpe(position_ids)
        presents = []
        for i, block in enumerate(self.blocks):
            x, k, v = block(x, mask, past[2 * i], past[2 * i + 1])
            presents += [k, v]
        return (self.head(self.ln_f(x)), *presents)


def empty_past(cfg: Config, batch: int) -> list[torch.Tensor]:
    hd = cfg.width // cfg.heads
    return [torch.zeros(batch, cfg.heads, 0, hd) for _ in range(2 * cfg.layers)]


def full_inputs(ids: torch.Tensor) -> tuple:
    b, s = ids.shape
    return ids, torch.ones(b, s, dtype=torch.int64), torch.arange(s).expand(b, s).contiguous()


def lm_loss(model: GPT, ids: torch.Tensor) -> torch.Tensor:
    """Mean next-byte cross-entropy (nats) over windows ids [b, s]."""
    logits = model(*full_inputs(ids[:, :-1]), *empty_past(model.cfg, ids.shape[0]))[0]
    return F.cross_entropy(logits.reshape(-1, logits.shape[-1]), ids[:, 1:].reshape(-1))


# ----------------------------------------------------------------- training

def windows(data: np.ndarray, length: int, count: int | None = None) -> np.ndarray:
    """Non-overlapping windows of `length` bytes from the start (int64 [n, length])."""
    n = data.size // length if count is None else min(count, data.size // length)
    return data[: n * length].reshape(n, length).astype(np.int64)


def evaluate(model: GPT, held: np.ndarray, count: int) -> float:
    """Held-out mean loss (nats per predicted byte) over `count` windows of context+1 bytes."""
    win = torch.from_numpy(windows(held, model.cfg.context + 1, count))
    model.eval()
    total, n = 0.0, 0
    with torch.no_grad():
        for chunk in win.split(16):
            total += float(lm_loss(model, chunk)) * chunk.shape[0]
            n += chunk.shape[0]
    return total / n


def train(model: GPT, data: np.ndarray, args, log) -> dict:
    opt = torch.optim.AdamW(model.parameters(), lr=args.lr, betas=(0.9, 0.95), weight_decay=0.1)
    rng = np.random.default_rng(SEED)
    length = min(args.train_context, model.cfg.context) + 1
    deadline = time.perf_counter() + 60 * args.minutes
    start, step, losses = time.perf_counter(), 0, []
    model.train()
    while step < args.max_steps and time.perf_counter() < deadline:
        # cosine decay towards the wall-time or step budget, whichever is nearer; short warm-up
        frac = max(step / args.max_steps, (time.perf_counter() - start) / (60 * args.minutes))
        lr = args.lr * min(1.0, (step + 1) / 50) * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * min(frac, 1.0))))
        for group in opt.param_groups:
            group["lr"] = lr
        starts = rng.integers(0, data.size - length, size=args.batch)
        ids = torch.from_numpy(np.stack([data[s:s + length] for s in starts]).astype(np.int64))
        loss = lm_loss(model, ids)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        losses.append(loss.item())
        step += 1
        if step % 25 == 0:
            log(f"step {step}  loss {np.mean(losses[-25:]):.3f}  lr {lr:.2e}  {time.perf_counter() - start:.0f} s")
    model.eval()
    return {"steps": step, "train_seconds": round(time.perf_counter() - start, 1),
            "final_train_loss": float(np.mean(losses[-25:])) if losses else None}


# ----------------------------------------------------------------- export

def names(cfg: Config) -> tuple[list[str], list[str]]:
    past = [f"past_key_values.{i}.{kv}" for i in range(cfg.layers) for kv in ("key", "value")]
    present = [f"present.{i}.{kv}" for i in range(cfg.layers) for kv in ("key", "value")]
    return ["input_ids", "attention_mask", "position_ids", *past], ["logits", *present]


def export(model: GPT, path: Path) -> None:
    """TorchScript exporter, opset 17, symbolic batch / sequence / past dims, weights folded to [K,N]."""
    cfg = model.cfg
    inputs, outputs = names(cfg)
    b, past, seq = 2, 3, 5
    hd = cfg.width // cfg.heads
    ids = torch.randint(0, cfg.vocab, (b, seq))
    args = (ids, torch.ones(b, past + seq, dtype=torch.int64),
            (torch.arange(seq) + past).expand(b, seq).contiguous(),
            *[torch.randn(b, cfg.heads, past, hd) for _ in range(2 * cfg.layers)])
    axes = {"input_ids": {0: "batch", 1: "sequence_length"},
            "attention_mask": {0: "batch", 1: "total_sequence_length"},
            "position_ids": {0: "batch", 1: "sequence_length"},
            "logits": {0: "batch", 1: "sequence_length"}}
    for name in inputs[3:]:
        axes[name] = {0: "batch", 2: "past_sequence_length"}
    for name in outputs[1:]:
        axes[name] = {0: "batch", 2: "total_sequence_length"}
    tmp = path.with_suffix(".tmp.onnx")
    with torch.no_grad():
        torch.onnx.export(model, args, str(tmp), input_names=inputs, output_names=outputs,
                          dynamic_axes=axes, opset_version=OPSET, do_constant_folding=True, dynamo=False)
    m = onnx.load(str(tmp))
    onnx.checker.check_model(m)
    m.producer_name, m.doc_string = "onnxopt tools/train_lm.py", "byte-level GPT trained on Python's stdlib"
    for key, value in (("onnxopt.lm_config", json.dumps(asdict(cfg))),):
        m.metadata_props.add(key=key, value=value)
    onnx.save(m, str(path))
    tmp.unlink()


def session(path: Path, threads: int = 1) -> ort.InferenceSession:
    opts = ort.SessionOptions()
    opts.intra_op_num_threads, opts.inter_op_num_threads = threads, 1
    opts.log_severity_level = 3
    return ort.InferenceSession(str(path), opts, providers=["CPUExecutionProvider"])


def ort_feed(cfg: Config, ids: np.ndarray, past: list[np.ndarray] | None = None) -> dict:
    """Feed for ids [b, s] after `past` (present arrays of an earlier run, or none)."""
    b, s = ids.shape
    hd = cfg.width // cfg.heads
    plen = 0 if past is None else past[0].shape[2]
    inputs = names(cfg)[0]
    feed = {"input_ids": ids.astype(np.int64), "attention_mask": np.ones((b, plen + s), np.int64),
            "position_ids": np.broadcast_to(np.arange(plen, plen + s), (b, s)).astype(np.int64)}
    for i, name in enumerate(inputs[3:]):
        feed[name] = np.zeros((b, cfg.heads, 0, hd), np.float32) if past is None else past[i]
    return feed


def check_export(model: GPT, path: Path, log) -> dict:
    """ORT against torch: full sequence, and prefill + one-token decode steps through the KV cache."""
    cfg = model.cfg
    rng = np.random.default_rng(1)
    ids = rng.integers(0, cfg.vocab, size=(2, 12))
    sess = session(path)
    full = sess.run(None, ort_feed(cfg, ids))
    with torch.no_grad():
        ref = model(*full_inputs(torch.from_numpy(ids)), *empty_past(cfg, 2))[0].numpy()
    err_full = float(np.abs(full[0] - ref).max())
    out = sess.run(None, ort_feed(cfg, ids[:, :8]))
    steps = [out[0]]
    for t in range(8, 12):
        out = sess.run(None, ort_feed(cfg, ids[:, t:t + 1], out[1:]))
        steps.append(out[0])
    err_kv = float(np.abs(np.concatenate(steps, axis=1) - ref).max())
    log(f"ORT vs torch: max |logits diff| full {err_full:.2e}, prefill+decode {err_kv:.2e}")
    scale = float(np.abs(ref).max())
    assert err_full <= 1e-4 * max(1.0, scale) and err_kv <= 1e-4 * max(1.0, scale), (err_full, err_kv)
    return {"max_abs_diff_full": err_full, "max_abs_diff_kv": err_kv}


def ort_loss(path: Path, cfg: Config, held: np.ndarray, count: int) -> float:
    """Held-out mean loss (nats/byte) in ORT, full-sequence windows of context+1 bytes, no KV cache."""
    sess = session(path, threads=1)
    win = windows(held, cfg.context + 1, count)
    total, n = 0.0, 0
    for chunk in np.array_split(win, max(1, len(win) // 16)):
        logits = sess.run(["logits"], ort_feed(cfg, chunk[:, :-1]))[0].astype(np.float64)
        logits -= logits.max(-1, keepdims=True)
        logp = logits - np.log(np.exp(logits).sum(-1, keepdims=True))
        total += -np.take_along_axis(logp, chunk[:, 1:, None], -1).sum()
        n += chunk[:, 1:].size
    return float(total / n)


def save_npz(path: Path, cfg: Config, ids: np.ndarray) -> None:
    np.savez(path, **ort_feed(cfg, ids))


def readme_section(stem: str, info: dict, argv: list[str] | None) -> str:
    """The shipped model's section of models/README.md (the tests read the perplexity from it)."""
    c, t, d, s, h = info["config"], info["training"], info["data"], info["sample"], info["heldout"]
    command = " ".join(["/work/venv-tools/bin/python tools/train_lm.py", *(argv if argv is not None else sys.argv[1:])])
    return "\n".join([
        f"## {stem}.onnx", "",
        f"A tiny byte-level GPT ({c['layers']} layers, width {c['width']}, {c['heads']} heads, context "
        f"{c['context']}, vocabulary 256, {info['parameters']:,} parameters, {info['file_bytes'] / 1024:.1f} KiB) "
        "trained on the `.py` files of Python's standard library, with the KV-cache interface decoder-LM "
        "exporters use (`input_ids`, `attention_mask`, `position_ids`, `past_key_values.{i}.key/value` in; "
        "`logits`, `present.{i}.key/value` out; see tools/README.md). Generated by:", "",
        f"    {command}", "",
        f"Data: Python {platform.python_version()}'s standard library, {d['files_train']} files "
        f"({d['bytes_train']:,} bytes) for training, {d['files_heldout']} held out by path. Training: "
        f"{t['steps']} steps of batch {t['batch']} x {t['train_context']} bytes in {t['train_seconds']:.0f} s "
        f"on {t['threads']} CPU threads (seeded, capped by wall time, so the step count depends on the machine).", "",
        f"`{stem}.heldout_sample.bin` holds the first {s['bytes']:,} held-out bytes. Held-out perplexity "
        f"in ONNX Runtime over its non-overlapping windows of {c['context'] + 1} bytes (each one full "
        f"sequence, empty past), per predicted byte, as tests/test_lm_model.py checks it:", "",
        f"- `{stem}.heldout_sample.bin`: **{s['perplexity']:.4f}** ({s['bits_per_byte']:.4f} bits per byte)",
        f"- first {h['windows']} windows of the whole held-out split: {h['perplexity']:.4f} "
        f"({h['bits_per_byte']:.4f} bits per byte)", ""])


# ----------------------------------------------------------------- main

def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--preset", choices=sorted(PRESETS), default="small")
    ap.add_argument("--out", default=None, help="folder (default ~/.cache/onnxopt/lm/<preset>)")
    ap.add_argument("--minutes", type=float, default=15.0, help="training wall-time cap")
    ap.add_argument("--max-steps", type=int, default=20000)
    ap.add_argument("--batch", type=int, default=16)
    ap.add_argument("--train-context", type=int, default=256, help="window length used in training")
    ap.add_argument("--lr", type=float, default=3e-3)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--eval-windows", type=int, default=64, help="held-out windows of context+1 bytes")
    ap.add_argument("--calib-windows", type=int, default=64)
    ap.add_argument("--sample-bytes", type=int, default=0,
                    help="also write heldout_sample.bin: the first N held-out bytes (the shipped tiny model's text)")
    ap.add_argument("--name", default=None, help="file stem for model/sample files (default model)")
    ap.add_argument("--ship", default=None,
                    help="also copy <name>.onnx and <name>.heldout_sample.bin into this folder (models/)")
    ap.add_argument("--export-only", action="store_true", help="load checkpoint.pt instead of training")
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    random.seed(SEED)
    np.random.seed(SEED)
    torch.manual_seed(SEED)
    cfg = PRESETS[args.preset]
    out = Path(args.out) if args.out else CACHE / args.preset
    out.mkdir(parents=True, exist_ok=True)
    stem = args.name or "model"
    log = lambda msg: print(f"[{args.preset}] {msg}", flush=True)
    model = GPT(cfg)
    info: dict = {"preset": args.preset, "config": asdict(cfg)}
    ckpt = out / f"{stem}.checkpoint.pt"
    if args.preset == "gpt2-small":
        info["weights"] = "random (seeded), untrained"
    else:
        train_bytes, held, info["data"] = load_text()
        log(f"data: {info['data']}")
        if args.export_only:
            state = torch.load(ckpt, weights_only=False)
            model.load_state_dict(state["weights"])
            info["training"] = state["training"]
        else:
            log(f"{sum(p.numel() for p in model.parameters()):,} parameters; training for at most "
                f"{args.minutes} min / {args.max_steps} steps")
            info["training"] = train(model, train_bytes, args, log) | {
                "batch": args.batch, "train_context": args.train_context, "lr": args.lr, "threads": args.threads}
            torch.save({"config": asdict(cfg), "weights": model.state_dict(), "training": info["training"]}, ckpt)
    model.eval()
    path = out / f"{stem}.onnx"
    start = time.perf_counter()
    export(model, path)
    info["export_seconds"] = round(time.perf_counter() - start, 1)
    info["file_bytes"] = path.stat().st_size
    info["parameters"] = sum(p.numel() for p in model.parameters())
    info["check"] = check_export(model, path, log)
    if args.preset != "gpt2-small":
        loss_t = evaluate(model, held, args.eval_windows)
        loss_o = ort_loss(path, cfg, held, args.eval_windows)
        info["heldout"] = {"windows": int(min(args.eval_windows, held.size // (cfg.context + 1))),
                           "window_bytes": cfg.context + 1, "loss_torch": loss_t, "loss_ort": loss_o,
                           "perplexity": math.exp(loss_o), "bits_per_byte": loss_o / math.log(2)}
        log(f"held-out: perplexity {math.exp(loss_o):.4f}, {loss_o / math.log(2):.4f} bits/byte "
            f"(torch {math.exp(loss_t):.4f})")
        (out / f"{stem}.heldout.bin").write_bytes(held.tobytes())
        starts = np.random.default_rng(2).integers(0, train_bytes.size - cfg.context, size=args.calib_windows)
        save_npz(out / f"{stem}.calib.npz", cfg, np.stack([train_bytes[s:s + cfg.context] for s in starts]))
        save_npz(out / f"{stem}.heldout.npz", cfg, windows(held, cfg.context, args.eval_windows))
        if args.sample_bytes:
            sample = held[: args.sample_bytes]
            (out / f"{stem}.heldout_sample.bin").write_bytes(sample.tobytes())
            loss_s = ort_loss(path, cfg, sample, None)
            info["sample"] = {"bytes": int(sample.size), "loss_ort": loss_s, "perplexity": math.exp(loss_s),
                              "bits_per_byte": loss_s / math.log(2)}
            log(f"sample ({sample.size} bytes): perplexity {math.exp(loss_s):.4f}")
    (out / f"{stem}.info.json").write_text(json.dumps(info, indent=1) + "\n")
    if args.ship:
        for suffix in (".onnx", ".heldout_sample.bin"):
            if (out / f"{stem}{suffix}").exists():
                shutil.copyfile(out / f"{stem}{suffix}", Path(args.ship) / f"{stem}{suffix}")
        if "sample" in info:
            write_section(Path(args.ship) / "README.md", f"## {stem}.onnx", readme_section(stem, info, argv))
    log(f"wrote {path} ({info['file_bytes'] / 2**20:.2f} MiB, {info['parameters']:,} parameters)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
