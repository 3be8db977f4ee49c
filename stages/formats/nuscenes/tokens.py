"""Deterministic nuScenes tokens: the same project exported twice gets the same tokens, so re-exports diff
cleanly and a table row can be found again from its natural key."""
from __future__ import annotations

import hashlib


def make_token(project: str, table: str, *key: object) -> str:
    """32 lowercase hex characters: md5 of ``"<project>|<table>|<key parts joined by |>"``."""
    text = "|".join([project, table, *(str(k) for k in key)])
    return hashlib.md5(text.encode("utf-8")).hexdigest()
