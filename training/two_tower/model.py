"""Two-tower retrieval model on TorchRec EmbeddingBagCollections (plain torch: no Ray, no LanceDB).

The query tower sees the customer (id + profile), the request context (month, sales channel) and the
customer's recent purchases, mean-pooled through the SAME article-id table the item tower uses. That
tie is what lets serving fold a purchase made a second ago into the query embedding without
retraining. The towers are saved and loaded separately: the item tower embeds the catalogue offline
(index build), the query tower runs per request.

An ensemble (`TwoTowerConfig.ensemble` > 1: models trained alike from different seeds) is saved in
the same two files and loads as an `EnsembleTower`: each member's unit vector scaled by 1/sqrt(n)
and concatenated, so a query-item dot product is the mean of the members' scores and the ANN index
(any dimension, inner product) is used unchanged.

Two input forms, one model: `inputs(encoded)` takes the jagged numpy dicts of `training.features`
(serving, evaluation); `batch_inputs(...)` takes fixed-width torch tensors (training batches from
Ray Data) on any device and builds the same KeyedJaggedTensor there.
"""
from __future__ import annotations

import weakref
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn
from torchrec import EmbeddingBagCollection, EmbeddingBagConfig, KeyedJaggedTensor
from torchrec.modules.embedding_configs import PoolingType

from common.config import TwoTowerConfig
from training.features import (
    DENSE,
    HIST_LENGTHS,
    HIST_VALUES,
    N_QUERY_DENSE,
    FeatureVocab,
    n_rows,
    take_rows,
)

QUERY_TOWER_FILE = "query_tower.pt"
ITEM_TOWER_FILE = "item_tower.pt"
VOCAB_FILE = "vocab.json"
HIST_FEATURE = "hist_article_id"
EMBED_CHUNK = 8192  # rows per forward pass in embed(): bounds memory on large catalogues
# Up to this many rows an unsharded CPU tower embeds in numpy (`_Tower.forward_numpy`): serving's
# one-row queries. Paced like serving, one request's embedding (the demo's 2-member ensemble) cost
# 1.27-1.66 ms of CPU through torch, mostly its per-op dispatch, and 0.51-0.82 ms in numpy
# (benchmarks/serve_load.py, "case": "query_encoder"); above a few dozen rows the matrix products
# dominate and torch's kernels are the better choice.
NUMPY_MAX_ROWS = 64
_NUMPY_WEIGHTS: weakref.WeakKeyDictionary[nn.Module, Any] = weakref.WeakKeyDictionary()  # _Tower._numpy_weights


def _table(feature: str, rows: int, dim: int, pooling: PoolingType = PoolingType.SUM) -> EmbeddingBagConfig:
    return EmbeddingBagConfig(
        name=f"t_{feature}", embedding_dim=dim, num_embeddings=rows, feature_names=[feature], pooling=pooling
    )


def _mlp(in_dim: int, hidden_dims: Sequence[int], out_dim: int) -> nn.Sequential:
    layers: list[nn.Module] = []
    for h in hidden_dims:
        layers += [nn.Linear(in_dim, h), nn.ReLU()]
        in_dim = h
    layers.append(nn.Linear(in_dim, out_dim))
    return nn.Sequential(*layers)


def _kjt(encoded: dict[str, np.ndarray], keys: Sequence[str], jagged: dict[str, tuple[str, str]]) -> KeyedJaggedTensor:
    """One-id-per-row features for `keys`, then jagged features given as (values_key, lengths_key)."""
    n = n_rows(encoded)
    values = [encoded[k] for k in keys] + [encoded[v] for v, _ in jagged.values()]
    lengths = [np.ones(n * len(keys), dtype=np.int32)] + [encoded[ln].astype(np.int32) for _, ln in jagged.values()]
    return KeyedJaggedTensor.from_lengths_sync(
        keys=[*keys, *jagged.keys()],
        values=torch.from_numpy(np.concatenate(values).astype(np.int64)),
        lengths=torch.from_numpy(np.concatenate(lengths)),
    )


