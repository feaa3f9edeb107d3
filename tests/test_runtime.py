"""anomorph.runtime: CPU limits from affinity and cgroups, the OpenMP environment set before torch
loads, and the one-line log of the choice."""
from __future__ import annotations

import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from anomorph import runtime

THREAD_ENV = ("OMP_WAIT_POLICY", "OMP_NUM_THREADS", "MKL_NUM_THREADS", "OMP_DISPLAY_ENV")


def _write(path: Path, text: str) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)


def _clean_env(**extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k not in THREAD_ENV}
    env.update(extra)
    return env


# --------------------------------------------------------------------------- parsing
@pytest.mark.parametrize("text, expected", [
    ("max 100000", None), ("max", None), ("150000 100000", 1.5), ("200000 100000\n", 2.0),
    ("50000 100000", 0.5), ("garbage", None), ("", None),
])
def test_parse_cpu_max(text, expected):
    assert runtime.parse_cpu_max(text) == expected


@pytest.mark.parametrize("quota, period, expected", [
    ("-1", "100000", None), ("250000", "100000", 2.5), ("100000", None, 1.0), ("x", "1", None),
])
def test_parse_cfs(quota, period, expected):
    assert runtime.parse_cfs(quota, period) == expected


def test_cgroup_v2_takes_the_tightest_limit_along_the_path(tmp_path):
    root = tmp_path / "cgroup"
    _write(root / "user.slice" / "job" / "cpu.max", "max 100000")
    _write(root / "user.slice" / "cpu.max", "150000 100000")
    _write(root / "cpu.max", "400000 100000")
    proc = tmp_path / "proc_self_cgroup"
    _write(proc, "0::/user.slice/job\n")
    assert runtime.cgroup_cpu_limit(root, proc) == 1.5


def test_cgroup_v2_container_root_and_missing_files(tmp_path):
    root = tmp_path / "cgroup"
    _write(root / "cpu.max", "300000 100000")
    proc = tmp_path / "proc_self_cgroup"
    # inside a cgroup namespace the own path may not exist under the mount: the mount root counts
    _write(proc, "0::/docker/abc\n")
    assert runtime.cgroup_cpu_limit(root, proc) == 3.0
    _write(root / "cpu.max", "max 100000")
    assert runtime.cgroup_cpu_limit(root, proc) is None
    assert runtime.cgroup_cpu_limit(tmp_path / "nothing", tmp_path / "no_proc_file") is None


def test_cgroup_v1_cfs_quota(tmp_path):
    root = tmp_path / "cgroup"
    directory = root / "cpu,cpuacct" / "docker" / "abc"
    _write(directory / "cpu.cfs_quota_us", "250000")
    _write(directory / "cpu.cfs_period_us", "100000")
    proc = tmp_path / "proc_self_cgroup"
    _write(proc, "12:memory:/docker/abc\n4:cpu,cpuacct:/docker/abc\n0::/docker/abc\n")
    assert runtime.cgroup_cpu_limit(root, proc) == 2.5
    _write(directory / "cpu.cfs_quota_us", "-1")
    assert runtime.cgroup_cpu_limit(root, proc) is None


def test_cgroup_mounts_come_from_the_mount_table_hybrid_included(tmp_path, monkeypatch):
    v2, v1 = tmp_path / "cg" / "unified", tmp_path / "cg" / "cpu,cpuacct"
    mounts = tmp_path / "mounts"
    _write(mounts, f"proc /proc proc rw 0 0\ncgroup2 {v2} cgroup2 rw,nosuid 0 0\n"
                   f"cgroup {tmp_path / 'cg' / 'memory'} cgroup rw,memory 0 0\n"
                   f"cgroup {v1} cgroup rw,nosuid,cpu,cpuacct 0 0\n")
    assert runtime.cgroup_mounts(mounts) == (v2, [v1])
    assert runtime.cgroup_mounts(tmp_path / "no_table") == (None, [])
    # the default reads the quota where the table says the hierarchies are (here: v1 cpu)
    _write(v1 / "job" / "cpu.cfs_quota_us", "150000")
    _write(v1 / "job" / "cpu.cfs_period_us", "100000")
    proc = tmp_path / "proc_self_cgroup"
    _write(proc, "4:cpu,cpuacct:/job\n0::/job\n")
    monkeypatch.setattr(runtime, "PROC_SELF_MOUNTS", mounts)
    monkeypatch.setattr(runtime.cgroup_mounts, "__defaults__", (mounts,))
    assert runtime.cgroup_cpu_limit(None, proc) == 1.5


