"""scripts/missed_lesions.py: per reference lesion, found or missed, its probability, contrast."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import yaml
from tiny import load_script

from segmenter.data.layout import load_dataset
from segmenter.data.synthetic import PhantomSpec, write_dataset
from segmenter.evaluation.components import label_components
from segmenter.evaluation.evaluate import evaluate_folders
from segmenter.io import read_image, write_image


def _replicate(tmp_path: Path) -> tuple[Path, int]:
    """A compare replicate whose probability map finds the first reference lesion only (p 0.95
    in it, 0.04 in every other): returns the folder and the number of reference lesions."""
    dataset = write_dataset(tmp_path / "data", 1, seed=3, spec=PhantomSpec(size=32))
    case = load_dataset(dataset).training[0]
    ref = read_image(case.label)
    labels, n = label_components(ref.array > 0)
    assert n >= 2, "the phantom needs two lesions for this test"
    prob = np.where(labels == 1, 0.95, np.where(labels > 0, 0.04, 0.0)).astype(np.float32)
    rep = tmp_path / "cmp" / "variants" / "v" / "fold0_seed0"
    name = f"{case.case_id}.nii.gz"
    write_image(rep / "reference" / name, (ref.array > 0).astype(np.uint8), ref.affine)
    write_image(rep / "predictions" / "probabilities" / name, prob, ref.affine)
    write_image(rep / "predictions" / name, (prob > 0.5).astype(np.uint8), ref.affine)
    evaluate_folders(rep / "predictions", rep / "reference", out_dir=rep / "evaluation")
    (rep / "config.yaml").write_text(yaml.safe_dump({"data": {"dataset": str(dataset)}}))
    return rep, n


def test_found_and_missed_lesions_with_their_probabilities(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    module = load_script("missed_lesions")
    rep, n = _replicate(tmp_path)
    lesions = module.replicate_lesions(rep)
    assert len(lesions) == n
    found = [x for x in lesions if x.found]
    assert len(found) == 1 and found[0].max_probability == pytest.approx(0.95)
    assert all(x.max_probability == pytest.approx(0.04) for x in lesions if not x.found)
    assert all(x.contrast[0] > 0 for x in lesions)  # phantom lesions are bright in channel 0
    assert module.main([str(tmp_path / "cmp"), "--lesions"]) == 0
    out = capsys.readouterr().out
    assert f"variant v: 1 replicate(s), {n} reference lesions" in out
    missed = next(line for line in out.splitlines() if line.strip().startswith("missed"))
    assert missed.split()[1:5:3] == [str(n - 1), str(n - 1)]  # n, and all of them below p 0.1


def test_a_folder_without_lesion_tables_is_refused(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    module = load_script("missed_lesions")
    assert module.main([str(tmp_path)]) == 2
    assert "no replicate with evaluation/lesions.csv" in capsys.readouterr().err


def test_a_lesion_table_that_does_not_match_the_reference_is_an_input_error(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    module = load_script("missed_lesions")
    rep, n = _replicate(tmp_path)
    table = rep / "evaluation" / "lesions.csv"
    lines = table.read_text().splitlines()
    first_ref = next(i for i, line in enumerate(lines) if ",ref," in line)
    table.write_text("\n".join(lines[:first_ref] + lines[first_ref + 1 :]) + "\n")
    assert module.main([str(rep)]) == 2
    assert f"has {n} reference lesions, its lesions.csv {n - 1}" in capsys.readouterr().err