def padded_kjt(
    keys: Sequence[str], cat: torch.Tensor, jagged: Sequence[tuple[str, torch.Tensor, torch.Tensor]] = ()
) -> KeyedJaggedTensor:
    """KJT from fixed-width tensors: `cat` [B, len(keys)] one id per row and feature, then each jagged
    feature as (name, padded [B, L], lengths [B]); built on the tensors' device, no host sync."""
    b = cat.shape[0]
    values = [cat.t().reshape(-1)]
    lengths = [torch.ones(b * cat.shape[1], dtype=torch.int32, device=cat.device)]
    for _, padded, ln in jagged:
        mask = torch.arange(padded.shape[1], device=padded.device).unsqueeze(0) < ln.unsqueeze(1)
        values.append(padded[mask])
        lengths.append(ln.to(torch.int32))
    return KeyedJaggedTensor(
        keys=[*keys, *(name for name, _, _ in jagged)],
        values=torch.cat(values).to(torch.int64),
        lengths=torch.cat(lengths),
        stride=b,
    )


class _Tower(nn.Module):
    """Shared plumbing: constructor kwargs kept for export, chunked no-grad embedding for inference."""

    init_kwargs: dict[str, Any]

    def inputs(self, encoded: dict[str, np.ndarray]) -> tuple[Any, ...]:
        raise NotImplementedError

    def embed(self, encoded: dict[str, np.ndarray], chunk: int = EMBED_CHUNK) -> np.ndarray:
        """L2-normalised float32 embeddings, one row per encoded row (computed on the tower's device).

        An unsharded tower on CPU runs `forward_plain` (the same tables and MLP without building a
        KeyedJaggedTensor): for the one-row batches of serving, KJT set-up costs more than the model;
        up to NUMPY_MAX_ROWS rows it runs `forward_numpy`, the same arithmetic without torch."""
        if n_rows(encoded) <= NUMPY_MAX_ROWS and not self.training and self._plain_cpu():
            return self.forward_numpy(encoded)
        return self._embed_torch(encoded, chunk)

    def _plain_cpu(self) -> bool:
        return isinstance(self.ebc, EmbeddingBagCollection) and next(self.parameters()).device.type == "cpu"

    @torch.no_grad()
    def _embed_torch(self, encoded: dict[str, np.ndarray], chunk: int) -> np.ndarray:
        was_training = self.training
        if was_training:
            self.eval()
        n = n_rows(encoded)
        device = next(self.parameters()).device
        plain = device.type == "cpu" and isinstance(self.ebc, EmbeddingBagCollection)
        parts = []
        for s in range(0, n, chunk):
            rows = encoded if n <= chunk else take_rows(encoded, np.arange(s, min(s + chunk, n)))
            out = self.forward_plain(rows) if plain else self(*(x.to(device) for x in self.inputs(rows)))
            parts.append(out.cpu().numpy())
        if was_training:
            self.train()
        out_dim = self.init_kwargs["output_dim"]
        return np.concatenate(parts).astype(np.float32) if parts else np.zeros((0, out_dim), np.float32)

    def forward_plain(self, encoded: dict[str, np.ndarray]) -> torch.Tensor:
        raise NotImplementedError

    def forward_numpy(self, encoded: dict[str, np.ndarray]) -> np.ndarray:
        raise NotImplementedError

    def _numpy_weights(self) -> tuple[dict[str, tuple[np.ndarray, str]], list[tuple[np.ndarray, np.ndarray] | None]]:
        """Numpy views of the tables (feature -> (weight, pooling mode)) and of the MLP's layers
        ((weight transposed, bias); None for a ReLU), made once per tower. Views share the
        parameters' storage, so in-place updates (optimizer steps, load_state_dict) show in them;
        moving or casting the module (`_apply`) drops them."""
        got = _NUMPY_WEIGHTS.get(self)
        if got is None:
            tables = {name.removeprefix("t_"): (bag.weight.detach().numpy(), bag.mode)
                      for name, bag in self.ebc.embedding_bags.items()}
            layers: list[tuple[np.ndarray, np.ndarray] | None] = []
            for layer in self.mlp:
                if isinstance(layer, nn.Linear):
                    layers.append((layer.weight.detach().numpy().T, layer.bias.detach().numpy()))
                elif isinstance(layer, nn.ReLU):
                    layers.append(None)
                else:
                    raise ValueError(f"layer {type(layer).__name__} has no numpy path")
            got = _NUMPY_WEIGHTS[self] = (tables, layers)
        return got

    def _apply(self, fn: Any, recurse: bool = True) -> Any:
        _NUMPY_WEIGHTS.pop(self, None)
        return super()._apply(fn, recurse)

    def _pooled_numpy(self, encoded: dict[str, np.ndarray], jagged: Sequence[tuple[str, str, str]] = ()
                      ) -> list[np.ndarray]:
        """`_pooled_plain` in numpy."""
        tables, _ = self._numpy_weights()
        pooled = [tables[f][0][np.asarray(encoded[f], dtype=np.int64)] for f in self.features]
        for feature, values, lengths in jagged:
            weight, mode = tables[feature]
            lens = np.asarray(encoded[lengths], dtype=np.int64)
            rows = weight[np.asarray(encoded[values], dtype=np.int64)]
            out = np.zeros((len(lens), weight.shape[1]), dtype=weight.dtype)
            np.add.at(out, np.repeat(np.arange(len(lens)), lens), rows)
            if mode == "mean":  # an empty bag pools to zeros, as embedding_bag's does
                out /= np.maximum(lens, 1).astype(weight.dtype)[:, None]
            elif mode != "sum":
                raise ValueError(f"{feature}: pooling mode {mode!r} has no numpy path")
            pooled.append(out)
        return pooled

    def _mlp_numpy(self, x: np.ndarray) -> np.ndarray:
        """`self.mlp` in numpy, then L2 normalisation as F.normalize does it."""
        for layer in self._numpy_weights()[1]:
            x = np.maximum(x, 0) if layer is None else x @ layer[0] + layer[1]
        norm = np.linalg.norm(x, axis=1, keepdims=True)
        return (x / np.maximum(norm, 1e-12)).astype(np.float32)

    def _pooled_plain(self, encoded: dict[str, np.ndarray], jagged: Sequence[tuple[str, str, str]] = ()) -> list[torch.Tensor]:
        """The EBC's pooled output, table by table, with plain torch ops on its own weights:
        one-id features are row lookups (sum over one id); each jagged feature (feature,
        values key, lengths key) is an embedding_bag with its table's pooling mode."""
        bags = self.ebc.embedding_bags
        pooled = [bags[f"t_{f}"].weight[torch.from_numpy(np.asarray(encoded[f], dtype=np.int64))]
                  for f in self.features]
        for feature, values, lengths in jagged:
            bag = bags[f"t_{feature}"]
            lens = torch.from_numpy(np.asarray(encoded[lengths], dtype=np.int64))
            offsets = torch.cumsum(lens, 0) - lens
            pooled.append(F.embedding_bag(torch.from_numpy(np.asarray(encoded[values], dtype=np.int64)),
                                          bag.weight, offsets, mode=bag.mode))
        return pooled


