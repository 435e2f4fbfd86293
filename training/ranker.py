"""The CatBoost ranker: training data, fit, export, and the filter -> rank -> diversify stage.

Training data (`build_ranking_data`): for weekly cut-offs T in the training window and the
customers who bought in [T, T + label_days), the retrieval model's top-N candidates as of T
(hard negatives: the ones the ranker must tell apart at serving time) labelled 1 when bought in
that week. Features come from the feature groups computed as of T (the same transforms that
fill the online store), converted to online-style rows and vectorised by
`training.ranking_features.vectorise`, the function serving calls on online rows. Groups are
(customer, cut-off).

Model: `CatBoostRanker` (YetiRank by default) with CatBoost's native categorical features. A
`CatBoostClassifier` on random negatives (what the Hopsworks demo does) is trained on the same
features as a baseline for metrics.json.

`RankingStage` is the per-request pipeline shared by serving, batch recommendations and
evaluation: business rules (`training.filters`) -> vectorise -> model -> diversity re-rank.
"""
from __future__ import annotations

import datetime as dt
import json
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from common.config import FilterConfig, RankerConfig
from training.diversity import rerank
from training.filters import FilterContext, RequestFilters, apply_rules, build_rules, columns_needed
from training.ranking_features import (
    HM_FEATURES,
    FeatureBlock,
    RankerFeatures,
    history_article_ids,
    offline_rows,
    ranker_features,
    recent_types,
    vectorise,
)

Row = Mapping[str, Any]
FEATURE_FORMAT = 4  # bump when FEATURES or their meaning change; checked when a model is loaded
# retrieve(customer_ids, history_frame, as_of) -> (candidate ids per customer, scores per customer)
RetrieveFn = Callable[[list[str], pd.DataFrame, pd.Timestamp], tuple[list[list[str]], list[np.ndarray]]]


# ---------------------------------------------------------------------------------------------
# Model wrapper


