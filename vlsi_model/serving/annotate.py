"""Draw a question and its answer on the frame they are about, for RViz / Foxglove viewers.

Why hand-written: it is a few OpenCV calls (a dark band, wrapped lines of text); no viewer
library is worth a dependency for it. The frame is copied, never drawn on in place (it may
be a read-only view of a received message).
"""

from __future__ import annotations

import textwrap

import numpy as np


def annotate_answer(rgb: np.ndarray, question: str, answer: str) -> np.ndarray:
    """A copy of `rgb` (H x W x 3 uint8) with "Q: ..." and "A: ..." in a band at its bottom."""
    import cv2

    out = np.array(rgb, dtype=np.uint8, order="C", copy=True)
    height, width = out.shape[:2]
    scale = max(0.35, min(1.0, width / 900.0))
    thickness = 1 if scale < 0.7 else 2
    (char_w, line_h), baseline = cv2.getTextSize("M", cv2.FONT_HERSHEY_SIMPLEX, scale, thickness)
    line_h += baseline + 4
    chars_per_line = max(8, (width - 12) // max(1, char_w))
    question_lines = textwrap.wrap(f"Q: {question}", chars_per_line)[:3]
    lines = [*question_lines, *textwrap.wrap(f"A: {answer}", chars_per_line)[:4]]
    band = min(height, line_h * len(lines) + 8)
    top = height - band
    out[top:] = (out[top:].astype(np.uint16) * 3 // 10).astype(np.uint8)  # darkened, still see-through
    for i, line in enumerate(lines):
        y = top + 4 + line_h * (i + 1) - baseline - 2
        colour = (255, 255, 255) if i < len(question_lines) else (255, 230, 80)
        cv2.putText(out, line, (6, y), cv2.FONT_HERSHEY_SIMPLEX, scale, colour, thickness, cv2.LINE_AA)
    return out
