"""The model layer: VGG weights and trunk, losses, targets, the pixel optimiser and one stylization end to end.

It knows images as tensors and settings as `Settings`; it knows nothing of manifests, rows, workers or ledgers, and
importing this package imports no torch (its light modules, `layout` and `scales`, serve the CLI's light commands).
"""
