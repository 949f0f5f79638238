"""Realistic inputs for the corpus models, made with numpy alone (seeded, no downloads).

Every generator takes a numpy Generator, the wanted shape and the recipe's arguments, and returns
an array of that shape. Images are drawn, not random: document pages with lines of glyph strokes
(for OCR and layout models), single text lines (recognizers, captchas), and scenes of smooth
gradients and solid shapes (detectors, classifiers). Audio is speech-like: voiced syllables with a
wandering pitch and formant resonances, pauses and a little noise. Text becomes token ids through
a WordPiece vocabulary that a package ships. File bytes come from files on this machine.
"""

from __future__ import annotations

import os
import unicodedata
from typing import Any, Callable, Optional

import numpy as np

# 14 segment strokes on a 0..1 box (x0, y0, x1, y1): enough to make letter-like glyphs.
_SEGMENTS = [
    (0, 0, 1, 0), (0, 0.5, 1, 0.5), (0, 1, 1, 1), (0, 0, 0, 0.5), (0, 0.5, 0, 1), (1, 0, 1, 0.5),
    (1, 0.5, 1, 1), (0.5, 0, 0.5, 0.5), (0.5, 0.5, 0.5, 1), (0, 0, 0.5, 0.5), (1, 0, 0.5, 0.5),
    (0, 1, 0.5, 0.5), (1, 1, 0.5, 0.5), (0, 0, 1, 1),
]

IMAGENET_MEAN = np.array([0.485, 0.456, 0.406], np.float32)
IMAGENET_STD = np.array([0.229, 0.224, 0.225], np.float32)


def _glyphs(rng: np.random.Generator, count: int) -> list[list[tuple]]:
    """A small alphabet of glyphs, each 2-5 strokes."""
    return [[_SEGMENTS[i] for i in rng.choice(len(_SEGMENTS), size=rng.integers(2, 6), replace=False)]
            for _ in range(count)]


def _line(img: np.ndarray, x0: float, y0: float, x1: float, y1: float, width: float, color: np.ndarray) -> None:
    """Draw an anti-aliased thick segment into img (H, W, 3 float, 0..255)."""
    h, w = img.shape[:2]
    pad = width + 1
    xa, xb = int(max(0, min(x0, x1) - pad)), int(min(w, max(x0, x1) + pad + 1))
    ya, yb = int(max(0, min(y0, y1) - pad)), int(min(h, max(y0, y1) + pad + 1))
    if xa >= xb or ya >= yb:
        return
    yy, xx = np.mgrid[ya:yb, xa:xb].astype(np.float32)
    dx, dy = x1 - x0, y1 - y0
    t = np.clip(((xx - x0) * dx + (yy - y0) * dy) / max(dx * dx + dy * dy, 1e-6), 0, 1)
    dist = np.hypot(xx - (x0 + t * dx), yy - (y0 + t * dy))
    alpha = np.clip(width / 2 + 0.5 - dist, 0, 1)[..., None]
    img[ya:yb, xa:xb] = img[ya:yb, xa:xb] * (1 - alpha) + color * alpha


def _text(img: np.ndarray, rng: np.random.Generator, glyphs: list, x: float, y: float, size: float,
          max_x: float, color: np.ndarray) -> float:
    """Write glyphs (with word gaps) from (x, y) of height size until max_x; returns the end x."""
    gw = size * 0.6
    while x + gw < max_x:
        if rng.random() < 0.15:
            x += gw  # a space
            continue
        for (a, b, c, d) in glyphs[rng.integers(len(glyphs))]:
            _line(img, x + a * gw, y + b * size, x + c * gw, y + d * size, max(1.0, size / 9), color)
        x += gw * 1.35
    return x


def _background(rng: np.random.Generator, h: int, w: int, base: float = 235.0) -> np.ndarray:
    tint = base + rng.uniform(-15, 15, size=3)
    yy, xx = np.mgrid[0:h, 0:w].astype(np.float32)
    shade = (xx / max(w, 1) - 0.5) * rng.uniform(-20, 20) + (yy / max(h, 1) - 0.5) * rng.uniform(-20, 20)
    img = tint[None, None, :] + shade[..., None] + rng.normal(0, 3, size=(h, w, 1))
    return img.astype(np.float32)


