"""Raw data in the H&M Kaggle schema: a synthetic generator and a strict loader.

The rest of the pipeline only ever sees the three Kaggle tables (plus four small tables
the serving filters need), so the real competition files can replace the generated ones
without touching any other module. This module is therefore the only place that names
these files (`FILES`) and their columns.

* `generate()` writes an H&M-shaped data set with structure a model can learn and that
  popularity alone cannot explain: age-dependent customer segments with product-type,
  index and price affinities, personal repeat buying of product types, baskets, weekly
  seasonality, articles introduced over time, heavy-tailed activity and channel habits.
* `load_hm()` reads real or generated files, normalises ids (article ids keep their
  leading zero), drops and *counts* rows that reference unknown ids or repeat an id, and
  raises `DataError` naming file, line and field for anything it cannot parse.
"""
from __future__ import annotations

import math
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pandas as pd

# ---------------------------------------------------------------------------------------
# Schema
# ---------------------------------------------------------------------------------------

ARTICLES_COLUMNS: list[str] = [
    "article_id", "product_code", "prod_name", "product_type_no", "product_type_name",
    "product_group_name", "graphical_appearance_no", "graphical_appearance_name",
    "colour_group_code", "colour_group_name", "perceived_colour_value_id",
    "perceived_colour_value_name", "perceived_colour_master_id", "perceived_colour_master_name",
    "department_no", "department_name", "index_code", "index_name", "index_group_no",
    "index_group_name", "section_no", "section_name", "garment_group_no", "garment_group_name",
    "detail_desc",
]
CUSTOMERS_COLUMNS: list[str] = [
    "customer_id", "FN", "Active", "club_member_status", "fashion_news_frequency", "age", "postal_code",
]
TRANSACTIONS_COLUMNS: list[str] = ["t_dat", "customer_id", "article_id", "price", "sales_channel_id"]
STOCK_COLUMNS: list[str] = ["article_id", "stock"]
REGIONS_COLUMNS: list[str] = ["article_id", "region"]
AGE_RESTRICTION_COLUMNS: list[str] = ["article_id", "min_age"]
POSTAL_REGIONS_COLUMNS: list[str] = ["postal_code", "region"]

# Logical name -> file name. The first three are the Kaggle files; the rest are extras.
FILES: dict[str, str] = {
    "articles": "articles.csv",
    "customers": "customers.csv",
    "transactions": "transactions_train.csv",
    "stock": "article_stock.csv",
    "regions": "article_regions.csv",
    "age_restriction": "article_age_restriction.csv",
    "postal_regions": "postal_code_regions.csv",
}
EXTRA_TABLES: tuple[str, ...] = ("stock", "regions", "age_restriction", "postal_regions")
REGIONS: tuple[str, ...] = ("north", "south", "east", "west")

CLUB_MEMBER_STATUSES: tuple[str, ...] = ("ACTIVE", "PRE-CREATE", "LEFT CLUB")
FASHION_NEWS_FREQUENCIES: tuple[str, ...] = ("NONE", "Regularly", "Monthly")


class DataError(ValueError):
    """A source file cannot be read as the H&M schema; the message names file, line, field."""


# ---------------------------------------------------------------------------------------
# Generator: the catalogue vocabulary
# ---------------------------------------------------------------------------------------

# index_code -> (index_name, index_group_no, index_group_name)
_INDICES: dict[str, tuple[str, int, str]] = {
    "A": ("Ladieswear", 1, "Ladieswear"),
    "B": ("Lingeries/Tights", 1, "Ladieswear"),
    "C": ("Ladies Accessories", 1, "Ladieswear"),
    "D": ("Divided", 2, "Divided"),
    "F": ("Menswear", 3, "Menswear"),
    "G": ("Baby Sizes 50-98", 4, "Baby/Children"),
    "H": ("Children Sizes 92-140", 4, "Baby/Children"),
    "I": ("Children Sizes 134-170", 4, "Baby/Children"),
    "S": ("Sport", 26, "Sport"),
}
_INDEX_CODES: list[str] = list(_INDICES)

# (product_type_no, name, product_group_name, garment_group_no, garment_group_name,
#  SEK price points, indices that sell it)
_TYPES: list[tuple[int, str, str, int, str, tuple[int, ...], str]] = [
    (272, "Trousers", "Garment Lower body", 1009, "Trousers", (199, 249, 299, 399), "ADFGHIS"),
    (265, "Dress", "Garment Full body", 1013, "Dresses Ladies", (249, 299, 399, 499), "ADGHI"),
    (252, "Sweater", "Garment Upper body", 1003, "Knitwear", (199, 249, 299, 399), "ADFGHI"),
    (255, "T-shirt", "Garment Upper body", 1002, "Jersey Basic", (49, 79, 99, 129), "ADFGHIS"),
    (254, "Top", "Garment Upper body", 1005, "Jersey Fancy", (99, 129, 149, 199), "ADS"),
    (253, "Vest top", "Garment Upper body", 1002, "Jersey Basic", (49, 79, 99), "AD"),
    (259, "Blouse", "Garment Upper body", 1010, "Blouses", (199, 249, 299), "AD"),
    (275, "Skirt", "Garment Lower body", 1012, "Skirt", (199, 249, 299), "ADI"),
    (274, "Shorts", "Garment Lower body", 1025, "Shorts", (129, 149, 199), "ADFHIS"),
    (264, "Jacket", "Garment Upper body", 1007, "Outdoor", (399, 499, 599, 799), "ADFHIS"),
    (262, "Coat", "Garment Upper body", 1007, "Outdoor", (699, 799, 999, 1299), "AF"),
    (267, "Cardigan", "Garment Upper body", 1003, "Knitwear", (249, 299, 399), "AG"),
    (245, "Shirt", "Garment Upper body", 1011, "Shirts", (199, 249, 299, 399), "FH"),
    (308, "Hoodie", "Garment Upper body", 1005, "Jersey Fancy", (199, 249, 299), "DFHIS"),
    (306, "Bra", "Underwear", 1017, "Under-, Nightwear", (149, 199, 249, 299), "BS"),
    (286, "Underwear bottom", "Underwear", 1017, "Under-, Nightwear", (49, 79, 99), "BF"),
    (302, "Socks", "Socks & Tights", 1021, "Socks and Tights", (29, 49, 79), "BFGH"),
    (273, "Leggings/Tights", "Garment Lower body", 1021, "Socks and Tights", (99, 149, 199), "BHS"),
    (296, "Pyjama set", "Nightwear", 1017, "Under-, Nightwear", (199, 249, 299), "BFGH"),
    (283, "Swimwear bottom", "Swimwear", 1018, "Swimwear", (99, 149), "BFI"),
    (298, "Bikini top", "Swimwear", 1018, "Swimwear", (149, 199), "BI"),
    (304, "Bodysuit", "Garment Full body", 1020, "Woven/Jersey/Knitted mix Baby", (79, 99, 149), "G"),
    (66, "Bag", "Accessories", 1019, "Accessories", (149, 199, 299), "C"),
    (72, "Earring", "Accessories", 1019, "Accessories", (49, 79, 99), "C"),
    (87, "Hat/beanie", "Accessories", 1019, "Accessories", (79, 99, 149), "CFH"),
    (83, "Scarf", "Accessories", 1019, "Accessories", (99, 149, 199), "C"),
]
_TYPE_NAMES: list[str] = [t[1] for t in _TYPES]
# Items that may carry an 18+ restriction (lingerie, nightwear, swimwear for adults).
_RESTRICTABLE_TYPES = {"Bra", "Underwear bottom", "Pyjama set", "Swimwear bottom", "Bikini top"}
_RESTRICTABLE_INDICES = {"B", "F"}