class QueryTower(_Tower):
    """Customer id + profile + request context + mean-pooled purchase history -> unit vector."""

    def __init__(
        self,
        cardinalities: dict[str, int],
        n_articles: int,
        embedding_dim: int,
        hidden_dims: Sequence[int],
        output_dim: int,
        n_dense: int = N_QUERY_DENSE,
    ) -> None:
        super().__init__()
        self.init_kwargs = dict(
            cardinalities=dict(cardinalities), n_articles=n_articles, embedding_dim=embedding_dim,
            hidden_dims=list(hidden_dims), output_dim=output_dim, n_dense=n_dense,
        )
        self.features = list(cardinalities)  # model order: the vocab's query features (q_cat's columns)
        tables = [_table(f, cardinalities[f], embedding_dim) for f in self.features]
        tables.append(_table(HIST_FEATURE, n_articles, embedding_dim, PoolingType.MEAN))
        self.ebc = EmbeddingBagCollection(tables=tables, device=torch.device("cpu"))
        self.mlp = _mlp(embedding_dim * len(tables) + n_dense, hidden_dims, output_dim)

    @property
    def history_table(self) -> nn.EmbeddingBag:
        return self.ebc.embedding_bags[f"t_{HIST_FEATURE}"]

    def inputs(self, encoded: dict[str, np.ndarray]) -> tuple[KeyedJaggedTensor, torch.Tensor]:
        kjt = _kjt(encoded, self.features, {HIST_FEATURE: (HIST_VALUES, HIST_LENGTHS)})
        return kjt, torch.from_numpy(np.ascontiguousarray(encoded[DENSE], dtype=np.float32))

    def batch_inputs(
        self, q_cat: torch.Tensor, q_hist: torch.Tensor, q_hist_len: torch.Tensor, q_dense: torch.Tensor
    ) -> tuple[KeyedJaggedTensor, torch.Tensor]:
        """Forward inputs from fixed-width tensors (see `training.features.fixed_width_queries`)."""
        return padded_kjt(self.features, q_cat, [(HIST_FEATURE, q_hist, q_hist_len)]), q_dense.to(torch.float32)

    def forward(self, kjt: KeyedJaggedTensor, dense: torch.Tensor) -> torch.Tensor:
        pooled = self.ebc(kjt).values()  # [B, n_tables * dim], table order
        return F.normalize(self.mlp(torch.cat([pooled, dense], dim=1)), dim=-1)

    def forward_plain(self, encoded: dict[str, np.ndarray]) -> torch.Tensor:
        pooled = self._pooled_plain(encoded, [(HIST_FEATURE, HIST_VALUES, HIST_LENGTHS)])
        dense = torch.from_numpy(np.ascontiguousarray(encoded[DENSE], dtype=np.float32))
        return F.normalize(self.mlp(torch.cat([*pooled, dense], dim=1)), dim=-1)

    def forward_numpy(self, encoded: dict[str, np.ndarray]) -> np.ndarray:
        pooled = self._pooled_numpy(encoded, [(HIST_FEATURE, HIST_VALUES, HIST_LENGTHS)])
        dense = np.asarray(encoded[DENSE], dtype=np.float32)
        return self._mlp_numpy(np.concatenate([*pooled, dense], axis=1))