def document(rng: np.random.Generator, h: int, w: int) -> np.ndarray:
    """A page: a title, paragraphs of text lines, a shaded box (figure) and a ruled table."""
    img = _background(rng, h, w, 240)
    glyphs = _glyphs(rng, 40)
    ink = np.array([25, 25, 30], np.float32) + rng.uniform(0, 30, size=3)
    margin = w * 0.06
    y = h * 0.05
    size = max(8.0, h / 22)
    _text(img, rng, glyphs, margin, y, size * 1.4, w * 0.7, ink)
    y += size * 2.6
    while y < h * 0.92:
        choice = rng.random()
        if choice < 0.15 and y < h * 0.7:  # a figure
            bh = rng.uniform(0.1, 0.2) * h
            x0 = rng.uniform(margin, w * 0.4)
            img[int(y):int(y + bh), int(x0):int(x0 + w * 0.45)] = rng.uniform(80, 200, size=3)
            y += bh + size
        elif choice < 0.25 and y < h * 0.7:  # a table
            rows, cols = rng.integers(3, 6), rng.integers(2, 5)
            cw, rh = (w - 2 * margin) / cols, size * 1.6
            for r in range(rows + 1):
                _line(img, margin, y + r * rh, w - margin, y + r * rh, 1.5, ink)
            for c in range(cols + 1):
                _line(img, margin + c * cw, y, margin + c * cw, y + rows * rh, 1.5, ink)
            for r in range(rows):
                for c in range(cols):
                    _text(img, rng, glyphs, margin + c * cw + 4, y + r * rh + 3, size * 0.8,
                          margin + (c + 0.8) * cw, ink)
            y += rows * rh + size
        else:
            s = size * rng.uniform(0.8, 1.1)
            _text(img, rng, glyphs, margin + rng.uniform(0, 2) * s, y, s, w - margin - rng.uniform(0, 0.3) * w, ink)
            y += s * 1.8
    return np.clip(img, 0, 255)


def text_line(rng: np.random.Generator, h: int, w: int) -> np.ndarray:
    """One line of text filling the height, as a recognizer's crop."""
    img = _background(rng, h, w, rng.uniform(190, 250))
    ink = rng.uniform(0, 90, size=3).astype(np.float32)
    size = h * rng.uniform(0.55, 0.75)
    end = _text(img, rng, _glyphs(rng, 36), h * 0.15, (h - size) / 2, size, w * rng.uniform(0.6, 0.98), ink)
    del end
    return np.clip(img, 0, 255)


def captcha(rng: np.random.Generator, h: int, w: int) -> np.ndarray:
    """A few large, jittered glyphs on a noisy background with crossing lines."""
    img = _background(rng, h, w, rng.uniform(180, 240)) + rng.normal(0, 12, size=(h, w, 3))
    glyphs = _glyphs(rng, 20)
    x = w * 0.08
    for _ in range(5):
        size = h * rng.uniform(0.5, 0.7)
        y = rng.uniform(0.05, 0.95 - size / h) * h
        ink = rng.uniform(0, 120, size=3).astype(np.float32)
        for (a, b, c, d) in glyphs[rng.integers(len(glyphs))]:
            _line(img, x + a * size * 0.6, y + b * size, x + c * size * 0.6, y + d * size, size / 7, ink)
        x += size * 0.6 + rng.uniform(4, 10)
    for _ in range(2):
        _line(img, 0, rng.uniform(0, h), w, rng.uniform(0, h), 1.5, rng.uniform(0, 150, size=3).astype(np.float32))
    return np.clip(img, 0, 255)


def scene(rng: np.random.Generator, h: int, w: int) -> np.ndarray:
    """Sky-and-ground gradients with solid ellipses and boxes (objects) and light noise."""
    yy, xx = np.mgrid[0:h, 0:w].astype(np.float32)
    top, bottom = rng.uniform(60, 230, size=3), rng.uniform(30, 200, size=3)
    t = (yy / h)[..., None]
    img = top * (1 - t) + bottom * t
    for _ in range(rng.integers(3, 8)):
        cy, cx = rng.uniform(0, h), rng.uniform(0, w)
        ry, rx = rng.uniform(0.05, 0.3) * h, rng.uniform(0.05, 0.3) * w
        color = rng.uniform(0, 255, size=3)
        if rng.random() < 0.5:
            mask = ((yy - cy) / ry) ** 2 + ((xx - cx) / rx) ** 2 <= 1
        else:
            mask = (abs(yy - cy) <= ry) & (abs(xx - cx) <= rx)
        shade = 1 - 0.3 * np.clip((yy - cy) / (2 * ry) + 0.5, 0, 1)
        img = np.where(mask[..., None], color * shade[..., None], img)
    img = img + rng.normal(0, 4, size=img.shape)
    return np.clip(img, 0, 255).astype(np.float32)


_PICTURES: dict[str, Callable] = {"document": document, "text_line": text_line, "captcha": captcha, "scene": scene}


