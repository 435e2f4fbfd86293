"""The typed config tree, loaded once at the entry point and passed down.

Every section forbids unknown keys so a typo in a YAML file is an error naming the key,
not a silently ignored setting. Secrets are never stored here: only the name of the
environment variable that holds them.
"""
from __future__ import annotations

import os
import re
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class DataConfig(_Strict):
    """Size and seed of the generated H&M-shaped dataset; whether the purchases serving logged in
    the workdir join the data of its next pipeline run and feature build."""

    customers: int = Field(4000, ge=10)
    articles: int = Field(1500, ge=10)
    days: int = Field(120, ge=14)
    seed: int = 0
    # add the workdir's logged purchase events (POST /v1/events) to the transactions, those the
    # data does not already hold (feature_store.events.add_logged_purchases)
    event_log: bool = True
    # ...except those dated more than this many days after the data's last day: a log that does
    # not continue this data (a 2020 sample with events of today) would make the test split
    event_log_max_gap_days: int = Field(30, ge=0)


class DatabaseConfig(_Strict):
    """The online store: RonDB in production, a local MariaDB for demo and tests."""

    host: str = "127.0.0.1"
    port: int = Field(3307, ge=1, le=65535)
    database: str = Field("rayrec", pattern=r"^[A-Za-z_][A-Za-z0-9_]{0,63}$")
    user: str = Field("rayrec", pattern=r"^[A-Za-z_][A-Za-z0-9_]{0,31}$")
    password_env: str = "RAYREC_DB_PASSWORD"
    # Start and stop a local MariaDB inside the workdir; false when pointing at RonDB.
    local: bool = True
    # Rows per online transaction. A feature-group insert with more (a new version of a large
    # group) is written in transactions of this many rows, the last one with the insert's commit
    # marker: NDB holds every row of a transaction in the data nodes' transaction memory until
    # it commits, so one 1M-row transaction fails where RonDB runs with its usual memory.
    max_txn_rows: int = Field(20_000, ge=1)
    # After a pipeline run, drop the online tables of all but this many newest versions of each
    # feature group (never one the new manifest serves; their Parquet files stay): RonDB keeps
    # every table in memory, and each run writes new versions. At least 2, so that an app still
    # serving the previous run until its reload keeps its tables. None: keep every version.
    keep_online_versions: int | None = Field(None, ge=2)
    # TLS to the server. "preferred" (the MySQL clients' default): encrypted when the server
    # offers it, its certificate unchecked; "required": no connection without TLS, certificate
    # unchecked; "verify": TLS with the server's certificate checked against `tls_ca` (a PEM
    # file; else the system's CAs) and its host name against `host`, what a RonDB reached over a
    # network should use; "disabled": never (a local MariaDB listens on 127.0.0.1 without TLS).
    tls: Literal["preferred", "required", "verify", "disabled"] = "preferred"
    tls_ca: str | None = None

    @model_validator(mode="after")
    def _ca_needs_verify(self) -> DatabaseConfig:
        if self.tls_ca is not None and self.tls != "verify":
            raise ValueError(f"database.tls_ca is only used with tls: verify (tls is {self.tls!r})")
        return self