class RankerModel:
    """A fitted CatBoost model plus the feature contract it was trained with.

    `kind` is "ranker" (CatBoostRanker) or "classifier" (CatBoostClassifier); both score
    candidates with their raw formula value (higher is better).
    """

    def __init__(self, model: Any, kind: str, info: dict[str, Any] | None = None,
                 spec: RankerFeatures | None = None):
        if kind not in ("ranker", "classifier"):
            raise ValueError(f"kind must be 'ranker' or 'classifier', got {kind!r}")
        self.model = model
        self.kind = kind
        self.info = dict(info or {})
        self.spec = spec or HM_FEATURES
        self._scorer: Any = None  # `model` without its training parameters, built on first predict

    def predict(self, block: FeatureBlock, thread_count: int = 1) -> np.ndarray:
        """Scores for the rows of `block` (higher is better)."""
        if len(block) == 0:
            return np.zeros(0)
        from catboost import CatBoost, FeaturesData, Pool

        # A Pool built here from FeaturesData (numeric then categorical: the spec's order, which
        # is the model's) without feature names: predict() on bare FeaturesData, or with names,
        # costs 3-4x more (2.3 ms vs 0.6 ms for 200 x 23 here), and this runs once per request.
        # The Pool gets the same thread_count: by default it builds on every core, and the TBB
        # worker that this wakes then spins (sched_yield) between requests: on this 2-core VM a
        # request-paced predict cost 2.35-2.64 ms of CPU that way against 1.24-1.72 ms with one
        # thread (benchmarks/rank.py, "case": "paced_predict").
        # The numeric block goes in column-major: catboost stores features by column, and from
        # a row-major block its Pool cost 2.5x more to build (180 x 20 here: 186 vs 45 us;
        # benchmarks/rank.py, "case": "paced_predict", `ratio_vs_row_major`). From column-major
        # data the Pool keeps the arrays instead of copying them and marks them read-only:
        # it gets copies, so that the caller's block stays writable.
        data = Pool(FeaturesData(num_feature_data=np.array(block.num, order="F"), cat_feature_data=block.cat.copy()),
                    thread_count=thread_count)
        # The base class's predict takes prediction_type for rankers and classifiers alike.
        return np.asarray(CatBoost.predict(self._scoring_model(), data, prediction_type="RawFormulaVal",
                                           thread_count=thread_count))

    def _scoring_model(self) -> Any:
        """A copy of the model without the training parameters in its metadata ("params").

        CatBoost 1.2 parses that JSON document (4.5 kB here) on every predict call, to look up
        the loss function: paced like serving, a 154-row call cost 1.21-1.44 ms of CPU with it and
        0.97-0.99 ms without (benchmarks/rank.py, "case": "paced_predict"). Raw formula values do
        not depend on it (a unit test checks that the scores are equal); `model` keeps it for
        saving and for feature importance."""
        if self._scorer is None:
            scorer = self.model.copy()
            meta = scorer.get_metadata()
            if "params" in meta:
                del meta["params"]
            self._scorer = scorer
        return self._scorer

    def importance(self) -> dict[str, float]:
        """PredictionValuesChange importance per feature, largest first."""
        values = self.model.get_feature_importance(type="PredictionValuesChange")
        names = self.model.feature_names_
        return dict(sorted(zip(names, (float(v) for v in values), strict=True), key=lambda kv: -kv[1]))

    def save(self, path: Path) -> Path:
        """One .cbm file; the feature contract travels in the model's metadata."""
        path.parent.mkdir(parents=True, exist_ok=True)
        meta = self.model.get_metadata()
        meta["rayrec"] = json.dumps({"kind": self.kind, "feature_format": FEATURE_FORMAT,
                                     "features": self.spec.names, "spec": self.spec.to_dict(), **self.info})
        self.model.save_model(str(path))
        return path

    @classmethod
    def load(cls, path: Path) -> RankerModel:
        from catboost import CatBoost

        if not Path(path).is_file():
            raise FileNotFoundError(f"no ranker model at {path}")
        model = CatBoost()
        model.load_model(str(path))
        raw = model.get_metadata().get("rayrec")
        info = json.loads(raw) if raw else {}
        spec = RankerFeatures.from_dict(info.pop("spec")) if "spec" in info else HM_FEATURES
        if info.get("feature_format") != FEATURE_FORMAT or info.get("features") != spec.names:
            raise ValueError(f"{path}: ranker was trained with feature format {info.get('feature_format')!r}, "
                             f"this code builds format {FEATURE_FORMAT}: retrain with `rayrec pipeline`")
        return cls(model, info.pop("kind"), info, spec)


@dataclass
class TrainedRankers:
    """What `rayrec pipeline` trains: the served ranker and the baseline classifier (metrics only)."""

    ranker: RankerModel
    classifier: RankerModel | None = None


def save_ranker(model: RankerModel | TrainedRankers, path: Path) -> Path:
    """Save the served ranker (of a `TrainedRankers`, its `ranker`)."""
    return (model.ranker if isinstance(model, TrainedRankers) else model).save(path)


def load_ranker(path: Path) -> RankerModel:
    return RankerModel.load(path)


# ---------------------------------------------------------------------------------------------
# The per-request stage: filter -> vectorise -> rank -> diversify


@dataclass
class Ranked:
    """A ranked list and what happened on the way."""

    article_ids: list[str]
    scores: list[float]
    removed: dict[str, int] = field(default_factory=dict)  # rule -> candidates it removed
    n_candidates: int = 0  # retrieved
    n_after_filter: int = 0
    n_ranked: int = 0  # scored by the model (at most the stage's n_rank)
    candidates: list[tuple[str, float]] = field(default_factory=list)  # every scored candidate, retrieval order


@dataclass
class Prepared:
    """Filtered candidates (retrieval order) with their feature rows, before the model."""

    ids: list[str]
    rows: list[Row | None]
    block: FeatureBlock
    stats: Ranked


