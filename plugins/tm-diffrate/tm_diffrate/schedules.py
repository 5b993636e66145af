"""The kept-token schedules the DiffRate authors published for DeiT (``compression_rate.json`` in
github.com/OpenGVLab/DiffRate), by name.

Each entry is ``(prune, merge)``: per block 0..11, the tokens kept after pruning and after merging,
class token included, for a 12-block ViT with 197 tokens (224 px, patch 16, one class token).
Names are ``deit-{t,s,b}-<GMACs>``; the GMACs are the published targets, which for DeiT-T and
DeiT-S are also the official file's keys. The file lists the DeiT-B schedules under the keys
10.0, 10.4, 11.5 and 12.5; their names here (12.0, 12.4, 13.5, 14.5) are the GMACs they cost by
the repository's own FLOP formula (its README quotes 13.5 for the schedule filed under 11.5).
"""

from __future__ import annotations

from typing import NamedTuple

__all__ = ["Published", "PUBLISHED", "KEEP_ALL", "SCHEDULE_NAMES", "token_counts"]


class Published(NamedTuple):
    """One published schedule: per-block kept counts (class token included) and its origin."""

    prune: tuple[int, ...]
    merge: tuple[int, ...]
    model: str  # the DeiT variant it was searched on
    json_key: str  # its key under the model in the official compression_rate.json


def _counts(text: str) -> tuple[int, ...]:
    return tuple(int(v) for v in text.split(","))


def _entry(model: str, key: str, prune: str, merge: str) -> Published:
    return Published(_counts(prune), _counts(merge), model, key)


PUBLISHED: dict[str, Published] = {
    "deit-t-0.6": _entry(
        "ViT-T-DeiT", "0.6", "197,196,180,157,130,107,86,73,63,51,40,3", "197,187,167,139,114,90,76,66,57,45,37,3"
    ),
    "deit-t-0.7": _entry(
        "ViT-T-DeiT", "0.7", "197,196,194,180,150,123,98,82,68,60,52,3", "197,196,192,158,133,103,88,72,64,58,49,3"
    ),
    "deit-t-0.8": _entry(
        "ViT-T-DeiT", "0.8", "197,197,196,186,166,147,117,103,92,80,74,3", "197,196,190,172,154,125,107,96,84,78,70,3"
    ),
    "deit-t-0.9": _entry(
        "ViT-T-DeiT",
        "0.9",
        "197,197,196,190,182,166,141,125,113,105,99,3",
        "197,196,194,188,172,147,129,115,107,103,96,3",
    ),
    "deit-t-1.0": _entry(
        "ViT-T-DeiT",
        "1.0",
        "197,197,196,194,188,184,178,164,156,137,129,21",
        "197,197,196,190,186,154,148,156,145,135,125,21",
    ),
    "deit-s-2.3": _entry(
        "ViT-S-DeiT", "2.3", "197,192,168,143,121,105,92,74,62,45,33,3", "197,180,156,127,109,98,80,66,52,37,31,3"
    ),
    "deit-s-2.5": _entry(
        "ViT-S-DeiT", "2.5", "197,192,174,156,131,115,111,99,76,50,39,3", "197,186,160,133,119,107,96,82,66,43,37,3"
    ),
    "deit-s-2.7": _entry(
        "ViT-S-DeiT", "2.7", "197,196,182,160,141,127,115,105,88,66,49,3", "197,188,170,147,131,119,109,96,76,54,45,3"
    ),
    "deit-s-2.9": _entry(
        "ViT-S-DeiT", "2.9", "197,196,190,168,150,139,129,117,99,78,58,3", "197,194,176,156,141,133,121,107,88,64,56,3"
    ),
    "deit-s-3.1": _entry(
        "ViT-S-DeiT",
        "3.1",
        "197,197,194,180,160,147,137,129,115,92,76,3",
        "197,196,186,164,150,141,133,121,103,78,68,3",
    ),
    "deit-b-8.7": _entry(
        "ViT-B-DeiT", "8.7", "197,192,172,156,131,107,90,72,56,33,17,3", "197,178,162,141,115,96,78,60,47,21,13,3"
    ),
    "deit-b-12.0": _entry(
        "ViT-B-DeiT",
        "10.0",
        "197,194,182,168,148,129,113,101,82,49,25,3",
        "197,186,174,156,137,117,105,90,66,31,19,3",
    ),
    "deit-b-12.4": _entry(
        "ViT-B-DeiT",
        "10.4",
        "197,196,188,174,156,141,121,103,90,58,25,3",
        "197,190,184,164,145,131,107,94,74,31,21,3",
    ),
    "deit-b-13.5": _entry(
        "ViT-B-DeiT",
        "11.5",
        "197,197,197,188,170,154,139,123,107,72,43,3",
        "197,197,192,178,158,145,127,111,94,50,35,3",
    ),
    "deit-b-14.5": _entry(
        "ViT-B-DeiT",
        "12.5",
        "197,197,196,192,184,170,154,139,129,94,58,3",
        "197,196,194,190,176,160,145,131,115,68,47,3",
    ),
}
"""Published DeiT schedules by name (15 entries: DeiT-T, -S, -B at five targets each)."""

KEEP_ALL = "keep-all"
"""The schedule name that keeps every token in every block (the identity; nothing is re-ordered)."""

SCHEDULE_NAMES: tuple[str, ...] = (KEEP_ALL, *PUBLISHED)


def token_counts(prune: tuple[int, ...], merge: tuple[int, ...], num_tokens: int) -> list[int]:
    """Tokens after each block for an input of ``num_tokens``: the running minimum of the current
    count and both kept counts."""
    out, n = [], num_tokens
    for a, b in zip(prune, merge):
        n = min(n, a, b)
        out.append(n)
    return out
