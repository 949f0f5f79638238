"""Robustness sweep of the lossy passes over the real-model corpus.

For every model of ``~/.cache/onnxopt-corpus/manifest.json`` (real inputs in ``<name>/inputs.npz``,
used as calibration data too unless a ``calib.npz`` sits beside them) and every exported model in
``~/.cache/onnxopt/models/*.onnx`` (with its ``.inputs.npz``), runs the CLI once per configuration
in a subprocess under a time limit and records the exit code, wall time, peak RSS, size ratio,
the validation headline and, for exit 2/3, the message. Results stream to a JSON-lines file (a run
already there is not repeated unless ``--fresh``); ``--write`` puts the table into BENCHMARKS.md,
section "Lossy passes on the real-model corpus".

    PYTHONPATH=. /work/venv/bin/python tools/sweep_passes.py [--only NAME,...] [--configs KEY,...]
        [--timeout 300] [--out sweep.jsonl] [--write]
"""

from __future__ import annotations

import argparse
import json
import os
import re
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from benchmarks_md import machine, write_section  # noqa: E402

CORPUS = Path.home() / ".cache" / "onnxopt-corpus"
EXPORTED = Path.home() / ".cache" / "onnxopt" / "models"
ROOT = Path(__file__).resolve().parent.parent
HEADING = "## Lossy passes on the real-model corpus"

# key -> (--passes value or None for the default pipeline, whether --calib is given)
CONFIGS = {
    "default": (None, False),
    "qdq": ("cleanup,qdq", True),
    "qdq_dyn": ("cleanup,qdq(mode=dynamic)", False),
    "woq": ("cleanup,woq", True),
    "prune": ("cleanup,prune(sparsity=0.3)", True),
    "svd": ("cleanup,svd(energy=0.99)", True),
}


def models(include_nofold: bool) -> list[dict]:
    """Every model with its input data, smallest file first."""
    found = []
    manifest = json.loads((CORPUS / "manifest.json").read_text()) if (CORPUS / "manifest.json").exists() else []
    for entry in manifest:
        folder = CORPUS / entry["name"]
        calib = folder / "calib.npz"
        inputs = folder / "inputs.npz"
        found.append({"name": entry["name"], "model": folder / "model.onnx",
                      "inputs": inputs if inputs.exists() else None,
                      "calib": calib if calib.exists() else (inputs if inputs.exists() else None)})
    for path in sorted(EXPORTED.glob("*.onnx")):
        if ".nofold." in path.name and not include_nofold:
            continue
        stem = path.name[: -len(".onnx")]
        inputs = EXPORTED / f"{stem.split('.')[0]}.inputs.npz"
        inputs = inputs if inputs.exists() else None
        found.append({"name": f"exported/{stem}", "model": path, "inputs": inputs, "calib": inputs})
    found = [m for m in found if m["model"].exists()]
    return sorted(found, key=lambda m: m["model"].stat().st_size)


def command(entry: dict, key: str, out: Path, report: Path) -> list[str]:
    passes, calib = CONFIGS[key]
    cmd = [sys.executable, "-m", "onnxopt", "optimize", str(entry["model"]), "-o", str(out),
           "--report", str(report), "--latency-runs", "0", "--quiet"]
    if passes:
        cmd += ["--passes", passes]
    if calib and entry["calib"]:
        cmd += ["--calib", str(entry["calib"])]
    if entry["inputs"]:
        cmd += ["--inputs", str(entry["inputs"])]
    return cmd


