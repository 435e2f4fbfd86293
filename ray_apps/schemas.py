"""Request and response types of the HTTP API, and the contracts between serving stages."""
from __future__ import annotations

import datetime as dt
from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, StringConstraints


class Context(BaseModel):
    """Request context: when and through which channel the customer is shopping."""

    model_config = ConfigDict(extra="forbid")
    date: dt.date | None = Field(None, description="Shopping date (YYYY-MM-DD); today when absent")
    sales_channel: Literal[1, 2] | None = Field(None, description="1 = store, 2 = online; 2 when absent")
    age: int | None = Field(None, ge=0, le=120, strict=True,
                            description="The shopper's age when the customer is unknown (cold start by age group)")


class Filters(BaseModel):
    """Request-level filters, applied after the business rules (stock, age, region, bought)."""

    model_config = ConfigDict(extra="forbid")
    index_groups: list[Annotated[str, StringConstraints(min_length=1, max_length=64)]] | None = Field(
        None, min_length=1, max_length=50, description="Only articles of these index groups, e.g. ['Menswear']")
    max_price: float | None = Field(None, gt=0, allow_inf_nan=False,
                                    description="Only articles at most this price (the data's price units)")


class RecommendRequest(BaseModel):
    model_config = ConfigDict(extra="forbid")
    customer_id: str = Field(..., min_length=1, max_length=64, strict=True)
    k: int = Field(12, ge=1, le=100, strict=True)
    context: Context = Context()
    filters: Filters | None = None
    debug: bool = Field(False, strict=True)


class ScoredItem(BaseModel):
    article_id: str
    score: float


Source = Literal["ranked", "popular"]


class RecommendResponse(BaseModel):
    request_id: str
    customer_id: str
    items: list[ScoredItem]
    source: Source = Field("ranked", description="ranked: retrieval + ranker; popular: cold start or fallback")
    degraded: bool = Field(False, description="the online store was unavailable: answered from the last good "
                                              "data or popularity")
    model: dict[str, Any] = Field(default_factory=dict, description="run and index version that answered")
    warnings: list[str] = Field(default_factory=list, description="e.g. fewer than k articles passed the filters")
    debug: dict[str, Any] | None = None


class SimilarResponse(BaseModel):
    request_id: str
    article_id: str
    items: list[ScoredItem]
    model: dict[str, Any] = Field(default_factory=dict)


Text = Annotated[str, StringConstraints(min_length=1, max_length=500, strip_whitespace=True)]
Id = Annotated[str, StringConstraints(min_length=1, max_length=64)]


class SearchRequest(BaseModel):
    model_config = ConfigDict(extra="forbid")
    query: Text
    customer_id: Id | None = None
    k: int = Field(12, ge=1, le=100, strict=True)
    context: Context = Context()
    debug: bool = Field(False, strict=True)


class SearchResponse(RecommendResponse):
    query: str


class Event(BaseModel):
    """One customer event; `event_id` makes retries safe (an id seen before changes nothing)."""

    model_config = ConfigDict(extra="forbid")
    event_id: Id
    customer_id: Id
    article_id: Id
    type: Literal["view", "click", "add_to_cart", "purchase"]
    ts: dt.datetime | None = Field(None, description="When it happened (ISO 8601); now when absent")
    price: float | None = Field(None, ge=0, allow_inf_nan=False,
                                description="Price paid (purchases); the article's mean price when absent")
    sales_channel: Literal[1, 2] | None = None


class EventBatch(BaseModel):
    model_config = ConfigDict(extra="forbid")
    events: list[Event] = Field(..., min_length=1, max_length=500)


class EventResult(BaseModel):
    event_id: str
    type: str
    applied: bool = Field(..., description="False: this event id was applied before (nothing changed)")
    pending: bool = Field(False, description="logged durably; the online update waits for the store")


class EventsResponse(BaseModel):
    results: list[EventResult]


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
    degraded: bool = False