class RankingStage:
    """Business rules, features, model and diversity for one customer's candidates.

    Plain Python: serving, batch recommendations and evaluation call `run` with rows read
    from the online store (or built offline the same way). The caller reads the articles
    group once per request for `article_keys(...)` with `article_columns(...)` and passes
    the rows by id; the customer's rows are those the query encoder read.
    """

    def __init__(
        self,
        model: RankerModel,
        ranker_cfg: RankerConfig,
        filter_cfg: FilterConfig,
        n_rank: int,
        item_vectors: Mapping[str, np.ndarray] | None = None,
    ):
        if ranker_cfg.diversity.rule == "mmr" and item_vectors is None:
            raise ValueError("diversity rule 'mmr' needs item vectors")
        self.model = model
        self.spec: RankerFeatures = getattr(model, "spec", HM_FEATURES)  # the contract the model was fit on
        self.cfg = ranker_cfg
        self.filters = filter_cfg
        self.n_rank = n_rank
        self.item_vectors = item_vectors
        self.window = ranker_cfg.type_recency_window

    def rules(self, request: RequestFilters | None = None):
        return build_rules(self.filters, request)

    def article_columns(self, request: RequestFilters | None = None) -> list[str]:
        """Columns of the articles group that the rules and the features read (one query)."""
        needed = columns_needed(self.rules(request)).get("articles", [])
        return list(dict.fromkeys([*self.spec.article_columns(), *needed]))

    def article_keys(self, candidate_ids: Sequence[str], history: Row | None) -> list[str]:
        """Articles to read: the candidates plus the recent purchases `purchases_since_type` needs."""
        return list(dict.fromkeys([*candidate_ids, *history_article_ids(history, self.window)]))

    def run(
        self,
        customer: Row | None,
        history: Row | None,
        candidate_ids: Sequence[str],
        candidate_scores: Sequence[float],
        articles: Mapping[str, Row | None],
        *,
        channel: int,
        now: dt.date,
        k: int,
        request: RequestFilters | None = None,
    ) -> Ranked:
        """The top `k` after filtering, ranking the first `n_rank` survivors in retrieval order."""
        prep = self.prepare(customer, history, candidate_ids, candidate_scores, articles, channel=channel, now=now,
                            request=request)
        return self.finish(prep, self.model.predict(prep.block), k)

    def prepare(
        self,
        customer: Row | None,
        history: Row | None,
        candidate_ids: Sequence[str],
        candidate_scores: Sequence[float],
        articles: Mapping[str, Row | None],
        *,
        channel: int,
        now: dt.date,
        request: RequestFilters | None = None,
    ) -> Prepared:
        """Filter, then vectorise the first `n_rank` survivors (the model is not called)."""
        arts = [articles.get(a) for a in candidate_ids]
        result = apply_rules(self.rules(request), FilterContext(customer, history), candidate_ids, arts)
        kept = result.kept[: self.n_rank]
        ids = [candidate_ids[i] for i in kept]
        rows = [arts[i] for i in kept]
        spec = self.spec
        block = vectorise(customer, history, rows, [float(candidate_scores[i]) for i in kept], article_ids=ids,
                          channel=channel, now=now,
                          recent=recent_types(history, articles, self.window, spec.type_column),
                          window=self.window, spec=spec)
        stats = Ranked([], [], result.removed, len(candidate_ids), len(result.kept), len(kept))
        return Prepared(ids, rows, block, stats)

    def finish(self, prep: Prepared, scores: np.ndarray, k: int) -> Ranked:
        """The final top `k` of prepared candidates, given their model scores."""
        out = prep.stats
        if prep.ids:
            order = self.final_order(prep.ids, prep.rows, scores, k)
            out.article_ids = [prep.ids[i] for i in order]
            out.scores = [float(scores[i]) for i in order]
            # 5 decimals: for the prediction log's lines (a float's full repr is up to 18 characters)
            out.candidates = list(zip(prep.ids, np.round(scores, 5).tolist(), strict=True))
        return out

    def final_order(self, ids: Sequence[str], rows: Sequence[Row | None], scores: np.ndarray, k: int) -> list[int]:
        """Positions of the final top k: the configured diversity rule over the model scores."""
        col = self.spec.type_column
        types = [(r or {}).get(col) for r in rows] if col else list(range(len(rows)))  # none: no grouping
        vecs = None
        if self.cfg.diversity.rule == "mmr":
            dim = len(next(iter(self.item_vectors.values())))
            zero = np.zeros(dim, np.float32)
            vecs = np.stack([self.item_vectors.get(a, zero) for a in ids])
        return rerank(self.cfg.diversity, scores, k, groups=types, vectors=vecs)


