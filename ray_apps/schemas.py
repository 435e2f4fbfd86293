"""Request and response types of the HTTP API, and the contracts between serving stages."""
from __future__ import annotations

import datetime as dt
from typing import Annotated, Any, Literal

from pydantic import AfterValidator, BaseModel, BeforeValidator, ConfigDict, Field, StringConstraints

# how far ahead of this server's clock an event may be dated (clients' clocks drift); a later
# one would move the article's sales window past every real sale until the next batch build
EVENT_CLOCK_SKEW = dt.timedelta(days=1)
EARLIEST_EVENT = dt.datetime(1970, 1, 1)


def _no_bool(v: Any) -> Any:
    """JSON `true` is not the number 1 (pydantic's lax mode would take it as 1)."""
    if isinstance(v, bool):
        raise ValueError("expected a number, not a boolean")
    return v


def _iso_text(v: Any) -> Any:
    """Dates and times as ISO 8601 text only: lax mode would read a number as seconds since 1970."""
    if isinstance(v, int | float):
        raise ValueError("expected an ISO 8601 string")
    return v


def _event_time(v: dt.datetime | None) -> dt.datetime | None:
    """A time the event log and the online rows can hold: 1970 to a day after now (UTC)."""
    if v is None:
        return v
    if v.tzinfo is not None and 1970 < v.year < 9999:  # (converting year 1 or 9999 can overflow)
        v = v.astimezone(dt.UTC).replace(tzinfo=None)
    if v.tzinfo is not None or not EARLIEST_EVENT <= v <= dt.datetime.now(dt.UTC).replace(tzinfo=None) + EVENT_CLOCK_SKEW:
        raise ValueError("must be after 1970-01-01 and at most a day from now (UTC)")
    return v


Channel = Annotated[Literal[1, 2] | None, BeforeValidator(_no_bool)]
IsoDate = Annotated[dt.date | None, BeforeValidator(_iso_text)]
EventTime = Annotated[dt.datetime | None, BeforeValidator(_iso_text), AfterValidator(_event_time)]


class Context(BaseModel):
    """Request context: when and through which channel the customer is shopping."""

    model_config = ConfigDict(extra="forbid")
    date: IsoDate = Field(None, description="Shopping date (YYYY-MM-DD); today when absent")
    sales_channel: Channel = Field(None, description="1 = store, 2 = online; 2 when absent")
    age: int | None = Field(None, ge=0, le=120, strict=True,
                            description="The shopper's age when the customer is unknown (cold start by age group)")


class Filters(BaseModel):
    """Request-level filters, applied after the business rules (stock, age, region, bought)."""

    model_config = ConfigDict(extra="forbid")
    index_groups: list[Annotated[str, StringConstraints(min_length=1, max_length=64)]] | None = Field(
        None, min_length=1, max_length=50, description="Only articles of these index groups, e.g. ['Menswear']")
    max_price: float | None = Field(None, gt=0, allow_inf_nan=False, strict=True,
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
def _no_trailing_space(v: str) -> str:
    """Ids are keys of the online store, whose servers compare them without trailing spaces."""
    if v.endswith(" "):
        raise ValueError("must not end with a space")
    return v


Id = Annotated[str, StringConstraints(min_length=1, max_length=64), AfterValidator(_no_trailing_space)]


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
    ts: EventTime = Field(None, description="When it happened (ISO 8601; UTC unless it has an offset), "
                                            "after 1970 and at most a day from now; now when absent")
    price: float | None = Field(None, ge=0, allow_inf_nan=False, strict=True,
                                description="Price paid (purchases); the article's mean price when absent")
    sales_channel: Channel = None


class EventBatch(BaseModel):
    model_config = ConfigDict(extra="forbid")
    events: list[Event] = Field(..., min_length=1, max_length=500)


class EventResult(BaseModel):
    event_id: str
    type: str
    applied: bool = Field(..., description="False: this event id was applied before (nothing changed)")
    pending: bool = Field(False, description="logged durably; the online update waits for the store")
    error: str | None = Field(None, description="why the online update failed (the event is logged durably, "
                                                "and the next pipeline run reads it)")


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
