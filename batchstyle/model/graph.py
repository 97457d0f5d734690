"""What a target graph computes (`GraphSpec`) and whether an export on disk is it, without torch.

A run's parent decides which ONNX graphs its rows need and finds them on disk before any worker starts; with this
module torch-free, a run whose graphs are already exported plans its rows without importing torch (a 200,000-row
manifest planned in a third of the memory, docs/benchmarks.md). `export` builds and validates the graphs, with torch.
"""

from __future__ import annotations

import hashlib
import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from batchstyle.version import ALGORITHM_VERSION, __version__

if TYPE_CHECKING:
    from batchstyle.model.weights import Weights, WeightSource
    from batchstyle.options import Settings

INPUT_NAME = "pixels"
GRAM_NORMALISATION = "G = F F^T / (H W), fp32"


class ExportError(RuntimeError):
    """An export that failed or does not match PyTorch."""


@dataclass(frozen=True)
class GraphSpec:
    """What a target graph computes; two exports with equal specs are interchangeable."""

    model: str
    weights_sha256: str
    content_layers: tuple[str, ...]
    style_layers: tuple[str, ...]
    pooling: str = "max"
    preprocess: str = ""  # the weights' preprocessing name: baked into the graph

    @property
    def output_names(self) -> list[str]:
        return (
            [f"content_{name}" for name in self.content_layers]
            + [f"gram_{name}" for name in self.style_layers]
            + [f"mean_{name}" for name in self.style_layers]
        )

    def filename(self) -> str:
        """Model and layer set in the name, so several exports live side by side in one folder."""
        short = lambda layers: "-".join(name.removeprefix("relu") for name in layers)  # noqa: E731
        model = Path(self.model).stem if os.sep in self.model else self.model
        digest = hashlib.sha256(f"{self.weights_sha256}:{self.preprocess}".encode()).hexdigest()[:8]
        return f"{model}.{digest}.{self.pooling}.c{short(self.content_layers)}.s{short(self.style_layers)}.onnx"

    def metadata(self, weights: Weights, exporter: str) -> dict[str, str]:
        pre = weights.preprocess
        return {
            "batchstyle.version": __version__,
            "batchstyle.algorithm": ALGORITHM_VERSION,
            "batchstyle.model": self.model,
            "batchstyle.weights_sha256": self.weights_sha256,
            "batchstyle.arch": weights.arch,
            "batchstyle.pooling": self.pooling,
            "batchstyle.content_layers": ",".join(self.content_layers),
            "batchstyle.style_layers": ",".join(self.style_layers),
            "batchstyle.gram_normalisation": GRAM_NORMALISATION,
            "batchstyle.preprocessing": json.dumps(
                {"name": pre.name, "mean": pre.mean, "std": pre.std, "bgr": pre.bgr, "scale": pre.scale}
            ),
            "batchstyle.input": f"{INPUT_NAME}: float32 RGB in [0, 1], shape (batch, 3, height, width)",
            "batchstyle.exporter": exporter,
        }


def graph_spec(source: WeightSource, settings: Settings) -> GraphSpec:
    """The graph a stylization under `settings` takes its targets from."""
    return GraphSpec(
        source.name,
        source.sha256,
        settings.content_layers,
        settings.style_layers,
        settings.pooling,
        source.preprocess.name,
    )


def shared_graph(shared: str, spec: GraphSpec) -> str:
    """Where a shared cache (`--cache-dir s3://...`) keeps an exported graph: by the algorithm's version too, which
    the file's name leaves out (a local export that does not match is simply exported again; an object in a shared
    cache is never replaced, so machines of two versions must never meet at one name)."""
    return f"{shared.rstrip('/')}/onnx/{ALGORITHM_VERSION}/{spec.filename()}"


def graph_matches(path: Path, spec: GraphSpec) -> bool:
    """An existing export is reused only if its recorded model, weights and layers are the spec's."""
    import onnx

    if not path.is_file():
        return False
    try:
        model = onnx.load(str(path), load_external_data=False)
    except Exception:  # noqa: BLE001 - an unreadable file is simply not a match; it will be rewritten
        return False
    meta = {p.key: p.value for p in model.metadata_props}
    return (
        meta.get("batchstyle.algorithm") == ALGORITHM_VERSION
        and json.loads(meta.get("batchstyle.preprocessing", "{}")).get("name") == spec.preprocess
        and meta.get("batchstyle.weights_sha256") == spec.weights_sha256
        and meta.get("batchstyle.content_layers") == ",".join(spec.content_layers)
        and meta.get("batchstyle.style_layers") == ",".join(spec.style_layers)
        and meta.get("batchstyle.pooling") == spec.pooling
    )
