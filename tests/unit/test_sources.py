"""Tests for the H&M-schema generator and loader (feature_store.sources).

The structure tests are chosen so that uniformly random data would fail them: the model
stages downstream rely on this structure existing.
"""
from __future__ import annotations

import re
import shutil
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from feature_store.sources import (
    ARTICLES_COLUMNS,
    CLUB_MEMBER_STATUSES,
    CUSTOMERS_COLUMNS,
    EXTRA_TABLES,
    FASHION_NEWS_FREQUENCIES,
    FILES,
    REGIONS,
    TRANSACTIONS_COLUMNS,
    DataError,
    HMData,
    generate,
    load_hm,
)

STRUCTURE_SIZE = {"customers": 1000, "articles": 1000, "days": 56}
TINY_SIZE = {"customers": 40, "articles": 30, "days": 14}


def _raw(path: Path) -> pd.DataFrame:
    """A file exactly as written: every value a string, empty stays empty."""
    return pd.read_csv(path, dtype=str, keep_default_na=False)


def _lines(path: Path) -> list[str]:
    return path.read_text().splitlines()


def _write_lines(path: Path, lines: list[str]) -> None:
    path.write_text("\n".join(lines) + "\n")


def _set_field(path: Path, line_no: int, column: str, value: str) -> None:
    """Replace one field on a 1-based line (header = line 1) of a quote-free CSV line."""
    lines = _lines(path)
    pos = lines[0].split(",").index(column)
    fields = lines[line_no - 1].split(",")
    fields[pos] = value
    lines[line_no - 1] = ",".join(fields)
    _write_lines(path, lines)


@pytest.fixture(scope="module")
def structured(tmp_path_factory: pytest.TempPathFactory) -> dict[str, pd.DataFrame]:
    out = tmp_path_factory.mktemp("structured")
    paths = generate(out, seed=1, **STRUCTURE_SIZE)
    return {name: _raw(path) for name, path in paths.items()}


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("tiny")
    generate(out, seed=7, **TINY_SIZE)
    return out


@pytest.fixture()
def data_dir(tiny_dir: Path, tmp_path: Path) -> Path:
    """A private copy of the tiny data set that a test may corrupt."""
    target = tmp_path / "data"
    shutil.copytree(tiny_dir, target)
    return target


@pytest.fixture()
def transactions(structured: dict[str, pd.DataFrame]) -> pd.DataFrame:
    tr = structured["transactions"].copy()
    tr["t_dat"] = pd.to_datetime(tr["t_dat"])
    return tr.merge(structured["articles"], on="article_id").merge(structured["customers"], on="customer_id")


# --- generator: files and formats -------------------------------------------------------


def test_generate_writes_every_file_with_exact_headers(tiny_dir: Path) -> None:
    expected = {
        "articles": ARTICLES_COLUMNS,
        "customers": CUSTOMERS_COLUMNS,
        "transactions": TRANSACTIONS_COLUMNS,
        "stock": ["article_id", "stock"],
        "regions": ["article_id", "region"],
        "age_restriction": ["article_id", "min_age"],
        "postal_regions": ["postal_code", "region"],
    }
    assert set(FILES) == set(expected)
    for name, columns in expected.items():
        assert _lines(tiny_dir / FILES[name])[0] == ",".join(columns), name


def test_generate_returns_paths_by_logical_name(tmp_path: Path) -> None:
    paths = generate(tmp_path, seed=3, **TINY_SIZE)
    assert paths == {name: tmp_path / file for name, file in FILES.items()}
    assert not list(tmp_path.glob("*.tmp"))


def test_article_value_formats(structured: dict[str, pd.DataFrame]) -> None:
    art = structured["articles"]
    assert len(art) == STRUCTURE_SIZE["articles"]
    assert art["article_id"].str.fullmatch(r"0\d{9}").all()
    assert art["article_id"].is_unique
    assert (art["article_id"].str[1:7].astype(int) == art["product_code"].astype(int)).all()
    for col in ("product_type_no", "graphical_appearance_no", "colour_group_code", "department_no",
                "index_group_no", "section_no", "garment_group_no"):
        assert art[col].str.fullmatch(r"\d+").all(), col
    assert set(art["index_group_name"]) == {"Ladieswear", "Menswear", "Baby/Children", "Sport", "Divided"}
    assert {"Trousers", "Dress", "Sweater", "T-shirt", "Socks", "Bra"} <= set(art["product_type_name"])
    assert art["index_code"].str.fullmatch(r"[A-Z]").all()
    # One product code = one product: variants share type and name.
    assert (art.groupby("product_code")[["product_type_no", "prod_name"]].nunique() == 1).all().all()
    assert (art["detail_desc"].str.len() > 10).mean() > 0.95


