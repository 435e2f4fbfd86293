"""`rayrec pipeline`: data -> feature store -> two-tower -> index -> ranker -> evaluation -> manifest.

Each step is a small function over explicit inputs; `run_pipeline` only wires them and
writes the manifest last, so a failed run never leaves a manifest pointing at half an output.
"""
from __future__ import annotations

import time
from contextlib import contextmanager
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import pandas as pd
import yaml

from common import locations
from common.artifacts import IndexRef, Manifest, new_manifest, write_json, write_manifest
from common.config import RayrecConfig
from common.workdir import Workdir
from feature_store.dataset import HM_ROLES, DatasetConfig, Roles, hm_dataset_config, load_dataset
from feature_store.events import add_logged_purchases, describe_added
from feature_store.groups import dataset_groups
from feature_store.online.base import OnlineStore
from feature_store.sources import FILES, generate
from feature_store.store import FeatureStore
from feature_store.transforms import article_features, serving_frames
from feature_store.views import RETRIEVAL_VIEW_VERSION, query_frame, retrieval_frame
from training import evaluate as ev
from training.features import encode_items, encode_queries
from training.index import ItemIndex, build_index, index_columns
from training.plots import plot_metrics, plot_training
from training.popularity import popular_articles, save_popularity
from training.ranker import (
    TrainedRankers,
    build_classifier_data,
    build_ranking_data,
    evaluation_lists,
    fit_classifier,
    fit_ranker,
    plot_importance,
    ranking_report,
    rows_as_of,
    save_ranker,
    training_cutoffs,
)
from training.ray_session import init_ray
from training.two_tower.model import load_item_tower, load_query_tower
from training.two_tower.train import train_two_tower


@contextmanager
def step(name: str):
    t0 = time.time()
    print(f"==> {name}", flush=True)
    yield
    print(f"<== {name} ({time.time() - t0:.1f}s)", flush=True)


@dataclass
class Raw:
    """The canonical tables (see feature_store.dataset) and the roles of their columns."""

    articles: pd.DataFrame
    customers: pd.DataFrame
    transactions: pd.DataFrame
    extras: dict[str, pd.DataFrame]
    roles: Roles = HM_ROLES
    name: str = "hm"


@dataclass
class Split:
    """Train/test rows, the time features are computed as of, and the evaluation request month."""

    kind: str
    train: pd.DataFrame
    test: pd.DataFrame
    as_of: pd.Timestamp | None  # None: every training row counts as history (random split, none)
    month: int

    def describe(self) -> str:
        at = f" cut-off {self.as_of.date()}" if self.as_of is not None else ""
        return f"{self.kind} split: train {len(self.train)} rows, test {len(self.test)} rows{at}"


def make_split(tx: pd.DataFrame, cfg: RayrecConfig) -> Split:
    e = cfg.eval
    last_month = int(tx["t_dat"].max().month)
    if e.split == "time":
        train, test, cutoff = ev.time_split(tx, e.test_days)
        return Split("time", train, test, cutoff, int(cutoff.month))
    if e.split == "random":
        train, test = ev.random_split(tx, e.test_frac, e.seed)
        return Split("random", train, test, None, last_month)
    return Split("none", tx, tx.iloc[:0], None, last_month)


def prepare_data(cfg: RayrecConfig, wd: Workdir, data_dir: Path | None, dataset: DatasetConfig | None = None) -> Raw:
    """Load a dataset config's files, the user's H&M files, or generate H&M-shaped data into the workdir."""
    if dataset is None:
        if data_dir is None:
            data_dir = wd.data_dir
            if not (data_dir / FILES["transactions"]).exists():
                d = cfg.data
                generate(data_dir, seed=d.seed, customers=d.customers, articles=d.articles, days=d.days,
                         progress=True)
        dataset = hm_dataset_config(Path(data_dir))
    data = load_dataset(dataset)
    for line in data.report.summary_lines():
        print(f"[data] {line}", flush=True)
    report = data.report.to_dict()
    tx = data.transactions
    if cfg.data.event_log:
        tx, report["event_log"] = add_logged_purchases(tx, data.customers, data.articles, wd,
                                                       cfg.data.event_log_max_gap_days)
        if report["event_log"]["logged"]:
            print(f"[data] {describe_added(report['event_log'])}", flush=True)
    write_json(wd.reports_dir / "data_report.json", report)
    return Raw(data.articles, data.customers, tx, data.extras, data.roles, data.name)


