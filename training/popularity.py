"""Popular articles for cold start and degraded answers: last-week sales, overall and per age group.

Serving answers an unknown customer (and any customer while the online store is down) from
this list. It is computed from the same training transactions as the served models, so it
never knows more than they do, and stored as a small JSON file named in the manifest.
"""
from __future__ import annotations

import json
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import pandas as pd

from common.artifacts import atomic_write_text
from feature_store.on_demand import age_group

DEFAULT_DAYS = 7
DEFAULT_TOP = 300


def popular_articles(tx: pd.DataFrame, customers: pd.DataFrame, days: int = DEFAULT_DAYS,
                     top: int = DEFAULT_TOP) -> dict[str, Any]:
    """Article ids by sales in the last `days` days of `tx`, filled up to `top` by all-time
    sales, overall; and for each age group of the buyers, the group's last-week sales filled
    up by the overall list (so a small group still gets `top` articles)."""
    if tx.empty:
        return {"as_of": None, "days": days, "overall": [], "by_age_group": {}}
    end = tx["t_dat"].max()
    recent = tx[tx["t_dat"] > end - pd.Timedelta(days=days)]
    overall = _ranked(recent["article_id"], tx["article_id"], top)
    groups = customers.set_index("customer_id")["age"] if "age" in customers.columns else pd.Series(dtype=float)
    buyer_group = pd.Series(age_group(recent["customer_id"].map(groups).to_numpy()), index=recent.index)
    by_group = {}
    for g, part in recent.groupby(buyer_group, dropna=True):
        by_group[str(g)] = _fill(list(part["article_id"].value_counts().index[:top]), overall, top)
    return {"as_of": str(end.date()), "days": days, "overall": overall, "by_age_group": by_group}


def _ranked(primary: pd.Series, fill: pd.Series, top: int) -> list[str]:
    return _fill(list(primary.value_counts().index[:top]), list(fill.value_counts().index), top)


def _fill(first: list[str], more: list[str], top: int) -> list[str]:
    seen = set(first)
    return first + [a for a in more if a not in seen][: max(0, top - len(first))]


def save_popularity(pop: Mapping[str, Any], path: Path) -> Path:
    atomic_write_text(path, json.dumps(pop, indent=1) + "\n")
    return path


def load_popularity(path: Path) -> dict[str, Any]:
    return json.loads(Path(path).read_text())


def popular_for(pop: Mapping[str, Any], group: str | None) -> list[str]:
    """The age group's list when there is one, else the overall list."""
    if group is not None and pop.get("by_age_group", {}).get(group):
        return list(pop["by_age_group"][group])
    return list(pop.get("overall", []))


def is_cold(customer: Mapping[str, Any] | None, history: Mapping[str, Any] | None) -> bool:
    """No profile and no purchases: nothing to personalise on (serving and batch agree)."""
    return customer is None and not (history or {}).get("purchased")


def popular_ranked(pop: Mapping[str, Any], customer: Mapping[str, Any] | None, history: Mapping[str, Any] | None,
                   articles: Mapping[str, Mapping[str, Any] | None], filter_cfg: Any, k: int,
                   request: Any = None) -> dict[str, Any]:
    """The customer's age group's popular articles through the business rules, top `k`, with
    descending scores in (0, 1]. `articles` holds the rows of `popular_ids(...)`."""
    from training.filters import FilterContext, apply_rules, build_rules

    group = _group((customer or {}).get("age"))
    ids = popular_for(pop, group)
    res = apply_rules(build_rules(filter_cfg, request), FilterContext(customer, history), ids,
                      [articles.get(a) for a in ids])
    kept = [ids[i] for i in res.kept][:k]
    n = len(kept)
    return {"items": [{"article_id": a, "score": float(n - i) / n} for i, a in enumerate(kept)],
            "removed": res.removed, "n_candidates": len(ids), "n_after_filter": len(res.kept), "n_ranked": 0,
            "age_group": group}


def popular_ids(pop: Mapping[str, Any], customer: Mapping[str, Any] | None) -> list[str]:
    """The ids `popular_ranked` will read rows for."""
    return popular_for(pop, _group((customer or {}).get("age")))


def _group(age: Any) -> str | None:
    return None if age is None else age_group([age])[0]
