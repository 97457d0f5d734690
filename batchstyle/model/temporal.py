"""Temporal coherence for video (Ruder, Dosovitskiy & Brox, "Artistic style transfer for videos", 2016).

    content frame t, t+1 (uint8, at the output size)
        -> flow_pair: DIS optical flow forward (t -> t+1) and backward (t+1 -> t), once per pair, cached on disk
        -> consistency: 1 where the backward flow is trusted (forward-backward check, no motion boundary)
    stylized frame t  --warp(backward flow)-->  frame t seen from t+1
        -> the start of frame t+1's optimisation, and the target of TemporalLoss (weighted by the consistency)
    temporal_error: the figure `bench video` reports, the same warp and mask applied to two outputs

Flow is classical (OpenCV's DIS, no network weights) and runs on the CPU; everything here is numpy or torch on
whatever device the pixels live on. Flows are (H, W, 2) float32 arrays of (dx, dy) in pixels: for the backward flow
w_b, pixel x of frame t+1 shows what pixel x + w_b(x) of frame t showed.
"""

from __future__ import annotations

import hashlib
import os
import secrets
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

# Ruder et al.'s thresholds, in pixels of the frame the flow was computed at (section 4.2 of the paper).
CONSISTENCY_RELATIVE = 0.01
CONSISTENCY_ABSOLUTE = 0.5
BOUNDARY_RELATIVE = 0.01
BOUNDARY_ABSOLUTE = 0.002


def _need_cv2() -> None:
    """OpenCV is an extra, imported late (only video rows need it): its absence is an ImportError naming the install,
    raised before each `import cv2`, which is written out where it is used so that OpenCV's calls are type checked."""
    try:
        import cv2  # noqa: F401
    except ImportError as exc:
        raise ImportError(
            "video needs OpenCV for optical flow (opencv-python-headless): pip install 'batchstyle[video]'"
        ) from exc


def grey(frame: np.ndarray) -> np.ndarray:
    """(H, W, 3) uint8 RGB -> (H, W) uint8 luma, what DIS works on."""
    _need_cv2()
    import cv2

    return cv2.cvtColor(np.ascontiguousarray(frame), cv2.COLOR_RGB2GRAY)


def optical_flow(source: np.ndarray, target: np.ndarray) -> np.ndarray:
    """DIS flow from `source` to `target` (both (H, W) uint8): (H, W, 2) float32 with target(x) ~ source(x + w).

    That is, the flow OpenCV returns for calc(target, source): for each pixel of `target`, where it came from in
    `source`, which is the form a backward warp (`warp`) needs. The MEDIUM preset: on 256x144 frames of a panned
    photo it is ~10 ms a pair on one core, against ~3 ms for FAST with visibly noisier edges.
    """
    _need_cv2()
    import cv2

    dis = cv2.DISOpticalFlow.create(cv2.DISOPTICAL_FLOW_PRESET_MEDIUM)
    # OpenCV's stubs type the output flow as an array; None (allocate it) is what its own Python examples pass.
    return dis.calc(target, source, None).astype(np.float32)  # type: ignore[call-overload]