def write_feature_groups(fs: FeatureStore, raw: Raw, manifest: Manifest) -> dict[str, pd.DataFrame]:
    """Serving-time groups (as of the end of the data) offline and online; transactions offline."""
    frames = serving_frames(raw)
    groups = dataset_groups(raw.roles)
    for name, frame in frames.items():
        manifest.feature_groups[name] = fs.write(name, frame, groups=groups)
    return frames


def main_channel(tx: pd.DataFrame) -> dict[str, int]:
    """Each customer's most used sales channel: the request context for batch evaluation."""
    return tx.groupby("customer_id")["sales_channel_id"].agg(lambda s: int(s.mode().iloc[0])).to_dict()


def item_vectors(model_dir: Path, articles: pd.DataFrame, item_ids: list[str]) -> np.ndarray:
    """The item tower's vectors of `item_ids` from an articles frame, i.e. with its features as of the
    frame's time (the index holds them as of the end of the data)."""
    tower, vocab = load_item_tower(model_dir)
    return tower.embed(encode_items(vocab, articles.set_index("article_id").loc[item_ids].reset_index()))


def retrieve(
    model_dir: Path, item_ids: list[str], item_vecs: np.ndarray, customers_fg: pd.DataFrame,
    history: pd.DataFrame, customer_ids: list[str], month: int, channel: dict[str, int], k: int, history_len: int,
    roles: Roles = HM_ROLES,
) -> tuple[list[list[str]], list[np.ndarray]]:
    """Batch retrieval as serving does it: query tower, exact top-k, already-bought removed."""
    tower, vocab = load_query_tower(model_dir)
    purchased = dict(zip(history["customer_id"], history["purchased"], strict=True))
    q = query_frame(customer_ids, customers_fg, purchased, month, channel, history_len, roles)
    qv = tower.embed(encode_queries(vocab, q, history_len))
    pos = {a: i for i, a in enumerate(item_ids)}
    exclude = [np.array([pos[a] for a in purchased.get(c, []) if a in pos], dtype=np.int64) for c in customer_ids]
    idx, sc = ev.top_k_exact(qv, item_vecs, k, exclude)
    return [[item_ids[j] for j in row] for row in idx], list(sc)


def checkpoint_location(cfg: RayrecConfig, wd: Workdir, run: str) -> str:
    """Ray Train's storage for one training run: under `storage.checkpoint_uri`, else the workdir's ray/."""
    return locations.join(wd.location(cfg.storage.checkpoint_uri, wd.ray_dir), run)


