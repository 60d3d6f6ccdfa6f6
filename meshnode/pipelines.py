"""A pipeline document from the outside: bytes -> a loaded mapping, bounded.

YAML or JSON, at most ``DOC_BYTES_MAX`` bytes of UTF-8.  YAML anchors and
aliases are refused before anything is built (an alias bomb is a few lines
that expand to billions of nodes), and so is a document of more than
``EVENTS_MAX`` YAML events or nested deeper than ``DEPTH_MAX``: each is a
``MeshError`` (4xx) within milliseconds, and nothing runs.  What the mapping
means is ``protocol.pipeline``'s business.
"""

from __future__ import annotations

import json
from typing import Any

import yaml

from .errors import MeshError

__all__ = ["DOC_BYTES_MAX", "load_document"]

DOC_BYTES_MAX = 256 * 1024
EVENTS_MAX = 50_000
DEPTH_MAX = 16

_Loader: Any = getattr(yaml, "CSafeLoader", yaml.SafeLoader)


def _check_events(text: str) -> None:
    depth = 0
    try:
        for n, ev in enumerate(yaml.parse(text, Loader=_Loader)):
            if n >= EVENTS_MAX:
                raise MeshError("INVALID_PIPELINE", f"the document is over {EVENTS_MAX} YAML nodes")
            if isinstance(ev, yaml.AliasEvent) or getattr(ev, "anchor", None) is not None:
                raise MeshError("INVALID_PIPELINE", "YAML anchors and aliases (&, *) are not accepted in a pipeline")
            if isinstance(ev, (yaml.MappingStartEvent, yaml.SequenceStartEvent)):
                depth += 1
                if depth > DEPTH_MAX:
                    raise MeshError("INVALID_PIPELINE", f"the document nests deeper than {DEPTH_MAX} levels")
            elif isinstance(ev, (yaml.MappingEndEvent, yaml.SequenceEndEvent)):
                depth -= 1
    except (yaml.YAMLError, ValueError, RecursionError) as e:  # ValueError: an integer of 5,000 digits
        raise MeshError("INVALID_PIPELINE", f"not valid YAML: {str(e)[:300]}") from None


def load_document(data: bytes, *, yaml_ok: bool = True) -> Any:
    """The document ``data`` holds (JSON, or YAML when ``yaml_ok``)."""
    if len(data) > DOC_BYTES_MAX:
        raise MeshError("TOO_LARGE", f"a pipeline is at most {DOC_BYTES_MAX} bytes; this one is {len(data)}")
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as e:
        raise MeshError("INVALID_PIPELINE", f"the document is not UTF-8 (byte {e.start})") from None
    if not text.strip():
        raise MeshError("INVALID_PIPELINE", "the document is empty")
    if not yaml_ok:
        try:
            return json.loads(text)
        except (ValueError, RecursionError) as e:
            raise MeshError("INVALID_JSON", f"not valid JSON: {str(e)[:200]}") from None
    _check_events(text)
    try:
        return yaml.load(text, Loader=_Loader)
    except (yaml.YAMLError, ValueError, RecursionError) as e:  # ValueError: an integer of 5,000 digits
        raise MeshError("INVALID_PIPELINE", f"not valid YAML: {str(e)[:300]}") from None