def flow_pair(previous: np.ndarray, current: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(backward, forward) flows between two RGB uint8 frames: backward maps current -> previous positions (the
    warp of the previous output onto the current frame), forward maps previous -> current (for the check)."""
    a, b = grey(previous), grey(current)
    return optical_flow(a, b), optical_flow(b, a)


def warp_numpy(image: np.ndarray, flow: np.ndarray) -> np.ndarray:
    """Backward warp: result(x) = image(x + flow(x)), bilinear, borders replicated. Any channel count."""
    _need_cv2()
    import cv2

    h, w = flow.shape[:2]
    ys, xs = np.mgrid[0:h, 0:w].astype(np.float32)
    return cv2.remap(
        image, xs + flow[..., 0], ys + flow[..., 1], interpolation=cv2.INTER_LINEAR, borderMode=cv2.BORDER_REPLICATE
    )


def consistency(backward: np.ndarray, forward: np.ndarray) -> np.ndarray:
    """(H, W) float32 in {0, 1}: 1 where the backward flow can be trusted.

    Ruder et al.: a pixel is disoccluded when following the backward flow and then the forward flow does not come
    back, |w_b + w_f~|^2 > 0.01 (|w_b|^2 + |w_f~|^2) + 0.5 with w_f~ the forward flow sampled where w_b points,
    and on a motion boundary when |grad u|^2 + |grad v|^2 > 0.01 |w_b|^2 + 0.002. Pixels whose flow points outside
    the previous frame have nothing to come from, and are out as well.
    """
    h, w = backward.shape[:2]
    there = warp_numpy(forward, backward)
    round_trip = ((backward + there) ** 2).sum(-1)
    magnitude = (backward**2).sum(-1) + (there**2).sum(-1)
    occluded = round_trip > CONSISTENCY_RELATIVE * magnitude + CONSISTENCY_ABSOLUTE
    du = np.gradient(backward[..., 0])
    dv = np.gradient(backward[..., 1])
    gradient = du[0] ** 2 + du[1] ** 2 + dv[0] ** 2 + dv[1] ** 2
    boundary = gradient > BOUNDARY_RELATIVE * (backward**2).sum(-1) + BOUNDARY_ABSOLUTE
    return (~(occluded | boundary | (uncovered(backward) > 0))).astype(np.float32)


def uncovered(backward: np.ndarray) -> np.ndarray:
    """(H, W) float32 in {0, 1}: 1 where the backward flow points off the previous frame, the strip a pan or zoom
    brings into view. Nothing of the previous output can be carried there, so the frame must paint it anew."""
    h, w = backward.shape[:2]
    ys, xs = np.mgrid[0:h, 0:w].astype(np.float32)
    x, y = xs + backward[..., 0], ys + backward[..., 1]
    return ((x < 0) | (x > w - 1) | (y < 0) | (y > h - 1)).astype(np.float32)


def entering_band(new: np.ndarray, width: float) -> np.ndarray:
    """(H, W) float32 in [0, 1]: 1 on the pixels a frame brings into view (`new`, from `uncovered`), falling linearly
    to 0 at `width` pixels into what the previous frame carried over; the temporal loss is weighted by 1 minus this.
    A pan uncovers a sliver of a pixel or two a frame, too narrow to hold any texture: freed alone, sliver after
    sliver, it came out as stripes. Freed over a band it is painted together with its neighbours, and each pixel is
    held a little harder every frame as the pan carries it inwards."""
    if not new.any():
        return np.zeros_like(new, dtype=np.float32)
    _need_cv2()
    import cv2

    distance = cv2.distanceTransform((new == 0).astype(np.uint8), cv2.DIST_L2, 3)
    return np.clip(1 - distance / max(width, 1.0), 0, 1).astype(np.float32)


def warp(image: torch.Tensor, flow: torch.Tensor, padding: str = "border", mode: str = "bilinear") -> torch.Tensor:
    """Backward warp of (B, C, H, W) by (B, H, W, 2) pixel flows, bilinear, borders replicated (or `padding`
    "reflection"): the torch twin of `warp_numpy`, on the pixels' own device. `mode` "bicubic" (clamped to
    [0, 1]) blurs less: a video frame is warped from the one before, which was warped from the one before that."""
    b, _, h, w = image.shape
    ys, xs = torch.meshgrid(
        torch.arange(h, device=image.device, dtype=image.dtype),
        torch.arange(w, device=image.device, dtype=image.dtype),
        indexing="ij",
    )
    x = (xs + flow[..., 0]) * (2 / max(w - 1, 1)) - 1
    y = (ys + flow[..., 1]) * (2 / max(h - 1, 1)) - 1
    grid = torch.stack([x, y], dim=-1).expand(b, h, w, 2)
    warped = F.grid_sample(image, grid, mode=mode, padding_mode=padding, align_corners=True)
    return warped.clamp(0, 1) if mode == "bicubic" else warped  # a cubic overshoots at edges


class TemporalLoss(nn.Module):
    """Mean over pixels and channels of c * (x - warped previous output)^2, one value per image: Ruder et al.'s
    short-term temporal loss, with c the consistency mask. Resized to the pixels' grid at each scale. Unweighted,
    like the other terms: the objective weights it by temporal_weight, and records it as the "temporal" term."""

    # Buffers, declared so that the checker sees tensors (nn.Module's __getattr__ says "Tensor | Module").
    previous: torch.Tensor
    mask: torch.Tensor

    def __init__(self, previous: torch.Tensor, mask: torch.Tensor) -> None:
        super().__init__()
        self.register_buffer("previous", previous)  # (B, 3, H, W), already warped onto this frame
        self.register_buffer("mask", mask)  # (B, 1, H, W)

    def forward(self, pixels: torch.Tensor) -> torch.Tensor:
        previous, mask = self.previous, self.mask
        if previous.shape[-2:] != pixels.shape[-2:]:
            previous = F.interpolate(previous, size=pixels.shape[-2:], mode="bilinear", align_corners=False)
            mask = F.interpolate(mask, size=pixels.shape[-2:], mode="bilinear", align_corners=False)
        return (mask * (pixels.float() - previous) ** 2).mean(dim=(1, 2, 3))


def temporal_error(previous: np.ndarray, current: np.ndarray, backward: np.ndarray, mask: np.ndarray) -> float:
    """Mean absolute difference, in 8-bit levels, between output frame t+1 and output frame t warped by the
    content's flow, over the consistent pixels: how much a coherent clip still flickers (0 is none)."""
    warped = warp_numpy(previous.astype(np.float32), backward)
    diff = np.abs(current.astype(np.float32) - warped).mean(-1)
    kept = mask > 0.5
    return float(diff[kept].mean()) if kept.any() else 0.0


class FlowCache:
    """Flows of a clip's consecutive frame pairs, one file per pair under `<cache>/flow/<clip key>/`, written
    atomically: computed once per clip (frame selection and size in the key), shared by every chunk and run."""

    def __init__(self, folder: Path | None, clip_key: str) -> None:
        self.folder = None if folder is None else Path(folder) / "flow" / clip_key

    @staticmethod
    def key(clip_digest: str, selection: Sequence[int], size: tuple[int, int]) -> str:
        material = f"{clip_digest}|{','.join(map(str, selection))}|{size[0]}x{size[1]}|dis-medium"
        return hashlib.sha256(material.encode()).hexdigest()[:32]

    def get(self, index: int, previous: np.ndarray, current: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """(backward, forward) between selected frames index-1 and index; computed and stored on a miss."""
        path = None if self.folder is None else self.folder / f"{index:06d}.npz"
        if path is not None and path.is_file():
            try:
                with np.load(path) as stored:
                    return stored["backward"].astype(np.float32), stored["forward"].astype(np.float32)
            except (OSError, ValueError, KeyError):
                pass  # a damaged entry is computed again
        backward, forward = flow_pair(previous, current)
        if path is not None:
            path.parent.mkdir(parents=True, exist_ok=True)
            temp = path.with_name(f".{path.name}.tmp-{secrets.token_hex(8)}")
            with open(temp, "wb") as handle:
                np.savez(handle, backward=backward, forward=forward)
            os.replace(temp, path)
        return backward, forward
