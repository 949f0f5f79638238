"""Export real architectures with random weights to ONNX, for onnxopt benchmarks.

No downloads: every architecture is written by hand below in torch.nn and
initialised from a fixed seed. For each model NAME this writes to --out
(default ~/.cache/onnxopt/models):
  NAME.onnx         default export (constant folding on; Conv+BN already fused)
  NAME.nofold.onnx  do_constant_folding=False (BatchNormalization nodes kept)
  NAME.inputs.npz   batch-1 inputs keyed by graph input name (seq 32 for text)

All exports: TorchScript exporter, opset 17, eval mode, symbolic batch (and seq)
dims. Existing exports with the same configuration are skipped unless --force.

Usage (from the repo root):
  .venv-tools/bin/python tools/export_models.py [--only resnet18,bert] [--resolution 224]
"""

from __future__ import annotations

import argparse
import json
import math
import os
import time
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import numpy as np
import onnx
import onnxruntime as ort
import torch
from torch import nn

OPSET = 17
SEED = 0
SEQ = 32          # sequence length of the sample inputs for text models
CONFIG_KEY = "onnxopt.export_config"  # ONNX metadata key used for idempotence


# --------------------------------------------------------------------------- CNNs

def randomize_bn(model: nn.Module) -> None:
    """Give BatchNorm layers non-trivial statistics so folding them changes numbers."""
    for m in model.modules():
        if isinstance(m, nn.BatchNorm2d):
            with torch.no_grad():
                m.running_mean.normal_(0.0, 0.1)
                m.running_var.uniform_(0.5, 1.5)
                m.weight.uniform_(0.5, 1.5)
                m.bias.normal_(0.0, 0.1)