def run_one(cmd: list[str], timeout: float) -> tuple[int, float, float, str, str]:
    """(exit code or -9 on timeout, seconds, peak RSS MiB, stdout, stderr) of one run."""
    env = dict(os.environ, PYTHONPATH=str(ROOT), OMP_NUM_THREADS="1", ONNXOPT_PROGRESS="0")
    with tempfile.TemporaryFile() as out, tempfile.TemporaryFile() as err:
        start = time.monotonic()
        # One core per run: ORT sizes its pools to the CPUs it may use.
        proc = subprocess.Popen(["taskset", "-c", "0", *cmd], stdout=out, stderr=err, env=env, cwd=ROOT)
        code, rss = None, 0.0
        while code is None:
            pid, status, usage = os.wait4(proc.pid, os.WNOHANG)
            if pid:
                code = os.waitstatus_to_exitcode(status)
                rss = usage.ru_maxrss / 1024
                proc.returncode = code
            elif time.monotonic() - start > timeout:
                proc.kill()
                _, _, usage = os.wait4(proc.pid, 0)
                proc.returncode = code = -9
                rss = usage.ru_maxrss / 1024
            else:
                time.sleep(0.2)
        seconds = time.monotonic() - start
        out.seek(0)
        err.seek(0)
        return code, seconds, rss, out.read().decode(errors="replace"), err.read().decode(errors="replace")


def headline(report: dict | None, stdout: str) -> str:
    """One line per run: each output's verdict with cosine and the kind's figure."""
    parts = []
    if report and isinstance(report.get("validation"), dict):
        for o in report["validation"].get("outputs", []):
            figure = ""
            for name in ("top1_agreement", "sequence_match", "vector_cosine_mean"):
                if isinstance(o.get(name), (int, float)):
                    figure = f" {name.split('_')[0]} {100 * o[name]:.1f}%"
                    break
            verdict = "ok" if o.get("passed", True) else "FAIL"
            cos = o.get("cosine")
            cos = f" cos {cos:.4f}" if isinstance(cos, (int, float)) else ""
            why = f" ({'; '.join(map(str, o['failures']))[:120]})" if o.get("failures") else ""
            parts.append(f"{o['name']}[{o.get('kind', '?')}] {verdict}{cos}{figure}{why}")
        return "; ".join(parts)
    lines = [ln.strip() for ln in stdout.splitlines() if re.match(r"\s+\S+ \[\w+\]: ", ln)]
    return "; ".join(ln[:120] for ln in lines)


def message(stdout: str, stderr: str) -> str:
    lines = [ln for ln in (stderr + "\n" + stdout).splitlines() if ln.strip()]
    errors = [ln for ln in lines if ln.startswith(("onnxopt: error", "error", "Traceback")) or "Error" in ln]
    return (errors[-1] if errors else (lines[-1] if lines else ""))[:400]


def sweep(args) -> None:
    done = set()
    out_path = Path(args.out)
    if out_path.exists() and not args.fresh:
        for line in out_path.read_text().splitlines():
            row = json.loads(line)
            done.add((row["model"], row["config"]))
    only = set(args.only.split(",")) if args.only else None
    skip = set(args.skip.split(",")) if args.skip else set()
    keys = args.configs.split(",") if args.configs else list(CONFIGS)
    for entry in models(args.nofold):
        if (only and entry["name"] not in only) or entry["name"] in skip:
            continue
        for key in keys:
            if (entry["name"], key) in done:
                continue
            with tempfile.TemporaryDirectory(prefix="sweep-") as tmp:
                out, report_path = Path(tmp) / "out.onnx", Path(tmp) / "report.json"
                cmd = command(entry, key, out, report_path)
                code, seconds, rss, stdout, stderr = run_one(cmd, args.timeout)
                report = json.loads(report_path.read_text()) if report_path.exists() else None
                size_in = entry["model"].stat().st_size
                size_out = out.stat().st_size if out.exists() else None
                if out.exists() and Path(str(out) + ".data").exists():
                    size_out += Path(str(out) + ".data").stat().st_size
            row = {"model": entry["name"], "config": key, "exit": code, "seconds": round(seconds, 1),
                   "rss_mib": round(rss), "size_ratio": round(size_out / size_in, 3) if size_out else None,
                   "headline": headline(report, stdout),
                   "message": message(stdout, stderr) if code not in (0, 1) else "",
                   "passes": pass_stats(report)}
            with out_path.open("a") as f:
                f.write(json.dumps(row) + "\n")
            print(f"{entry['name']:28s} {key:8s} exit {code:3d} {seconds:6.1f}s {rss:6.0f} MiB "
                  f"{row['size_ratio']} {row['headline'][:100]} {row['message'][:200]}", flush=True)