def test_customer_value_formats(structured: dict[str, pd.DataFrame]) -> None:
    cust = structured["customers"]
    assert len(cust) == STRUCTURE_SIZE["customers"]
    assert cust["customer_id"].str.fullmatch(r"[0-9a-f]{64}").all()
    assert cust["customer_id"].is_unique
    assert cust["postal_code"].str.fullmatch(r"[0-9a-f]{64}").all()
    assert set(cust["FN"]) <= {"1.0", ""} and set(cust["Active"]) <= {"1.0", ""}
    assert set(cust["club_member_status"]) <= set(CLUB_MEMBER_STATUSES) | {""}
    assert set(cust["fashion_news_frequency"]) <= set(FASHION_NEWS_FREQUENCIES) | {""}
    age = cust["age"]
    assert age[age != ""].str.fullmatch(r"\d{2}").all()
    assert 0.005 < (age == "").mean() < 0.08
    assert age[age != ""].astype(int).between(16, 100).all()


def test_transaction_value_formats(structured: dict[str, pd.DataFrame]) -> None:
    tr = structured["transactions"]
    n_cust = STRUCTURE_SIZE["customers"]
    assert 12 * n_cust * 56 / 120 < len(tr) < 45 * n_cust * 56 / 120  # ~25-40 per customer per 120 days
    assert tr["t_dat"].str.fullmatch(r"\d{4}-\d{2}-\d{2}").all()
    days = pd.to_datetime(tr["t_dat"], format="%Y-%m-%d")
    assert days.min() >= pd.Timestamp("2020-06-01")
    assert days.max() < pd.Timestamp("2020-06-01") + pd.Timedelta(days=STRUCTURE_SIZE["days"])
    assert days.is_monotonic_increasing  # the Kaggle file is in date order
    assert set(tr["sales_channel_id"]) == {"1", "2"}
    price = tr["price"].astype(float)
    assert price.between(0.0005, 1.0).all()
    assert 0.005 < price.median() < 0.2
    assert set(tr["article_id"]) <= set(structured["articles"]["article_id"])
    assert set(tr["customer_id"]) <= set(structured["customers"]["customer_id"])


def test_generate_is_deterministic_per_seed(tmp_path: Path) -> None:
    a = generate(tmp_path / "a", seed=11, **TINY_SIZE)
    b = generate(tmp_path / "b", seed=11, **TINY_SIZE)
    c = generate(tmp_path / "c", seed=12, **TINY_SIZE)
    for name in FILES:
        assert a[name].read_bytes() == b[name].read_bytes(), name
    assert a["transactions"].read_bytes() != c["transactions"].read_bytes()
    assert a["customers"].read_bytes() != c["customers"].read_bytes()


@pytest.mark.parametrize(
    ("kwargs", "name"),
    [({"customers": 9}, "customers"), ({"articles": 5}, "articles"), ({"days": 13}, "days"),
     ({"start_date": "not a date"}, "start_date")],
)
def test_generate_validates_parameters(tmp_path: Path, kwargs: dict[str, object], name: str) -> None:
    with pytest.raises(ValueError, match=name):
        generate(tmp_path, **kwargs)  # type: ignore[arg-type]


