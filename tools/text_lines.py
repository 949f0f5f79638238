"""Labelled text-line images for OCR recognizers, made with numpy alone (seeded, no fonts needed).

Letters and digits come from a 5x7 dot-matrix font, drawn with anti-aliased strokes (bold
or thin), slight slant and spacing jitter, dark ink on a light shaded background, so a
recognizer reads them as text; each image comes with the string it shows (the ground truth).
"""

from __future__ import annotations

import numpy as np

from corpus_data import _line  # the corpus's anti-aliased stroke (tools/ is on the path)

_FONT = {
    "0": "01110 10001 10011 10101 11001 10001 01110", "1": "00100 01100 00100 00100 00100 00100 01110",
    "2": "01110 10001 00001 00010 00100 01000 11111", "3": "11111 00010 00100 00010 00001 10001 01110",
    "4": "00010 00110 01010 10010 11111 00010 00010", "5": "11111 10000 11110 00001 00001 10001 01110",
    "6": "00110 01000 10000 11110 10001 10001 01110", "7": "11111 00001 00010 00100 01000 01000 01000",
    "8": "01110 10001 10001 01110 10001 10001 01110", "9": "01110 10001 10001 01111 00001 00010 01100",
    "A": "01110 10001 10001 11111 10001 10001 10001", "B": "11110 10001 10001 11110 10001 10001 11110",
    "C": "01110 10001 10000 10000 10000 10001 01110", "D": "11100 10010 10001 10001 10001 10010 11100",
    "E": "11111 10000 10000 11110 10000 10000 11111", "F": "11111 10000 10000 11110 10000 10000 10000",
    "G": "01110 10001 10000 10111 10001 10001 01111", "H": "10001 10001 10001 11111 10001 10001 10001",
    "I": "01110 00100 00100 00100 00100 00100 01110", "J": "00111 00010 00010 00010 00010 10010 01100",
    "K": "10001 10010 10100 11000 10100 10010 10001", "L": "10000 10000 10000 10000 10000 10000 11111",
    "M": "10001 11011 10101 10101 10001 10001 10001", "N": "10001 10001 11001 10101 10011 10001 10001",
    "O": "01110 10001 10001 10001 10001 10001 01110", "P": "11110 10001 10001 11110 10000 10000 10000",
    "Q": "01110 10001 10001 10001 10101 10010 01101", "R": "11110 10001 10001 11110 10100 10010 10001",
    "S": "01111 10000 10000 01110 00001 00001 11110", "T": "11111 00100 00100 00100 00100 00100 00100",
    "U": "10001 10001 10001 10001 10001 10001 01110", "V": "10001 10001 10001 10001 10001 01010 00100",
    "W": "10001 10001 10001 10101 10101 10101 01010", "X": "10001 10001 01010 00100 01010 10001 10001",
    "Y": "10001 10001 10001 01010 00100 00100 00100", "Z": "11111 00001 00010 00100 01000 10000 11111",
}
_CHARS = sorted(set(_FONT) - {"O", "V"})  # O reads as 0, V as U in this font: left out, so the text is unambiguous


def _segments(ch: str) -> list[tuple[float, float, float, float]]:
    """Strokes joining neighbouring set dots of a glyph (x0, y0, x1, y1 in dot units), plus lone dots."""
    rows = [r for r in _FONT[ch].split()]
    on = {(x, y) for y, r in enumerate(rows) for x, c in enumerate(r) if c == "1"}
    segs = []
    for (x, y) in on:
        linked = False
        for dx, dy in ((1, 0), (0, 1), (1, 1), (-1, 1)):
            if (x + dx, y + dy) in on:
                segs.append((x, y, x + dx, y + dy))
                linked = True
        if not linked:
            segs.append((x, y, x, y))
    return segs


def text_line(rng: np.random.Generator, h: int, w: int) -> tuple[np.ndarray, str]:
    """(H, W, 3) float image 0..255 of a line of letters and digits, and its text."""
    tint = rng.uniform(200, 250) + rng.uniform(-10, 10, size=3)
    yy, xx = np.mgrid[0:h, 0:w].astype(np.float32)
    shade = (xx / w - 0.5) * rng.uniform(-20, 20) + (yy / h - 0.5) * rng.uniform(-15, 15)
    img = tint[None, None, :] + shade[..., None] + rng.normal(0, 2, size=(h, w, 1))
    ink = rng.uniform(0, 70, size=3).astype(np.float32)
    size = h * rng.uniform(0.5, 0.7)  # glyph height
    dot = size / 6.0
    width = dot * rng.uniform(0.7, 1.1)
    slant = rng.uniform(-0.15, 0.15)
    y0 = (h - size) / 2 + rng.uniform(-0.08, 0.08) * h
    x = h * rng.uniform(0.1, 0.4)
    text = ""
    n = int(rng.integers(3, 13))
    for i in range(n):
        adv = dot * 4 + dot * rng.uniform(1.6, 2.4)
        if x + adv > w - h * 0.1:
            break
        if i and rng.random() < 0.12:
            x += dot * 4  # a space: recognizers drop or keep it; it is left out of the text
        ch = _CHARS[int(rng.integers(len(_CHARS)))]
        for (a, b, c, d) in _segments(ch):
            _line(img, x + a * dot + slant * (6 - b) * dot, y0 + b * dot,
                  x + c * dot + slant * (6 - d) * dot, y0 + d * dot, width, ink)
        text += ch
        x += adv
    return np.clip(img, 0, 255), text


def text_lines(rng: np.random.Generator, n: int, h: int = 48, w: int = 320, *, norm: str = "half",
               channels: str = "bgr") -> tuple[np.ndarray, list[str]]:
    """n images as float32 [n, 3, h, w] (norm 'half': (x/255-0.5)/0.5, or 'unit') and their texts."""
    imgs, texts = [], []
    for _ in range(n):
        img, text = text_line(rng, h, w)
        if channels == "bgr":
            img = img[..., ::-1]
        img = img / 255.0
        if norm == "half":
            img = (img - 0.5) / 0.5
        imgs.append(img.transpose(2, 0, 1))
        texts.append(text)
    return np.stack(imgs).astype(np.float32), texts
