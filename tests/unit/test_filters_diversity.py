"""Business rules and diversity re-ranking on hand-made cases (plain functions, no Ray, no DB)."""
import numpy as np
import pytest

from common.config import DiversityConfig, FilterConfig, load_config
from training.diversity import max_per_group, mmr, rerank
from training.filters import (
    AgeRestricted,
    AlreadyBought,
    FilterContext,
    IndexGroupIn,
    MaxPrice,
    OtherRegion,
    RequestFilters,
    SoldOut,
    apply_rules,
    build_rules,
    columns_needed,
    fetch_size,
    next_fetch,
)


def _art(**kw):
    base = {"stock": 5.0, "min_age": 0, "regions": ["north", "south"], "index_group_name": "Ladieswear",
            "price": 0.03, "product_type_name": "Dress"}
    return {**base, **kw}


def _keep(rule, customer=None, history=None, arts=(), ids=None):
    ids = ids or [f"a{i}" for i in range(len(arts))]
    return rule.keep(FilterContext(customer, history), ids, list(arts))


def test_customer_of_17_never_gets_an_age_restricted_article():
    arts = [_art(min_age=18), _art(min_age=0), _art(min_age=None), None]
    assert _keep(AgeRestricted(), {"age": 17.0}, arts=arts) == [False, True, True, True]
    assert _keep(AgeRestricted(), {"age": 18.0}, arts=arts) == [True, True, True, True]


def test_customer_of_unknown_age_counts_as_a_minor_unless_configured():
    arts = [_art(min_age=18), _art()]
    assert _keep(AgeRestricted(), {"age": None}, arts=arts) == [False, True]
    assert _keep(AgeRestricted(), None, arts=arts) == [False, True]  # unknown customer
    assert _keep(AgeRestricted(unknown_is_minor=False), {"age": float("nan")}, arts=arts) == [True, True]


def test_sold_out_article_never_appears_and_unknown_stock_is_kept():
    arts = [_art(stock=0.0), _art(stock=-1.0), _art(stock=3.0), _art(stock=None), _art(stock=float("nan")), None]
    assert _keep(SoldOut(), arts=arts) == [False, False, True, True, True, True]


def test_bought_article_never_reappears_within_the_lookback():
    history = {"purchased": ["a0", "a1", "a2"]}  # most recent first
    arts = [_art()] * 4
    assert _keep(AlreadyBought(), history=history, arts=arts) == [False, False, False, True]
    assert _keep(AlreadyBought(lookback=2), history=history, arts=arts) == [False, False, True, True]
    assert _keep(AlreadyBought(), history=None, arts=arts) == [True] * 4


def test_article_not_sold_in_the_customers_region_is_dropped():
    arts = [_art(regions=["south"]), _art(regions=["north"]), _art(regions=None), _art(regions=[]), None]
    assert _keep(OtherRegion(), {"region": "north"}, arts=arts) == [False, True, True, False, True]
    assert _keep(OtherRegion(), {"region": None}, arts=arts) == [True] * 5


def test_request_filters_drop_what_they_cannot_verify():
    arts = [_art(index_group_name="Menswear", price=0.01), _art(price=0.05), _art(index_group_name=None, price=None)]
    assert _keep(IndexGroupIn(("Menswear", "Sport")), arts=arts) == [True, False, False]
    assert _keep(MaxPrice(0.03), arts=arts) == [True, False, False]


