"""The ceiling of retrieval quality on the generated data: the generator's own purchase probabilities.

Usage: python benchmarks/oracle_recall.py [--customers 4000 --articles 1500 --days 120] [--seed 0]

The generated data set draws each purchase from hidden parameters that no model sees (the
customer's segment, product-type tastes and region; each article's popularity, style, price fit,
regional availability and life cycle). Ranking every test customer's articles by the probability
the generator gives them over the test week (already-bought articles removed, as for every model)
is about the best any model can do. Its recall@100, next to last-week popularity's on the same
split, says how much of the gap a model closes (`train_two_tower.py` reports the models):

    {"bench": "oracle_recall", "model": "generator_probabilities" | "popularity_last_week",
     "recall_at_100": .., "map_at_12": .., "ratio_vs_popularity": ..}
"""
from __future__ import annotations

import argparse
import sys
import tempfile
from pathlib import Path

import numpy as np
import pandas as pd

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import emit, json_lines_only  # noqa: E402

import feature_store.sources as sources  # noqa: E402
from feature_store.transforms import customer_history  # noqa: E402
from training import evaluate as ev  # noqa: E402

BENCH = "oracle_recall"
TEST_DAYS = 7
START = "2020-06-01"  # the generator's day 0


def generate_with_sampler(out: Path, seed: int, customers: int, articles: int, days: int):
    """Generate the data set and keep the generator's article sampler (its hidden parameters)."""
    kept = {}
    original = sources._ArticleSampler.__init__

    def keep(self, *args, **kwargs):
        original(self, *args, **kwargs)
        kept["sampler"] = self

    sources._ArticleSampler.__init__ = keep
    try:
        sources.generate(out, seed=seed, customers=customers, articles=articles, days=days, start_date=START)
    finally:
        sources._ArticleSampler.__init__ = original
    return kept["sampler"]


def oracle_lists(sampler, customer_ids: list[str], day_numbers: list[int], bought: dict[str, set[str]],
                 k: int) -> dict[str, list[str]]:
    """Each customer's top k by expected purchases over the days: per day and product type, the
    customer's type share times the article's share of that type's weight, as the generator draws."""
    cat, pop = sampler.cat, sampler.pop
    art_ids = cat.frame["article_id"].to_numpy()
    pos = {a: j for j, a in enumerate(art_ids)}
    row = {c: i for i, c in enumerate(pop.frame["customer_id"])}
    out = {}
    for c in customer_ids:
        i = row[c]
        score = np.zeros(len(art_ids))
        for d in day_numbers:
            w = (sampler.base[pop.segment[i]] * sampler.time[d] * cat.regions[:, pop.region[i]]
                 * (cat.min_age <= pop.age[i]))
            for t, cols in enumerate(sampler.by_type):
                total = w[cols].sum()
                if total > 0:
                    score[cols] += pop.type_pref[i, t] * w[cols] / total
        score[[pos[a] for a in bought.get(c, ()) if a in pos]] = -np.inf
        out[c] = [art_ids[j] for j in np.argsort(-score, kind="stable")[:k]]
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--customers", type=int, default=4000)
    ap.add_argument("--articles", type=int, default=1500)
    ap.add_argument("--days", type=int, default=120)
    ap.add_argument("--seed", type=int, default=0, help="the data set's seed")
    a = ap.parse_args()
    json_lines_only()
    with tempfile.TemporaryDirectory(prefix="rayrec-oracle-") as tmp:
        sampler = generate_with_sampler(Path(tmp), a.seed, a.customers, a.articles, a.days)
        hm = sources.load_hm(Path(tmp))
    train_tx, test_tx, cutoff = ev.time_split(hm.transactions, TEST_DAYS)
    truth = ev.ground_truth(test_tx, 5000, seed=0)  # the customers train_two_tower.py evaluates
    cids = sorted(truth)
    start = pd.Timestamp(START)
    days = [(d - start).days for d in pd.date_range(cutoff, periods=TEST_DAYS)]
    days = [d for d in days if d < sampler.time.shape[0]]
    hist = customer_history(train_tx, hm.articles, cutoff)
    purchased = dict(zip(hist["customer_id"], hist["purchased"], strict=True))
    bought = {c: set(v) for c, v in purchased.items()}
    pop = ev.evaluate_lists(ev.popularity_lists(train_tx, cids, purchased, 100), truth)
    best = ev.evaluate_lists(oracle_lists(sampler, cids, days, bought, 100), truth)
    for model, s in (("generator_probabilities", best), ("popularity_last_week", pop)):
        emit(BENCH, model=model, recall_at_100=s["recall@100"], map_at_12=s["map@12"],
             ratio_vs_popularity=s["recall@100"] / pop["recall@100"], eval_customers=len(truth),
             test_days=TEST_DAYS)


if __name__ == "__main__":
    main()