def run_pipeline(
    cfg: RayrecConfig, wd: Workdir, data_dir: Path | None = None, online: OnlineStore | None = None,
    dataset: DatasetConfig | None = None,
) -> Manifest:
    """Run every step; the manifest is written only when all of them succeeded.

    The data: `dataset` (a dataset config), else the H&M files in `data_dir`, else generated."""

    wd.root.mkdir(parents=True, exist_ok=True)
    wd.config_path.write_text(yaml.safe_dump(cfg.model_dump(), sort_keys=False))
    manifest = new_manifest(cfg.name)
    t_all = time.time()
    with step("data"):
        raw = prepare_data(cfg, wd, data_dir, dataset)
        manifest.extra["dataset"] = {"name": raw.name, "roles": asdict(raw.roles)}
    with step("feature groups (offline Parquet + online tables)"):
        fs = FeatureStore(wd, online, max_txn_rows=cfg.database.max_txn_rows)
        frames = write_feature_groups(fs, raw, manifest)
    split = make_split(raw.transactions, cfg)
    train_tx = split.train
    print(f"[split] {split.describe()}", flush=True)
    with step("retrieval training data (point-in-time view)"):
        arts_cut = article_features(raw.articles, train_tx, split.as_of, raw.extras, raw.roles)
        view = retrieval_frame(train_tx, frames["customers"], arts_cut, cfg.two_tower.history_len, raw.roles)
        view_dir = wd.views_dir / "retrieval" / f"v{RETRIEVAL_VIEW_VERSION}"
        view_dir.mkdir(parents=True, exist_ok=True)
        view.to_parquet(view_dir / "train.parquet", index=False)
        manifest.feature_views["retrieval"] = RETRIEVAL_VIEW_VERSION
    init_ray(wd)
    with step("two-tower training (Ray Train)"):
        t_fit = time.time()
        result = train_two_tower(view, arts_cut, frames["customers"], cfg.two_tower, wd.two_tower_dir,
                                 checkpoint_location(cfg, wd, "train"), roles=raw.roles)
        fit_s = round(time.time() - t_fit, 1)
        for name in ("query_tower", "item_tower", "vocab"):
            manifest.models[name] = wd.relative(getattr(result, name))
        plot_training(result.history, wd.reports_dir / "training.png")
    with step("item index (Ray Data -> LanceDB)"):
        arts_path = wd.resolve(manifest.feature_groups["articles"].offline_path)
        built = build_index(arts_path, wd.two_tower_dir, wd.location(cfg.storage.index_uri, wd.index_dir),
                            columns=index_columns(raw.roles))
        manifest.index = IndexRef(uri=wd.to_ref(built.uri), table=built.table, version=built.version,
                                  dim=built.dim, n_rows=built.n_rows)
    pop = popular_articles(train_tx, frames["customers"])
    manifest.models["popularity"] = wd.relative(save_popularity(pop, wd.popularity_path))
    item_ids, item_vecs = ItemIndex(built.uri, built.table, built.version).vectors()
    if split.as_of is not None:  # the index embeds today's article activity; the test week must not see it
        item_vecs = item_vectors(wd.two_tower_dir, arts_cut, item_ids)
    channel = main_channel(train_tx)
    with step("ranker (CatBoost on retrieval candidates)"):
        ranker = train_ranker(cfg, wd, raw, train_tx, frames["customers"], item_ids, item_vecs, channel)
        manifest.models["ranker"] = wd.relative(save_ranker(ranker, wd.ranker_path))
    with step(f"evaluation ({split.kind} split)"):
        if split.kind == "none":
            metrics = {"protocol": {"split": "none"}, "skipped": "trained on every interaction; nothing held out"}
        else:
            metrics = evaluate_all(cfg, wd, raw, split, frames["customers"], item_ids, item_vecs, channel, ranker)
            plot_metrics({m: metrics[m] for m in metrics["models"]}, wd.reports_dir / "recall.png")
        metrics["dataset"] = raw.name
        metrics["data_range"] = {"first_day": str(raw.transactions["t_dat"].min().date()),
                                 "last_day": str(raw.transactions["t_dat"].max().date())}
        metrics["timing_s"] = {"pipeline": round(time.time() - t_all, 1), "two_tower_fit": fit_s}
        write_json(wd.metrics_path, metrics)
        manifest.metrics = wd.relative(wd.metrics_path)
    write_manifest(wd, manifest)
    if cfg.database.keep_online_versions is not None and online is not None:
        retire_old_versions(fs, manifest, cfg.database.keep_online_versions)
    print(f"[pipeline] done in {time.time() - t_all:.0f}s; manifest {wd.manifest_path}", flush=True)
    return manifest


def retire_old_versions(fs: FeatureStore, manifest: Manifest, keep: int) -> None:
    """`database.keep_online_versions`: retire older versions' online tables, once the new manifest
    is written (never a version it names). A failure is reported, not raised: the run is done."""
    try:
        retired = fs.retire_online(keep, manifest.served_versions())
    except (ConnectionError, OSError, ValueError) as e:
        print(f"[feature store] could not retire old online tables ({e}); `rayrec features retire` "
              "does it later", flush=True)
        return
    for r in retired:
        print(f"[feature store] {r['group']} v{r['version']}: dropped online table {r['online_table']} "
              f"({r['online_rows']:,} rows; database.keep_online_versions: {keep}); its Parquet files stay", flush=True)


