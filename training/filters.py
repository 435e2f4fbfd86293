"""Business rules between retrieval and ranking, as plain composable rules (no Ray, no I/O).

A rule says which feature-group columns it reads (`needs`) and, given the request's customer
rows and one row per candidate article, which candidates to keep. The caller reads each
feature group once for all rules together (one batched query per group) and applies the
rules in order with `apply_rules`, which counts what each rule removed. Serving
(ray_apps/stages), batch recommendations (training/batch.py) and evaluation use the same rules.

Missing data keeps a candidate, except where keeping it could break a promise to the customer:
an article with unknown stock is kept, an article with an age limit is not shown to a customer
whose age is unknown (configurable), and a request-level filter drops what it cannot verify.
"""
from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from common.config import FilterConfig

Row = Mapping[str, Any]
CUSTOMERS, HISTORY, ARTICLES = "customers", "customer_history", "articles"


@dataclass(frozen=True)
class RequestFilters:
    """Filters a request asks for: only these index groups, at most this price (None: any)."""

    index_groups: tuple[str, ...] | None = None
    max_price: float | None = None

    @classmethod
    def from_dict(cls, d: Mapping[str, Any] | None) -> RequestFilters:
        d = dict(d or {})
        groups = d.get("index_groups")
        return cls(tuple(groups) if groups is not None else None, d.get("max_price"))


@dataclass(frozen=True)
class FilterContext:
    """What the rules know about the request: the customer's online rows."""

    customer: Row | None = None
    history: Row | None = None


class Rule:
    """Base of every rule: `name`, `needs` (group -> columns) and `keep`."""

    name: str = "rule"
    needs: Mapping[str, tuple[str, ...]] = {}

    def keep(self, ctx: FilterContext, article_ids: Sequence[str], articles: Sequence[Row | None]) -> list[bool]:
        """One flag per candidate: True keeps it. `articles[i]` is None for an article the
        online store does not know."""
        raise NotImplementedError


def bought_within(history: Row | None, lookback: int | None) -> list[str]:
    """The customer's purchases that count as already bought (most recent first)."""
    purchased = list((history or {}).get("purchased") or [])
    return purchased if lookback is None else purchased[:lookback]


@dataclass(frozen=True)
class AlreadyBought(Rule):
    """Drops articles among the customer's last `lookback` purchases (None: all kept online)."""

    lookback: int | None = None
    name: str = "already_bought"
    needs: Mapping[str, tuple[str, ...]] = field(default_factory=lambda: {HISTORY: ("purchased",)})

    def keep(self, ctx, article_ids, articles):
        bought = set(bought_within(ctx.history, self.lookback))
        return [a not in bought for a in article_ids]


@dataclass(frozen=True)
class SoldOut(Rule):
    """Drops articles whose stock is known and <= 0."""

    name: str = "sold_out"
    needs: Mapping[str, tuple[str, ...]] = field(default_factory=lambda: {ARTICLES: ("stock",)})

    def keep(self, ctx, article_ids, articles):
        return [not _known(s := (a or {}).get("stock")) or s > 0 for a in articles]


@dataclass(frozen=True)
class AgeRestricted(Rule):
    """Drops articles with a minimum age above the customer's age.

    A customer of unknown age counts as a minor when `unknown_is_minor` (the safe default).
    """

    unknown_is_minor: bool = True
    name: str = "age_restricted"
    needs: Mapping[str, tuple[str, ...]] = field(
        default_factory=lambda: {CUSTOMERS: ("age",), ARTICLES: ("min_age",)}
    )

    def keep(self, ctx, article_ids, articles):
        age = (ctx.customer or {}).get("age")
        if not _known(age):
            age = 0.0 if self.unknown_is_minor else math.inf
        return [not ((m := (a or {}).get("min_age")) and m > age) for a in articles]


@dataclass(frozen=True)
class OtherRegion(Rule):
    """Drops articles not sold in the customer's region. An article without availability data
    (regions None) or a customer without a region keeps every article; an empty list means
    the article is sold nowhere."""

    name: str = "not_in_region"
    needs: Mapping[str, tuple[str, ...]] = field(
        default_factory=lambda: {CUSTOMERS: ("region",), ARTICLES: ("regions",)}
    )

    def keep(self, ctx, article_ids, articles):
        region = (ctx.customer or {}).get("region")
        if region is None:
            return [True] * len(article_ids)
        return [(r := (a or {}).get("regions")) is None or region in r for a in articles]


