"""JSON objects with each key once: ``json.loads(text, object_pairs_hook=unique_keys)``.

json.loads keeps the last of a repeated key silently, while another reader may take the first; where a JSON text is a
statement (a request's parameters, a bundle's manifest under its sha256, a certificate under its signature), a key
given twice is refused instead. Shared by the request parser, the bundle loader and the certificate verifier.
"""

from __future__ import annotations


class RepeatedKey(Exception):
    """A JSON object gives a key more than once; ``str(exc)``: the repeated keys (up to 10, sorted, comma-joined)."""


def unique_keys(pairs: list) -> dict:
    """object_pairs_hook: the object as a dict, or :class:`RepeatedKey`. Linear: a text with many keys costs no more
    than parsing it."""
    out = dict(pairs)
    if len(out) != len(pairs):
        seen, repeated = set(), set()
        for key, _ in pairs:
            (repeated if key in seen else seen).add(key)
        raise RepeatedKey(", ".join(sorted(repeated)[:10]))
    return out