def train_ranker(cfg, wd, raw: Raw, train_tx, customers_fg, item_ids, item_vecs, channel) -> TrainedRankers:
    """CatBoostRanker on hard negatives: weekly cut-offs at the end of the training window, the
    retrieval top-N as of each cut-off, labels = the following week's purchases. The candidates
    come from a two-tower trained before the first cut-off (`ranker.retrieval_for_training`).
    With `ranker.compare_classifier`, also the Hopsworks demo's classifier on random negatives."""
    label_days = cfg.eval.test_days
    first_cut = min(training_cutoffs(train_tx, cfg.ranker.n_cutoffs, label_days))
    model_dir, vecs = wd.two_tower_dir, item_vecs
    if cfg.ranker.retrieval_for_training == "refit":
        with step(f"ranker: two-tower on purchases before {first_cut.date()} (leak-free candidates)"):
            model_dir = wd.ranker_path.parent / "retrieval_before_cutoff"
            before = train_tx[train_tx["t_dat"] < first_cut]
            if before["customer_id"].nunique() < 2:
                raise ValueError(f"no purchases before the ranker's first cut-off {first_cut.date()}: lower "
                                 "ranker.n_cutoffs or set ranker.retrieval_for_training: served")
            arts = article_features(raw.articles, before, first_cut, raw.extras, raw.roles)
            view = retrieval_frame(before, customers_fg, arts, cfg.two_tower.history_len, raw.roles)
            train_two_tower(view, arts, customers_fg, cfg.two_tower, model_dir,
                            checkpoint_location(cfg, wd, "train_ranker_retrieval"), roles=raw.roles)
            vecs = item_vectors(model_dir, arts, item_ids)
    tower, vocab = load_query_tower(model_dir)

    def candidates(cids: list[str], hist: pd.DataFrame, as_of: pd.Timestamp):
        return retrieve(model_dir, item_ids, vecs, customers_fg, hist, cids, as_of.month, channel,
                        cfg.ranker.n_candidates, cfg.two_tower.history_len, raw.roles)

    def score_all(cids: list[str], hist: pd.DataFrame, as_of: pd.Timestamp):
        purchased = dict(zip(hist["customer_id"], hist["purchased"], strict=True))
        q = query_frame(cids, customers_fg, purchased, as_of.month, channel, cfg.two_tower.history_len, raw.roles)
        qv = tower.embed(encode_queries(vocab, q, cfg.two_tower.history_len))
        return qv @ vecs.T, item_ids, [set(purchased.get(c, [])) for c in cids]

    data = build_ranking_data(raw.articles, train_tx, customers_fg, raw.extras, candidates, cfg.ranker, channel,
                              label_days=label_days, roles=raw.roles)
    ranker = fit_ranker(data, cfg.ranker, train_dir=wd.ranker_path.parent / "catboost_info")
    ranker.info["retrieval_for_training"] = cfg.ranker.retrieval_for_training
    plot_importance(ranker.importance(), wd.reports_dir / "ranker_importance.png")
    classifier = None
    if cfg.ranker.compare_classifier:
        cdata = build_classifier_data(raw.articles, train_tx, customers_fg, raw.extras, score_all, cfg.ranker,
                                      channel, label_days=label_days, roles=raw.roles)
        classifier = fit_classifier(cdata, cfg.ranker)
    return TrainedRankers(ranker, classifier)


