"""Business rules that remove candidates, as plain functions (tested without Ray)."""
from __future__ import annotations

from collections.abc import Iterable

from ray_apps.schemas import Candidates


def drop_purchased(cands: Candidates, purchased: Iterable[str]) -> Candidates:
    """Remove articles the customer already bought (read from the online history)."""
    bought = set(purchased)
    keep = [i for i, a in enumerate(cands.article_ids) if a not in bought]
    return Candidates(article_ids=[cands.article_ids[i] for i in keep], scores=[cands.scores[i] for i in keep])