class TwoTowerConfig(_Strict):
    """Retrieval model size and training schedule (see training/two_tower/train.py)."""

    embedding_dim: int = Field(32, ge=4)
    output_dim: int = Field(64, ge=4)
    hidden_dims: list[int] = [128]
    # Softmax temperature of the in-batch loss: 0.15 had the best recall@100 on the generated data's last
    # training week (a validation week, not the test week) over 0.05-0.3, with the article activity features.
    temperature: float = Field(0.15, gt=0)
    history_len: int = Field(20, ge=1)
    epochs: int = Field(15, ge=1)
    batch_size: int = Field(512, ge=8)
    learning_rate: float = Field(0.005, gt=0)
    weight_decay: float = Field(0.0, ge=0)
    # Extra uniformly drawn catalogue articles added to every batch's in-batch negatives.
    n_random_negatives: int = Field(0, ge=0)
    # Models trained alike from different seeds (seed + 1000 * member) and served as one: each
    # member's unit vectors scaled by 1/sqrt(n) and concatenated (the vector dimension is n x
    # output_dim, the score the members' mean). On the generated data's last training week
    # (validation, not the test week) recall@100 was 0.786 for one model (mean of 7 seeds), 0.799
    # for two (2 seeds), 0.7995 for three (10 epochs, no weight averaging). With 15 epochs and the
    # last 6 averaged (swa_epochs), recall@100 on the test week (seeds 0, 1, 2) was 0.7874 / 0.7920 /
    # 0.7842 for one model and 0.7934 / 0.7950 / 0.7929 for two: only two are at least twice
    # last-week popularity (0.3949) for every seed (validation week: 0.8015 for two, 0.7910 for one;
    # `train_two_tower.py --eval-week test|validation --seed S`). Two members double the training
    # CPU time (not the wall time where the CPUs hold both: `parallel_members`), the index's vector
    # size and the query towers run per request; `ensemble: 1` trades that point of recall for them.
    ensemble: int = Field(2, ge=1)
    # Ensemble members trained at the same time, each its own Ray Train run (0: as many as the free
    # CPUs (GPUs) hold, num_workers x cpus_per_worker each; 1: one after the other). Each member keeps
    # its own seed and data order, so the towers are the same either way; two 1-CPU members on 2 cores
    # took 0.52-0.55x the time of one after the other on the demo (docs/scaling.md F42). Each running
    # member holds its own tables, optimizer state and data blocks, so the auto setting also fits them
    # into Ray's free memory, at an upper bound per member (training/two_tower/train.py member_bytes).
    parallel_members: int = Field(0, ge=0)
    # Ray Train workers, and the CPUs (= torch threads) each one reserves; scaled down to fit the cluster.
    num_workers: int = Field(1, ge=1)
    cpus_per_worker: float = Field(1.0, gt=0)
    # "auto": data-parallel (DDP) on CPU, TorchRec DistributedModelParallel with the planner's choice on
    # GPU; "ddp": always data-parallel; "table_wise": DMP with whole tables per worker (CPU or GPU);
    # "planner": DMP with the planner's choice on CPU too (it mixes table-wise and data-parallel tables).
    sharding: Literal["auto", "ddp", "table_wise", "planner"] = "auto"
    # "auto": GPUs when the Ray cluster has them (nccl), else CPU (gloo).
    device: Literal["auto", "cpu", "cuda"] = "auto"
    # Stochastic weight averaging: the towers exported at the end of the schedule are the mean of
    # the weights at the end of its last `swa_epochs` epochs (0: the last epoch's weights). On the
    # generated data's last training week (validation, not the test week) recall@100 rose from
    # 0.775 (10 epochs, no averaging) to 0.787 (10 epochs, the last 3 averaged) and 0.791 (15
    # epochs, the last 6; `benchmarks/train_two_tower.py --skip-speed --skip-ray --eval-week validation
    # --ensemble 1 --epochs E --swa-epochs K`): averaging lets longer training pay, which alone
    # overfits. With validation the average is scored like any epoch (the best is exported); a run
    # stopped early exports its best epoch, unaveraged. The running mean is in every checkpoint, so a resumed run continues it.
    swa_epochs: int = Field(6, ge=0)
    # Worker failures a run recovers from (from its last checkpoint); -1 = unlimited.
    max_failures: int = Field(2, ge=-1)
    # Stop after this many epochs without a better validation recall (0 = never); the exported towers
    # are those of the best epoch. Needs validation data.
    early_stopping_patience: int = Field(3, ge=0)
    # Validation: recall@val_k over at most val_max_rows purchases. Without an explicit validation
    # frame, the last `val_days` days of the training frame are held out (0 = no validation).
    val_k: int = Field(100, ge=1)
    val_max_rows: int = Field(5000, ge=1)
    val_days: int = Field(0, ge=0)
    # Rows of Ray Data's local shuffle buffer on each worker (0 = block order shuffle only).
    shuffle_buffer_rows: int = Field(4096, ge=0)
    seed: int = 0


class DiversityConfig(_Strict):
    """How the ranked list is re-ranked for variety before the top k are returned.

    `max_per_type`: at most `max_per_type` articles of one product type (the rest move down);
    `mmr`: maximal marginal relevance on the item vectors (`mmr_lambda` weighs relevance);
    `none`: the ranker's order as is.
    """

    rule: Literal["none", "max_per_type", "mmr"] = "max_per_type"
    max_per_type: int = Field(4, ge=1)
    mmr_lambda: float = Field(0.7, ge=0, le=1)