# (colour_group_code, name, perceived value id, value name, master id, master name, weight)
_COLOURS: list[tuple[int, str, int, str, int, str, float]] = [
    (9, "Black", 4, "Dark", 5, "Black", 0.20),
    (10, "White", 3, "Light", 9, "White", 0.10),
    (11, "Off White", 1, "Dusty Light", 9, "White", 0.04),
    (13, "Beige", 1, "Dusty Light", 11, "Beige", 0.05),
    (12, "Light Beige", 3, "Light", 11, "Beige", 0.03),
    (7, "Grey", 2, "Medium Dusty", 12, "Grey", 0.04),
    (6, "Light Grey", 3, "Light", 12, "Grey", 0.03),
    (8, "Dark Grey", 4, "Dark", 12, "Grey", 0.03),
    (73, "Dark Blue", 4, "Dark", 2, "Blue", 0.10),
    (72, "Blue", 7, "Medium", 2, "Blue", 0.04),
    (71, "Light Blue", 3, "Light", 2, "Blue", 0.05),
    (42, "Red", 5, "Bright", 18, "Red", 0.03),
    (43, "Dark Red", 4, "Dark", 18, "Red", 0.02),
    (51, "Light Pink", 3, "Light", 4, "Pink", 0.05),
    (52, "Pink", 7, "Medium", 4, "Pink", 0.03),
    (19, "Greenish Khaki", 2, "Medium Dusty", 19, "Khaki green", 0.03),
    (53, "Dark Green", 4, "Dark", 20, "Green", 0.02),
    (62, "Yellow", 5, "Bright", 8, "Yellow", 0.02),
    (32, "Orange", 5, "Bright", 3, "Orange", 0.01),
]
_GRAPHICAL: list[tuple[int, str, float]] = [
    (1010016, "Solid", 0.50), (1010001, "All over pattern", 0.12), (1010014, "Placement print", 0.09),
    (1010010, "Melange", 0.06), (1010017, "Stripe", 0.06), (1010023, "Denim", 0.05),
    (1010008, "Front print", 0.05), (1010004, "Check", 0.03), (1010021, "Lace", 0.02),
    (1010005, "Colour blocking", 0.02),
]
# index_code -> general sections; special product groups get their own section below.
_SECTIONS: dict[str, list[tuple[int, str]]] = {
    "A": [(15, "Womens Everyday Collection"), (11, "Womens Casual"), (18, "Womens Trend")],
    "B": [(61, "Womens Lingerie")],
    "C": [(65, "Womens Big accessories")],
    "D": [(53, "Divided Collection"), (52, "Divided Basics"), (50, "Divided Projects")],
    "F": [(21, "Contemporary Casual"), (22, "Contemporary Smart")],
    "G": [(44, "Baby Essentials & Complements"), (41, "Baby Girl"), (40, "Baby Boy")],
    "H": [(46, "Kids Girl"), (45, "Kids Boy")],
    "I": [(77, "Young Girl"), (76, "Young Boy")],
    "S": [(5, "Ladies H&M Sport"), (27, "Men H&M Sport")],
}
_SPECIAL_SECTIONS: dict[tuple[str, str], tuple[int, str]] = {
    ("B", "Nightwear"): (62, "Womens Nightwear, Socks & Tigh"),
    ("B", "Socks & Tights"): (62, "Womens Nightwear, Socks & Tigh"),
    ("B", "Swimwear"): (64, "Womens Swimwear, beachwear"),
    ("C", "Earring"): (66, "Womens Small accessories"),
    ("F", "Underwear"): (25, "Men Underwear"),
    ("F", "Socks & Tights"): (25, "Men Underwear"),
    ("F", "Nightwear"): (25, "Men Underwear"),
    ("F", "Swimwear"): (25, "Men Underwear"),
    ("F", "Jacket"): (31, "Mens Outerwear"),
    ("F", "Coat"): (31, "Mens Outerwear"),
    ("F", "Hat/beanie"): (26, "Men Accessories"),
    ("H", "Jacket"): (47, "Kids Outerwear"),
}
_DEPARTMENT_PREFIX: dict[str, tuple[int, str]] = {
    "A": (1, ""), "B": (3, "Lingerie "), "C": (4, "Ladies "), "D": (5, "Divided "), "F": (7, "Men "),
    "G": (6, "Baby "), "H": (8, "Kids "), "I": (9, "Young "), "S": (2, "Sport "),
}
_FIRST_NAMES: list[str] = [
    "Luna", "Tilly", "Jade", "Ellie", "Mia", "Nora", "Alva", "Stella", "Iris", "Vera", "Maja", "Ella",
    "Hugo", "Liam", "Otto", "Noah", "Theo", "Elsa", "Ida", "Freja", "Wilma", "Saga", "Ebba", "Tess",
    "Kim", "Sam", "Robin", "Alex", "Billie", "Charlie",
]
_NAME_STYLES: list[str] = [
    "", "", "slim", "relaxed", "basic", "HW", "oversized", "wide", "2-pack", "cropped", "regular", "soft",
]
_FABRICS: list[str] = [
    "Soft cotton jersey", "Fine-knit", "Airy woven", "Stretch denim", "Ribbed", "Lyocell-blend",
    "Recycled polyester", "Linen-blend", "Brushed fleece", "Organic cotton",
]
_FEATURES: list[str] = [
    "a round neckline", "long sleeves", "short sleeves", "an elasticated waist", "side pockets",
    "a V-neck", "narrow shoulder straps", "a concealed zip", "a relaxed fit", "a regular waist",
    "a wrapover front", "ribbing around the cuffs and hem", "a drawstring", "a buttoned front",
]

