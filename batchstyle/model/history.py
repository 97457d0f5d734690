"""Where L-BFGS keeps its correction pairs: beside the image in fp32, in bf16, or in a file.

The history is the largest thing an optimisation of a huge image holds. At 8192x6144 one image-sized fp32 vector is
604 MB, and the five (s, y) pairs `BatchLBFGS` keeps at the least are 6 GB, more than the rest of a tiled scale's
working memory. So the pairs can be stored

    fp32   on the image's device, as they always were: one batched matmul per product, nothing waits for the device
    bf16   on the device at half the bytes; the products read it a slice at a time into fp32 (CHUNK elements a
           vector), so they sum in fp32 as before and only the stored vectors are rounded
    file   bf16 in an unnamed temporary file in a folder given (a run's output folder, beside its ledger): no
           memory but a slice's; the page cache serves the reads while the machine has room, the disk when not

and `BatchLBFGS` only ever asks a store for two products with the stored vectors, so each is a drop-in for the
others. What each costs in convergence is measured in docs/large-outputs.md#the-l-bfgs-history.
"""

from __future__ import annotations

import tempfile
from abc import ABC, abstractmethod
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import torch

from batchstyle.model.memory import STORES

CHUNK = 1 << 20  # elements of a vector per slice: a 4 MiB fp32 slice per stored vector, a few MiB in all


class PairStore(ABC):
    """B images' correction pairs, (B, h, 2, n): image b's pair in slot k is rows b*2h + 2k (s) and b*2h + 2k + 1
    (y). Row `scratch` (= B*2h) takes a pair not stored, so storing or not is a choice of index, not a branch."""

    def __init__(self, batch: int, history: int, numel: int) -> None:
        self.batch, self.history, self.numel = batch, history, numel
        self.scratch = batch * 2 * history

    @abstractmethod
    def write(self, row_s: torch.Tensor, row_y: torch.Tensor, s: torch.Tensor, y: torch.Tensor) -> None:
        """Image b's s and y into rows row_s[b] and row_y[b] (`scratch`: not stored)."""
        ...

    @abstractmethod
    def dots(self, m: int, vectors: torch.Tensor) -> torch.Tensor:
        """(B, 2m, k): every vector of each image's first m slots (s_0, y_0, s_1, ...) against its k `vectors`."""
        ...

    @abstractmethod
    def combine(self, m: int, coefficients: torch.Tensor, base: torch.Tensor) -> torch.Tensor:
        """(B, n): base + sum_r coefficients[b, r] * stored vector r, over the first m slots' 2m vectors."""
        ...


class DeviceStore(PairStore):
    """The pairs in a tensor on the image's device, in fp32 (the products are single batched matmuls, as before
    stores existed) or in bf16 (the products go a CHUNK slice at a time through fp32)."""

    def __init__(self, batch: int, history: int, numel: int, like: torch.Tensor, dtype: torch.dtype) -> None:
        super().__init__(batch, history, numel)
        self.rows = torch.zeros(self.scratch + 1, numel, device=like.device, dtype=dtype)
        self._pairs = self.rows[:-1].view(batch, history * 2, numel)

    def write(self, row_s: torch.Tensor, row_y: torch.Tensor, s: torch.Tensor, y: torch.Tensor) -> None:
        self.rows.index_copy_(0, row_s, s.to(self.rows.dtype))
        self.rows.index_copy_(0, row_y, y.to(self.rows.dtype))

    def dots(self, m: int, vectors: torch.Tensor) -> torch.Tensor:
        pairs = self._pairs[:, : 2 * m]
        if pairs.dtype == vectors.dtype:
            return torch.bmm(pairs, vectors.transpose(1, 2))
        out = vectors.new_zeros(self.batch, 2 * m, vectors.shape[1])
        for i in range(0, self.numel, CHUNK):
            out += torch.bmm(pairs[..., i : i + CHUNK].to(vectors.dtype), vectors[..., i : i + CHUNK].transpose(1, 2))
        return out

    def combine(self, m: int, coefficients: torch.Tensor, base: torch.Tensor) -> torch.Tensor:
        pairs = self._pairs[:, : 2 * m]
        if pairs.dtype == base.dtype:
            return torch.baddbmm(base[:, None, :], coefficients[:, None, :], pairs).view(self.batch, self.numel)
        out = torch.empty_like(base)
        for i in range(0, self.numel, CHUNK):
            piece = pairs[..., i : i + CHUNK].to(base.dtype)
            out[:, i : i + CHUNK] = torch.baddbmm(base[:, None, i : i + CHUNK], coefficients[:, None, :], piece)[:, 0]
        return out


