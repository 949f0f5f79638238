"""Train two small classifiers on scikit-learn's digits data and export them to ONNX.

Writes to --out (default: models/):
  digits_mlp.onnx     LeNet-300-100-shaped MLP
  digits_cnn.onnx     small CNN with Conv+BatchNorm+ReLU blocks
  digits_calib.npz    calibration inputs ("input": float32 [360,1,8,8])
  digits_test.npz     test inputs and labels ("input", "labels": int64 [360])
  README.md           description, command, measured accuracies, sizes

Usage (from the repo root):
  .venv-tools/bin/python tools/train_digits.py [--out models]

torch is used only by tools/; the onnxopt package itself never imports it.
"""

from __future__ import annotations

import argparse
import random
import warnings
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import torch
from sklearn.datasets import load_digits
from sklearn.model_selection import train_test_split
from torch import nn

SEED = 0
OPSET = 17
N_TRAIN = 1077
N_CALIB = 360
N_TEST = 360

Split = tuple[np.ndarray, np.ndarray]  # (images float32 [N,1,8,8], labels int64 [N])


def set_seeds(seed: int = SEED) -> None:
    """Make data shuffling and weight init reproducible."""
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)
    torch.use_deterministic_algorithms(True)


def load_splits() -> dict[str, Split]:
    """Stratified, deterministic train (1077) / calib (360) / test (360) split."""
    digits = load_digits()
    x = (digits.images / 16.0).astype(np.float32)[:, None, :, :]  # [N,1,8,8] in [0,1]
    y = digits.target.astype(np.int64)
    x_train, x_rest, y_train, y_rest = train_test_split(
        x, y, test_size=N_CALIB + N_TEST, stratify=y, random_state=SEED
    )
    x_calib, x_test, y_calib, y_test = train_test_split(
        x_rest, y_rest, test_size=N_TEST, stratify=y_rest, random_state=SEED
    )
    return {
        "train": (x_train, y_train),
        "calib": (x_calib, y_calib),
        "test": (x_test, y_test),
    }


def make_mlp() -> nn.Module:
    """LeNet-300-100: 64 -> 300 -> 100 -> 10."""
    return nn.Sequential(
        nn.Flatten(),
        nn.Linear(64, 300), nn.ReLU(),
        nn.Linear(300, 100), nn.ReLU(),
        nn.Linear(100, 10),
    )


def conv_bn_relu(c_in: int, c_out: int) -> list[nn.Module]:
    """3x3 same-padding conv (no bias: BN follows) + BatchNorm + ReLU."""
    return [nn.Conv2d(c_in, c_out, 3, padding=1, bias=False), nn.BatchNorm2d(c_out), nn.ReLU()]


def make_cnn() -> nn.Module:
    """8x8 -> conv16 -> conv32 -> pool(4x4) -> conv64 -> global avg pool -> linear 10."""
    return nn.Sequential(
        *conv_bn_relu(1, 16),
        *conv_bn_relu(16, 32),
        nn.MaxPool2d(2),
        *conv_bn_relu(32, 64),
        nn.AdaptiveAvgPool2d(1),
        nn.Flatten(),
        nn.Linear(64, 10),
    )


def train(model: nn.Module, data: Split, epochs: int, lr: float = 1e-3, batch: int = 32) -> None:
    """Plain Adam + cross-entropy, shuffled minibatches from a seeded generator."""
    x, y = torch.from_numpy(data[0]), torch.from_numpy(data[1])
    opt = torch.optim.Adam(model.parameters(), lr=lr)
    gen = torch.Generator().manual_seed(SEED)
    loss_fn = nn.CrossEntropyLoss()
    model.train()
    for _ in range(epochs):
        for idx in torch.randperm(len(x), generator=gen).split(batch):
            opt.zero_grad()
            loss_fn(model(x[idx]), y[idx]).backward()
            opt.step()
    model.eval()


def torch_logits(model: nn.Module, x: np.ndarray) -> np.ndarray:
    with torch.no_grad():
        return model(torch.from_numpy(x)).numpy()


def accuracy(logits: np.ndarray, labels: np.ndarray) -> float:
    return float((logits.argmax(axis=1) == labels).mean())


def export(model: nn.Module, path: Path) -> None:
    """TorchScript exporter, opset 17, symbolic batch dim, no constant folding.

    do_constant_folding=False keeps BatchNormalization as separate nodes
    (folding them into Conv is the optimizer's job, not the exporter's).
    """
    model.eval()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)  # legacy-exporter notice
        torch.onnx.export(
            model,
            (torch.zeros(1, 1, 8, 8),),
            str(path),
            dynamo=False,
            opset_version=OPSET,
            do_constant_folding=False,
            input_names=["input"],
            output_names=["logits"],
            dynamic_axes={"input": {0: "batch"}, "logits": {0: "batch"}},
        )


def ort_logits(path: Path, x: np.ndarray) -> np.ndarray:
    """Check the model and run it on CPU with onnxruntime."""
    onnx.checker.check_model(onnx.load(str(path)), full_check=True)
    sess = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    return sess.run(["logits"], {"input": x})[0]