# Customer segments: (name, prior, age mean, age sd, index weights, boosted types,
#  price elasticity (>0 prefers cheaper), share whose main channel is online, activity)
_SEGMENTS: list[tuple[str, float, float, float, dict[str, float], tuple[str, ...], float, float, float]] = [
    ("teen_divided", 0.14, 21, 4, {"D": 6, "S": 1, "A": 0.8, "C": 1.2, "B": 0.6},
     ("T-shirt", "Top", "Hoodie", "Shorts", "Vest top"), 1.2, 0.6, 0.9),
    ("young_trend", 0.15, 27, 5, {"A": 4, "D": 1.5, "C": 1.5, "B": 1},
     ("Dress", "Top", "Skirt", "Blouse"), 0.3, 0.75, 1.1),
    ("young_parents", 0.13, 34, 5, {"G": 4, "H": 2.5, "A": 1.8, "B": 0.6},
     ("Bodysuit", "Trousers", "T-shirt", "Pyjama set"), 0.8, 0.8, 1.3),
    ("family_kids", 0.10, 43, 6, {"H": 3, "I": 3, "A": 1.5, "F": 0.5},
     ("Trousers", "Hoodie", "Jacket", "Shorts"), 0.5, 0.7, 1.2),
    ("classic_women", 0.15, 53, 9, {"A": 5, "B": 1.5, "C": 0.8},
     ("Trousers", "Blouse", "Cardigan", "Sweater", "Coat"), -0.3, 0.5, 1.0),
    ("menswear", 0.10, 36, 11, {"F": 6, "S": 0.8, "D": 0.5},
     ("Shirt", "Trousers", "T-shirt", "Socks", "Underwear bottom"), 0.2, 0.7, 0.8),
    ("sport_active", 0.08, 30, 7, {"S": 6, "A": 0.8, "D": 0.8},
     ("Leggings/Tights", "Bra", "Top", "Shorts", "Jacket"), 0.0, 0.7, 1.0),
    ("basics_lingerie", 0.15, 46, 12, {"B": 5, "A": 1},
     ("Bra", "Underwear bottom", "Socks", "Leggings/Tights", "Pyjama set"), 1.0, 0.45, 0.9),
]

_PRICE_SCALE = 5900.0  # Kaggle prices are scaled by an undisclosed constant: 299.99 SEK -> 0.0508
_WEEKDAY_FACTOR = np.array([0.84, 0.82, 0.86, 0.92, 1.05, 1.38, 1.22])  # Mon..Sun
_MEAN_BASKETS_PER_120_DAYS = 13.0


class _Progress:
    """Stage lines on stderr, so a long generation is visibly alive."""

    def __init__(self, enabled: bool) -> None:
        self.enabled = enabled
        self.start = time.perf_counter()

    def __call__(self, message: str) -> None:
        if self.enabled:
            elapsed = time.perf_counter() - self.start
            print(f"[rayrec.generate {elapsed:6.1f}s] {message}", file=sys.stderr, flush=True)


@dataclass
class _Catalogue:
    """Articles plus the hidden attributes that drive purchases (not written to disk)."""

    frame: pd.DataFrame
    type_idx: np.ndarray  # index into _TYPES
    index_idx: np.ndarray  # index into _INDEX_CODES
    colour_idx: np.ndarray  # index into _COLOURS
    price_sek: np.ndarray
    popularity: np.ndarray  # Zipf weight
    intro_day: np.ndarray  # first day it can be sold (<= 0: already in the catalogue)
    lifetime: np.ndarray  # days over which popularity halves
    style: np.ndarray  # latent taste vector
    regions: np.ndarray  # bool (articles, regions)
    min_age: np.ndarray


@dataclass
class _Population:
    """Customers plus their hidden segment and habits."""

    frame: pd.DataFrame
    segment: np.ndarray
    age: np.ndarray  # true age, also for customers whose age is blank in the file
    region: np.ndarray
    main_channel: np.ndarray
    activity: np.ndarray
    type_pref: np.ndarray  # (customers, types) personal product-type distribution
    postal_codes: np.ndarray  # unique postal codes
    postal_region: np.ndarray


def _validate(customers: int, articles: int, days: int, start_date: str) -> pd.Timestamp:
    """Reject sizes too small for the structure (weekly seasonality, segments) to exist."""
    for name, value, minimum in (("customers", customers, 10), ("articles", articles, 10), ("days", days, 14)):
        if not isinstance(value, int | np.integer) or isinstance(value, bool) or value < minimum:
            raise ValueError(f"{name} must be an integer >= {minimum}, got {value!r}")
    try:
        return pd.Timestamp(start_date).normalize()
    except (ValueError, TypeError) as exc:
        raise ValueError(f"start_date must be a date like '2020-06-01', got {start_date!r}") from exc


def _hex_ids(rng: np.random.Generator, n: int) -> np.ndarray:
    """n distinct 64-hex-character ids, like the hashed ids of the Kaggle files."""
    raw = rng.bytes(32 * n).hex()
    ids = np.array([raw[i * 64:(i + 1) * 64] for i in range(n)], dtype=object)
    if len(set(ids)) != n:  # astronomically unlikely, but ids must be unique
        raise RuntimeError("id collision; use another seed")
    return ids


def _pick(rng: np.random.Generator, weights: list[float] | np.ndarray, size: int) -> np.ndarray:
    p = np.asarray(weights, dtype=float)
    return rng.choice(len(p), size=size, p=p / p.sum())