class ItemTower(_Tower):
    """Article id + attributes + price bucket -> unit vector."""

    def __init__(
        self, cardinalities: dict[str, int], embedding_dim: int, hidden_dims: Sequence[int], output_dim: int
    ) -> None:
        super().__init__()
        self.init_kwargs = dict(
            cardinalities=dict(cardinalities), embedding_dim=embedding_dim,
            hidden_dims=list(hidden_dims), output_dim=output_dim,
        )
        self.features = list(cardinalities)  # model order: the vocab's item features (i_cat's columns)
        tables = [_table(f, cardinalities[f], embedding_dim) for f in self.features]
        self.ebc = EmbeddingBagCollection(tables=tables, device=torch.device("cpu"))
        self.mlp = _mlp(embedding_dim * len(tables), hidden_dims, output_dim)

    @property
    def article_table(self) -> nn.EmbeddingBag:
        return self.ebc.embedding_bags["t_article_id"]

    def inputs(self, encoded: dict[str, np.ndarray]) -> tuple[KeyedJaggedTensor]:
        return (_kjt(encoded, self.features, {}),)

    def batch_inputs(self, i_cat: torch.Tensor) -> tuple[KeyedJaggedTensor]:
        """Forward inputs from the fixed-width [B, n item features] id tensor."""
        return (padded_kjt(self.features, i_cat),)

    def forward(self, kjt: KeyedJaggedTensor) -> torch.Tensor:
        return F.normalize(self.mlp(self.ebc(kjt).values()), dim=-1)

    def forward_plain(self, encoded: dict[str, np.ndarray]) -> torch.Tensor:
        return F.normalize(self.mlp(torch.cat(self._pooled_plain(encoded), dim=1)), dim=-1)

    def forward_numpy(self, encoded: dict[str, np.ndarray]) -> np.ndarray:
        return self._mlp_numpy(np.concatenate(self._pooled_numpy(encoded), axis=1))


