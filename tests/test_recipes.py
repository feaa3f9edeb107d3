"""Dataset recipes on miniature copies of each public layout: real directory and file names,
realistic orientations, spacings and data types, phantom content with known transforms."""
from __future__ import annotations

import csv
import json
import locale

import nibabel as nib
import numpy as np
import pytest
import SimpleITK as sitk

from anomorph.cli.main import main
from anomorph.data.manifest import read_manifest
from anomorph.data.prepare import _lesion_mask, read_raw
from anomorph.data.recipes import find_subjects, prepare_layout
from anomorph.errors import ConfigError, DataError

from raw_phantom import (LESION_CENTER_LPS, brats_labels, centroid_mm, dice, make_raw_case, template_space_truth,
                         wmh_labels, write, write_dicom_series)

CHEAP = {"spacing_mm": 6.0, "registration": "none", "bias_correction": False, "threads": 2}
FULL = {"spacing_mm": 4.0, "registration_spacing_mm": 6.0, "threads": 2}


def _case(seed, lesion=True, **kw):
    return make_raw_case(seed, spacing=kw.pop("spacing", (4.0, 4.0, 4.0)), lesion=lesion, **kw)


def _as(image: sitk.Image, pixel) -> sitk.Image:
    return sitk.Cast(image, pixel)


