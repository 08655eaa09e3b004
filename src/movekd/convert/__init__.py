"""Convert checkpoints of other code bases into movekd bundles (``movekd import-official``)."""

from movekd.convert.official import import_official

__all__ = ["import_official"]