def test_usable_cpus_caps_affinity_by_quota_rounding_down():
    assert runtime.usable_cpus(8, 2.5) == 2
    assert runtime.usable_cpus(8, 0.5) == 1           # never 0
    assert runtime.usable_cpus(2, 16.0) == 2          # the quota never raises the count
    assert runtime.usable_cpus(6, None, read_quota=False) == 6


def test_affinity_mask_is_used(monkeypatch):
    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: {0, 3, 5}, raising=False)
    assert runtime.affinity_cpus() == 3


# --------------------------------------------------------------------------- environment
def test_prepare_sets_passive_and_thread_count_before_torch():
    env: dict[str, str] = {}
    setup = runtime.prepare_environment(env, torch_loaded=False, cpus=3)
    assert env == {"OMP_WAIT_POLICY": "PASSIVE", "OMP_NUM_THREADS": "3", "MKL_NUM_THREADS": "3"}
    assert (setup.threads, setup.wait_policy_source, setup.threads_source) == (3, "anomorph", "anomorph")


def test_prepare_respects_user_settings():
    env = {"OMP_WAIT_POLICY": "ACTIVE", "OMP_NUM_THREADS": "1"}
    setup = runtime.prepare_environment(env, torch_loaded=False, cpus=4)
    assert env == {"OMP_WAIT_POLICY": "ACTIVE", "OMP_NUM_THREADS": "1"}
    assert setup.threads == 1 and setup.wait_policy == "ACTIVE"
    assert setup.wait_policy_source == "user" and setup.threads_source.startswith("user")
    line = setup.describe()
    assert "OMP_WAIT_POLICY=ACTIVE (user)" in line and "\n" not in line


def test_prepare_after_torch_leaves_environment_and_says_so():
    env: dict[str, str] = {}
    setup = runtime.prepare_environment(env, torch_loaded=True, cpus=2)
    assert env == {}
    assert "too late" in setup.wait_policy_source


# --------------------------------------------------------------------------- real processes
def _run(code: str, env: dict[str, str]) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-c", textwrap.dedent(code)], env=env, capture_output=True,
                          text=True, timeout=120)


def test_import_anomorph_sets_wait_policy_before_torch_is_imported():
    # Records the environment at the moment `torch` is first imported, wherever that happens.
    code = """
        import os, sys, importlib.abc
        seen = {}
        class Spy(importlib.abc.MetaPathFinder):
            def find_spec(self, name, path=None, target=None):
                if name == "torch" and "torch" not in seen:
                    seen["torch"] = (os.environ.get("OMP_WAIT_POLICY"), os.environ.get("OMP_NUM_THREADS"))
                return None
        sys.meta_path.insert(0, Spy())
        import anomorph
        import anomorph.training.fit, anomorph.evaluation.api, anomorph.cli.main
        import torch
        print(seen["torch"][0], seen["torch"][1], torch.get_num_threads())
    """
    done = _run(code, _clean_env())
    assert done.returncode == 0, done.stderr[-2000:]
    policy, threads, torch_threads = done.stdout.split()
    assert policy == "PASSIVE"
    assert int(threads) == runtime.usable_cpus() == int(torch_threads)