# ---------------------------------------------------------------------------------------------
# Training data


@dataclass
class RankingData:
    """Feature rows with labels; `group` numbers (customer, cut-off) groups, rows contiguous."""

    block: FeatureBlock
    labels: np.ndarray
    group: np.ndarray
    customer_ids: list[str]
    stats: dict[str, Any]
    spec: RankerFeatures = HM_FEATURES


@dataclass
class AsOf:
    """Feature group rows as of one time (offline, converted like the online rows)."""

    as_of: pd.Timestamp
    customers: dict[str, dict[str, Any]]
    history: dict[str, dict[str, Any]]
    articles: dict[str, dict[str, Any]]
    history_frame: pd.DataFrame  # the customer_history rows of the customers asked for


def rows_as_of(raw_articles: pd.DataFrame, tx: pd.DataFrame, customers_fg: pd.DataFrame,
               extras: dict[str, pd.DataFrame] | None, as_of: pd.Timestamp | None,
               customer_ids: Sequence[str], roles: Any = None) -> AsOf:
    """The customers, customer_history and articles groups as of `as_of` (transactions before
    it), for `customer_ids`: what the online store held at that time. `roles`: the dataset's.

    The history (`history_frame` too) is computed for `customer_ids` alone: a customer's history
    depends on their own purchases only, and the per-customer pass over every customer cost the
    demo's ranker data 4.5-5.8 s per cut-off instead of 1.4 s (1,000 of 3,882 customers)."""
    from feature_store.transforms import article_features, customer_history

    hist = customer_history(tx[tx["customer_id"].isin(customer_ids)], raw_articles, as_of, roles=roles)
    arts = article_features(raw_articles, tx, as_of, extras, roles=roles)
    when = as_of if as_of is not None else tx["t_dat"].max() + pd.Timedelta(days=1)
    return AsOf(when, offline_rows("customers", customers_fg, customer_ids, roles),
                offline_rows("customer_history", hist, customer_ids, roles), offline_rows("articles", arts, None, roles),
                hist)


def training_cutoffs(tx: pd.DataFrame, n_cutoffs: int, label_days: int) -> list[pd.Timestamp]:
    """Weekly cut-offs ending the training window: the last label window is its last `label_days`."""
    end = tx["t_dat"].max().normalize() + pd.Timedelta(days=1)
    return [end - pd.Timedelta(days=label_days * (i + 1)) for i in range(n_cutoffs)]