@dataclass(frozen=True)
class IndexGroupIn(Rule):
    """Request filter: only articles of these index groups (unknown group: dropped)."""

    groups: tuple[str, ...] = ()
    name: str = "index_group"
    needs: Mapping[str, tuple[str, ...]] = field(default_factory=lambda: {ARTICLES: ("index_group_name",)})

    def keep(self, ctx, article_ids, articles):
        allowed = set(self.groups)
        return [(a or {}).get("index_group_name") in allowed for a in articles]


@dataclass(frozen=True)
class MaxPrice(Rule):
    """Request filter: only articles at most this price (unknown price: dropped)."""

    max_price: float = math.inf
    name: str = "max_price"
    needs: Mapping[str, tuple[str, ...]] = field(default_factory=lambda: {ARTICLES: ("price",)})

    def keep(self, ctx, article_ids, articles):
        return [_known(p := (a or {}).get("price")) and p <= self.max_price for a in articles]


def _known(v: Any) -> bool:
    return v is not None and not (isinstance(v, float) and math.isnan(v))


def build_rules(cfg: FilterConfig, request: RequestFilters | None = None) -> list[Rule]:
    """The configured business rules, then the request's own filters, in the order applied."""
    rules: list[Rule] = []
    if cfg.drop_bought:
        rules.append(AlreadyBought(cfg.bought_lookback))
    if cfg.drop_sold_out:
        rules.append(SoldOut())
    if cfg.drop_age_restricted:
        rules.append(AgeRestricted(cfg.unknown_age_is_minor))
    if cfg.drop_other_regions:
        rules.append(OtherRegion())
    if request is not None and request.index_groups is not None:
        rules.append(IndexGroupIn(tuple(request.index_groups)))
    if request is not None and request.max_price is not None:
        rules.append(MaxPrice(float(request.max_price)))
    return rules


def columns_needed(rules: Sequence[Rule]) -> dict[str, list[str]]:
    """Feature group -> the columns the rules read, so each group is read once for all rules."""
    out: dict[str, list[str]] = {}
    for rule in rules:
        for group, cols in rule.needs.items():
            out.setdefault(group, [])
            out[group] += [c for c in cols if c not in out[group]]
    return out


@dataclass
class FilterResult:
    """Positions (into the candidate list) that survived, in order, and each rule's removals."""

    kept: list[int]
    removed: dict[str, int]

    @property
    def n_removed(self) -> int:
        return sum(self.removed.values())


def apply_rules(
    rules: Sequence[Rule], ctx: FilterContext, article_ids: Sequence[str], articles: Sequence[Row | None]
) -> FilterResult:
    """Apply the rules in order; each sees only the survivors of the rules before it, so a
    candidate removed by two rules is counted once, by the first."""
    if len(article_ids) != len(articles):
        raise ValueError(f"{len(article_ids)} candidate ids but {len(articles)} article rows")
    kept = list(range(len(article_ids)))
    removed: dict[str, int] = {}
    for rule in rules:
        flags = rule.keep(ctx, [article_ids[i] for i in kept], [articles[i] for i in kept])
        survivors = [i for i, f in zip(kept, flags, strict=True) if f]
        removed[rule.name] = len(kept) - len(survivors)
        kept = survivors
    return FilterResult(kept, removed)


def fetch_size(n_rank: int, n_bought: int, cfg: FilterConfig) -> int:
    """How many candidates to retrieve so that `n_rank` are likely to survive the filters:
    room for the look-back's purchases (which retrieval may return; at most `n_rank` of them
    are counted, so a heavy buyer does not make every request read hundreds of article rows)
    plus an over-fetch margin. When too few survive, `next_fetch` asks for more."""
    return max(1, min(cfg.max_fetch, math.ceil((n_rank + min(n_bought, n_rank)) * cfg.overfetch)))


def next_fetch(n_asked: int, n_returned: int, n_kept: int, k: int, cfg: FilterConfig) -> int | None:
    """After a round with fewer than `k` survivors: how many to retrieve next, or None when
    asking again cannot help (retrieval ran out of articles, or the cap is reached)."""
    if n_kept >= k or n_returned < n_asked or n_asked >= cfg.max_fetch:
        return None
    survival = max(n_kept, 1) / max(n_returned, 1)
    return min(cfg.max_fetch, max(n_asked * 2, math.ceil(1.5 * k / survival)))
