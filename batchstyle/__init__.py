"""batchstyle: batch neural style transfer (Gatys, Ecker & Bethge) over CSV manifests."""

from batchstyle.version import ALGORITHM_VERSION, __version__

__all__ = ["ALGORITHM_VERSION", "__version__"]