class RankerConfig(_Strict):
    """CatBoost ranker over retrieval candidates (hard negatives), and its training data."""

    iterations: int = Field(300, ge=1)
    depth: int = Field(6, ge=1, le=16)
    learning_rate: float = Field(0.1, gt=0)
    # YetiRank with 2 permutations (CatBoost's default is 10): same quality here, 4x faster.
    loss_function: str = Field("YetiRank:permutations=2",
                               pattern=r"^(YetiRank|YetiRankPairwise|PairLogit|QueryRMSE)(:.*)?$")
    # Categoricals with at most this many values are one-hot encoded (by CatBoost), the rest get
    # CatBoost's target statistics; one-hot is faster to fit and the vocabularies here are small.
    one_hot_max_size: int = Field(32, ge=1, le=255)
    n_candidates: int = Field(100, ge=1)
    max_train_customers: int = Field(2000, ge=10)
    # Weekly cut-offs in the training window: groups are (customer, cut-off); labels = next week's buys.
    n_cutoffs: int = Field(2, ge=1, le=12)
    # Where the training candidates and their retrieval features come from. "refit": a two-tower
    # trained only on purchases before the first cut-off, as the served model at serving time has
    # never seen the week it recommends for (no label leakage; costs a second two-tower fit).
    # "served": the served model, which has seen the label weeks, so the ranker over-trusts it.
    retrieval_for_training: Literal["refit", "served"] = "refit"
    # Candidates kept per group for fitting: every positive plus the best-ranked negatives.
    train_negatives: int = Field(60, ge=1)
    # How many of the customer's most recent purchases `purchases_since_type` looks back over.
    type_recency_window: int = Field(20, ge=1, le=200)
    # The baseline of the Hopsworks demo: a CatBoostClassifier on random negatives (metrics only).
    compare_classifier: bool = True
    classifier_negatives: int = Field(4, ge=1)
    diversity: DiversityConfig = DiversityConfig()
    seed: int = 0


class FilterConfig(_Strict):
    """Business rules between retrieval and ranking (all on by default).

    `bought_lookback`: how many of the customer's most recent purchases count as "already
    bought" (None: every purchase kept online). `unknown_age_is_minor`: a customer without an
    age never gets age-restricted articles. `overfetch`: retrieval asks for this many times
    the candidates ranking needs (plus the look-back), retrying larger when too few survive.
    """

    drop_bought: bool = True
    bought_lookback: int | None = Field(None, ge=1)
    drop_sold_out: bool = True
    drop_age_restricted: bool = True
    unknown_age_is_minor: bool = True
    drop_other_regions: bool = True
    overfetch: float = Field(1.5, ge=1.0, le=20.0)
    max_fetch: int = Field(2000, ge=1)


class EvalConfig(_Strict):
    """How a run is evaluated.

    time: the last `test_days` days are held out (the Kaggle protocol); random: a `test_frac`
    share of interactions (MovieLens-style papers); none: train on everything, no evaluation.
    """

    split: Literal["time", "random", "none"] = "time"
    test_days: int = Field(7, ge=1)
    test_frac: float = Field(0.2, gt=0, lt=1)
    max_customers: int = Field(5000, ge=1)
    ease_lambda: float = Field(100.0, gt=0)
    ease_max_items: int = Field(20_000, ge=1)
    seed: int = 0