def image(rng: np.random.Generator, shape: list[int], dtype: str, *, picture: str = "scene",
          layout: str = "nchw", norm: str = "unit", channels: str = "rgb") -> np.ndarray:
    """Images of `picture` in `layout`, scaled by `norm`.

    norm: byte (0..255), unit (0..1), half (x/255-0.5)/0.5, imagenet ((x/255-mean)/std).
    A one-channel layout takes the grey level.
    """
    n = shape[0]
    if layout == "nchw":
        c, h, w = shape[1], shape[2], shape[3]
    else:
        h, w, c = shape[1], shape[2], shape[3]
    out = []
    for _ in range(n):
        img = _PICTURES[picture](rng, h, w)
        if channels == "bgr":
            img = img[..., ::-1]
        if norm == "byte":
            img = img
        elif norm == "unit":
            img = img / 255.0
        elif norm == "half":
            img = (img / 255.0 - 0.5) / 0.5
        elif norm == "imagenet":
            img = (img / 255.0 - IMAGENET_MEAN) / IMAGENET_STD
        else:
            raise ValueError(f"unknown norm {norm}")
        if c == 1:
            img = img.mean(axis=2, keepdims=True)
        out.append(img.transpose(2, 0, 1) if layout == "nchw" else img)
    return np.stack(out).astype(dtype)


def speech(rng: np.random.Generator, samples: int, rate: int = 16000) -> np.ndarray:
    """Speech-like audio in [-1, 1]: voiced syllables (harmonics, formants), pauses, noise."""
    t = np.arange(samples) / rate
    f0 = rng.uniform(100, 220) * (1 + 0.15 * np.sin(2 * np.pi * rng.uniform(0.5, 2) * t + rng.uniform(0, 6)))
    phase = 2 * np.pi * np.cumsum(f0) / rate
    formants = rng.uniform([300, 900, 2200], [800, 1800, 3200])
    voiced = np.zeros(samples)
    for k in range(1, 30):
        fk = k * f0
        gain = sum(np.exp(-((fk - f) / 120.0) ** 2) for f in formants) + 0.05 / k
        voiced += gain * np.sin(k * phase) * (fk < rate / 2)
    syll = np.clip(np.sin(2 * np.pi * rng.uniform(3, 5) * t + rng.uniform(0, 6)), 0, None) ** 1.5
    pauses = (np.sin(2 * np.pi * rng.uniform(0.3, 0.6) * t + rng.uniform(0, 6)) > -0.6).astype(float)
    audio = voiced * syll * pauses
    audio = 0.5 * audio / (np.abs(audio).max() + 1e-9) + rng.normal(0, 0.01, samples)
    return np.clip(audio, -1, 1)


def audio(rng: np.random.Generator, shape: list[int], dtype: str, *, scale: str = "float",
          rate: int = 16000) -> np.ndarray:
    """Rows of speech-like audio, shape [n, samples]; scale float (-1..1) or int16 (-32768..32767)."""
    n, samples = shape[0], int(np.prod(shape[1:]))
    rows = np.stack([speech(rng, samples, rate) for _ in range(n)])
    if scale == "int16":
        rows = np.round(rows * 32767)
    return rows.reshape(shape).astype(dtype)


def fill(rng: np.random.Generator, shape: list[int], dtype: str, *, value: float = 0.0) -> np.ndarray:
    """A constant tensor (recurrent states start at zero; sample rates are scalars)."""
    return np.full(shape, value, dtype=dtype)


# ---------------------------------------------------------------- text

def wordpiece(text: str, vocab: dict[str, int], max_chars: int = 100) -> list[int]:
    """BERT's uncased basic tokenizer + greedy longest-match WordPiece."""
    text = unicodedata.normalize("NFD", text.lower())
    text = "".join(ch for ch in text if unicodedata.category(ch) != "Mn")
    words: list[str] = []
    for raw in text.split():
        cur = ""
        for ch in raw:
            if unicodedata.category(ch).startswith("P") or ch in "$+<=>^`|~":
                if cur:
                    words.append(cur)
                words.append(ch)
                cur = ""
            else:
                cur += ch
        if cur:
            words.append(cur)
    unk = vocab.get("[UNK]", 100)
    ids = []
    for word in words:
        if len(word) > max_chars:
            ids.append(unk)
            continue
        start, pieces = 0, []
        while start < len(word):
            end = len(word)
            while end > start:
                piece = word[start:end] if start == 0 else "##" + word[start:end]
                if piece in vocab:
                    pieces.append(vocab[piece])
                    break
                end -= 1
            if end == start:
                pieces = [unk]
                break
            start = end
        ids.extend(pieces)
    return ids