def _make_catalogue(rng: np.random.Generator, n_articles: int, days: int) -> _Catalogue:
    """Products with a few colour variants each; a product has one type, index and section."""
    n_products = max(1, math.ceil(n_articles / 2.2))
    variants = np.ones(n_products, dtype=int)
    np.add.at(variants, rng.integers(0, n_products, n_articles - n_products), 1)
    codes = np.sort(rng.choice(np.arange(108775, 959461), size=n_products, replace=False))

    # A product's (type, index) is drawn from the pairs the vocabulary allows, weighted so
    # big indices (Ladieswear, Divided) carry more of the catalogue.
    index_weight = {"A": 3.0, "B": 1.5, "C": 0.8, "D": 2.0, "F": 1.6, "G": 1.0, "H": 1.2, "I": 0.8, "S": 0.8}
    pairs = [(t, _INDEX_CODES.index(c)) for t, spec in enumerate(_TYPES) for c in spec[6]]
    pair_w = np.array([index_weight[_INDEX_CODES[i]] / len(_TYPES[t][6]) ** 0.3 for t, i in pairs])
    # Every pair gets one product first (when the catalogue is big enough); the rest are drawn.
    order = rng.permutation(len(pairs))
    first = order[: min(len(pairs), n_products)]
    rest = _pick(rng, pair_w, max(0, n_products - len(first)))
    prod_pair = rng.permutation(np.concatenate([first, rest]))
    p_type = np.array([pairs[k][0] for k in prod_pair])
    p_index = np.array([pairs[k][1] for k in prod_pair])

    p_price = np.array([rng.choice(_TYPES[t][5]) for t in p_type], dtype=float)
    p_price *= np.exp(rng.normal(0.0, 0.12, n_products))
    p_price[p_index == _INDEX_CODES.index("G")] *= 0.6
    p_price[np.isin(p_index, [_INDEX_CODES.index("H"), _INDEX_CODES.index("I")])] *= 0.75
    p_price = np.maximum(np.round(p_price / 10.0) * 10.0 - 0.01, 9.99)

    # Introduction: two thirds are in the catalogue at the start, the rest arrive over time.
    is_new = rng.random(n_products) < 0.34
    p_intro = np.where(is_new, rng.integers(1, max(2, days - 7), n_products), -rng.integers(0, 180, n_products))
    # One product per type is always on sale from day 0, so every type is always buyable.
    for t in range(len(_TYPES)):
        members = np.flatnonzero(p_type == t)
        if members.size:
            p_intro[members[0]] = min(p_intro[members[0]], 0)

    art_prod = np.repeat(np.arange(n_products), variants)
    variant_no = np.concatenate([np.sort(rng.choice(np.arange(1, 60), size=v, replace=False)) for v in variants])
    article_id = [f"0{codes[p]:06d}{v:03d}" for p, v in zip(art_prod, variant_no, strict=True)]
    type_idx = p_type[art_prod]
    index_idx = p_index[art_prod]

    colour = _pick(rng, [c[6] for c in _COLOURS], n_articles)
    graph_p = _pick(rng, [g[2] for g in _GRAPHICAL], n_products)
    graph = np.where(rng.random(n_articles) < 0.85, graph_p[art_prod], _pick(rng, [g[2] for g in _GRAPHICAL], n_articles))

    names = _product_names(rng, p_type)
    descs = _product_descriptions(rng, p_type)

    rows = {c: [] for c in ARTICLES_COLUMNS}
    sections = _product_sections(rng, p_type, p_index)
    for a in range(n_articles):
        p, t, i = art_prod[a], type_idx[a], index_idx[a]
        ttype = _TYPES[t]
        code = _INDEX_CODES[i]
        idx_name, group_no, group_name = _INDICES[code]
        col = _COLOURS[colour[a]]
        g = _GRAPHICAL[graph[a]]
        dept_digit, dept_prefix = _DEPARTMENT_PREFIX[code]
        values = (
            article_id[a], int(codes[p]), names[p], ttype[0], ttype[1], ttype[2], g[0], g[1],
            col[0], col[1], col[2], col[3], col[4], col[5],
            dept_digit * 1000 + (ttype[3] - 1000) * 10 + 6, f"{dept_prefix}{ttype[4]}".strip(),
            code, idx_name, group_no, group_name, sections[p][0], sections[p][1], ttype[3], ttype[4], descs[p],
        )
        for c, v in zip(ARTICLES_COLUMNS, values, strict=True):
            rows[c].append(v)
    frame = pd.DataFrame(rows, columns=ARTICLES_COLUMNS)

    # Long-tail popularity: Zipf over a random ranking of the products *within each type*
    # (customers pick a type first), so every type has its bestsellers and its long tail.
    prod_rank = np.empty(n_products)
    for t in range(len(_TYPES)):
        members = np.flatnonzero(p_type == t)
        prod_rank[members] = rng.permutation(members.size) + 1
    popularity = (1.0 / prod_rank[art_prod] ** 1.8) * np.exp(rng.normal(0.0, 0.4, n_articles))
    # Colour variants get a slightly shifted price (the Kaggle data has per-variant prices too).
    price_sek = p_price[art_prod] * np.where(rng.random(n_articles) < 0.2, 0.9, 1.0)

    regions = np.ones((n_articles, len(REGIONS)), dtype=bool)
    partial = rng.random(n_articles) < 0.18
    for a in np.flatnonzero(partial):
        keep = rng.choice(len(REGIONS), size=int(rng.integers(1, len(REGIONS))), replace=False)
        regions[a] = False
        regions[a, keep] = True
    restrictable = np.array(
        [_TYPES[t][1] in _RESTRICTABLE_TYPES and _INDEX_CODES[i] in _RESTRICTABLE_INDICES
         for t, i in zip(type_idx, index_idx, strict=True)]
    )
    restricted_product = rng.random(n_products) < 0.35
    min_age = np.where(restrictable & restricted_product[art_prod], 18, 0)

    return _Catalogue(
        frame=frame, type_idx=type_idx, index_idx=index_idx,
        colour_idx=colour,
        price_sek=price_sek, popularity=popularity, intro_day=p_intro[art_prod].astype(float),
        lifetime=rng.uniform(40.0, 200.0, n_products)[art_prod],
        style=rng.normal(0.0, 1.0, (n_articles, 4)), regions=regions, min_age=min_age,
    )


def _product_names(rng: np.random.Generator, p_type: np.ndarray) -> list[str]:
    first = rng.integers(0, len(_FIRST_NAMES), p_type.size)
    style = rng.integers(0, len(_NAME_STYLES), p_type.size)
    out = []
    for t, f, s in zip(p_type, first, style, strict=True):
        noun = _TYPES[t][1].split("/")[0].lower()
        out.append(" ".join(x for x in (_FIRST_NAMES[f], _NAME_STYLES[s], noun) if x))
    return out


def _product_descriptions(rng: np.random.Generator, p_type: np.ndarray) -> list[str | None]:
    fabric = rng.integers(0, len(_FABRICS), p_type.size)
    feats = rng.integers(0, len(_FEATURES), (p_type.size, 2))
    missing = rng.random(p_type.size) < 0.005  # the Kaggle file has a few blank descriptions
    out: list[str | None] = []
    for k, t in enumerate(p_type):
        if missing[k]:
            out.append(None)
            continue
        f1, f2 = _FEATURES[feats[k, 0]], _FEATURES[feats[k, 1]]
        tail = f" and {f2}" if f2 != f1 else ""
        out.append(f"{_FABRICS[fabric[k]]} {_TYPES[t][1].lower()} with {f1}{tail}.")
    return out


def _product_sections(rng: np.random.Generator, p_type: np.ndarray, p_index: np.ndarray) -> list[tuple[int, str]]:
    out = []
    for t, i in zip(p_type, p_index, strict=True):
        code = _INDEX_CODES[i]
        special = _SPECIAL_SECTIONS.get((code, _TYPES[t][2])) or _SPECIAL_SECTIONS.get((code, _TYPES[t][1]))
        general = _SECTIONS[code]
        out.append(special or general[int(rng.integers(0, len(general)))])
    return out


def _segment_type_weights() -> np.ndarray:
    """(segments, types): how much each segment wants each product type before personal taste."""
    counts = {c: sum(c in t[6] for t in _TYPES) for c in _INDEX_CODES}
    w = np.full((len(_SEGMENTS), len(_TYPES)), 0.02)
    for s, seg in enumerate(_SEGMENTS):
        for t, ttype in enumerate(_TYPES):
            w[s, t] += sum(seg[4].get(c, 0.05) / counts[c] for c in ttype[6])
            if ttype[1] in seg[5]:
                w[s, t] *= 3.0
    return w / w.sum(axis=1, keepdims=True)