def evaluate_all(cfg, wd, raw: Raw, split: Split, customers_fg, item_ids, item_vecs, channel, ranker):
    """Baselines, retrieval and ranked lists for the test customers, scored by one harness."""
    train_tx, cutoff = split.train, split.as_of
    truth = ev.ground_truth(split.test, cfg.eval.max_customers, seed=cfg.eval.seed)
    cids = sorted(truth)
    state = rows_as_of(raw.articles, train_tx, customers_fg, raw.extras, cutoff, cids, raw.roles)
    hist = state.history_frame  # the evaluated customers' histories: all that the lists read
    purchased = dict(zip(hist["customer_id"], hist["purchased"], strict=True))
    k = max(100, cfg.ranker.n_candidates)
    lists = baseline_lists(cfg, train_tx, cids, purchased, k)
    cands, scores = retrieve(wd.two_tower_dir, item_ids, item_vecs, customers_fg, hist, cids, split.month, channel,
                             k, cfg.two_tower.history_len, raw.roles)
    retrieval = dict(zip(cids, cands, strict=True))
    ranking = evaluation_lists(ranker, cfg.ranker, cfg.filters, state, cids, cands, scores, channel)
    lists.update(retrieval=retrieval, ranked=ranking["ranked"])
    if "ranked_classifier" in ranking:
        lists["ranked_classifier"] = ranking["ranked_classifier"]
    out: dict = {m: ev.evaluate_lists(v, truth, n_items=len(item_ids)) for m, v in lists.items()}
    out["models"] = list(lists)
    out["n_eval_customers"] = len(truth)
    out["comparison"] = compare_to_baselines(out, ("retrieval", "ranked"), [m for m in lists if m in BASELINES])
    out["protocol"] = {
        "split": split.kind, "test_days": cfg.eval.test_days if split.kind == "time" else None,
        "test_frac": cfg.eval.test_frac if split.kind == "random" else None,
        "cutoff": str(cutoff.date()) if cutoff is not None else None,
        "filter": "articles the customer bought in training are removed from every list except 'repeat'",
    }
    out["ranking"] = ranking_report({"popularity": lists["popularity"], "retrieval": retrieval, **ranking}, truth,
                                    ranker)
    out["ranking"]["importance_png"] = wd.relative(wd.reports_dir / "ranker_importance.png")
    for model in lists:
        print(f"[eval] {model:18s} " + " ".join(f"{m}={v:.4f}" for m, v in out[model].items()), flush=True)
    for name, m in out["ranking"]["metrics"].items():
        print(f"[eval] ranking {name:18s} " + " ".join(f"{k}={v:.4f}" for k, v in m.items()), flush=True)
    for line in out["comparison"]["summary"]:
        print(f"[eval] {line}", flush=True)
    return out


BASELINES = ("popularity", "popularity_global", "repeat", "ease")


def baseline_lists(cfg: RayrecConfig, train_tx: pd.DataFrame, cids: list[str], purchased: dict, k: int) -> dict:
    """Every baseline, by the same harness: last-week popularity (`popularity`), all-time
    popularity, the customer's own repeat purchases, and EASE where the catalogue fits."""
    lists = {
        "popularity": ev.popularity_lists(train_tx, cids, purchased, k),
        "popularity_global": ev.global_popularity_lists(train_tx, cids, purchased, k),
        "repeat": ev.repeat_lists(train_tx, cids, k),
    }
    ease = ev.ease_lists(train_tx, cids, k, lam=cfg.eval.ease_lambda, max_items=cfg.eval.ease_max_items)
    if ease is not None:
        lists["ease"] = ease
    else:
        print(f"[eval] EASE skipped: catalogue above eval.ease_max_items={cfg.eval.ease_max_items}", flush=True)
    return lists


def compare_to_baselines(metrics: dict, models: tuple[str, ...], baselines: list[str], key: str = "map@12") -> dict:
    """Plainly: does each model beat the strongest baseline on MAP@12?"""
    best = max(baselines, key=lambda b: metrics[b][key])
    out: dict = {"metric": key, "best_baseline": best, "summary": []}
    for m in models:
        ratio = metrics[m][key] / metrics[best][key] if metrics[best][key] > 0 else float("inf")
        beats = metrics[m][key] > metrics[best][key]
        out[m] = {"ratio_vs_best_baseline": ratio, "beats_best_baseline": beats}
        verdict = "beats" if beats else "does NOT beat"
        out["summary"].append(f"{m} {verdict} the best baseline ({best}) on {key}: x{ratio:.2f}")
    return out