def test_openmp_runtime_really_reads_passive():
    # libgomp prints its settings at start-up with OMP_DISPLAY_ENV=VERBOSE. It shows the policy as
    # 'PASSIVE' even when unset; what differs is the spin count: 0 only for an explicit PASSIVE.
    done = _run("import anomorph, torch; torch.ones(64).sum()", _clean_env(OMP_DISPLAY_ENV="VERBOSE"))
    assert done.returncode == 0, done.stderr[-2000:]
    if "GOMP_SPINCOUNT" not in done.stderr:
        pytest.skip("this torch build's OpenMP runtime is not libgomp (no GOMP_SPINCOUNT in OMP_DISPLAY_ENV)")
    assert "GOMP_SPINCOUNT = '0'" in done.stderr
    # without anomorph imported first the runtime starts spinning (the default policy)
    plain = _run("import torch; torch.ones(64).sum()", _clean_env(OMP_DISPLAY_ENV="VERBOSE"))
    assert "GOMP_SPINCOUNT" in plain.stderr and "GOMP_SPINCOUNT = '0'" not in plain.stderr


def test_user_environment_is_respected_end_to_end():
    done = _run("import anomorph, torch, os; anomorph.configure_threads();"
                "print(os.environ['OMP_WAIT_POLICY'], torch.get_num_threads())",
                _clean_env(OMP_WAIT_POLICY="ACTIVE", OMP_NUM_THREADS="1"))
    assert done.returncode == 0, done.stderr[-2000:]
    assert done.stdout.split() == ["ACTIVE", "1"]


def test_cli_logs_the_choice_once_when_work_starts(tmp_path):
    """The CLI sets threads at start but prints its line only when fit/evaluate/predict start
    working: a user error stays one line (the error contract)."""
    code = "import sys; from anomorph.cli.main import main; sys.exit(main(sys.argv[1:]))"
    done = subprocess.run([sys.executable, "-c", code, "data", "check", str(tmp_path / "missing.csv")],
                          env=_clean_env(), capture_output=True, text=True, timeout=120)
    assert done.returncode == 2 and len(done.stderr.strip().splitlines()) == 1, done.stderr
    probe = ("import sys; from anomorph.cli.main import main; from anomorph import runtime; "
             "main(['data', 'check', sys.argv[1]]); runtime.configure_threads(); runtime.configure_threads()")
    done = subprocess.run([sys.executable, "-c", probe, str(tmp_path / "missing.csv")],
                          env=_clean_env(), capture_output=True, text=True, timeout=120)
    lines = [line for line in done.stderr.splitlines() if "OMP_WAIT_POLICY=" in line]
    assert len(lines) == 1, done.stderr
    assert "OMP_WAIT_POLICY=PASSIVE (anomorph)" in lines[0]
    assert f"{runtime.usable_cpus()} torch threads" in lines[0]


def test_configure_threads_lowers_but_never_raises(monkeypatch):
    torch = pytest.importorskip("torch")
    before = torch.get_num_threads()
    setup = runtime.ThreadSetup(threads=1, affinity=4, quota=1.0, wait_policy="PASSIVE",
                                wait_policy_source="anomorph", threads_source="anomorph",
                                torch_loaded_first=False)
    monkeypatch.setattr(runtime, "_SETUP", setup)
    monkeypatch.setattr(runtime, "_APPLIED", False)
    monkeypatch.setattr(runtime, "_LOGGED", False)
    lines: list[str] = []
    try:
        torch.set_num_threads(2)
        result = runtime.configure_threads(announce=lines.append)
        assert torch.get_num_threads() == 1 and result.torch_threads == 1
        assert len(lines) == 1 and "lowered from 2" in lines[0]
        runtime.configure_threads(announce=lines.append)
        assert len(lines) == 1                         # logged once
        # a smaller count chosen by the user stays
        monkeypatch.setattr(runtime, "_APPLIED", False)
        setup.threads = 4
        runtime.configure_threads()
        assert torch.get_num_threads() == 1
    finally:
        torch.set_num_threads(before)