def build(name: str, model: nn.Module, epochs: int, splits: dict[str, Split], out: Path) -> dict:
    """Train, export and verify one model; return a summary row for the README."""
    set_seeds()
    train(model, splits["train"], epochs)
    x_test, y_test = splits["test"]
    torch_acc = accuracy(torch_logits(model, x_test), y_test)
    path = out / f"{name}.onnx"
    export(model, path)
    logits = ort_logits(path, x_test)
    ort_acc = accuracy(logits, y_test)
    np.testing.assert_allclose(logits, torch_logits(model, x_test), rtol=1e-4, atol=1e-4)
    assert ort_acc == torch_acc, f"{name}: ORT {ort_acc} != torch {torch_acc}"
    n_params = sum(p.numel() for p in model.parameters())
    nodes = len(onnx.load(str(path)).graph.node)
    print(f"{name}: test accuracy torch={torch_acc:.4f} ort={ort_acc:.4f} "
          f"params={n_params} nodes={nodes} size={path.stat().st_size} B")
    return {"name": name, "acc": ort_acc, "params": n_params, "nodes": nodes, "epochs": epochs}


def save_data(splits: dict[str, Split], out: Path) -> None:
    np.savez_compressed(out / "digits_calib.npz", input=splits["calib"][0])
    np.savez_compressed(out / "digits_test.npz", input=splits["test"][0], labels=splits["test"][1])


def size(out: Path, name: str) -> str:
    return f"{(out / name).stat().st_size / 1024:.1f} KiB"


def write_readme(rows: list[dict], out: Path) -> None:
    """Describe the generated files, with accuracies and sizes measured in this run."""
    desc = {
        "digits_mlp": "LeNet-300-100 MLP: Flatten, Gemm(64->300), Relu, Gemm(300->100), Relu, Gemm(100->10)",
        "digits_cnn": "CNN: 3x [Conv3x3 + BatchNormalization + Relu] (16, 32, MaxPool, 64 ch), "
                      "GlobalAveragePool, Flatten, Gemm(64->10)",
    }
    lines = [
        "# models/",
        "",
        "Small real models for onnxopt's tests, trained on scikit-learn's bundled digits",
        "data set (1797 8x8 grayscale images, pixels scaled to [0, 1]). Generated by:",
        "",
        "    .venv-tools/bin/python tools/train_digits.py --out models",
        "",
        "(see tools/README.md for the tools venv). Training is seeded; the data split is",
        f"stratified: {N_TRAIN} train / {N_CALIB} calibration / {N_TEST} test.",
        "",
        "Both models: opset 17, one input `input` float32 [batch,1,8,8] (symbolic dim",
        "`batch`), one output `logits` float32 [batch,10]. Exported in eval mode with the",
        "TorchScript exporter and `do_constant_folding=False`, so BatchNormalization nodes",
        "are still in the CNN graph.",
        "",
        "| file | contents | nodes | params | test accuracy (onnxruntime) | size |",
        "| --- | --- | --- | --- | --- | --- |",
    ]
    for r in rows:
        f = f"{r['name']}.onnx"
        lines.append(f"| {f} | {desc[r['name']]} | {r['nodes']} | {r['params']} "
                     f"| {r['acc'] * 100:.2f}% | {size(out, f)} |")
    lines += [
        f"| digits_calib.npz | `input`: float32 [{N_CALIB},1,8,8] calibration images | | | "
        f"| {size(out, 'digits_calib.npz')} |",
        f"| digits_test.npz | `input`: float32 [{N_TEST},1,8,8], `labels`: int64 [{N_TEST}] | | | "
        f"| {size(out, 'digits_test.npz')} |",
        "",
        "Accuracy = argmax(logits) == labels over the 360 test images.",
        "",
    ]
    readme = out / "README.md"
    readme.write_text("\n".join(lines) + _other_sections(readme))


def _other_sections(readme: Path) -> str:
    """The '## ' sections other tools wrote into the README (train_lm.py's lm_tiny), kept as they are."""
    if not readme.is_file():
        return ""
    text = readme.read_text()
    start = text.find("\n## ")
    return text[start:] if start >= 0 else ""


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", type=Path, default=Path("models"), help="output directory")
    ap.add_argument("--mlp-epochs", type=int, default=60)
    ap.add_argument("--cnn-epochs", type=int, default=40)
    args = ap.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)

    splits = load_splits()
    assert [len(splits[k][0]) for k in ("train", "calib", "test")] == [N_TRAIN, N_CALIB, N_TEST]
    save_data(splits, args.out)
    set_seeds()
    rows = [build("digits_mlp", make_mlp(), args.mlp_epochs, splits, args.out)]
    set_seeds()
    rows.append(build("digits_cnn", make_cnn(), args.cnn_epochs, splits, args.out))
    write_readme(rows, args.out)
    print(f"wrote {args.out}/README.md")


if __name__ == "__main__":
    main()