def build_ranking_data(
    raw_articles: pd.DataFrame,
    tx: pd.DataFrame,
    customers_fg: pd.DataFrame,
    extras: dict[str, pd.DataFrame] | None,
    retrieve: RetrieveFn,
    cfg: RankerConfig,
    channel: Mapping[str, int],
    label_days: int = 7,
    progress: bool = True,
    roles: Any = None,
) -> RankingData:
    """Hard-negative ranking data over `cfg.n_cutoffs` weekly cut-offs (see the module doc).

    Each group keeps its positives and up to `cfg.train_negatives` negatives drawn at random
    from its candidates (all ranks alike); groups without a positive teach a ranker nothing
    and are dropped. Customers are sampled per cut-off up to `max_train_customers / n_cutoffs`.
    """
    from training.evaluate import ground_truth

    rng = np.random.default_rng(cfg.seed)
    spec = ranker_features(roles)
    per_cut = max(1, cfg.max_train_customers // cfg.n_cutoffs)
    blocks, labels, groups, owners = [], [], [], []
    stats: dict[str, Any] = {"cutoffs": [], "groups": 0, "rows": 0, "positives": 0, "groups_without_positive": 0}
    for ci, cut in enumerate(training_cutoffs(tx, cfg.n_cutoffs, label_days)):
        before = tx[tx["t_dat"] < cut]
        window = tx[(tx["t_dat"] >= cut) & (tx["t_dat"] < cut + pd.Timedelta(days=label_days))]
        if before.empty or window.empty:
            continue
        truth = ground_truth(window, per_cut, seed=cfg.seed + ci)
        cids = sorted(truth)
        state = rows_as_of(raw_articles, before, customers_fg, extras, cut, cids, roles)
        cands, scores = retrieve(cids, state.history_frame, cut)
        n_groups_before = stats["groups"]
        for cid, ids, sc in zip(cids, cands, scores, strict=True):
            y = np.array([a in truth[cid] for a in ids], dtype=np.int64)
            if not y.any():
                stats["groups_without_positive"] += 1
                continue
            keep = _sample_negatives(y, cfg.train_negatives, rng)
            block = vectorise(state.customers.get(cid), state.history.get(cid), [state.articles.get(a) for a in ids],
                              sc, article_ids=ids, channel=channel.get(cid, 1), now=cut.date(),
                              recent=recent_types(state.history.get(cid), state.articles, cfg.type_recency_window,
                                                  spec.type_column),
                              window=cfg.type_recency_window, spec=spec)
            blocks.append(block.take(keep))
            labels.append(y[keep])
            groups.append(np.full(len(keep), stats["groups"], dtype=np.int64))
            owners += [cid] * len(keep)
            stats["groups"] += 1
            stats["positives"] += int(y.sum())
        stats["cutoffs"].append({"as_of": str(cut.date()), "customers": len(cids),
                                 "groups": stats["groups"] - n_groups_before})
        if progress:
            print(f"[ranker] cut-off {cut.date()}: {len(cids)} customers, "
                  f"{stats['groups'] - n_groups_before} groups with a positive", flush=True)
    if not blocks:
        raise ValueError("ranker training data has no positive labels: the retrieval candidates never hit")
    data = RankingData(FeatureBlock.concat(blocks), np.concatenate(labels), np.concatenate(groups), owners, stats,
                       spec)
    stats["rows"] = len(data.labels)
    return data


def _sample_negatives(y: np.ndarray, n_neg: int, rng: np.random.Generator) -> np.ndarray:
    """Positions to keep: every positive and up to `n_neg` random negatives, in list order."""
    neg = np.flatnonzero(y == 0)
    if len(neg) > n_neg:
        neg = rng.choice(neg, size=n_neg, replace=False)
    return np.sort(np.concatenate([np.flatnonzero(y == 1), neg]))


def _pool(block: FeatureBlock, spec: RankerFeatures, labels: np.ndarray | None = None,
          group: np.ndarray | None = None):
    from catboost import FeaturesData, Pool

    data = FeaturesData(num_feature_data=block.num, cat_feature_data=block.cat,
                        num_feature_names=list(spec.numeric), cat_feature_names=list(spec.categorical))
    return Pool(data=data, label=labels, group_id=group)


def fit_ranker(data: RankingData, cfg: RankerConfig, progress: bool = True,
               train_dir: Path | None = None) -> RankerModel:
    """Fit a CatBoostRanker (cfg.loss_function, YetiRank by default) grouped per (customer, cut-off)."""
    from catboost import CatBoostRanker

    if not data.labels.any():
        raise ValueError("ranker training data has no positive labels: the retrieval candidates never hit")
    model = CatBoostRanker(loss_function=cfg.loss_function, iterations=cfg.iterations, depth=cfg.depth,
                           learning_rate=cfg.learning_rate, random_seed=cfg.seed, thread_count=2,
                           one_hot_max_size=cfg.one_hot_max_size,
                           verbose=max(1, cfg.iterations // 5) if progress else False,
                           **_train_dir_args(train_dir))
    t0 = time.time()
    model.fit(_pool(data.block, data.spec, data.labels, data.group))
    info = {"loss_function": cfg.loss_function, "fit_s": round(time.time() - t0, 1), **data.stats}
    if progress:
        print(f"[ranker] fit on {data.stats['groups']} groups x {len(data.labels)} rows in {info['fit_s']}s",
              flush=True)
    return RankerModel(model, "ranker", info, data.spec)


def fit_classifier(data: RankingData, cfg: RankerConfig, progress: bool = True) -> RankerModel:
    """The Hopsworks demo's ranking model: CatBoostClassifier (Logloss) on positives and random negatives."""
    from catboost import CatBoostClassifier

    if not data.labels.any() or data.labels.all():
        raise ValueError("classifier training data needs both positive and negative rows")
    model = CatBoostClassifier(loss_function="Logloss", iterations=cfg.iterations, depth=cfg.depth,
                               learning_rate=cfg.learning_rate, random_seed=cfg.seed, thread_count=2,
                               one_hot_max_size=cfg.one_hot_max_size,
                               verbose=False, allow_writing_files=False)
    t0 = time.time()
    model.fit(_pool(data.block, data.spec, data.labels))
    info = {"fit_s": round(time.time() - t0, 1), **data.stats}
    if progress:
        print(f"[ranker] classifier fit on {len(data.labels)} rows in {info['fit_s']}s", flush=True)
    return RankerModel(model, "classifier", info, data.spec)


def _train_dir_args(train_dir: Path | None) -> dict[str, Any]:
    if train_dir is None:
        return {"allow_writing_files": False}
    train_dir.mkdir(parents=True, exist_ok=True)
    return {"allow_writing_files": True, "train_dir": str(train_dir)}


def build_classifier_data(
    raw_articles: pd.DataFrame,
    tx: pd.DataFrame,
    customers_fg: pd.DataFrame,
    extras: dict[str, pd.DataFrame] | None,
    score_all: Callable[[list[str], pd.DataFrame, pd.Timestamp], tuple[np.ndarray, list[str], list[set[str]]]],
    cfg: RankerConfig,
    channel: Mapping[str, int],
    label_days: int = 7,
    roles: Any = None,
) -> RankingData:
    """Positives = purchases of the label week; negatives = `classifier_negatives` random
    catalogue articles per positive (not bought that week). Same cut-offs and features as the
    ranker; retrieval score and rank are those of each article in the customer's full
    retrieval ranking (already-bought articles excluded), so every row has them.

    `score_all(customer_ids, history_frame, as_of)` returns the (customers x items) retrieval
    scores, the item ids, and each customer's excluded (already bought) articles.
    """
    from training.evaluate import ground_truth

    rng = np.random.default_rng(cfg.seed + 1)
    spec = ranker_features(roles)
    per_cut = max(1, cfg.max_train_customers // cfg.n_cutoffs)
    blocks, labels, owners = [], [], []
    stats: dict[str, Any] = {"rows": 0, "positives": 0}
    for ci, cut in enumerate(training_cutoffs(tx, cfg.n_cutoffs, label_days)):
        before = tx[tx["t_dat"] < cut]
        window = tx[(tx["t_dat"] >= cut) & (tx["t_dat"] < cut + pd.Timedelta(days=label_days))]
        if before.empty or window.empty:
            continue
        truth = ground_truth(window, per_cut, seed=cfg.seed + ci)
        cids = sorted(truth)
        state = rows_as_of(raw_articles, before, customers_fg, extras, cut, cids, roles)
        scores, item_ids, excluded = score_all(cids, state.history_frame, cut)
        pos_of = {a: j for j, a in enumerate(item_ids)}
        for r, cid in enumerate(cids):
            s = scores[r].astype(np.float64).copy()
            ex = [pos_of[a] for a in excluded[r] if a in pos_of]
            s[ex] = -np.inf
            order = np.argsort(-s, kind="stable")
            rank = np.empty(len(s), dtype=np.int64)
            rank[order] = np.arange(len(s))
            positives = [pos_of[a] for a in truth[cid] if a in pos_of and np.isfinite(s[pos_of[a]])]
            if not positives:
                continue
            allowed = np.flatnonzero(np.isfinite(s))
            allowed = allowed[~np.isin(allowed, positives)]
            n_neg = min(len(allowed), cfg.classifier_negatives * len(positives))
            negatives = rng.choice(allowed, size=n_neg, replace=False) if n_neg else np.zeros(0, np.int64)
            cols = np.concatenate([np.asarray(positives, np.int64), negatives.astype(np.int64)])
            cols = cols[np.argsort(rank[cols], kind="stable")]  # retrieval order, as vectorise expects
            ids = [item_ids[j] for j in cols]
            block = vectorise(state.customers.get(cid), state.history.get(cid),
                              [state.articles.get(a) for a in ids], s[cols], article_ids=ids,
                              channel=channel.get(cid, 1), now=cut.date(),
                              recent=recent_types(state.history.get(cid), state.articles, cfg.type_recency_window,
                                                  spec.type_column),
                              window=cfg.type_recency_window, spec=spec)
            block.num[:, spec.numeric.index("retrieval_rank")] = rank[cols]
            block.num[:, spec.numeric.index("score_gap")] = s[order[0]] - s[cols]
            y = np.array([a in truth[cid] for a in ids], dtype=np.int64)
            blocks.append(block)
            labels.append(y)
            owners += [cid] * len(ids)
            stats["positives"] += int(y.sum())
    if not blocks:
        raise ValueError("classifier training data is empty: no label-week purchases of known articles")
    stats["rows"] = int(sum(len(b) for b in blocks))
    return RankingData(FeatureBlock.concat(blocks), np.concatenate(labels), np.zeros(0, np.int64), owners, stats,
                       spec)


# ---------------------------------------------------------------------------------------------
# Offline ranking (evaluation) through the same stage


def rank_offline(
    stage: RankingStage,
    state: AsOf,
    customer_ids: Sequence[str],
    cand_ids: Sequence[Sequence[str]],
    cand_scores: Sequence[np.ndarray],
    channel: Mapping[str, int],
    k: int,
    thread_count: int = 2,
) -> dict[str, list[str]]:
    """Each customer's final list from `stage` on offline rows as of `state.as_of`: the same
    `prepare` / `finish` as `RankingStage.run`, with one model call for all customers (faster,
    same scores: a tree ensemble scores each row on its own)."""
    now = state.as_of.date()
    prepared = [
        stage.prepare(state.customers.get(cid), state.history.get(cid), list(ids), sc, state.articles,
                      channel=channel.get(cid, 1), now=now)
        for cid, ids, sc in zip(customer_ids, cand_ids, cand_scores, strict=True)
    ]
    scores = stage.model.predict(FeatureBlock.concat([p.block for p in prepared]), thread_count=thread_count)
    out: dict[str, list[str]] = {}
    start = 0
    for cid, prep in zip(customer_ids, prepared, strict=True):
        out[cid] = stage.finish(prep, scores[start : start + len(prep.ids)], k).article_ids
        start += len(prep.ids)
    return out


NO_BUSINESS_RULES = FilterConfig(drop_sold_out=False, drop_age_restricted=False, drop_other_regions=False)


def evaluation_lists(
    trained: TrainedRankers,
    ranker_cfg: RankerConfig,
    filter_cfg: FilterConfig,
    state: AsOf,
    customer_ids: Sequence[str],
    cand_ids: Sequence[Sequence[str]],
    cand_scores: Sequence[np.ndarray],
    channel: Mapping[str, int],
) -> dict[str, dict[str, list[str]]]:
    """Lists to compare on the held-out purchases, all over the same retrieval candidates:

    - `ranked`: the ranker's order (already-bought rule only, no diversity): the ranking alone,
      comparable with the retrieval order;
    - `ranked_classifier`: the same with the random-negative classifier (when trained);
    - `retrieval_filtered` / `served`: retrieval order / the whole serving stage (every
      business rule, then the configured diversity rule), to show what the rules cost or gain.
    """
    n = ranker_cfg.n_candidates
    cands = [list(c[:n]) for c in cand_ids]
    scores = [np.asarray(s[:n]) for s in cand_scores]
    plain = ranker_cfg.model_copy(update={"diversity": ranker_cfg.diversity.model_copy(update={"rule": "none"})})
    bought_only = NO_BUSINESS_RULES.model_copy(update={"bought_lookback": filter_cfg.bought_lookback})
    out = {"ranked": rank_offline(RankingStage(trained.ranker, plain, bought_only, n), state, customer_ids, cands,
                                  scores, channel, n)}
    if trained.classifier is not None:
        out["ranked_classifier"] = rank_offline(RankingStage(trained.classifier, plain, bought_only, n), state,
                                                customer_ids, cands, scores, channel, n)
    rules = build_rules(filter_cfg)
    filtered = {}
    for cid, ids in zip(customer_ids, cands, strict=True):
        res = apply_rules(rules, FilterContext(state.customers.get(cid), state.history.get(cid)), ids,
                          [state.articles.get(a) for a in ids])
        filtered[cid] = [ids[i] for i in res.kept]
    out["retrieval_filtered"] = filtered
    if ranker_cfg.diversity.rule != "mmr":  # MMR needs the item vectors of a served index
        out["served"] = rank_offline(RankingStage(trained.ranker, ranker_cfg, filter_cfg, n), state, customer_ids,
                                     cands, scores, channel, n)
    return out


def ranking_report(lists: Mapping[str, Mapping[str, Sequence[str]]], truth: Mapping[str, set[str]],
                   trained: TrainedRankers, k: int = 12) -> dict[str, Any]:
    """MAP@k and NDCG@k of each list, the ranker's lift over retrieval order, training facts."""
    from training.evaluate import average_precision_at_k, ndcg_at_k

    scores: dict[str, dict[str, float]] = {}
    for name, pred in lists.items():
        maps = [average_precision_at_k(list(pred.get(c, [])), a, k) for c, a in truth.items()]
        ndcgs = [ndcg_at_k(list(pred.get(c, [])), a, k) for c, a in truth.items()]
        scores[name] = {f"map@{k}": float(np.mean(maps)) if maps else 0.0,
                        f"ndcg@{k}": float(np.mean(ndcgs)) if ndcgs else 0.0}
    out: dict[str, Any] = {"metrics": scores}
    key = f"map@{k}"
    if "retrieval" in scores and scores["retrieval"][key] > 0:
        out[f"ranked_vs_retrieval_{key}"] = scores["ranked"][key] / scores["retrieval"][key] - 1.0
        if "ranked_classifier" in scores:
            out[f"classifier_vs_retrieval_{key}"] = scores["ranked_classifier"][key] / scores["retrieval"][key] - 1.0
    out["ranker"] = {k2: v for k2, v in trained.ranker.info.items() if k2 != "cutoffs"}
    out["ranker"]["cutoffs"] = trained.ranker.info.get("cutoffs")
    out["importance"] = {n: round(v, 2) for n, v in trained.ranker.importance().items()}
    if trained.classifier is not None:
        out["classifier"] = dict(trained.classifier.info)
    out["lists"] = {
        "ranked": "ranker order of the retrieval top-N (already-bought removed, no diversity)",
        "ranked_classifier": "the same with a CatBoostClassifier on random negatives (Hopsworks demo)",
        "retrieval_filtered": "retrieval order after every business rule",
        "served": "the serving stage: every business rule, ranker, diversity rule",
    }
    return out


def plot_importance(importance: Mapping[str, float], path: Path, title: str = "ranker feature importance") -> Path:
    """Horizontal bars of CatBoost's feature importance, largest on top."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = list(importance)[::-1]
    fig, ax = plt.subplots(figsize=(7, 0.3 * len(names) + 1.2))
    ax.barh(names, [importance[n] for n in names], color="tab:blue")
    ax.set_xlabel("PredictionValuesChange")
    ax.set_title(title)
    ax.grid(axis="x", alpha=0.3)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path
