"""`--k auto:SHARE`: the smallest k reaching a share of the variance, chosen from one PCA fit."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest

from m9.config import AUTO_VARIANCE_TARGET, parse_k
from m9.stages.pca import choose_k, k_choice
from tests.conftest import TEST_K


def test_parse_k_reads_a_count_or_a_share():
    assert parse_k("50") == (50, None)
    assert parse_k("auto:0.9") == (None, 0.9)
    assert parse_k("AUTO") == (None, AUTO_VARIANCE_TARGET)
    for bad in ("0", "-3", "many", "auto:", "auto:0", "auto:1.5", "auto:x"):
        with pytest.raises(ValueError, match="--k"):
            parse_k(bad)


def test_choose_k_is_the_smallest_k_reaching_the_share():
    ratios = [0.5, 0.25, 0.125, 0.0625, 0.0625]
    assert choose_k(ratios, 0.5) == 1
    assert choose_k(ratios, 0.75) == 2  # reached exactly
    assert choose_k(ratios, 0.76) == 3
    assert choose_k(ratios, 1.0) == 5
    assert choose_k([0.5, 0.2], 0.95) == 2  # never reached: every component the fit has


def test_k_choice_says_why():
    choice = k_choice([0.5, 0.25, 0.125, 0.125], 0.8, 3)
    assert choice["k"] == 3 and choice["fitted_components"] == 4
    assert choice["explained"] == pytest.approx(0.875) and choice["explained_by_k_minus_1"] == pytest.approx(0.75)
    assert "3 explain 87.5 %, 2 explain 75.0 %" in choice["why"]
    assert "short of 95 %" in k_choice([0.5, 0.2], 0.95, 2)["why"]


def test_the_cli_refuses_a_bad_k():
    from click.testing import CliRunner

    from m9.cli import main

    result = CliRunner().invoke(main, ["reduce", "--k", "auto:2"])
    assert result.exit_code == 2
    assert "auto:0.95" in result.output


@pytest.mark.slow
def test_reduce_auto_keeps_the_first_components_of_one_fit(pipeline, spark, tmp_path):
    from m9.config import ReduceConfig
    from m9.stages.reduce import reduce

    out = tmp_path / "auto"
    result = reduce(ReduceConfig(input=pipeline["dirs"]["embed"], output=str(out), k=None, variance_target=0.5))
    variance = json.loads((out / "variance.json").read_text())
    k = result.details["k"]
    choice = variance["k_choice"]
    assert variance["k"] == k == choice["k"] == len(variance["explained_variance_ratio"])
    assert choice["fitted_components"] == 240  # min(1280 features, 240 embedded images)
    assert choice["explained"] >= 0.5 > choice["explained_by_k_minus_1"]
    assert variance["total_explained"] == pytest.approx(choice["explained"])
    # The same components as a fit with a fixed k: PCA's components are nested (signs may flip).
    fixed = json.loads(Path(pipeline["dirs"]["reduce"], "variance.json").read_text())
    shared = min(k, TEST_K)
    ratios = variance["explained_variance_ratio"][:shared]
    assert ratios == pytest.approx(fixed["explained_variance_ratio"][:shared], rel=1e-6)
    auto_pcs = pq.read_table(out / "pca").to_pandas().sort_values("image_id")
    fixed_pcs = pq.read_table(Path(pipeline["dirs"]["reduce"], "pca")).to_pandas().sort_values("image_id")
    a = np.stack(auto_pcs["pca"])[:, :shared]
    b = np.stack(fixed_pcs["pca"])[:, :shared]
    assert np.allclose(np.abs(a), np.abs(b), atol=1e-3)
    header = (out / "pca.csv").read_text().splitlines()[0]
    assert header.endswith(f"pc_{k}")
    # A re-run with the same rule is recognised as done.
    again = reduce(ReduceConfig(input=pipeline["dirs"]["embed"], output=str(out), k=None, variance_target=0.5))
    assert again.skipped
    # Another share is another output: refused, naming the change (the contract's fingerprint holds it).
    from m9.errors import InputError

    with pytest.raises(InputError, match="variance_target"):
        reduce(ReduceConfig(input=pipeline["dirs"]["embed"], output=str(out), k=None, variance_target=0.6))