class ServeConfig(_Strict):
    """HTTP binding, graph shape, sizes, timeouts and admission control of the Serve app.

    `topology`: "fused" runs every stage in one deployment (no hops between replicas: the
    fastest on small machines); "split" runs encoder, retriever and ranker as deployments of
    their own that scale independently. Past `max_ongoing_requests` per replica plus
    `max_queued_requests` waiting, requests get a 503 with Retry-After instead of queueing until
    they time out (from HAProxy itself with `haproxy_admission`). The API key, when its environment variable is set, is
    required on every endpoint but the health checks.
    """

    host: str = "127.0.0.1"
    port: int = Field(8000, ge=1, le=65535)
    n_candidates: int = Field(100, ge=1, le=1000)
    topology: Literal["fused", "split"] = "fused"
    # How the fused replica runs its stages: "coalesced" on its request loop, where the requests that
    # reach the encoder or the ranker together share one call (ray_apps/coalesce.py); "inline" on the
    # loop one request's stage at a time; or "batched": @serve.batch queues and a worker thread. On
    # the 2-core machine inline beat batched (less CPU, about half the p99; docs/scaling.md F25), and
    # coalesced served 10% more than inline when offered twice the rate it holds (F38).
    fused_calls: Literal["coalesced", "inline", "batched"] = "coalesced"
    num_cpus: float = Field(0.5, gt=0)
    # Replicas of the fused deployment (the split topology starts each deployment at 1). On the
    # 2-core machine two fused replicas held p99 <= 50 ms to a higher rate than one (serve_load.py).
    min_replicas: int = Field(2, ge=1)
    max_replicas: int = Field(2, ge=1)
    # `rayrec serve start` runs Serve's HAProxy ingress (RAY_SERVE_ENABLE_HA_PROXY) instead of the
    # Python proxy: on 2 cores it served about twice the rate at the same latency (serve_load.py).
    haproxy: bool = True
    # The niceness Ray adds to its worker processes (RAY_worker_niceness; Ray's own default is 15),
    # for the Ray head `rayrec serve start` starts. Replicas are workers, and HAProxy is started by
    # one, so with Ray's default the whole request path runs below Ray's own processes, and the
    # metrics agent's export every 10 s stalled the replicas. At 0 (the same as Ray's processes), on
    # the 2-core machine in a slow hour: 150 req/s at p99 46-98 ms against 87-185 ms in four paired
    # windows (serve_load.py --variants haproxy_ray_nice haproxy; docs/scaling.md F27).
    worker_niceness: int = Field(0, ge=0, le=19)
    # Seconds between two runs of Serve's control loop (RAY_SERVE_CONTROL_LOOP_INTERVAL_S; Ray's
    # default is 0.1) on the head `rayrec serve start` starts. The controller spent 0.27-0.28 ms of
    # CPU per request at 150 req/s with Ray's default and 0.11-0.12 ms at 0.5 s (serve_load.py
    # --variants haproxy_ray_control haproxy_admission; docs/scaling.md F34). Scaling decisions
    # and deployment changes are acted on at most this much later.
    control_loop_interval_s: float = Field(0.5, gt=0, le=10)
    # Seconds a stopped replica behind HAProxy still answers (RAY_SERVE_DIRECT_INGRESS_MIN_DRAINING_PERIOD_S)
    # on the head `rayrec serve start` starts. Ray's default, 30 s, gives an external load
    # balancer that targets replicas directly time to deregister one; here the only router is
    # the HAProxy that Ray reloads with the new replica set when one stops. With 30 s, `rayrec
    # serve stop` (Serve's shutdown) took 43 s, and every scale-down held a replica's memory that long.
    drain_s: float = Field(5.0, ge=0, le=300)
    target_ongoing_requests: float = Field(2, gt=0)
    # Serve's `max_surge_percent` for every deployment: when the app is rebuilt (a new code version
    # for Serve: new args, a `serve.run` from Python), a positive value starts each replacement
    # replica before its old one stops, so a deployment with one replica (each stage of the split
    # topology) keeps answering. It needs room for the replacements: where the replicas hold every
    # CPU (the 2-core machine's local Ray) the rollout waits forever, so the default is Serve's 0,
    # which stops the old replica first; the cluster config, whose autoscaler adds a node, sets 100.
    rollout_surge_percent: int = Field(0, ge=0, le=100)
    # 4 at a time and 2 waiting per replica. HAProxy sends the next request as soon as an answer is
    # out, before the replica has counted it done, so behind HAProxy's admission the replica's own
    # queue takes max_ongoing_requests more (ray_apps.app.deployment_options). With that slack,
    # Offered 300 req/s, 4 + 2 served as many as 8 + 8 with accepted requests at p99 61-98 ms
    # instead of 144-260 ms; at 150 req/s it refused 0.04-0.07% of the requests in 3 of 12
    # windows, where 8 + 8 refused none (serve_load.py --max-ongoing --max-queued; docs/scaling.md F35,
    # F36). 2 + 2 cut the accepted p99 to 40-44 ms but refused up to 2% at 150.
    # An earlier finding that 4 left a replica idle (F32) came from runs without the slack,
    # where the replica refused requests itself.
    max_ongoing_requests: int = Field(4, ge=1)
    max_queued_requests: int = Field(2, ge=-1)
    retry_after_s: float = Field(1.0, ge=0)
    # With `haproxy`, HAProxy itself enforces the bounds above before a request reaches a replica
    # (ray_apps/haproxy_admission.py): at most max_ongoing_requests per replica, queued in
    # HAProxy past that, an immediate 503 once max_queued_requests per replica wait, and a 503
    # after queue_timeout_ms in the queue. Without it the replica refuses, on the loop that runs
    # the stages, so in overload its 503s wait behind the work (docs/scaling.md F29).
    haproxy_admission: bool = True
    queue_timeout_ms: int = Field(1000, ge=1)
    # Behind HAProxy's admission, a replica also refuses (503 + Retry-After, before parsing) a
    # request that waited more than shed_delay_ms since HAProxy received it, but only once no
    # request has waited less for shed_interval_ms: a standing overload, not a stall's backlog
    # (ray_apps/shedding.py). 0: off. Off by default: on the 2-core machine 10 ms / 100 ms cut the
    # accepted requests' p99 offered 300 req/s by about a seventh (mean 50.9 against 59.2 ms) but
    # refused requests at 150 req/s in 3 of 5 windows (docs/scaling.md F37).
    shed_delay_ms: float = Field(0, ge=0)
    shed_interval_ms: float = Field(200, gt=0)
    # The online store: a call waits at most db_timeout_s; after a failure it is skipped for
    # db_retry_s (answers come from the last good data or popularity, flagged degraded).
    db_timeout_s: float = Field(0.5, gt=0)
    db_retry_s: float = Field(1.0, gt=0)
    # split topology: a stage call waits stage_timeout_s, and is sent again (stage_retries times)
    # after a timeout or a dead replica, before the request falls back or gets a 503.
    stage_timeout_s: float = Field(2.0, gt=0)
    stage_retries: int = Field(4, ge=0)
    api_key_env: str = Field("RAYREC_API_KEY", pattern=r"^[A-Za-z_][A-Za-z0-9_]*$")
    max_body_bytes: int = Field(1_000_000, ge=1024)
    max_batch_events: int = Field(500, ge=1, le=500)  # at most the request schema's bound (EventBatch)
    prediction_log: bool = True
    # The prediction log (9 kB per answer in the demo run: 1.4 MB/s at 150 answers/s) is kept under
    # prediction_log_max_mb by removing its oldest files, each closed at prediction_log_segment_mb
    # (0: no bound, e.g. when something else ships and removes the files).
    prediction_log_segment_mb: int = Field(64, ge=1)
    prediction_log_max_mb: int = Field(2048, ge=0)
    # Serve's access log: one line per request, formatted and written by the replica while it
    # serves (to its log file and stderr). Off by default: the Prometheus metrics count every
    # request by endpoint and outcome, and the prediction log keeps each answer.
    access_log: bool = False
    # Where a replica runs the app's code: "main", the replica's main event loop, which saves the
    # thread hand-offs of every request (RAY_SERVE_RUN_USER_CODE_IN_SEPARATE_THREAD=0, as Serve's
    # throughput-optimized mode sets it; health checks and metrics then wait at most one request's
    # stages), or "thread", an event loop of its own in a separate thread (Serve's default). On the
    # 2-core machine "main" served 3-41% more in 8 of 9 paired windows offered 150-300 req/s (2.6%
    # less in the ninth) and fewer fast 503s (serve_load.py --user-code-loop thread main).
    user_code_loop: Literal["thread", "main"] = "main"
    # Article rows the ranker read stay in the replica this many seconds (0: read every request).
    # Candidates of one request overlap the last ones', so most of the articles query is saved:
    # on the 2-core machine 1.4-2.4 ms of replica CPU and 0.7-0.9 ms of database CPU per request
    # of the load mix at 60-100 req/s (benchmarks/serve_load.py --article-cache-ttl-s 2 0). The
    # price: stock, availability and sales aggregates may be this old, except (fused topology)
    # for the articles of the replica's own purchase events, which it reads again at once.
    article_cache_ttl_s: float = Field(2.0, ge=0)
    article_cache_entries: int = Field(100_000, ge=1)
    # At start-up a replica that takes events applies the purchases logged within this many
    # seconds that no replica applied online (one killed between its durable log write and the
    # online transaction); 0 turns the check off.
    replay_events_s: float = Field(86_400, ge=0)

    @model_validator(mode="after")
    def _log_bound_holds_a_file(self) -> ServeConfig:
        if 0 < self.prediction_log_max_mb < self.prediction_log_segment_mb:
            raise ValueError(f"prediction_log_max_mb ({self.prediction_log_max_mb}) is below "
                             f"prediction_log_segment_mb ({self.prediction_log_segment_mb}): the bound "
                             "must hold at least one file (0: no bound)")
        return self

    def prediction_log_args(self) -> dict[str, int | None]:
        """`PredictionLog` arguments for these settings."""
        return {"segment_bytes": self.prediction_log_segment_mb << 20,
                "max_bytes": (self.prediction_log_max_mb << 20) or None}