@pytest.fixture(scope="module")
def datasets(tmp_path_factory):
    root = tmp_path_factory.mktemp("datasets")
    cases = {}
    # IXI: flat folders per modality, sagittal int16 scans, demographics sheet (CSV export of IXI.xls)
    for i, name in enumerate(["IXI002-Guys-0828", "IXI012-HH-1211", "IXI013-IOP-0770"]):
        case = _case(10 + i, lesion=False, spacing=(4.0, 4.0, 5.0))
        write(case.image, root / "IXI" / "IXI-T1" / f"{name}-T1.nii.gz")
        write(case.image, root / "IXI" / "IXI-T2" / f"{name}-T2.nii.gz")
    with (root / "IXI" / "IXI.csv").open("w", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow(["IXI_ID", "SEX_ID (1=m, 2=f)", "AGE"])
        writer.writerows([[2, 2, 35.8], [12, 1, 38.78], [13, 1, 46.71]])
    # BraTS 2021: one folder per case, LPS-stored 1 mm-like axial grid, float t1, uint8 seg {1, 2, 4}
    for i, name in enumerate(["BraTS2021_00000", "BraTS2021_00002"]):
        case = _case(20 + i, sagittal=False, oblique_deg=0.0)
        cases[name] = case
        for mod in ("t1", "t1ce", "t2", "flair"):
            write(_as(case.image, sitk.sitkFloat32), root / "BraTS" / name / f"{name}_{mod}.nii.gz")
        write(brats_labels(case.mask), root / "BraTS" / name / f"{name}_seg.nii.gz")
    write(_case(22, sagittal=False, oblique_deg=0.0).image, root / "BraTS" / "BraTS2021_00099" / "BraTS2021_00099_t1.nii.gz")
    # ATLAS v2.0: BIDS, already in MNI152NLin2009aSym (identity), RAS+ float32
    for i, (cohort, sub) in enumerate([("R001", "sub-r001s001"), ("R002", "sub-r002s004")]):
        case = _case(30 + i, in_mni=True)
        cases[sub] = case
        anat = root / "ATLAS_2" / "Training" / cohort / sub / "ses-1" / "anat"
        write(_as(case.image, sitk.sitkFloat32), anat / f"{sub}_ses-1_space-MNI152NLin2009aSym_T1w.nii.gz")
        write(case.mask, anat / f"{sub}_ses-1_space-MNI152NLin2009aSym_label-L_desc-T1lesion_mask.nii.gz")
    write(_case(32, in_mni=True).image, root / "ATLAS_2" / "Testing" / "R003" / "sub-r003s001" / "ses-1" / "anat" /
          "sub-r003s001_ses-1_space-MNI152NLin2009aSym_T1w.nii.gz")
    # MSLUB: raw/ and coregistered/ copies; sagittal int16
    for i, name in enumerate(["patient01", "patient02"]):
        case = _case(40 + i)
        for copy in ("raw", "coregistered"):
            for mod in ("T1W", "FLAIR"):
                write(case.image, root / "MSLUB" / "cross_sectional" / copy / name / f"{mod}.nii.gz")
            write(case.mask, root / "MSLUB" / "cross_sectional" / copy / name / "consensus_gt.nii.gz")
    # WMH 2017: <site>/<id>/pre/{T1,FLAIR}.nii.gz + wmh.nii.gz (1 = WMH, 2 = other pathology); thick axial slices
    for i, (site, cid) in enumerate([("Utrecht", "0"), ("Singapore", "50"), ("GE3T", "100")]):
        case = _case(50 + i, sagittal=False, oblique_deg=4.0, spacing=(4.0, 4.0, 6.0))
        cases[f"{site}_{cid}"] = case
        for mod in ("T1", "FLAIR"):
            write(case.image, root / "WMH" / "training" / site / cid / "pre" / f"{mod}.nii.gz")
        write(wmh_labels(case.mask), root / "WMH" / "training" / site / cid / "wmh.nii.gz")
    # generic folder: NIfTI images, one with a mask, and a DICOM series folder
    folder = root / "hospital"
    write(_case(60, lesion=False).image, folder / "scan_a.nii.gz")
    case = _case(61)
    write(case.image, folder / "scan_b.nii.gz")
    write(case.mask, folder / "scan_b_mask.nii.gz")
    cases["dicom"] = _case(62, lesion=False, sagittal=False, oblique_deg=10.0)
    write_dicom_series(cases["dicom"].image, folder / "scan_c")
    # BIDS with a derivatives lesion mask
    write(_case(70, lesion=False).image, root / "bids" / "sub-01" / "anat" / "sub-01_T1w.nii.gz")
    case = _case(71)
    write(case.image, root / "bids" / "sub-02" / "ses-1" / "anat" / "sub-02_ses-1_T1w.nii.gz")
    write(case.mask, root / "bids" / "derivatives" / "lesions" / "sub-02" / "ses-1" / "anat" /
          "sub-02_ses-1_desc-lesion_mask.nii.gz")
    return root, cases


def _names(recipe):
    return {s.subject: s for s in recipe.subjects}


def test_ixi_finds_one_modality_and_reads_demographics(datasets, tmp_path):
    root, _ = datasets
    recipe = find_subjects("ixi", root / "IXI")
    subjects = _names(recipe)
    assert sorted(subjects) == ["IXI002-Guys-0828", "IXI012-HH-1211", "IXI013-IOP-0770"]
    assert all(s.healthy and s.mask is None and s.image.name.endswith("-T1.nii.gz") for s in recipe.subjects)
    assert subjects["IXI002-Guys-0828"].info == {"sex": "female", "age": 35.8}
    assert _names(find_subjects("ixi", root / "IXI", modality="T2"))["IXI012-HH-1211"].image.parent.name == "IXI-T2"
    _, report = prepare_layout("ixi", root / "IXI", tmp_path, CHEAP, healthy_fractions=(0.34, 0.33, 0.33))
    rows = read_manifest(report.manifest)
    assert sorted(r.split for r in rows) == ["test", "train", "val"] and all(r.mask is None for r in rows)
    record = json.loads((tmp_path / "provenance" / "IXI002-Guys-0828.json").read_text())
    assert record["info"]["age"] == 35.8


def test_brats_merges_labels_and_registers_the_lesion_into_place(datasets, tmp_path):
    root, cases = datasets
    recipe = find_subjects("brats", root / "BraTS")
    assert sorted(_names(recipe)) == ["BraTS2021_00000", "BraTS2021_00002"]
    assert any("without *_seg" in n for n in recipe.notes)
    seg = read_raw(root / "BraTS" / "BraTS2021_00000" / "BraTS2021_00000_seg.nii.gz")
    assert set(np.unique(sitk.GetArrayFromImage(seg)).astype(int)) == {0, 1, 2, 4}
    merged = sitk.GetArrayFromImage(_lesion_mask(seg, None))
    assert merged.sum() == sitk.GetArrayFromImage(cases["BraTS2021_00000"].mask).sum()
    _, report = prepare_layout("brats", root / "BraTS", tmp_path, FULL)
    rows = read_manifest(report.manifest)
    assert {r.split for r in rows} <= {"val", "test"} and all(r.label == 1 and r.lesion_type == "glioma" for r in rows)
    for name in ("BraTS2021_00000", "BraTS2021_00002"):
        mask = sitk.ReadImage(str(tmp_path / "masks" / f"{name}.nii.gz"))
        error = float(np.linalg.norm(centroid_mm(mask) - LESION_CENTER_LPS))
        overlap = dice(sitk.GetArrayFromImage(mask) > 0, template_space_truth(mask))
        print(f"{name}: lesion centroid error {error:.2f} mm, Dice vs the template-space truth {overlap:.3f}")
        assert error < 2.0 and overlap > 0.8, (error, overlap)


def test_atlas_is_already_in_mni_space(datasets, tmp_path):
    root, _ = datasets
    recipe = find_subjects("atlas", root / "ATLAS_2")
    assert sorted(_names(recipe)) == ["sub-r001s001_ses-1", "sub-r002s004_ses-1"]
    assert recipe.defaults == {"registration": "none"} and any("without a lesion mask" in n for n in recipe.notes)
    _, report = prepare_layout("atlas", root / "ATLAS_2", tmp_path, {"spacing_mm": 4.0, "threads": 2})
    record = json.loads((tmp_path / "provenance" / "sub-r001s001_ses-1.json").read_text())
    assert record["config"]["registration"] == "none" and record["steps"]["n4"]
    mask = sitk.ReadImage(str(tmp_path / "masks" / "sub-r001s001_ses-1.nii.gz"))
    overlap = dice(sitk.GetArrayFromImage(mask) > 0, template_space_truth(mask))
    print(f"ATLAS: Dice of the resampled mask vs the template-space truth {overlap:.3f}")
    assert overlap > 0.85
    # outputs are RAS+ on disk like every anomorph volume
    assert nib.aff2axcodes(nib.load(str(tmp_path / "images" / "sub-r001s001_ses-1.nii.gz")).affine) == ("R", "A", "S")
    assert all(r.lesion_type == "stroke" for r in read_manifest(report.manifest))


def test_mslub_prefers_the_raw_copy(datasets, tmp_path):
    root, _ = datasets
    recipe = find_subjects("mslub", root / "MSLUB")
    assert sorted(_names(recipe)) == ["patient01", "patient02"]
    assert all("raw" in s.image.parts and s.mask.name == "consensus_gt.nii.gz" for s in recipe.subjects)
    assert _names(find_subjects("mslub", root / "MSLUB", modality="FLAIR"))["patient01"].image.name == "FLAIR.nii.gz"
    _, report = prepare_layout("mslub", root / "MSLUB", tmp_path, CHEAP)
    assert report.failed == [] and len(read_manifest(report.manifest)) == 2


def test_wmh_counts_label_1_only(datasets, tmp_path):
    root, cases = datasets
    recipe = find_subjects("wmh", root / "WMH", modality="FLAIR")
    subjects = _names(recipe)
    assert sorted(subjects) == ["GE3T_100", "Singapore_50", "Utrecht_0"]
    assert subjects["Utrecht_0"].mask_labels == (1,) and subjects["Utrecht_0"].image.parent.name == "pre"
    labels = read_raw(subjects["Utrecht_0"].mask)
    lesion = sitk.GetArrayFromImage(_lesion_mask(labels, (1,)))
    assert lesion.sum() == (sitk.GetArrayFromImage(labels) == 1).sum() > 0
    _, report = prepare_layout("wmh", root / "WMH", tmp_path, CHEAP, modality="T1")
    assert report.failed == [] and {r.lesion_type for r in read_manifest(report.manifest)} == {"wmh"}


def test_folder_layout_reads_nifti_and_a_dicom_series(datasets, tmp_path):
    root, cases = datasets
    recipe = find_subjects("folder", root / "hospital")
    subjects = _names(recipe)
    assert sorted(subjects) == ["scan_a", "scan_b", "scan_c"]
    assert subjects["scan_b"].mask.name == "scan_b_mask.nii.gz" and not subjects["scan_b"].healthy
    assert subjects["scan_a"].healthy and subjects["scan_c"].image.is_dir()
    encoding = locale.getpreferredencoding(False)
    dicom = read_raw(subjects["scan_c"].image)
    assert locale.getpreferredencoding(False) == encoding  # DICOM I/O left the locale alone (GDCM writing sets "C")
    original = cases["dicom"].image
    assert dicom.GetSize() == original.GetSize()
    np.testing.assert_allclose(dicom.GetOrigin(), original.GetOrigin(), atol=1e-3)
    np.testing.assert_allclose(dicom.GetDirection(), original.GetDirection(), atol=1e-5)
    np.testing.assert_array_equal(sitk.GetArrayFromImage(dicom), sitk.GetArrayFromImage(original))
    code = main(["data", "prepare", str(root / "hospital"), "--layout", "folder", "--out", str(tmp_path),
                 "--registration", "none", "--no-bias-correction", "--spacing-mm", "6", "--threads", "2", "--quiet"])
    assert code == 0
    rows = {r.subject: r for r in read_manifest(tmp_path / "manifest.csv")}
    assert rows["scan_b"].split in ("val", "test") and rows["scan_b"].mask is not None
    assert json.loads((tmp_path / "provenance" / "scan_c.json").read_text())["raw_grid"]["size"] == list(original.GetSize())


def test_bids_finds_derivative_masks(datasets, tmp_path):
    root, _ = datasets
    subjects = _names(find_subjects("bids", root / "bids"))
    assert sorted(subjects) == ["sub-01", "sub-02_ses-1"]
    assert subjects["sub-01"].healthy and subjects["sub-02_ses-1"].mask.name == "sub-02_ses-1_desc-lesion_mask.nii.gz"


def test_recipe_errors_are_one_line(tmp_path, capsys):
    with pytest.raises(DataError, match="no subjects found"):
        find_subjects("brats", tmp_path)
    with pytest.raises(ConfigError, match="modality 'T3'"):
        find_subjects("ixi", tmp_path, modality="T3")
    with pytest.raises(DataError, match="dataset folder not found"):
        find_subjects("ixi", tmp_path / "missing")
    code = main(["data", "prepare", str(tmp_path), "--layout", "ixi", "--out", str(tmp_path / "o")])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and len(err) == 1 and "no subjects found" in err[0]
    code = main(["data", "prepare", str(tmp_path), "--layout", "ixi", "--out", str(tmp_path / "o"),
                 "--registration", "warp"])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and len(err) == 1 and "'registration'" in err[0] and "warp" in err[0]


def test_merge_builds_a_study_from_two_prepared_datasets(datasets, tmp_path, capsys):
    root, _ = datasets
    _, ixi = prepare_layout("ixi", root / "IXI", tmp_path / "ixi", CHEAP, healthy_fractions=(1.0, 0.0, 0.0))
    _, bids = prepare_layout("bids", root / "bids", tmp_path / "bids", CHEAP, healthy_fractions=(0.0, 0.0, 1.0),
                             lesion_val_fraction=0.0)
    out = tmp_path / "study" / "manifest.csv"
    assert main(["data", "merge", str(ixi.manifest), str(bids.manifest), "--out", str(out)]) == 0
    rows = read_manifest(out)
    assert [r.split for r in rows] == ["train"] * 3 + ["test"] * 2
    assert rows[-1].mask is not None and rows[-1].mask.is_file()
    assert main(["data", "merge", str(ixi.manifest), str(ixi.manifest), "--out", str(out)]) == 2
    assert "must be unique" in capsys.readouterr().err
