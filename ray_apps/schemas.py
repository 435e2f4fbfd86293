"""Request and response types of the HTTP API, and the contracts between serving stages."""
from __future__ import annotations

import datetime as dt
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field


class Context(BaseModel):
    """Request context: when and through which channel the customer is shopping."""

    model_config = ConfigDict(extra="forbid")
    date: dt.date | None = Field(None, description="Shopping date (YYYY-MM-DD); today when absent")
    sales_channel: Literal[1, 2] | None = Field(None, description="1 = store, 2 = online; 2 when absent")


class RecommendRequest(BaseModel):
    model_config = ConfigDict(extra="forbid")
    customer_id: str = Field(..., min_length=1, max_length=64, strict=True)
    k: int = Field(12, ge=1, le=100, strict=True)
    context: Context = Context()
    debug: bool = Field(False, strict=True)


class ScoredItem(BaseModel):
    article_id: str
    score: float


class RecommendResponse(BaseModel):
    request_id: str
    customer_id: str
    items: list[ScoredItem]
    debug: dict[str, Any] | None = None


class Candidates(BaseModel):
    """What retrieval hands to filtering and ranking: ids with their retrieval scores."""

    article_ids: list[str]
    scores: list[float]


class QueryContext(BaseModel):
    """What the query encoder read online, passed down so later stages need not read it again."""

    customer_id: str
    known_customer: bool
    customer: dict[str, Any] | None
    history: dict[str, Any] | None
    purchased: list[str]
    vector: list[float]
    sales_channel: int