_LOCATION = re.compile(r"^([a-z][a-z0-9+.-]*://\S+|[^:\s]+)$")


class StorageConfig(_Strict):
    """Where the artifacts that every node reads live, when they must outlive one machine.

    `index_uri`: the LanceDB item index, a folder or an object-store URI that LanceDB opens
    natively (`s3://bucket/rayrec/index`); None: the workdir's `index/`.
    `checkpoint_uri`: Ray Train's storage path (checkpoints and results); on a multi-node cluster
    every node must reach it (`s3://...` or a shared filesystem); None: the workdir's `ray/`.
    Relative paths are under the workdir. Object-store credentials come from the environment
    (AWS_* variables or the instance role), never from this file.
    """

    index_uri: str | None = None
    checkpoint_uri: str | None = None

    @field_validator("index_uri", "checkpoint_uri")
    @classmethod
    def _location(cls, v: str | None) -> str | None:
        if v is not None and not _LOCATION.match(v):
            raise ValueError(f"{v!r} is neither a path without ':' nor a URI like s3://bucket/prefix")
        return v


class RayrecConfig(_Strict):
    """Root of the config tree."""

    name: str = Field("demo", pattern=r"^[A-Za-z0-9_.-]+$")
    data: DataConfig = DataConfig()
    database: DatabaseConfig = DatabaseConfig()
    two_tower: TwoTowerConfig = TwoTowerConfig()
    ranker: RankerConfig = RankerConfig()
    filters: FilterConfig = FilterConfig()
    eval: EvalConfig = EvalConfig()
    serve: ServeConfig = ServeConfig()
    storage: StorageConfig = StorageConfig()


