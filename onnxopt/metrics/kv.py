"""KV-cache tensors of decoder language models, recognized by the names exporters give them.

``past_key_values.3.key`` / ``present.3.value`` (transformers/optimum), ``past_key_3``,
``key_cache.3``, ``past.3`` / ``present.3`` (keys and values stacked, older GPT-2 exports):
each is a cache tensor of one layer, holding keys, values, or both.
"""

from __future__ import annotations

import re
from typing import Any, Optional

_KV = re.compile(
    r"^(?P<prefix>past_key_values|present_key_values|past_key_value|present_key|present_value|past_key|past_value"
    r"|key_cache|value_cache|k_cache|v_cache|cache_k|cache_v|kv_cache|present|past|cache)(?P<rest>.*)$", re.I)
_KEY_PREFIX = ("present_key", "past_key", "key_cache", "k_cache", "cache_k")
_VALUE_PREFIX = ("present_value", "past_value", "value_cache", "v_cache", "cache_v")


def kv_role(name: str) -> Optional[tuple[int, str]]:
    """(layer, 'key' | 'value' | 'key+value') for a KV-cache tensor name, else None."""
    match = _KV.match(name)
    if not match:
        return None
    prefix, rest = match.group("prefix").lower(), match.group("rest")
    layer = re.search(r"\d+", rest)
    if layer is None or (rest and rest[0].isalpha()):  # 'pastry_1' is not a cache
        return None
    if prefix in _KEY_PREFIX:
        return int(layer.group()), "key"
    if prefix in _VALUE_PREFIX:
        return int(layer.group()), "value"
    tokens = [t for t in re.split(r"[^a-z]+", rest.lower()) if t]
    if "key" in tokens or "k" in tokens or "keys" in tokens:
        return int(layer.group()), "key"
    if "value" in tokens or "v" in tokens or "values" in tokens:
        return int(layer.group()), "value"
    return int(layer.group()), "key+value"


def pattern(name: str) -> str:
    """The name with its layer index and role generalized: ``past_key_values.{layer}.{key|value}``."""
    role = kv_role(name)
    match = _KV.match(name)
    if role is None or match is None:
        return name
    prefix, rest = match.group("prefix"), match.group("rest")
    if prefix.lower() in _KEY_PREFIX + _VALUE_PREFIX:
        prefix = re.sub(r"(?i)(?<![a-z])(key|value|k|v)(?![a-z])", "{key|value}", prefix, count=1)
    rest = re.sub(r"\d+", "{layer}", rest, count=1)
    rest = re.sub(r"(?i)(?<![a-z])(key|value|keys|values|k|v)(?![a-z])", "{key|value}", rest)
    return prefix + rest


def group(values: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """KV-cache entries of an inspect listing, one group per name pattern: the layers it covers,
    the roles, how many tensors, and the dtype and shape they share (the first one's)."""
    groups: dict[str, dict[str, Any]] = {}
    for v in values:
        role = kv_role(v["name"])
        if role is None:
            continue
        g = groups.setdefault(pattern(v["name"]), {"pattern": pattern(v["name"]), "layers": [], "roles": [],
                                                   "tensors": 0, "dtype": v["dtype"], "shape": v["shape"]})
        g["tensors"] += 1
        if role[0] not in g["layers"]:
            g["layers"].append(role[0])
        if role[1] not in g["roles"]:
            g["roles"].append(role[1])
    for g in groups.values():
        g["layers"].sort()
    return list(groups.values())