class FileStore(PairStore):
    """The pairs in bf16 in a temporary file in `folder`: unnamed from the start on POSIX (deleted on close
    elsewhere), so nothing is left behind even by a process killed with SIGKILL. The products read a CHUNK slice
    of each stored vector at a time; a write asks the device which rows (the only wait it adds) and writes the
    stored images' s and y whole."""

    def __init__(self, batch: int, history: int, numel: int, like: torch.Tensor, folder: Path | None) -> None:
        super().__init__(batch, history, numel)
        self.device = like.device
        self._file = tempfile.TemporaryFile(prefix="lbfgs-history-", dir=folder)  # noqa: SIM115 (lives with the store)
        self._file.truncate(self.scratch * numel * 2)  # sparse: the disk is used as pairs arrive

    def _seek(self, row: int, start: int = 0) -> None:
        self._file.seek((row * self.numel + start) * 2)

    def write(self, row_s: torch.Tensor, row_y: torch.Tensor, s: torch.Tensor, y: torch.Tensor) -> None:
        for rows, vectors in ((row_s, s), (row_y, y)):
            for b, row in enumerate(rows.tolist()):
                if row != self.scratch:
                    half = vectors[b].to("cpu", torch.bfloat16).view(torch.int16).numpy()
                    self._seek(row)
                    # .data is memoryview(half): numpy declares ndarray a buffer to the checker only for Python 3.12+.
                    self._file.write(half.data)

    def _slices(self, m: int) -> Iterator[tuple[int, int, torch.Tensor]]:
        """Per CHUNK slice: (start, end, the first m slots' vectors of every image there as fp32 on the device)."""
        for i in range(0, self.numel, CHUNK):
            j = min(self.numel, i + CHUNK)
            buffer = np.empty((self.batch, 2 * m, j - i), dtype=np.int16)
            for b in range(self.batch):
                for r in range(2 * m):
                    self._seek(b * 2 * self.history + r, i)
                    self._file.readinto(memoryview(buffer[b, r]))
            piece = torch.from_numpy(buffer).view(torch.bfloat16).to(self.device, torch.float32)
            yield i, j, piece

    def dots(self, m: int, vectors: torch.Tensor) -> torch.Tensor:
        out = vectors.new_zeros(self.batch, 2 * m, vectors.shape[1])
        for i, j, piece in self._slices(m):
            out += torch.bmm(piece, vectors[..., i:j].transpose(1, 2))
        return out

    def combine(self, m: int, coefficients: torch.Tensor, base: torch.Tensor) -> torch.Tensor:
        out = torch.empty_like(base)
        for i, j, piece in self._slices(m):
            out[:, i:j] = torch.baddbmm(base[:, None, i:j], coefficients[:, None, :], piece)[:, 0]
        return out


def pair_store(
    store: str, batch: int, history: int, numel: int, like: torch.Tensor, folder: Path | None = None
) -> PairStore:
    """A store of `history` pairs per image for B images of `numel` floats like `like` (its device and dtype)."""
    if store == "fp32":
        return DeviceStore(batch, history, numel, like, like.dtype)
    if store == "bf16":
        return DeviceStore(batch, history, numel, like, torch.bfloat16)
    if store == "file":
        return FileStore(batch, history, numel, like, folder)
    raise ValueError(f"unknown history store {store!r}: use one of {', '.join(STORES)}")