class ConfigError(ValueError):
    """A config file that cannot be used; the message names the file and the key."""


def load_config(path: str | os.PathLike[str] | None = None, overrides: dict[str, Any] | None = None) -> RayrecConfig:
    """Read a YAML config (or the defaults) and apply nested overrides."""
    raw: dict[str, Any] = {}
    if path is not None:
        p = Path(path)
        if not p.is_file():
            raise ConfigError(f"config file not found: {p}")
        try:
            raw = yaml.safe_load(p.read_text()) or {}
        except yaml.YAMLError as e:
            raise ConfigError(f"{p}: not valid YAML: {e}") from e
        if not isinstance(raw, dict):
            raise ConfigError(f"{p}: top level must be a mapping")
    raw = _merge(raw, overrides or {})
    try:
        return RayrecConfig.model_validate(raw)
    except ValidationError as e:
        where = f"{path}: " if path else ""
        msgs = "; ".join(f"{'.'.join(str(x) for x in err['loc'])}: {err['msg']}" for err in e.errors())
        raise ConfigError(f"{where}invalid config: {msgs}") from e


def _merge(base: dict[str, Any], over: dict[str, Any]) -> dict[str, Any]:
    out = dict(base)
    for k, v in over.items():
        out[k] = _merge(out.get(k) or {}, v) if isinstance(v, dict) else v
    return out
