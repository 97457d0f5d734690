"""Faces found in a content image, and the soft mask that makes the content hold there (`faces=auto`).

Strokes eat faces first: a face is small, its features are a few pixels of contrast, and a viewer forgives nothing
there. The gallery's fix was a hand-drawn `content_mask` over the face; this draws it from a detector instead, so the
protection needs no user who knows to ask for it.

The detector is scikit-image's LBP frontal-face cascade (OpenCV's lbpcascade_frontalface, shipped inside the
scikit-image wheel): nothing is downloaded at run time, and it is deterministic. opencv-python 5 wheels no longer
carry OpenCV's Haar cascades (`cv2.data` holds no XML), so they were not an option for one offline path. Detection
runs once per image, on its greyscale at DETECT_SIDE px, so every scale and tile of a row sees the same faces. Boxes
are kept as fractions of the image's width and height: they hold at every size the image is stylized at, and the
report draws them on any thumbnail.

The thresholds were chosen on the package's own photos (scale step 1.1, windows from 1/12 of the long side):
the astronaut's face is found, and nothing in coffee, chelsea (a cat), rocket or the cameraman, at long sides from
96 to 512 px. The cameraman's face is missed too: it is half turned, and a frontal cascade does not see it. Five
neighbours instead of six found false faces on the astronaut's suit and in gravel.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
from PIL import Image

DETECT_SIDE = 512  # px: the long side faces are looked for at (never enlarged)
SCALE_STEP = 1.1  # the cascade's window grows by this factor from one size to the next
MIN_NEIGHBOURS = 6  # overlapping detections a face needs: fewer let in textures (a suit's folds, gravel)
MIN_FACE = 1 / 12  # of the long side: smaller faces are a few pixels at the first scale, and rarely faces
CASCADE_WINDOW = 24  # px: the cascade's own window, the smallest face it can see
CONFIRM = 0.8  # the second size a face must be found at, of the first (find_faces)
MIN_OVERLAP = 0.4  # intersection over union of the two finds of one face
# The soft mask over a face: an ellipse around the cascade's box (which runs from the brows to the mouth), a little
# lower and taller than the box to take in the forehead and chin, solid in its inner part and fading to 0 at its rim.
ELLIPSE_WIDTH = 0.65  # semi-axis, of the box's width
ELLIPSE_HEIGHT = 0.85  # semi-axis, of the box's height
ELLIPSE_DROP = 0.08  # the centre below the box's, as a fraction of its height
SOLID = 0.6  # of the ellipse's radius: full weight inside, a smooth fall to 0 between here and the rim


class FacesUnavailable(RuntimeError):
    """faces=auto without scikit-image installed: the message names the fix."""


@dataclass(frozen=True)
class Face:
    """A found face's box: left, top, width and height as fractions of the image's width and height."""

    x: float
    y: float
    width: float
    height: float

    def as_list(self) -> list[float]:
        """[x, y, width, height] rounded to 4 places: what the ledger and the output's metadata record."""
        return [round(self.x, 4), round(self.y, 4), round(self.width, 4), round(self.height, 4)]

    def pixels(self, width: int, height: int) -> tuple[int, int, int, int]:
        """(left, top, right, bottom) in an image of this size: where the report draws it."""
        return (
            round(self.x * width),
            round(self.y * height),
            round((self.x + self.width) * width),
            round((self.y + self.height) * height),
        )


def find_faces(image: Image.Image) -> tuple[Face, ...]:
    """The frontal faces in `image`, left to right; none found is an empty tuple.

    A face counts only where the cascade finds it at two sizes of the image (its long side at DETECT_SIDE or less,
    and CONFIRM of that): the cascade's false faces come and go with the size. Measured on scikit-image's photos at
    long sides 96 to 512 px in steps of 32-64: alone, it found a second face on the astronaut's suit at 256 and 448
    px and one on chelsea (a cat) at 320; confirmed, none of them, and the astronaut's own face at every size from
    160 px up."""
    try:
        from skimage.data import lbp_frontal_face_cascade_filename
        from skimage.feature import Cascade
    except ImportError as exc:
        raise FacesUnavailable(
            "faces=auto needs scikit-image (its wheel carries the face detector): pip install 'batchstyle[faces]', "
            "or set faces=off"
        ) from exc
    cascade = Cascade(lbp_frontal_face_cascade_filename())
    grey = image.convert("L")
    side = min(DETECT_SIDE, max(grey.size))  # never enlarged: an enlarged photo gave the cascade false faces
    found = _detect(cascade, grey, side)
    seen = _detect(cascade, grey, round(side * CONFIRM)) if found else []
    faces = [face for face in found if any(_overlap(face, other) >= MIN_OVERLAP for other in seen)]
    return tuple(sorted(faces, key=lambda face: (face.x, face.y)))


def _detect(cascade: Any, grey: Image.Image, side: int) -> list[Face]:
    """The cascade's faces in `grey` shrunk to a long side of `side` px, as fractions of its size."""
    scale = side / max(grey.size)
    if scale < 1.0:
        grey = grey.resize(
            (max(1, round(grey.width * scale)), max(1, round(grey.height * scale))), Image.Resampling.BOX
        )
    pixels = np.asarray(grey, dtype=np.float32) / 255.0
    h, w = pixels.shape
    smallest = max(CASCADE_WINDOW, round(max(h, w) * MIN_FACE))
    if min(h, w) < smallest:
        return []
    found = cascade.detect_multi_scale(
        pixels,
        scale_factor=SCALE_STEP,
        step_ratio=1,
        min_size=(smallest, smallest),
        max_size=(min(h, w), min(h, w)),
        min_neighbor_number=MIN_NEIGHBOURS,
    )
    return [Face(box["c"] / w, box["r"] / h, box["width"] / w, box["height"] / h) for box in found]


def _overlap(a: Face, b: Face) -> float:
    """Intersection over union of two boxes."""
    w = max(0.0, min(a.x + a.width, b.x + b.width) - max(a.x, b.x))
    h = max(0.0, min(a.y + a.height, b.y + b.height) - max(a.y, b.y))
    inter = w * h
    return inter / (a.width * a.height + b.width * b.height - inter)


def face_mask(faces: Sequence[Face], width: int, height: int) -> np.ndarray:
    """(height, width) float32 in [0, 1]: 1 over each face, fading to 0 around it (overlapping faces: the larger
    value). Drawn afresh at every size asked for, so each scale gets a sharp mask rather than a resized one."""
    mask = np.zeros((height, width), dtype=np.float32)
    ys = (np.arange(height, dtype=np.float32) + 0.5) / height
    xs = (np.arange(width, dtype=np.float32) + 0.5) / width
    for face in faces:
        cx = face.x + face.width / 2
        cy = face.y + face.height * (0.5 + ELLIPSE_DROP)
        rx, ry = face.width * ELLIPSE_WIDTH, face.height * ELLIPSE_HEIGHT
        radius = np.sqrt(((xs[None, :] - cx) / rx) ** 2 + ((ys[:, None] - cy) / ry) ** 2)
        t = np.clip((1.0 - radius) / (1.0 - SOLID), 0.0, 1.0)
        mask = np.maximum(mask, t * t * (3.0 - 2.0 * t))  # smoothstep: no edge for the optimiser to draw
    return mask