def sentences(text: str, count: int, rng: np.random.Generator) -> list[str]:
    """`count` sentence-ish chunks of prose from text (lines of letters, not tables or code)."""
    lines = [ln.strip() for ln in text.splitlines()]
    good = [ln for ln in lines if len(ln) > 40 and sum(c.isalpha() or c == " " for c in ln) > 0.85 * len(ln)]
    if not good:
        good = ["the quick brown fox jumps over the lazy dog"]
    picks = rng.choice(len(good), size=count, replace=len(good) < count)
    return [" ".join(good[i:i + 2]) for i in picks]


def tokens(rng: np.random.Generator, shape: list[int], dtype: str, *, part: str, vocab: dict[str, int],
           text: str) -> np.ndarray:
    """BERT-style ids/attention_mask/token_type_ids of real sentences, padded to shape[1].

    Each sentence is cut or padded to the sequence length; the seed fixes the picks so the
    three parts (made by separate calls with the same seed) agree.
    """
    n, seq = shape
    ids = np.zeros((n, seq), np.int64)
    mask = np.zeros((n, seq), np.int64)
    for i, s in enumerate(sentences(text, n, rng)):
        body = wordpiece(s, vocab)[: seq - 2]
        row = [vocab.get("[CLS]", 101)] + body + [vocab.get("[SEP]", 102)]
        ids[i, :len(row)] = row
        mask[i, :len(row)] = 1
    out = {"ids": ids, "mask": mask, "types": np.zeros_like(ids)}[part]
    return out.astype(dtype)


# ---------------------------------------------------------------- file bytes

def machine_files(count: int, rng: np.random.Generator) -> list[str]:
    """Files of varied types found on this machine (Python sources, shared libraries, text, json...).

    A bounded walk of a few system folders: at most 20 candidates per suffix, 20000 entries in all.
    """
    roots = [os.path.dirname(os.__file__), "/usr/share/doc", "/etc", "/usr/lib/x86_64-linux-gnu", "/usr/share"]
    suffixes = [".py", ".so", ".txt", ".json", ".html", ".xml", ".png", ".gz", ".sh", ".conf", ".pem", ".md"]
    hits: dict[str, list[str]] = {s: [] for s in suffixes}
    seen = 0
    for root in roots:
        for dirpath, dirnames, filenames in os.walk(root):
            dirnames.sort()
            for fn in sorted(filenames):
                seen += 1
                for suf in suffixes:
                    if (fn.endswith(suf) or suf + "." in fn) and len(hits[suf]) < 20:
                        path = os.path.join(dirpath, fn)
                        if os.path.isfile(path) and not os.path.islink(path) and os.path.getsize(path) > 0:
                            hits[suf].append(path)
                        break
            if seen > 20000 or all(len(v) >= 20 for v in hits.values()):
                break
    found = [v[int(rng.integers(len(v)))] for v in hits.values() if v]
    while len(found) < count:
        found.append(found[len(found) % max(1, len(found))])
    return found[:count]


def file_bytes(rng: np.random.Generator, shape: list[int], dtype: str, *, beg: int, end: int,
               padding: int = 256) -> np.ndarray:
    """Magika's features: the first `beg` and last `end` bytes of real files, whitespace-stripped,
    padded with `padding`."""
    n = shape[0]
    rows = []
    for path in machine_files(n, rng):
        with open(path, "rb") as f:
            data = f.read(1 << 22)
        data = data.strip()
        head = list(data[:beg]) + [padding] * max(0, beg - len(data))
        tail = list(data[-end:]) if data else []
        tail = [padding] * (end - len(tail)) + tail
        rows.append(head + tail)
    return np.asarray(rows).reshape(shape).astype(dtype)


GENERATORS: dict[str, Callable[..., np.ndarray]] = {
    "image": image, "audio": audio, "fill": fill, "tokens": tokens, "file_bytes": file_bytes,
}


def seed_for(name: str) -> int:
    return int.from_bytes(name.encode()[:8].ljust(8, b"\0"), "little") % (2 ** 32)


def make(name: str, kind: str, shape: list[int], dtype: str, args: Optional[dict[str, Any]] = None,
         extra: Optional[dict[str, Any]] = None) -> np.ndarray:
    """One input array for model `name` (seeded by the model's name, so rebuilds are identical)."""
    rng = np.random.default_rng(seed_for(name))
    kwargs = dict(args or {})
    kwargs.update(extra or {})
    return GENERATORS[kind](rng, list(shape), dtype, **kwargs)