def pass_stats(report: dict | None) -> dict:
    """The lossy passes' stats from the report (what each changed and left alone)."""
    if not report:
        return {}
    passes = report.get("passes")
    if isinstance(passes, str):
        return {}
    return {p["name"]: p.get("stats", {}) for p in passes or []
            if p.get("name") in ("qdq", "woq", "prune", "svd")}


def table(rows: list[dict]) -> str:
    by_model: dict[str, dict] = {}
    for row in rows:
        by_model.setdefault(row["model"], {})[row["config"]] = row
    keys = list(CONFIGS)
    head = "| model | " + " | ".join(keys) + " |\n|---|" + "---|" * len(keys) + "\n"
    body = []
    for model, runs in by_model.items():
        cells = []
        for key in keys:
            row = runs.get(key)
            if row is None:
                cells.append("")
                continue
            code = "timeout" if row["exit"] == -9 else f"exit {row['exit']}"
            ratio = f" x{row['size_ratio']:.2f}" if row.get("size_ratio") else ""
            cells.append(f"{code}{ratio} {row['seconds']:.0f}s {row['rss_mib']}M")
        body.append(f"| {model} | " + " | ".join(cells) + " |")
    return head + "\n".join(body) + "\n"


def notes(rows: list[dict]) -> str:
    lines = []
    for row in rows:
        if row["exit"] == 0:
            continue
        text = row["message"] or row["headline"]
        code = f"timeout after {row['seconds']:.0f} s" if row["exit"] == -9 else f"exit {row['exit']}"
        lines.append(f"- {row['model']} `{row['config']}` {code}" + (f": {text[:220]}" if text else ""))
    return "\n".join(lines) + ("\n" if lines else "")


def write(args) -> None:
    latest: dict[tuple, dict] = {}  # several --out files: a later run of a row replaces an earlier one
    for path in args.out.split(","):
        if not Path(path).exists():
            continue
        for line in Path(path).read_text().splitlines():
            row = json.loads(line)
            latest[(row["model"], row["config"])] = row
    order = {e["name"]: i for i, e in enumerate(models(True))}
    rows = sorted(latest.values(), key=lambda r: (order.get(r["model"], len(order)), list(CONFIGS).index(r["config"])))
    m = machine()
    commands = ", ".join(f"`{k}`: `{p or '(default)'}`{' --calib' if c else ''}" for k, (p, c) in CONFIGS.items())
    section = (f"{HEADING}\n\n`PYTHONPATH=. python tools/sweep_passes.py --write` runs the CLI on every corpus "
               f"model (`~/.cache/onnxopt-corpus`, real inputs as `--inputs` and as calibration data) and the "
               f"exported random-weight models, one subprocess per run on one core, {args.timeout:.0f} s limit, "
               f"`--latency-runs 0`. Configurations: {commands}. A cell is the exit code (0 written, 1 "
               f"validation failed, 2 refused input, timeout), file size ratio, wall time and peak RSS.\n"
               f"Machine: {m['cpu']}, {m['cores']} cores, {m['memory']}.\n\n"
               + table(rows) + "\nRuns that did not exit 0:\n\n" + notes(rows))
    write_section(ROOT / "BENCHMARKS.md", HEADING, section)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--only", help="comma-separated model names")
    parser.add_argument("--skip", help="comma-separated model names to leave out")
    parser.add_argument("--configs", help=f"comma-separated among {', '.join(CONFIGS)}")
    parser.add_argument("--timeout", type=float, default=300)
    parser.add_argument("--out", default="sweep.jsonl", help="results file (--write: several, comma-separated, "
                        "a later file's row replacing an earlier one's)")
    parser.add_argument("--fresh", action="store_true", help="rerun runs already in --out")
    parser.add_argument("--nofold", action="store_true", help="include the exported *.nofold.onnx models")
    parser.add_argument("--write", action="store_true", help="only write the BENCHMARKS.md section from --out")
    args = parser.parse_args()
    if args.write:
        write(args)
    else:
        sweep(args)


if __name__ == "__main__":
    main()
