"""batchstyle: batch neural style transfer (Gatys, Ecker & Bethge) over CSV manifests.

    from batchstyle import StyleTransfer, run_manifest
    image = StyleTransfer(model="vgg16-hed", device="cpu").stylize("photo.jpg", ["starry.jpg"], size=512)
    summary = run_manifest("night.csv", out="night-out", devices="all", size=768)

The facade is imported on first use, so `import batchstyle` (and the CLI's light commands) do not load torch.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from batchstyle.version import ALGORITHM_VERSION, __version__

if TYPE_CHECKING:
    from batchstyle.api import StyleTransfer, run_manifest

__all__ = ["ALGORITHM_VERSION", "StyleTransfer", "__version__", "run_manifest"]


def __getattr__(name: str) -> Any:
    if name in ("StyleTransfer", "run_manifest"):
        from batchstyle import api

        return getattr(api, name)
    raise AttributeError(f"module 'batchstyle' has no attribute {name!r}")
