"""meshnode: the trio daemon that keeps ML model weights where a GPU cluster needs them."""

from __future__ import annotations

__version__ = "0.1.0"
__all__ = ["__version__"]
