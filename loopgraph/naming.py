"""Every name loopgraph reads or writes in a graph, in one place.

- :func:`lg_name`: the one naming helper; every tensor, node and input loopgraph adds to a graph
  carries the ``loopgraph/`` prefix (no name inside a Loop body may repeat an outer name, and a
  prefix of our own cannot collide with an exporter's names).
- The KV-cache names of an exported decoder (Optimum's and onnxruntime-genai's convention):
  ``past_key_values.{i}.key/.value`` in, ``present.{i}.key/.value`` out.
"""

from __future__ import annotations

NAME_PREFIX = "loopgraph/"

#: inputs holding the cache of earlier steps, and the outputs returning the updated cache
PAST_PREFIX = "past_key_values."
PRESENT_PREFIX = "present."


def lg_name(*parts: str) -> str:
    """``loopgraph/<part>/<part>...``: the name of anything loopgraph adds to a graph."""
    return NAME_PREFIX + "/".join(parts)


def is_lg_name(name: str | bytes) -> bool:
    """True for a name that loopgraph added (tolerates non-UTF-8 names of damaged files)."""
    if isinstance(name, bytes):
        name = name.decode("utf-8", "replace")
    return name.startswith(NAME_PREFIX)


def present_for(past: str) -> str:
    """``past_key_values.3.key`` -> ``present.3.key``."""
    return PRESENT_PREFIX + past[len(PAST_PREFIX):]