def _make_population(rng: np.random.Generator, n_customers: int) -> _Population:
    """Customers: age-dependent segment, concentrated personal type taste, channel habit."""
    ids = np.sort(_hex_ids(rng, n_customers))
    segment = _pick(rng, [s[1] for s in _SEGMENTS], n_customers)
    age_mu = np.array([s[2] for s in _SEGMENTS])[segment]
    age_sd = np.array([s[3] for s in _SEGMENTS])[segment]
    age = np.clip(np.round(rng.normal(age_mu, age_sd)), 16, 92).astype(int)

    # Personal taste: a Dirichlet draw around the segment profile with low concentration, so
    # most customers have one to three favourite product types they keep coming back to.
    seg_w = _segment_type_weights()[segment]
    gam = rng.gamma(shape=np.maximum(2.5 * seg_w, 1e-3))
    personal = gam / gam.sum(axis=1, keepdims=True)
    type_pref = 0.8 * personal + 0.2 * seg_w

    activity_seg = np.array([s[8] for s in _SEGMENTS])[segment]
    activity = activity_seg * rng.lognormal(-0.4, 0.9, n_customers)  # heavy tail, mean ~ segment
    online = rng.random(n_customers) < np.array([s[7] for s in _SEGMENTS])[segment]
    main_channel = np.where(online, 2, 1)

    n_postal = max(2, n_customers // 4)
    postal_codes = np.sort(_hex_ids(rng, n_postal))
    postal_region = _pick(rng, [0.3, 0.25, 0.25, 0.2], n_postal)
    pc_rank = rng.permutation(n_postal) + 1
    postal = _pick(rng, 1.0 / pc_rank**0.8, n_customers)
    region = postal_region[postal]

    fn = rng.random(n_customers) < 0.35
    active = np.where(fn, rng.random(n_customers) < 0.97, rng.random(n_customers) < 0.01)
    club = np.array(["ACTIVE", "PRE-CREATE", "LEFT CLUB", ""], dtype=object)[
        _pick(rng, [0.925, 0.065, 0.005, 0.005], n_customers)
    ]
    news = np.where(
        fn,
        np.array(["Regularly", "Monthly", "NONE"], dtype=object)[_pick(rng, [0.96, 0.02, 0.02], n_customers)],
        np.array(["NONE", "", "Regularly"], dtype=object)[_pick(rng, [0.97, 0.02, 0.01], n_customers)],
    )
    age_str = np.where(rng.random(n_customers) < 0.03, "", age.astype(str)).astype(object)
    frame = pd.DataFrame(
        {
            "customer_id": ids,
            "FN": np.where(fn, "1.0", ""),
            "Active": np.where(active, "1.0", ""),
            "club_member_status": club,
            "fashion_news_frequency": news,
            "age": age_str,
            "postal_code": postal_codes[postal],
        },
        columns=CUSTOMERS_COLUMNS,
    )
    return _Population(
        frame=frame, segment=segment, age=age, region=region, main_channel=main_channel,
        activity=activity, type_pref=type_pref, postal_codes=postal_codes, postal_region=postal_region,
    )


def _day_weights(rng: np.random.Generator, start: pd.Timestamp, days: int) -> np.ndarray:
    """Weekly seasonality, a slow wave and a few campaign days."""
    weekday = (start.day_of_week + np.arange(days)) % 7
    w = _WEEKDAY_FACTOR[weekday] * (1.0 + 0.12 * np.sin(2 * np.pi * np.arange(days) / 91.0))
    w *= rng.gamma(40.0, 1.0 / 40.0, days)
    campaigns = rng.choice(days, size=max(1, days // 45), replace=False)
    w[campaigns] *= 1.6
    return w / w.sum()


class _ArticleSampler:
    """Draws an article of a given product type per item, vectorised by type.

    The weight of article a for customer c (segment s) on day d is
    popularity(a) * index affinity(s, a) * price fit(s, a) * colour/style taste(s, a)
    * novelty boost(a, d) * lifecycle decay(a, d), and zero where a is not on sale yet, not
    sold in c's region, 18+ while c is a minor, or in `exclude` (already bought by c).
    """

    _CHUNK = 2_000_000  # elements per (items x candidates) block, keeps memory flat

    def __init__(self, rng: np.random.Generator, cat: _Catalogue, pop: _Population, days: int) -> None:
        n_seg = len(_SEGMENTS)
        idx_aff = np.array([[seg[4].get(c, 0.05) for c in _INDEX_CODES] for seg in _SEGMENTS])
        elasticity = np.array([seg[6] for seg in _SEGMENTS])
        type_median = np.array(
            [np.median(cat.price_sek[cat.type_idx == t]) if np.any(cat.type_idx == t) else 1.0
             for t in range(len(_TYPES))]
        )
        rel_price = cat.price_sek / type_median[cat.type_idx]
        colour_taste = np.exp(rng.normal(0.0, 0.35, (n_seg, len(_COLOURS))))
        seg_style = rng.normal(0.0, 0.3, (n_seg, cat.style.shape[1]))
        self.base = (
            cat.popularity[None, :]
            * idx_aff[:, cat.index_idx]
            * rel_price[None, :] ** (-elasticity[:, None] * 2.0)
            * colour_taste[:, cat.colour_idx]
            * np.exp(seg_style @ cat.style.T)
        )
        d = np.arange(days, dtype=float)[:, None]
        age = d - cat.intro_day[None, :]
        self.time = np.where(
            age >= 0,
            (1.0 + 4.0 * np.exp(-np.maximum(age, 0) / 12.0)) / (1.0 + np.maximum(age, 0) / cat.lifetime[None, :]),
            0.0,
        )
        self.by_type = [np.flatnonzero(cat.type_idx == t) for t in range(len(_TYPES))]
        self.cat, self.pop = cat, pop
        self.n_art = cat.price_sek.size

    def key(self, cust: np.ndarray, art: np.ndarray) -> np.ndarray:
        """One integer per (customer, article) pair, for set membership tests."""
        return cust.astype(np.int64) * (self.n_art + 1) + art

    @staticmethod
    def isin(keys: np.ndarray, owned: np.ndarray) -> np.ndarray:
        """np.isin for a sorted `owned`, by binary search: no re-sort of `owned` per call."""
        if owned.size == 0:
            return np.zeros(keys.shape, dtype=bool)
        pos = np.minimum(np.searchsorted(owned, keys), owned.size - 1)
        return owned[pos] == keys

    def sample(
        self, rng: np.random.Generator, cust: np.ndarray, day: np.ndarray, typ: np.ndarray,
        exclude: np.ndarray | None = None,
    ) -> np.ndarray:
        """Article index per item, or -1 where nothing of that type is allowed that day."""
        out = np.full(cust.size, -1, dtype=np.int64)
        u = rng.random(cust.size)
        seg, region, age = self.pop.segment[cust], self.pop.region[cust], self.pop.age[cust]
        for t in np.unique(typ):
            cols = self.by_type[t]
            if cols.size == 0:
                continue
            items = np.flatnonzero(typ == t)
            step = max(1, self._CHUNK // cols.size)
            for lo in range(0, items.size, step):
                it = items[lo:lo + step]
                w = self.base[seg[it][:, None], cols[None, :]] * self.time[day[it][:, None], cols[None, :]]
                w *= self.cat.regions[cols[None, :], region[it][:, None]]
                w *= self.cat.min_age[cols][None, :] <= age[it][:, None]
                if exclude is not None:
                    w[self.isin(self.key(cust[it][:, None], cols[None, :]), exclude)] = 0.0
                cum = np.cumsum(w, axis=1)
                total = cum[:, -1]
                pick = np.minimum((cum < (u[it] * total)[:, None]).sum(axis=1), cols.size - 1)
                out[it] = np.where(total > 0, cols[pick], -1)
        return out


def _make_transactions(
    rng: np.random.Generator, cat: _Catalogue, pop: _Population, days: int, start: pd.Timestamp,
    progress: _Progress,
) -> pd.DataFrame:
    """Baskets per customer, items per basket, then articles; invalid draws are redrawn."""
    n_cust = pop.segment.size
    lam = _MEAN_BASKETS_PER_120_DAYS * days / 120.0 * pop.activity
    n_baskets = rng.poisson(lam)
    b_cust = np.repeat(np.arange(n_cust), n_baskets)
    b_day = _pick(rng, _day_weights(rng, start, days), b_cust.size)
    b_channel = np.where(rng.random(b_cust.size) < 0.92, pop.main_channel[b_cust], 3 - pop.main_channel[b_cust])
    b_size = 1 + rng.poisson(1.4, b_cust.size)
    progress(f"{b_cust.size} baskets for {n_cust} customers")

    i_basket = np.repeat(np.arange(b_cust.size), b_size)
    i_cust = b_cust[i_basket]
    i_day = b_day[i_basket]
    cum_pref = np.cumsum(pop.type_pref, axis=1)
    i_type = _draw_types(rng, cum_pref, i_cust)

    # Sort items by customer and time so "first purchase of an article" is well defined.
    order = np.lexsort((np.arange(i_cust.size), i_day, i_cust))
    i_basket, i_cust, i_day, i_type = i_basket[order], i_cust[order], i_day[order], i_type[order]

    sampler = _ArticleSampler(rng, cat, pop, days)
    art = sampler.sample(rng, i_cust, i_day, i_type)
    allow_repeat = rng.random(art.size) < 0.03  # buying the very same article again is rare
    for round_no in range(10):
        bad = _unwanted(sampler, i_cust, art, allow_repeat)
        progress(f"article draw round {round_no}: {int(bad.sum())} of {art.size} items to redraw")
        if not bad.any():
            break
        if round_no >= 4:  # the customer has exhausted that type that day: pick another one
            i_type[bad] = _draw_types(rng, cum_pref, i_cust[bad])
        owned = np.unique(sampler.key(i_cust[~bad], art[~bad]))
        art[bad] = sampler.sample(rng, i_cust[bad], i_day[bad], i_type[bad], exclude=owned)
    keep = ~_unwanted(sampler, i_cust, art, allow_repeat)
    i_basket, i_cust, i_day, art = i_basket[keep], i_cust[keep], i_day[keep], art[keep]

    on_sale = rng.random(art.size) < 0.12
    discount = np.where(on_sale, rng.choice([0.5, 0.6, 0.7, 0.8], size=art.size), 1.0)
    price = np.round(cat.price_sek[art] * discount, 2) / _PRICE_SCALE

    final = np.lexsort((np.arange(art.size), i_cust, i_day))  # Kaggle file is in date order
    dates = (start + pd.to_timedelta(np.arange(days), unit="D")).strftime("%Y-%m-%d").to_numpy()
    return pd.DataFrame(
        {
            "t_dat": dates[i_day[final]],
            "customer_id": pop.frame["customer_id"].to_numpy()[i_cust[final]],
            "article_id": cat.frame["article_id"].to_numpy()[art[final]],
            "price": price[final],
            "sales_channel_id": b_channel[i_basket[final]],
        },
        columns=TRANSACTIONS_COLUMNS,
    )


def _draw_types(rng: np.random.Generator, cum_pref: np.ndarray, cust: np.ndarray) -> np.ndarray:
    """Product type per item from the customer's personal distribution (inverse CDF)."""
    u = rng.random(cust.size)
    return np.minimum((cum_pref[cust] < u[:, None]).sum(axis=1), cum_pref.shape[1] - 1)


def _unwanted(sampler: _ArticleSampler, cust: np.ndarray, art: np.ndarray, allow_repeat: np.ndarray) -> np.ndarray:
    """Draws to redo: nothing was allowed (-1), or an unwanted repeat of an article the
    customer already bought earlier (items are in customer/time order)."""
    missing = art < 0
    _, first = np.unique(sampler.key(cust, np.where(missing, -1, art)), return_index=True)
    repeat = np.ones(art.size, dtype=bool)
    repeat[first] = False
    return missing | (repeat & ~allow_repeat & ~missing)


def _extras(cat: _Catalogue, pop: _Population, rng: np.random.Generator, days: int) -> dict[str, pd.DataFrame]:
    """The four filter tables: stock, regional availability, age limits, postal regions."""
    ids = cat.frame["article_id"].to_numpy()
    age_days = days - cat.intro_day
    sold_out = rng.random(ids.size) < np.clip(0.04 + age_days / 2000.0, 0.0, 0.4)
    stock = np.where(sold_out, 0, rng.negative_binomial(2, 0.02, ids.size) + 1)
    art_idx, reg_idx = np.nonzero(cat.regions)
    return {
        "stock": pd.DataFrame({"article_id": ids, "stock": stock.astype(np.int64)}),
        "regions": pd.DataFrame({"article_id": ids[art_idx], "region": np.array(REGIONS)[reg_idx]}),
        "age_restriction": pd.DataFrame({"article_id": ids, "min_age": cat.min_age.astype(np.int64)}),
        "postal_regions": pd.DataFrame(
            {"postal_code": pop.postal_codes, "region": np.array(REGIONS)[pop.postal_region]}
        ),
    }


def _write_csv(frame: pd.DataFrame, path: Path) -> None:
    """Write via a temp file and rename, so a reader never sees half a file."""
    tmp = path.with_name(path.name + ".tmp")
    frame.to_csv(tmp, index=False, lineterminator="\n")
    tmp.replace(path)


def generate(
    out_dir: Path,
    *,
    seed: int = 0,
    customers: int = 4000,
    articles: int = 1500,
    days: int = 120,
    start_date: str = "2020-06-01",
    progress: bool = False,
) -> dict[str, Path]:
    """Write a synthetic H&M data set to `out_dir`; returns logical name -> file path.

    Same seed and sizes give byte-identical files.
    """
    start = _validate(customers, articles, days, start_date)
    say = _Progress(progress)
    rng = np.random.default_rng(seed)
    cat = _make_catalogue(rng, int(articles), int(days))
    say(f"catalogue: {articles} articles")
    pop = _make_population(rng, int(customers))
    say(f"customers: {customers}")
    trans = _make_transactions(rng, cat, pop, int(days), start, say)
    say(f"transactions: {len(trans)}")
    tables = {"articles": cat.frame, "customers": pop.frame, "transactions": trans}
    tables.update(_extras(cat, pop, rng, int(days)))

    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    paths: dict[str, Path] = {}
    for name, frame in tables.items():
        paths[name] = out_dir / FILES[name]
        _write_csv(frame, paths[name])
    say(f"wrote {len(paths)} files to {out_dir}")
    return paths


# ---------------------------------------------------------------------------------------
# Loader
# ---------------------------------------------------------------------------------------


@dataclass
class FileReport:
    """What happened to one file: rows read, rows kept, rows dropped by reason."""

    rows: int
    kept: int
    dropped: dict[str, int] = field(default_factory=dict)
    dropped_columns: list[str] = field(default_factory=list)

    def to_dict(self) -> dict[str, object]:
        out: dict[str, object] = {"rows": self.rows, "kept": self.kept, "dropped": dict(self.dropped)}
        if self.dropped_columns:
            out["dropped_columns"] = list(self.dropped_columns)
        return out


@dataclass
class LoadReport:
    """Per-file accounting, so nothing the loader removes goes unnoticed."""

    files: dict[str, FileReport] = field(default_factory=dict)

    def to_dict(self) -> dict[str, dict[str, object]]:
        return {name: rep.to_dict() for name, rep in self.files.items()}

    @property
    def total_dropped(self) -> int:
        return sum(rep.rows - rep.kept for rep in self.files.values())

    def summary_lines(self) -> list[str]:
        lines = []
        for name, rep in self.files.items():
            line = f"{name}: {rep.rows} rows read, {rep.kept} kept"
            if rep.dropped:
                reasons = ", ".join(f"{k}={v}" for k, v in rep.dropped.items())
                line += f", {rep.rows - rep.kept} dropped ({reasons})"
            if rep.dropped_columns:
                line += f"; dropped columns: {', '.join(rep.dropped_columns)}"
            lines.append(line)
        return lines


@dataclass
class HMData:
    """The loaded tables; `extras` holds only the extra tables whose files exist."""

    articles: pd.DataFrame
    customers: pd.DataFrame
    transactions: pd.DataFrame
    extras: dict[str, pd.DataFrame]
    report: LoadReport


class _Table:
    """A file read as strings, remembering where each row came from for error messages."""

    def __init__(self, path: Path, required: list[str]) -> None:
        self.name = path.name
        try:
            frame = pd.read_csv(
                path, dtype=str, keep_default_na=False, na_values=[""], skip_blank_lines=False,
            )
        except pd.errors.ParserError as exc:
            raise DataError(f"{self.name}: malformed CSV: {_parser_detail(exc)}") from exc
        except pd.errors.EmptyDataError as exc:
            raise DataError(f"{self.name}: file is empty (no header line)") from exc
        except UnicodeDecodeError as exc:
            bad = exc.object[exc.start : exc.start + 1]
            raise DataError(f"{self.name}: not UTF-8 text (undecodable byte {bad!r}): save it as UTF-8") from exc
        self.dropped_columns: list[str] = []
        if not isinstance(frame.index, pd.RangeIndex):  # header one field short: implicit index
            frame = frame.reset_index(drop=True)
            self.dropped_columns.append("(unnamed index)")
        unnamed = [c for c in frame.columns if str(c).startswith("Unnamed:") or str(c).strip() == ""]
        frame = frame.drop(columns=unnamed)
        self.dropped_columns += [str(c) for c in unnamed]
        missing = [c for c in required if c not in frame.columns]
        if missing:
            raise DataError(f"{self.name}: missing required column(s) {', '.join(missing)}")
        self.raw = frame  # labels are 0-based positions of the data rows in the file
        self.rows = len(frame)
        self.dropped: dict[str, int] = {}

    def line_of(self, label: int) -> int:
        """1-based line number in the file (header is line 1), counting quoted newlines."""
        before = self.raw.iloc[:label]
        extra = 0
        for col in before.columns:
            extra += int(before[col].str.count("\n").fillna(0).sum())
        return label + 2 + extra

    def fail(self, bad: pd.Series, field_name: str, why: str) -> None:
        """Raise for the first row where `bad` holds; `why` may use {value}."""
        if not bad.any():
            return
        label = int(bad.idxmax())
        value = self.raw.at[label, field_name]
        raise DataError(f"{self.name} line {self.line_of(label)}, field {field_name}: {why.format(value=value)}")

    def drop(self, frame: pd.DataFrame, mask: pd.Series, reason: str) -> pd.DataFrame:
        """Remove rows where mask holds and count them under `reason`."""
        n = int(mask.sum())
        if n:
            self.dropped[reason] = self.dropped.get(reason, 0) + n
        return frame[~mask]

    def report(self, kept: int) -> FileReport:
        return FileReport(rows=self.rows, kept=kept, dropped=dict(self.dropped),
                          dropped_columns=list(self.dropped_columns))


def _parser_detail(exc: Exception) -> str:
    """pandas says 'Error tokenizing data. C error: Expected 5 fields in line 17, saw 6'."""
    text = str(exc).strip()
    return text.split("C error:", 1)[-1].strip() if "C error:" in text else text


def _drop_blank(table: _Table, frame: pd.DataFrame) -> pd.DataFrame:
    """Blank lines come through as all-empty rows (kept so line numbers stay exact)."""
    return table.drop(frame, frame.isna().all(axis=1), "blank_line")


def _required(table: _Table, s: pd.Series, field_name: str) -> None:
    table.fail(s.isna(), field_name, "missing value")


def _article_ids(table: _Table, s: pd.Series, field_name: str = "article_id") -> pd.Series:
    """Kaggle ids are 10 digits with a leading zero; files re-saved as numbers lose it."""
    _required(table, s, field_name)
    stripped = s.str.strip()
    table.fail(~stripped.str.fullmatch(r"\d{1,10}"), field_name,
               "cannot parse {value!r} as an article id (up to 10 digits)")
    return stripped.str.zfill(10)


def _ids(table: _Table, s: pd.Series, field_name: str) -> pd.Series:
    _required(table, s, field_name)
    stripped = s.str.strip()
    table.fail(stripped == "", field_name, "missing value")
    return stripped


def _numbers(table: _Table, s: pd.Series, field_name: str, *, required: bool) -> pd.Series:
    if required:
        _required(table, s, field_name)
    num = pd.to_numeric(s, errors="coerce").astype("float64")
    table.fail(s.notna() & num.isna(), field_name, "cannot parse {value!r} as a number")
    table.fail(s.notna() & ~np.isfinite(num.fillna(0.0)), field_name, "{value!r} is not a finite number")
    return num


def _integers(table: _Table, s: pd.Series, field_name: str, *, non_negative: bool = False) -> pd.Series:
    num = _numbers(table, s, field_name, required=True)
    table.fail(num % 1 != 0, field_name, "cannot parse {value!r} as an integer")
    table.fail(num.abs() >= 2.0**63, field_name, "{value!r} is outside the 64-bit integer range")
    if non_negative:
        table.fail(num < 0, field_name, "{value!r} is negative")
    return num.astype("int64")


def _dates(table: _Table, s: pd.Series, field_name: str) -> pd.Series:
    _required(table, s, field_name)
    parsed = pd.to_datetime(s.str.strip(), format="%Y-%m-%d", errors="coerce")
    table.fail(parsed.isna(), field_name, "cannot parse {value!r} as a date (YYYY-MM-DD)")
    return parsed


def _strings(table: _Table, s: pd.Series, field_name: str, *, required: bool) -> pd.Series:
    if required:
        _required(table, s, field_name)
    return s


def _finish(frame: pd.DataFrame, columns: list[str]) -> pd.DataFrame:
    """Schema columns first, extra named columns after, and a fresh 0..n-1 index."""
    others = [c for c in frame.columns if c not in columns]
    return frame[columns + others].reset_index(drop=True)


_ARTICLE_INT_COLUMNS = {
    "product_code", "product_type_no", "graphical_appearance_no", "colour_group_code",
    "perceived_colour_value_id", "perceived_colour_master_id", "department_no", "index_group_no",
    "section_no", "garment_group_no",
}


def _load_articles(path: Path) -> tuple[pd.DataFrame, FileReport]:
    table = _Table(path, ARTICLES_COLUMNS)
    df = _drop_blank(table, table.raw.copy())
    for col in ARTICLES_COLUMNS:
        if col == "article_id":
            df[col] = _article_ids(table, df[col])
        elif col in _ARTICLE_INT_COLUMNS:
            df[col] = _integers(table, df[col], col)
        else:
            df[col] = _strings(table, df[col], col, required=col != "detail_desc")
    df = table.drop(df, df["article_id"].duplicated(), "duplicate_article_id")
    return _finish(df, ARTICLES_COLUMNS), table.report(len(df))


def _load_customers(path: Path) -> tuple[pd.DataFrame, FileReport]:
    table = _Table(path, CUSTOMERS_COLUMNS)
    df = _drop_blank(table, table.raw.copy())
    df["customer_id"] = _ids(table, df["customer_id"], "customer_id")
    df["postal_code"] = _ids(table, df["postal_code"], "postal_code")
    for col in ("FN", "Active", "age"):
        df[col] = _numbers(table, df[col], col, required=False)
    df = table.drop(df, df["customer_id"].duplicated(), "duplicate_customer_id")
    return _finish(df, CUSTOMERS_COLUMNS), table.report(len(df))


def _load_transactions(path: Path, customers: pd.Series, articles: pd.Series) -> tuple[pd.DataFrame, FileReport]:
    table = _Table(path, TRANSACTIONS_COLUMNS)
    df = _drop_blank(table, table.raw.copy())
    df["t_dat"] = _dates(table, df["t_dat"], "t_dat")
    df["customer_id"] = _ids(table, df["customer_id"], "customer_id")
    df["article_id"] = _article_ids(table, df["article_id"])
    price = _numbers(table, df["price"], "price", required=True)
    table.fail(price < 0, "price", "{value!r} is negative")
    df["price"] = price
    channel = _numbers(table, df["sales_channel_id"], "sales_channel_id", required=True)
    table.fail(~channel.isin([1.0, 2.0]), "sales_channel_id", "expected 1 or 2, got {value!r}")
    df["sales_channel_id"] = channel.astype("int64")
    # Each dropped row is counted once, under the first reason that applies.
    df = table.drop(df, ~df["customer_id"].isin(customers), "unknown_customer")
    df = table.drop(df, ~df["article_id"].isin(articles), "unknown_article")
    return _finish(df, TRANSACTIONS_COLUMNS), table.report(len(df))


def _load_extra(name: str, path: Path, articles: pd.Series) -> tuple[pd.DataFrame, FileReport]:
    columns = {
        "stock": STOCK_COLUMNS, "regions": REGIONS_COLUMNS,
        "age_restriction": AGE_RESTRICTION_COLUMNS, "postal_regions": POSTAL_REGIONS_COLUMNS,
    }[name]
    table = _Table(path, columns)
    df = _drop_blank(table, table.raw.copy())
    if "article_id" in columns:
        df["article_id"] = _article_ids(table, df["article_id"])
    if name == "stock":
        df["stock"] = _integers(table, df["stock"], "stock", non_negative=True)
    if name == "age_restriction":
        df["min_age"] = _integers(table, df["min_age"], "min_age", non_negative=True)
    if name in ("regions", "postal_regions"):
        df["region"] = _ids(table, df["region"], "region")
    if name == "postal_regions":
        df["postal_code"] = _ids(table, df["postal_code"], "postal_code")
        df = table.drop(df, df["postal_code"].duplicated(), "duplicate_postal_code")
    else:
        df = table.drop(df, ~df["article_id"].isin(articles), "unknown_article")
        key = ["article_id", "region"] if name == "regions" else ["article_id"]
        df = table.drop(df, df.duplicated(subset=key), "duplicate_row" if name == "regions" else "duplicate_article_id")
    return _finish(df, columns), table.report(len(df))


def check_hm_files(data_dir: Path) -> None:
    """Raise FileNotFoundError naming every Kaggle file missing from `data_dir` (the extras
    are optional): a pipeline checks this before it starts a database or writes anything."""
    missing = [str(Path(data_dir) / FILES[n]) for n in ("articles", "customers", "transactions")
               if not (Path(data_dir) / FILES[n]).is_file()]
    if missing:
        raise FileNotFoundError(f"{', '.join(missing)} not found")


def load_hm(data_dir: Path) -> HMData:
    """Load the H&M tables (and whichever extra tables exist) from `data_dir`.

    Raises FileNotFoundError if a Kaggle file is missing and DataError if a file cannot be
    parsed; rows that are merely inconsistent are dropped and counted in `report`.
    """
    data_dir = Path(data_dir)
    check_hm_files(data_dir)
    report = LoadReport()
    articles, report.files[FILES["articles"]] = _load_articles(data_dir / FILES["articles"])
    customers, report.files[FILES["customers"]] = _load_customers(data_dir / FILES["customers"])
    transactions, report.files[FILES["transactions"]] = _load_transactions(
        data_dir / FILES["transactions"], customers["customer_id"], articles["article_id"]
    )
    extras: dict[str, pd.DataFrame] = {}
    for name in EXTRA_TABLES:
        path = data_dir / FILES[name]
        if path.is_file():
            extras[name], report.files[FILES[name]] = _load_extra(name, path, articles["article_id"])
    return HMData(articles=articles, customers=customers, transactions=transactions, extras=extras, report=report)