class EnsembleTower(nn.Module):
    """Towers of one kind (all query or all item towers) served as one: `embed` concatenates each
    member's L2-normalised vector scaled by 1/sqrt(n). The result is a unit vector again, and the dot
    product of a query and an item embedding is the mean of the members' dot products (cosines)."""

    def __init__(self, members: Sequence[_Tower]) -> None:
        super().__init__()
        if not members:
            raise ValueError("an ensemble needs at least one member")
        self.members = nn.ModuleList(members)
        first = dict(members[0].init_kwargs)
        self.init_kwargs = {**first, "output_dim": sum(m.init_kwargs["output_dim"] for m in members),
                            "members": len(members)}

    def embed(self, encoded: dict[str, np.ndarray], chunk: int = EMBED_CHUNK) -> np.ndarray:
        parts = [m.embed(encoded, chunk) for m in self.members]
        return (np.concatenate(parts, axis=1) / np.float32(np.sqrt(len(parts)))).astype(np.float32)


class TwoTower(nn.Module):
    """Both towers, with the history table tied to the item article-id table (one nn.Parameter).

    `tie_history=False` keeps two tables (same shape, separately trained): TorchRec's
    DistributedModelParallel shards each EmbeddingBagCollection on its own and cannot share a
    table between two of them, so the sharded path trains untied. Serving is unaffected: the
    exported query tower always carries its own history table.
    """

    def __init__(self, query_kwargs: dict[str, Any], item_kwargs: dict[str, Any], tie_history: bool = True) -> None:
        super().__init__()
        self.query_tower = QueryTower(**query_kwargs)
        self.item_tower = ItemTower(**item_kwargs)
        self.tie_history = tie_history
        if self.query_tower.history_table.weight.shape != self.item_tower.article_table.weight.shape:
            raise ValueError("history table and article table must have the same shape to be shared")
        if tie_history:
            self.query_tower.history_table.weight = self.item_tower.article_table.weight

    @classmethod
    def from_vocab(cls, vocab: FeatureVocab, cfg: TwoTowerConfig, tie_history: bool = True) -> TwoTower:
        return cls(*tower_kwargs(vocab, cfg), tie_history=tie_history)

    def init_kwargs(self) -> tuple[dict[str, Any], dict[str, Any]]:
        return self.query_tower.init_kwargs, self.item_tower.init_kwargs

    def forward(
        self, q_kjt: KeyedJaggedTensor, q_dense: torch.Tensor, i_kjt: KeyedJaggedTensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        return self.query_tower(q_kjt, q_dense), self.item_tower(i_kjt)


def tower_kwargs(vocab: FeatureVocab, cfg: TwoTowerConfig) -> tuple[dict[str, Any], dict[str, Any]]:
    """Constructor kwargs of both towers: everything needed to rebuild them besides the weights."""
    common = dict(embedding_dim=cfg.embedding_dim, hidden_dims=list(cfg.hidden_dims), output_dim=cfg.output_dim)
    query = dict(cardinalities=vocab.query_cardinalities(), n_articles=vocab.n_articles, n_dense=N_QUERY_DENSE, **common)
    return query, dict(cardinalities=vocab.item_cardinalities(), **common)


# -- loss -------------------------------------------------------------------------------------------
def in_batch_softmax_loss(
    q: torch.Tensor,
    i: torch.Tensor,
    item_ids: torch.Tensor,
    temperature: float,
    log_q: torch.Tensor | None = None,
) -> torch.Tensor:
    """Sampled softmax over the batch's items, each query's own item is the positive.

    `q` is [B, d]; `i` is [B + K, d]: row r < B is query r's positive, any further rows are extra
    negatives shared by every query (e.g. random catalogue articles). `item_ids` ([B + K]) are the
    candidates' article ids. Accidental hits (query r's own article at another column) are masked
    out, so a popular article is never pushed away from a query that bought it. `log_q` ([B + K],
    aligned with the columns: log of how often each column's article is expected among the
    candidates, see `candidate_log_q`) is subtracted from the logits to undo the sampling's bias
    toward popular articles.
    """
    b = q.shape[0]
    logits = (q @ i.T) / temperature
    if log_q is not None:
        logits = logits - log_q.to(logits.dtype).unsqueeze(0)
    hits = item_ids[:b].unsqueeze(1) == item_ids.unsqueeze(0)
    hits[:, :b] &= ~torch.eye(b, dtype=torch.bool, device=q.device)
    logits = logits.masked_fill(hits, torch.finfo(logits.dtype).min)
    return F.cross_entropy(logits, torch.arange(b, device=q.device))


def candidate_log_q(
    probs: torch.Tensor, ids: torch.Tensor, batch_size: int, n_random: int = 0, n_catalog: int = 1
) -> torch.Tensor:
    """log(expected occurrences among the candidates) per candidate column (mixed negative sampling).

    In-batch candidates are drawn by popularity (`probs`, per article row: B draws), the extra ones
    uniformly from a catalogue of `n_catalog` (K draws), so article j is expected
    B * p_j + K / n_catalog times. Without extra negatives this is log p_j + log B: the plain
    logQ correction up to a constant, which the softmax ignores.
    """
    return mixed_log_q(probs[ids], batch_size, n_random, n_catalog)


def mixed_log_q(p: torch.Tensor, batch_size: int, n_random: int = 0, n_catalog: int = 1) -> torch.Tensor:
    """`candidate_log_q` from each column's own in-batch probability `p` (e.g. per time group)."""
    return torch.log(batch_size * p.to(torch.float32) + (n_random / max(n_catalog, 1)))


# -- export -------------------------------------------------------------------------------------------
def save_towers(
    model: TwoTower | Sequence[TwoTower], vocab: FeatureVocab, cfg: TwoTowerConfig, out_dir: str | Path
) -> dict[str, Path]:
    """Write the two towers (weights + constructor kwargs) and the vocab; return their paths.

    A sequence of models (an ensemble, one vocab) goes into the same two files, one entry per member;
    one model (or a sequence of one) is written in the single-model form."""
    models = [model] if isinstance(model, TwoTower) else list(model)
    if not models:
        raise ValueError("save_towers needs at least one model")
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    paths = {"query_tower": out / QUERY_TOWER_FILE, "item_tower": out / ITEM_TOWER_FILE, "vocab": out / VOCAB_FILE}
    for key in ("query_tower", "item_tower"):
        entries = [_tower_entry(getattr(m, key)) for m in models]
        blob = entries[0] if len(entries) == 1 else {"members": entries}
        torch.save({**blob, "config": cfg.model_dump()}, paths[key])
    vocab.save(paths["vocab"])
    return paths


def _tower_entry(tower: _Tower) -> dict[str, Any]:
    return {"init": tower.init_kwargs, "state_dict": {k: v.detach().clone() for k, v in tower.state_dict().items()}}


def _build(cls: type[_Tower], entry: dict[str, Any]) -> _Tower:
    tower = cls(**entry["init"])
    tower.load_state_dict(entry["state_dict"])
    return tower.eval()


def _load(cls: type[_Tower], path: Path) -> _Tower | EnsembleTower:
    blob = torch.load(path, map_location="cpu", weights_only=True)
    if "members" in blob:
        return EnsembleTower([_build(cls, e) for e in blob["members"]]).eval()
    return _build(cls, blob)


def load_query_tower(model_dir: str | Path) -> tuple[QueryTower | EnsembleTower, FeatureVocab]:
    """The query tower (an `EnsembleTower` of query towers for an ensemble) and the vocab."""
    d = Path(model_dir)
    return _load(QueryTower, d / QUERY_TOWER_FILE), FeatureVocab.load(d / VOCAB_FILE)  # type: ignore[return-value]


def load_item_tower(model_dir: str | Path) -> tuple[ItemTower | EnsembleTower, FeatureVocab]:
    """The item tower (an `EnsembleTower` of item towers for an ensemble) and the vocab."""
    d = Path(model_dir)
    return _load(ItemTower, d / ITEM_TOWER_FILE), FeatureVocab.load(d / VOCAB_FILE)  # type: ignore[return-value]
