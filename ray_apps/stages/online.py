"""Online feature reads for a request: one batched query per feature group."""
from __future__ import annotations

from typing import Any

from common.artifacts import Manifest
from feature_store.online.base import OnlineStore
from feature_store.store import read_online, read_online_many


class OnlineFeatures:
    def __init__(self, store: OnlineStore, manifest: Manifest):
        self.store = store
        self.refs = manifest.feature_groups

    def customer(self, customer_id: str) -> tuple[dict[str, Any] | None, dict[str, Any] | None]:
        """Profile and purchase history (None for an unknown customer)."""
        return self.customers([customer_id])[customer_id]

    def customers(self, customer_ids: list[str]) -> dict[str, tuple[dict[str, Any] | None, dict[str, Any] | None]]:
        """`customer` for many ids, both groups in one statement (batched query encoding)."""
        prof, hist = read_online_many(self.store, [(self.refs["customers"], "customers", customer_ids),
                                                   (self.refs["customer_history"], "customer_history", customer_ids)])
        return {c: (prof.get(c), hist.get(c)) for c in customer_ids}

    def articles(self, article_ids: list[str]) -> dict[str, dict[str, Any]]:
        return read_online(self.store, self.refs["articles"], "articles", article_ids)
