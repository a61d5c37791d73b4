"""dtype resolution: names, torch dtypes, and "auto" measured once per machine then read from the cache."""

from __future__ import annotations

import pytest
import torch

from dyntree import precision
from dyntree.errors import DynTreeError


@pytest.mark.parametrize("value, expected", [("float32", torch.float32), ("bf16", torch.bfloat16),
                                             ("BFloat16", torch.bfloat16), (torch.bfloat16, torch.bfloat16),
                                             ("torch.float32", torch.float32), (None, torch.float32),
                                             ("float16", torch.float16), ("fp16", torch.float16)])
def test_names_and_dtypes_resolve(value, expected):
    assert precision.resolve_dtype(value) == expected


@pytest.mark.parametrize("value", ["half", "", torch.int8])
def test_bad_values_are_one_line_errors_naming_the_choices(value):
    with pytest.raises(DynTreeError, match="auto, float32, bfloat16") as err:
        precision.resolve_dtype(value)
    assert "\n" not in str(err.value)


def test_auto_measures_once_then_reads_the_cache(tmp_path, monkeypatch):
    monkeypatch.setenv("DYNTREE_CACHE", str(tmp_path))
    calls = []
    measure = precision.measure_dense_speed
    monkeypatch.setattr(precision, "measure_dense_speed", lambda: calls.append(1) or measure(repeats=1))
    monkeypatch.setattr(precision, "machine_busy", lambda: True)  # timings beside other work: not kept
    assert precision.resolve_dtype("auto") in (torch.float32, torch.bfloat16)
    assert calls == [1] and not (tmp_path / "precision").exists()
    monkeypatch.setattr(precision, "machine_busy", lambda: False)
    first = precision.resolve_dtype("auto")
    assert first in (torch.float32, torch.bfloat16)
    assert precision.resolve_dtype("auto") == first
    assert calls == [1, 1]
    assert len(list((tmp_path / "precision").glob("*.json"))) == 1


def test_load_model_takes_dtype_names(tiny_model_dir):
    from dyntree.loading import load_model

    assert load_model(tiny_model_dir, dtype="bfloat16").backbone.dtype == torch.bfloat16
