"""Business rules over serving `Candidates`. The rules themselves are plain functions in
`training.filters`, shared with batch recommendations and evaluation (tested without Ray)."""
from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from typing import Any

from ray_apps.schemas import Candidates
from training.filters import FilterContext, Rule, apply_rules


def drop_purchased(cands: Candidates, purchased: Iterable[str]) -> Candidates:
    """Remove articles the customer already bought (read from the online history)."""
    bought = set(purchased)
    keep = [i for i, a in enumerate(cands.article_ids) if a not in bought]
    return Candidates(article_ids=[cands.article_ids[i] for i in keep], scores=[cands.scores[i] for i in keep])


def filter_candidates(
    cands: Candidates,
    rules: Sequence[Rule],
    customer: Mapping[str, Any] | None,
    history: Mapping[str, Any] | None,
    articles: Mapping[str, Mapping[str, Any] | None],
) -> tuple[Candidates, dict[str, int]]:
    """The candidates every rule keeps (order kept) and how many each rule removed."""
    res = apply_rules(rules, FilterContext(customer, history), cands.article_ids,
                      [articles.get(a) for a in cands.article_ids])
    kept = Candidates(article_ids=[cands.article_ids[i] for i in res.kept], scores=[cands.scores[i] for i in res.kept])
    return kept, res.removed