def conv_bn(c_in: int, c_out: int, k: int, stride: int = 1, groups: int = 1) -> list[nn.Module]:
    return [nn.Conv2d(c_in, c_out, k, stride, k // 2, groups=groups, bias=False), nn.BatchNorm2d(c_out)]


class BasicBlock(nn.Module):
    """ResNet basic block: two 3x3 conv+BN, residual add, 1x1 projection when shape changes."""

    def __init__(self, c_in: int, c_out: int, stride: int) -> None:
        super().__init__()
        self.body = nn.Sequential(*conv_bn(c_in, c_out, 3, stride), nn.ReLU(), *conv_bn(c_out, c_out, 3))
        self.short = nn.Sequential(*conv_bn(c_in, c_out, 1, stride)) if stride != 1 or c_in != c_out else nn.Identity()
        self.relu = nn.ReLU()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.relu(self.body(x) + self.short(x))


def resnet18(num_classes: int = 1000) -> nn.Module:
    layers: list[nn.Module] = [*conv_bn(3, 64, 7, 2), nn.ReLU(), nn.MaxPool2d(3, 2, 1)]
    c_in = 64
    for i, c_out in enumerate([64, 128, 256, 512]):
        for j in range(2):
            layers.append(BasicBlock(c_in, c_out, 2 if i > 0 and j == 0 else 1))
            c_in = c_out
    layers += [nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(512, num_classes)]
    return nn.Sequential(*layers)


class InvertedResidual(nn.Module):
    """MobileNetV2 block: 1x1 expand, 3x3 depthwise, 1x1 linear project, residual if same shape."""

    def __init__(self, c_in: int, c_out: int, stride: int, expand: int) -> None:
        super().__init__()
        hidden = c_in * expand
        layers: list[nn.Module] = [*conv_bn(c_in, hidden, 1), nn.ReLU6()] if expand != 1 else []
        layers += [*conv_bn(hidden, hidden, 3, stride, groups=hidden), nn.ReLU6(), *conv_bn(hidden, c_out, 1)]
        self.body = nn.Sequential(*layers)
        self.residual = stride == 1 and c_in == c_out

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.body(x) if self.residual else self.body(x)


def mobilenetv2(num_classes: int = 1000) -> nn.Module:
    # (expand t, channels c, repeats n, first stride s), as in the paper
    cfg = [(1, 16, 1, 1), (6, 24, 2, 2), (6, 32, 3, 2), (6, 64, 4, 2), (6, 96, 3, 1), (6, 160, 3, 2), (6, 320, 1, 1)]
    layers: list[nn.Module] = [*conv_bn(3, 32, 3, 2), nn.ReLU6()]
    c_in = 32
    for t, c, n, s in cfg:
        for i in range(n):
            layers.append(InvertedResidual(c_in, c, s if i == 0 else 1, t))
            c_in = c
    layers += [*conv_bn(c_in, 1280, 1), nn.ReLU6(), nn.AdaptiveAvgPool2d(1), nn.Flatten(),
               nn.Dropout(0.2), nn.Linear(1280, num_classes)]
    return nn.Sequential(*layers)


# --------------------------------------------------------------------------- transformers

class SelfAttention(nn.Module):
    """Multi-head attention written op by op (Linear, reshape, transpose, matmul, softmax)."""

    def __init__(self, hidden: int, heads: int) -> None:
        super().__init__()
        self.heads, self.head_dim = heads, hidden // heads
        self.q, self.k, self.v, self.o = (nn.Linear(hidden, hidden) for _ in range(4))

    def split(self, x: torch.Tensor) -> torch.Tensor:
        b, s, _ = x.shape  # [b, s, hidden] -> [b, heads, s, head_dim]
        return x.reshape(b, s, self.heads, self.head_dim).transpose(1, 2)

    def forward(self, x: torch.Tensor, bias: torch.Tensor | None = None,
                causal: torch.Tensor | None = None) -> torch.Tensor:
        q, k, v = self.split(self.q(x)), self.split(self.k(x)), self.split(self.v(x))
        scores = torch.matmul(q, k.transpose(-1, -2)) / math.sqrt(self.head_dim)
        if causal is not None:  # GPT-2 style: where(mask, scores, -1e4)
            scores = torch.where(causal, scores, torch.tensor(-1e4, dtype=scores.dtype))
        if bias is not None:    # BERT style: additive padding mask
            scores = scores + bias
        ctx = torch.matmul(torch.softmax(scores, dim=-1), v)
        b, _, s, _ = ctx.shape
        return self.o(ctx.transpose(1, 2).reshape(b, s, self.heads * self.head_dim))


class FeedForward(nn.Sequential):
    def __init__(self, hidden: int, ffn: int, approximate: str) -> None:
        super().__init__(nn.Linear(hidden, ffn), nn.GELU(approximate=approximate), nn.Linear(ffn, hidden))


class BertLayer(nn.Module):
    """Post-LN encoder layer: x = LN(x + attn(x)); x = LN(x + ffn(x)). Exact (erf) GELU."""

    def __init__(self, hidden: int, heads: int, ffn: int) -> None:
        super().__init__()
        self.attn, self.ln1 = SelfAttention(hidden, heads), nn.LayerNorm(hidden)
        self.ffn, self.ln2 = FeedForward(hidden, ffn, "none"), nn.LayerNorm(hidden)

    def forward(self, x: torch.Tensor, bias: torch.Tensor) -> torch.Tensor:
        x = self.ln1(x + self.attn(x, bias=bias))
        return self.ln2(x + self.ffn(x))


class Bert(nn.Module):
    def __init__(self, vocab: int = 1000, hidden: int = 256, layers: int = 4, heads: int = 4,
                 ffn: int = 1024, max_pos: int = 512) -> None:
        super().__init__()
        self.tok, self.pos = nn.Embedding(vocab, hidden), nn.Embedding(max_pos, hidden)
        self.ln = nn.LayerNorm(hidden)
        self.layers = nn.ModuleList(BertLayer(hidden, heads, ffn) for _ in range(layers))

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        pos = torch.arange(input_ids.shape[1], device=input_ids.device).unsqueeze(0)
        x = self.ln(self.tok(input_ids) + self.pos(pos))
        # [b, s] 1/0 mask -> additive [b, 1, 1, s] bias: 0 keeps, -10000 drops
        bias = (1.0 - attention_mask[:, None, None, :].to(x.dtype)) * -10000.0
        for layer in self.layers:
            x = layer(x, bias)
        return x


class GPT2Block(nn.Module):
    """Pre-LN decoder block with causal self-attention and tanh-approximate GELU."""

    def __init__(self, hidden: int, heads: int) -> None:
        super().__init__()
        self.ln1, self.attn = nn.LayerNorm(hidden), SelfAttention(hidden, heads)
        self.ln2, self.mlp = nn.LayerNorm(hidden), FeedForward(hidden, 4 * hidden, "tanh")

    def forward(self, x: torch.Tensor, causal: torch.Tensor) -> torch.Tensor:
        x = x + self.attn(self.ln1(x), causal=causal)
        return x + self.mlp(self.ln2(x))


class GPT2(nn.Module):
    def __init__(self, vocab: int = 1000, hidden: int = 256, layers: int = 4, heads: int = 4,
                 max_pos: int = 1024) -> None:
        super().__init__()
        self.wte, self.wpe = nn.Embedding(vocab, hidden), nn.Embedding(max_pos, hidden)
        self.blocks = nn.ModuleList(GPT2Block(hidden, heads) for _ in range(layers))
        self.ln_f = nn.LayerNorm(hidden)
        self.lm_head = nn.Linear(hidden, vocab, bias=False)
        self.lm_head.weight = self.wte.weight  # tied LM head, as in GPT-2
        self.register_buffer("causal", torch.tril(torch.ones(max_pos, max_pos, dtype=torch.bool)), persistent=False)

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        s = input_ids.shape[1]
        pos = torch.arange(s, device=input_ids.device).unsqueeze(0)
        x = self.wte(input_ids) + self.wpe(pos)
        causal = self.causal[:s, :s]  # sliced with the dynamic seq length
        for block in self.blocks:
            x = block(x, causal)
        return self.lm_head(self.ln_f(x))


# --------------------------------------------------------------------------- specs

@dataclass
class Spec:
    """How to build one model and what its graph inputs/outputs look like."""
    build: Callable[[], nn.Module]
    inputs: Callable[[np.random.Generator], dict[str, np.ndarray]]  # batch-1 sample inputs
    outputs: list[str]
    dynamic: dict[str, dict[int, str]]
    config: dict = field(default_factory=dict)  # stored in the ONNX metadata for idempotence


def image_spec(build: Callable[[], nn.Module], res: int) -> Spec:
    return Spec(
        build=build,
        inputs=lambda rng: {"input": rng.standard_normal((1, 3, res, res), dtype=np.float32)},
        outputs=["logits"],
        dynamic={"input": {0: "batch"}, "logits": {0: "batch"}},
        config={"resolution": res},
    )


def token_ids(rng: np.random.Generator, vocab: int) -> np.ndarray:
    return rng.integers(0, vocab, size=(1, SEQ), dtype=np.int64)


def bert_inputs(rng: np.random.Generator, vocab: int) -> dict[str, np.ndarray]:
    mask = np.ones((1, SEQ), dtype=np.int64)
    mask[:, -4:] = 0  # a little padding, so the mask actually matters
    return {"input_ids": token_ids(rng, vocab), "attention_mask": mask}


def specs(args: argparse.Namespace) -> dict[str, Spec]:
    v, bs = args.vocab, {0: "batch", 1: "seq"}
    return {
        "resnet18": image_spec(resnet18, args.resolution),
        "mobilenetv2": image_spec(mobilenetv2, args.resolution),
        "bert": Spec(
            build=lambda: Bert(vocab=v, layers=args.layers),
            inputs=lambda rng: bert_inputs(rng, v),
            outputs=["last_hidden_state"],
            dynamic={"input_ids": bs, "attention_mask": bs, "last_hidden_state": bs},
            config={"vocab": v, "layers": args.layers},
        ),
        "gpt2": Spec(
            build=lambda: GPT2(vocab=v, layers=args.layers),
            inputs=lambda rng: {"input_ids": token_ids(rng, v)},
            outputs=["logits"],
            dynamic={"input_ids": bs, "logits": bs},
            config={"vocab": v, "layers": args.layers},
        ),
    }


# --------------------------------------------------------------------------- export

def build_model(spec: Spec) -> nn.Module:
    torch.manual_seed(SEED)
    model = spec.build()
    randomize_bn(model)
    return model.eval()


def export_one(model: nn.Module, spec: Spec, feeds: dict[str, np.ndarray], path: Path,
               config: dict) -> None:
    """Export with the TorchScript exporter to a temp file, tag it, then move it into place."""
    tmp = path.with_name(path.name + ".tmp")
    args = tuple(torch.from_numpy(a) for a in feeds.values())
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # legacy-exporter deprecation and tracer warnings
        torch.onnx.export(model, args, str(tmp), dynamo=False, opset_version=OPSET,
                          do_constant_folding=config["constant_folding"], input_names=list(feeds),
                          output_names=spec.outputs, dynamic_axes=spec.dynamic)
    proto = onnx.load(str(tmp))
    onnx.helper.set_model_props(proto, {CONFIG_KEY: json.dumps(config, sort_keys=True)})
    onnx.save(proto, str(tmp))
    os.replace(tmp, path)


def is_current(configs: dict[Path, dict], inputs_path: Path) -> bool:
    """True when all files exist and each ONNX file was made with its configuration."""
    if not inputs_path.exists() or not all(p.exists() for p in configs):
        return False
    for path, config in configs.items():
        props = {m.key: m.value for m in onnx.load(str(path), load_external_data=False).metadata_props}
        if props.get(CONFIG_KEY) != json.dumps(config, sort_keys=True):
            return False
    return True


def check_ort(path: Path, feeds: dict[str, np.ndarray], expected: list[np.ndarray] | None) -> None:
    """Run the model in onnxruntime; compare with torch's outputs when we have them."""
    sess = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    got = sess.run(None, feeds)
    for g, e in zip(got, expected or []):
        np.testing.assert_allclose(g, e, rtol=1e-3, atol=1e-3, err_msg=str(path))


def stats(path: Path) -> tuple[int, int, int]:
    """(nodes, params in initializers, file bytes) of an ONNX file."""
    g = onnx.load(str(path)).graph
    params = sum(int(np.prod(t.dims)) for t in g.initializer)
    return len(g.node), params, path.stat().st_size


def process(name: str, spec: Spec, out: Path, force: bool) -> list[tuple]:
    """Export (unless current) and validate one model; return its table rows."""
    files = [out / f"{name}.onnx", out / f"{name}.nofold.onnx"]
    inputs_path = out / f"{name}.inputs.npz"
    base = {"name": name, "opset": OPSET, "seed": SEED, **spec.config}
    configs = {path: {**base, "constant_folding": fold} for path, fold in zip(files, (True, False))}
    seconds: dict[Path, float | None] = {p: None for p in files}
    expected = None
    if force or not is_current(configs, inputs_path):
        feeds = spec.inputs(np.random.default_rng(SEED))
        model = build_model(spec)
        with torch.no_grad():
            out_t = model(*(torch.from_numpy(a) for a in feeds.values()))
        expected = [out_t.numpy()]
        for path, config in configs.items():
            t0 = time.perf_counter()
            export_one(model, spec, feeds, path, config)
            seconds[path] = time.perf_counter() - t0
        np.savez(inputs_path, **feeds)
    feeds = dict(np.load(inputs_path))
    rows = []
    for path in files:
        check_ort(path, feeds, expected)
        rows.append((path.name, *stats(path), seconds[path]))
    return rows


def print_table(rows: list[tuple]) -> None:
    print(f"{'file':<24} {'nodes':>6} {'params':>11} {'size MiB':>9} {'export s':>9}")
    for name, nodes, params, size, secs in rows:
        t = f"{secs:.1f}" if secs is not None else "cached"
        print(f"{name:<24} {nodes:>6} {params:>11,} {size / 2**20:>9.1f} {t:>9}")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", type=Path, default=Path.home() / ".cache" / "onnxopt" / "models")
    ap.add_argument("--only", default="", help="comma-separated subset of: resnet18,mobilenetv2,bert,gpt2")
    ap.add_argument("--force", action="store_true", help="re-export even if current files exist")
    ap.add_argument("--resolution", type=int, default=224, help="input height=width for resnet18 and mobilenetv2")
    ap.add_argument("--layers", type=int, default=4, help="transformer layers for bert and gpt2")
    ap.add_argument("--vocab", type=int, default=1000, help="vocabulary size for bert and gpt2")
    args = ap.parse_args()

    all_specs = specs(args)
    names = [n for n in args.only.split(",") if n] or list(all_specs)
    unknown = set(names) - set(all_specs)
    if unknown:
        ap.error(f"unknown model(s): {', '.join(sorted(unknown))}; choose from {', '.join(all_specs)}")
    args.out.mkdir(parents=True, exist_ok=True)
    rows = []
    for name in names:
        print(f"{name} ...", flush=True)
        rows += process(name, all_specs[name], args.out, args.force)
    print_table(rows)
    print(f"files in {args.out}")


if __name__ == "__main__":
    main()