def test_generate_shows_progress(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    generate(tmp_path, seed=1, progress=True, **TINY_SIZE)
    err = capsys.readouterr().err
    assert "transactions" in err and len(err.splitlines()) >= 3
    generate(tmp_path, seed=1, progress=False, **TINY_SIZE)
    assert capsys.readouterr().err == ""


# --- generator: learnable structure ------------------------------------------------------


def test_popularity_is_long_tailed(structured: dict[str, pd.DataFrame]) -> None:
    counts = structured["transactions"]["article_id"].value_counts()
    top = counts.iloc[: len(structured["articles"]) // 10].sum()
    assert top / counts.sum() > 0.35  # uniform choice would give ~0.1-0.15


def test_weekends_sell_more(transactions: pd.DataFrame) -> None:
    per_day = transactions.groupby("t_dat").size()
    weekend = per_day.index.day_of_week >= 5
    assert per_day[weekend].mean() > 1.2 * per_day[~weekend].mean()


def test_customers_repeat_product_types(transactions: pd.DataFrame) -> None:
    """The share of a customer's purchases in their favourite type beats shuffled types."""

    def favourite_share(frame: pd.DataFrame) -> float:
        per_type = frame.groupby(["customer_id", "product_type_name"]).size()
        share = per_type.groupby(level=0).max() / frame.groupby("customer_id").size()
        return float(share[frame.groupby("customer_id").size() >= 8].mean())

    shuffled = transactions.copy()
    shuffled["product_type_name"] = np.random.default_rng(0).permutation(shuffled["product_type_name"].to_numpy())
    assert favourite_share(transactions) > favourite_share(shuffled) + 0.12


def test_age_drives_what_customers_buy(transactions: pd.DataFrame) -> None:
    age = pd.to_numeric(transactions["age"], errors="coerce")
    divided = transactions["index_group_name"] == "Divided"
    kids = transactions["index_group_name"] == "Baby/Children"
    assert divided[age < 25].mean() > 2 * divided[age >= 40].mean()
    assert kids[(age >= 30) & (age < 50)].mean() > 1.5 * kids[age < 25].mean()


def test_articles_are_introduced_over_time(transactions: pd.DataFrame) -> None:
    """Many articles first sell weeks into the period, and sell fastest when new."""
    start, end = transactions["t_dat"].min(), transactions["t_dat"].max()
    first = transactions.groupby("article_id")["t_dat"].min()
    late = first[first > start + pd.Timedelta(days=14)]
    assert len(late) > 0.15 * len(first)
    sold = transactions[transactions["article_id"].isin(late.index)]
    age_days = (sold["t_dat"] - sold["article_id"].map(late)).dt.days
    remaining = (end - late).dt.days + 1
    early_rate = (age_days < 14).sum() / remaining.clip(upper=14).sum()
    later_rate = (age_days >= 14).sum() / max(1, (remaining - 14).clip(lower=0).sum())
    assert early_rate > 1.5 * later_rate


def test_baskets_channels_and_activity(transactions: pd.DataFrame) -> None:
    baskets = transactions.groupby(["customer_id", "t_dat"]).size()
    assert baskets.mean() > 1.6 and (baskets >= 3).mean() > 0.15
    per_cust = transactions.groupby("customer_id")
    n = per_cust.size()
    main_share = per_cust["sales_channel_id"].agg(lambda s: s.value_counts(normalize=True).iloc[0])
    assert main_share[n >= 5].mean() > 0.85
    heavy = n.sort_values(ascending=False)
    assert heavy.iloc[: len(heavy) // 10].sum() > 0.25 * heavy.sum()


def test_same_article_is_rarely_bought_twice(transactions: pd.DataFrame) -> None:
    repeats = transactions.duplicated(["customer_id", "article_id"]).mean()
    assert 0.0 < repeats < 0.05


def test_extras_are_consistent(structured: dict[str, pd.DataFrame]) -> None:
    articles = set(structured["articles"]["article_id"])
    stock, regions = structured["stock"], structured["regions"]
    ages, postal = structured["age_restriction"], structured["postal_regions"]
    assert set(stock["article_id"]) == articles and stock["article_id"].is_unique
    assert stock["stock"].str.fullmatch(r"\d+").all() and 0 < (stock["stock"] == "0").mean() < 0.5
    assert set(regions["article_id"]) == articles and set(regions["region"]) == set(REGIONS)
    per_article = regions.groupby("article_id").size()
    assert (per_article == len(REGIONS)).mean() > 0.7
    assert set(ages["article_id"]) == articles and set(ages["min_age"]) == {"0", "18"}
    assert postal["postal_code"].is_unique and set(postal["region"]) <= set(REGIONS)
    assert set(structured["customers"]["postal_code"]) <= set(postal["postal_code"])


def test_history_respects_the_filters(transactions: pd.DataFrame, structured: dict[str, pd.DataFrame]) -> None:
    """No minor bought an 18+ article and nobody bought outside their region's assortment."""
    restricted = set(structured["age_restriction"].query("min_age == '18'")["article_id"])
    age = pd.to_numeric(transactions["age"], errors="coerce")
    assert not transactions[(age < 18) & transactions["article_id"].isin(restricted)].shape[0]
    region = transactions["postal_code"].map(structured["postal_regions"].set_index("postal_code")["region"])
    pairs = set(zip(structured["regions"]["article_id"], structured["regions"]["region"], strict=True))
    assert all((a, r) in pairs for a, r in zip(transactions["article_id"], region, strict=True))


# --- loader ----------------------------------------------------------------------------------


def test_load_round_trip(data_dir: Path) -> None:
    data = load_hm(data_dir)
    assert isinstance(data, HMData)
    for name in FILES:
        rep = data.report.files[FILES[name]]
        assert rep.rows == rep.kept == len(_lines(data_dir / FILES[name])) - 1
        assert rep.dropped == {}
    assert data.report.total_dropped == 0
    assert list(data.articles.columns) == ARTICLES_COLUMNS
    assert list(data.customers.columns) == CUSTOMERS_COLUMNS
    assert list(data.transactions.columns) == TRANSACTIONS_COLUMNS
    assert set(data.extras) == set(EXTRA_TABLES)

    tr, cust, art = data.transactions, data.customers, data.articles
    assert pd.api.types.is_datetime64_any_dtype(tr["t_dat"])
    assert tr["price"].dtype == np.float64 and tr["sales_channel_id"].dtype == np.int64
    assert pd.api.types.is_string_dtype(tr["article_id"]) and tr["article_id"].str.fullmatch(r"0\d{9}").all()
    for col in ("FN", "Active", "age"):
        assert cust[col].dtype == np.float64
    assert cust["age"].isna().sum() == (_raw(data_dir / FILES["customers"])["age"] == "").sum()
    for col in ("product_code", "product_type_no", "colour_group_code", "perceived_colour_value_id",
                "department_no", "index_group_no", "section_no", "garment_group_no"):
        assert art[col].dtype == np.int64, col
    assert pd.api.types.is_string_dtype(art["prod_name"])
    assert data.extras["stock"]["stock"].dtype == np.int64
    assert data.extras["age_restriction"]["min_age"].dtype == np.int64
    assert pd.api.types.is_string_dtype(data.extras["regions"]["region"])
    raw_tr = _raw(data_dir / FILES["transactions"])
    assert (tr["customer_id"] == raw_tr["customer_id"]).all()
    assert np.allclose(tr["price"], raw_tr["price"].astype(float))


def test_missing_extras_are_simply_absent(data_dir: Path) -> None:
    (data_dir / FILES["stock"]).unlink()
    (data_dir / FILES["postal_regions"]).unlink()
    data = load_hm(data_dir)
    assert set(data.extras) == {"regions", "age_restriction"}
    assert FILES["stock"] not in data.report.files


def test_missing_kaggle_file_is_an_error(data_dir: Path) -> None:
    (data_dir / FILES["customers"]).unlink()
    with pytest.raises(FileNotFoundError, match="customers.csv"):
        load_hm(data_dir)


def test_article_ids_without_leading_zero_are_normalised(data_dir: Path) -> None:
    expected = set(_raw(data_dir / FILES["articles"])["article_id"])
    for name in ("articles", "transactions", "stock", "regions", "age_restriction"):
        path = data_dir / FILES[name]
        frame = _raw(path)
        frame["article_id"] = frame["article_id"].astype(int)  # what a numeric re-save does
        frame.to_csv(path, index=False)
    assert _lines(data_dir / FILES["articles"])[1].split(",")[0].isdigit()
    assert not _lines(data_dir / FILES["articles"])[1].startswith("0")
    data = load_hm(data_dir)
    assert set(data.articles["article_id"]) == expected
    assert data.transactions["article_id"].isin(expected).all()
    assert data.report.total_dropped == 0
    for name in ("stock", "regions", "age_restriction"):
        assert data.extras[name]["article_id"].str.fullmatch(r"0\d{9}").all()


def test_unnamed_index_column_is_dropped(data_dir: Path) -> None:
    for name in ("customers", "transactions"):
        path = data_dir / FILES[name]
        _raw(path).to_csv(path, index=True)  # leading ",customer_id,..." header
    assert _lines(data_dir / FILES["transactions"])[0].startswith(",t_dat")
    data = load_hm(data_dir)
    assert list(data.transactions.columns) == TRANSACTIONS_COLUMNS
    assert list(data.customers.columns) == CUSTOMERS_COLUMNS
    assert data.report.files[FILES["transactions"]].dropped_columns == ["Unnamed: 0"]
    assert "dropped columns: Unnamed: 0" in "\n".join(data.report.summary_lines())


def test_unknown_ids_are_dropped_and_counted(data_dir: Path) -> None:
    path = data_dir / FILES["transactions"]
    lines = _lines(path)
    n_rows = len(lines) - 1
    _set_field(path, 3, "customer_id", "f" * 64)
    _set_field(path, 5, "customer_id", "e" * 64)
    _set_field(path, 6, "article_id", "0999999999")
    data = load_hm(data_dir)
    rep = data.report.to_dict()[FILES["transactions"]]
    assert rep == {"rows": n_rows, "kept": n_rows - 3, "dropped": {"unknown_customer": 2, "unknown_article": 1}}
    assert len(data.transactions) == n_rows - 3
    summary = "\n".join(data.report.summary_lines())
    assert "unknown_customer=2" in summary and "unknown_article=1" in summary


def test_duplicate_ids_are_dropped_and_counted(data_dir: Path) -> None:
    for name in ("articles", "customers"):
        path = data_dir / FILES[name]
        lines = _lines(path)
        _write_lines(path, [*lines, lines[1]])
    data = load_hm(data_dir)
    assert data.report.files[FILES["articles"]].dropped == {"duplicate_article_id": 1}
    assert data.report.files[FILES["customers"]].dropped == {"duplicate_customer_id": 1}
    assert data.articles["article_id"].is_unique and data.customers["customer_id"].is_unique


def test_unknown_articles_in_extras_are_dropped_and_counted(data_dir: Path) -> None:
    path = data_dir / FILES["stock"]
    _write_lines(path, [*_lines(path), "0999999999,4"])
    data = load_hm(data_dir)
    assert data.report.files[FILES["stock"]].dropped == {"unknown_article": 1}


@pytest.mark.parametrize(
    ("column", "value", "why"),
    [
        ("price", "abc", "cannot parse 'abc' as a number"),
        ("t_dat", "2020-13-45", "cannot parse '2020-13-45' as a date"),
        ("sales_channel_id", "3", "expected 1 or 2"),
        ("sales_channel_id", "web", "cannot parse 'web' as a number"),
        ("article_id", "0abc123", "cannot parse '0abc123' as an article id"),
        ("price", "", "missing value"),
    ],
)
def test_bad_transaction_value_names_file_line_and_field(data_dir: Path, column: str, value: str, why: str) -> None:
    _set_field(data_dir / FILES["transactions"], 17, column, value)
    pattern = rf"transactions_train\.csv line 17, field {column}: {re.escape(why)}"
    with pytest.raises(DataError, match=pattern):
        load_hm(data_dir)


def test_bad_customer_and_stock_values(data_dir: Path) -> None:
    _set_field(data_dir / FILES["customers"], 9, "age", "twenty")
    with pytest.raises(DataError, match=r"customers\.csv line 9, field age: cannot parse 'twenty'"):
        load_hm(data_dir)


def test_bad_extra_value(data_dir: Path) -> None:
    _set_field(data_dir / FILES["stock"], 4, "stock", "-2")
    with pytest.raises(DataError, match=r"article_stock\.csv line 4, field stock: '-2' is negative"):
        load_hm(data_dir)


@pytest.mark.parametrize("value", ["1e30", "99999999999999999999", "-9223372036854775809"])
def test_integers_outside_int64_are_named_not_wrapped(data_dir: Path, value: str) -> None:
    """Parsed through float64, 1e30 would become -2**63 (a negative stock past the sign check)."""
    _set_field(data_dir / FILES["stock"], 4, "stock", value)
    with pytest.raises(DataError, match=rf"article_stock\.csv line 4, field stock: '{value}' is outside the 64-bit"):
        load_hm(data_dir)


def test_a_file_not_in_utf8_is_named(data_dir: Path) -> None:
    path = data_dir / FILES["articles"]
    path.write_bytes(path.read_bytes().replace(b"\n", "\u00e9\n".encode("latin-1"), 3))
    with pytest.raises(DataError, match=r"articles\.csv: not UTF-8 text \(undecodable byte b'\\xe9'\)"):
        load_hm(data_dir)


def test_line_numbers_stay_exact_after_blank_lines(data_dir: Path) -> None:
    path = data_dir / FILES["transactions"]
    lines = _lines(path)
    _write_lines(path, [lines[0], lines[1], "", *lines[2:]])
    assert load_hm(data_dir).report.files[FILES["transactions"]].dropped == {"blank_line": 1}
    _set_field(path, 6, "price", "x1")
    with pytest.raises(DataError, match=r"transactions_train\.csv line 6, field price"):
        load_hm(data_dir)


def test_row_with_too_many_fields_names_the_file(data_dir: Path) -> None:
    path = data_dir / FILES["transactions"]
    lines = _lines(path)
    lines[9] += ",extra"
    _write_lines(path, lines)
    with pytest.raises(DataError, match=r"transactions_train\.csv: malformed CSV: .*line 10"):
        load_hm(data_dir)


def test_missing_column_names_file_and_column(data_dir: Path) -> None:
    path = data_dir / FILES["transactions"]
    _raw(path).drop(columns=["price"]).to_csv(path, index=False)
    with pytest.raises(DataError, match=r"transactions_train\.csv: missing required column\(s\) price"):
        load_hm(data_dir)


def test_data_error_is_a_value_error() -> None:
    assert issubclass(DataError, ValueError)