def test_each_rule_reports_what_it_removed_counted_once_by_the_first():
    rules = build_rules(FilterConfig(), RequestFilters(max_price=0.04))
    assert [r.name for r in rules] == ["already_bought", "sold_out", "age_restricted", "not_in_region", "max_price"]
    ids = ["bought", "soldout", "adult", "south", "pricey", "ok", "bought_and_soldout"]
    arts = [_art(), _art(stock=0.0), _art(min_age=18), _art(regions=["south"]), _art(price=0.09), _art(),
            _art(stock=0.0)]
    ctx = FilterContext({"age": 17.0, "region": "north"}, {"purchased": ["bought", "bought_and_soldout"]})
    res = apply_rules(rules, ctx, ids, arts)
    assert [ids[i] for i in res.kept] == ["ok"]
    assert res.removed == {"already_bought": 2, "sold_out": 1, "age_restricted": 1, "not_in_region": 1,
                           "max_price": 1}
    assert res.n_removed == 6
    with pytest.raises(ValueError, match="2 candidate ids but 1 article rows"):
        apply_rules(rules, ctx, ["a", "b"], [None])


def test_rules_follow_the_config_and_say_what_they_read():
    rules = build_rules(FilterConfig(drop_sold_out=False, drop_other_regions=False, bought_lookback=5),
                        RequestFilters(index_groups=("Sport",)))
    assert [r.name for r in rules] == ["already_bought", "age_restricted", "index_group"]
    assert rules[0].lookback == 5
    assert columns_needed(rules) == {"customer_history": ["purchased"], "customers": ["age"],
                                     "articles": ["min_age", "index_group_name"]}
    assert RequestFilters.from_dict({"index_groups": ["A"], "max_price": 1.0}) == RequestFilters(("A",), 1.0)
    assert RequestFilters.from_dict(None) == RequestFilters()


def test_filter_config_is_strict_and_reachable_from_the_root():
    cfg = load_config(None, {"filters": {"bought_lookback": 10, "overfetch": 2.0}})
    assert cfg.filters.bought_lookback == 10
    with pytest.raises(ValueError, match="filters.overfetc"):
        load_config(None, {"filters": {"overfetc": 2.0}})


def test_retrieval_over_fetches_and_retries_only_when_it_can_help():
    cfg = FilterConfig(overfetch=1.5, max_fetch=1000)
    assert fetch_size(100, 20, cfg) == 180
    assert fetch_size(100, 450, cfg) == 300  # a heavy buyer counts as n_rank purchases
    assert fetch_size(900, 100, cfg) == 1000  # capped
    assert next_fetch(180, 180, 50, 12, cfg) is None  # enough survived
    assert next_fetch(180, 120, 5, 12, cfg) is None  # retrieval ran out of articles
    assert next_fetch(1000, 1000, 5, 12, cfg) is None  # at the cap
    n = next_fetch(180, 180, 5, 12, cfg)
    assert 360 <= n <= 1000


def test_max_per_group_caps_each_type_and_fills_the_tail_when_short():
    groups = ["a", "a", "a", "b", "a", "c"]
    assert max_per_group(range(6), groups, 2, 4) == [0, 1, 3, 5]
    assert max_per_group(range(6), groups, 1, 5) == [0, 3, 5, 1, 2]  # overflow only to reach k
    with pytest.raises(ValueError, match="max_per must be >= 1"):
        max_per_group(range(6), groups, 0, 3)


def test_mmr_prefers_a_dissimilar_item_over_a_near_duplicate():
    vecs = np.array([[1, 0], [1, 0], [0, 1]], dtype=np.float32)  # item 1 duplicates item 0
    scores = np.array([1.0, 0.9, 0.8])
    assert mmr([0, 1, 2], scores, vecs, 2, lam=0.5) == [0, 2]
    assert mmr([0, 1, 2], scores, vecs, 2, lam=1.0) == [0, 1]  # relevance only


def test_rerank_by_configured_rule():
    scores = np.array([0.1, 0.9, 0.8, 0.7])
    types = ["x", "y", "y", "y"]
    assert rerank(DiversityConfig(rule="none"), scores, 3) == [1, 2, 3]
    assert rerank(DiversityConfig(rule="max_per_type", max_per_type=1), scores, 2, groups=types) == [1, 0]
    with pytest.raises(ValueError, match="needs the candidates' item vectors"):
        rerank(DiversityConfig(rule="mmr"), scores, 2)
