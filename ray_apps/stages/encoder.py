"""Query encoding: online customer features + request context -> query vector."""
from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np

from feature_store.views import query_row
from training.features import as_columns, encode_queries
from training.two_tower.model import load_query_tower


class QueryEncoder:
    def __init__(self, model_dir: Path, history_len: int):
        import torch

        torch.set_num_threads(1)
        self.tower, self.vocab = load_query_tower(model_dir)
        self.history_len = history_len

    def encode(self, customer_id: str, customer: dict[str, Any] | None, purchased: list[str], month: int,
               channel: int) -> np.ndarray:
        row = query_row(customer, customer_id, purchased[: self.history_len], month, channel)
        return self.tower.embed(encode_queries(self.vocab, as_columns([row]), self.history_len))[0]
