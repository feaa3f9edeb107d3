"""The anomorph command: help for every subcommand, phantom → data check, clear errors."""
from __future__ import annotations

import subprocess
import sys

import pytest

import anomorph
from anomorph.cli.main import build_parser, main

SUBCOMMANDS = [["phantom"], ["data", "check"], ["fit"], ["evaluate"], ["predict"], ["calibrate"], ["benchmark"], ["demo"]]


@pytest.mark.parametrize("command", SUBCOMMANDS, ids=lambda c: " ".join(c))
def test_help(command, capsys):
    with pytest.raises(SystemExit) as exit_info:
        main([*command, "--help"])
    assert exit_info.value.code == 0
    assert "usage: anomorph" in capsys.readouterr().out


def test_phantom_then_data_check(tmp_path, capsys):
    assert main(["phantom", "--out", str(tmp_path / "p"), "--size", "32", "--n-slices", "4", "--n-train", "2",
                 "--n-val-healthy", "1", "--n-val-lesion", "1", "--n-test", "4", "--n-test-healthy", "1",
                 "--quiet"]) == 0
    assert main(["data", "check", str(tmp_path / "p" / "manifest.csv"), "--size", "32"]) == 0
    out = capsys.readouterr().out
    assert "train      2" in out and "OK: every row loaded" in out


def test_bad_manifest_exits_2_with_row_and_file(tmp_path):
    (tmp_path / "manifest.csv").write_text("image,split\nmissing.nii.gz,train\n")
    done = subprocess.run([sys.executable, "-m", "anomorph.cli.main", "data", "check", str(tmp_path / "manifest.csv")],
                          capture_output=True, text=True)
    assert done.returncode == 2
    assert "row 1" in done.stderr and "missing.nii.gz" in done.stderr and "Traceback" not in done.stderr


def test_every_readme_python_name_exists():
    for name in ["build_phantom", "check_manifest", "fit", "load_config", "evaluate", "predict_files",
                 "ModelScorer", "Detector", "calibrate", "run_benchmark", "load_benchmark_config", "run_demo", "PhantomConfig"]:
        assert callable(getattr(anomorph, name)), name
    assert {action.dest for action in build_parser()._subparsers._group_actions}  # parser builds
