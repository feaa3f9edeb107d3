"""A safe CPU threading setup, chosen before torch starts its thread pools.

Imported first by ``anomorph/__init__.py`` — so by ``import anomorph`` and by the ``anomorph``
console script — and deliberately free of any torch import. Two things are decided:

- **passive waiting.** ``OMP_WAIT_POLICY=PASSIVE`` unless the user set ``OMP_WAIT_POLICY``.
  With the default (active) policy, OpenMP threads spin at the end of every parallel op while
  waiting for a peer; when another process holds a core, the peer is descheduled and the spin
  burns the time slice, so a network of many small ops runs several times slower. The OpenMP
  runtime (libgomp) reads the variable once, when it is loaded, i.e. at ``import torch``: it can
  only be set before torch is imported, which :func:`prepare_environment` does when torch is
  not loaded yet (and reports when it came too late).
- **the thread count**: the number of CPUs this process may use, :func:`usable_cpus` — the
  affinity mask (``os.sched_getaffinity``; containers, ``taskset``) capped by the cgroup CPU
  quota (v2 ``cpu.max``, v1 ``cpu.cfs_quota_us`` / ``cpu.cfs_period_us``; rounded down, at
  least 1). Unless the user set ``OMP_NUM_THREADS``, it is exported as ``OMP_NUM_THREADS`` /
  ``MKL_NUM_THREADS`` before torch is loaded and applied with ``torch.set_num_threads`` by
  :func:`configure_threads` (which only ever lowers torch's count, so a smaller
  ``torch.set_num_threads`` of the user's stays).

:func:`configure_threads` is called by the CLI and by the Python entry points (``fit``,
``evaluate``, ``predict_files``); it logs the choice once per process as one line
(``logging.getLogger("anomorph.runtime")``, INFO; the CLI prints it to stderr).
"""
from __future__ import annotations

import logging
import math
import os
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Mapping, MutableMapping

logger = logging.getLogger("anomorph.runtime")

# the kernel's per-process interfaces; every reader takes them as arguments, so tests pass fakes.
# Where the cgroup hierarchy is mounted is read from the mount table, not assumed.
PROC_SELF_CGROUP = Path("/proc/self/cgroup")
PROC_SELF_MOUNTS = Path("/proc/self/mounts")
THREAD_VARIABLES = ("OMP_NUM_THREADS", "MKL_NUM_THREADS")


# --------------------------------------------------------------------------- CPU limits
def affinity_cpus() -> int:
    """CPUs in this process' affinity mask (``os.cpu_count()`` where the mask is unavailable)."""
    getaffinity = getattr(os, "sched_getaffinity", None)
    if getaffinity is not None:
        try:
            return max(1, len(getaffinity(0)))
        except OSError:
            pass
    return max(1, os.cpu_count() or 1)


def _read(path: Path) -> str | None:
    try:
        return path.read_text(encoding="ascii").strip()
    except (OSError, UnicodeDecodeError):
        return None


def parse_cpu_max(text: str) -> float | None:
    """CPUs allowed by a cgroup v2 ``cpu.max`` line ``"QUOTA PERIOD"`` (``"max ..."`` = no limit)."""
    parts = text.split()
    if not parts or parts[0] == "max":
        return None
    try:
        quota = int(parts[0])
        period = int(parts[1]) if len(parts) > 1 else 100_000
    except ValueError:
        return None
    if quota <= 0 or period <= 0:
        return None
    return quota / period


def parse_cfs(quota_text: str, period_text: str | None) -> float | None:
    """CPUs allowed by cgroup v1 ``cpu.cfs_quota_us`` / ``cpu.cfs_period_us`` (quota -1 = no limit)."""
    try:
        quota = int(quota_text)
        period = int(period_text) if period_text else 100_000
    except ValueError:
        return None
    if quota <= 0 or period <= 0:
        return None
    return quota / period


def _self_cgroups(proc_self_cgroup: Path) -> list[tuple[str, str]]:
    """``(controllers, path)`` of every line of ``/proc/self/cgroup`` (``"0::/a/b"`` → ``("", "/a/b")``)."""
    text = _read(proc_self_cgroup)
    entries = []
    for line in (text or "").splitlines():
        parts = line.split(":", 2)
        if len(parts) == 3:
            entries.append((parts[1], parts[2]))
    return entries


def _ancestors(mount: Path, cgroup_path: str) -> list[Path]:
    """``mount/cgroup_path`` and each parent up to ``mount`` (a limit may sit on any ancestor).

    Inside a container the process' path often does not exist under the mount (the mount
    *is* the container's cgroup); then only the existing ancestors, down to ``mount``, count.
    """
    relative = Path(cgroup_path.lstrip("/"))
    dirs = [mount / relative]
    dirs += [mount / parent for parent in relative.parents]
    seen, out = set(), []
    for d in dirs:
        if d not in seen:
            seen.add(d)
            out.append(d)
    return out


def cgroup_mounts(mounts: Path = PROC_SELF_MOUNTS) -> tuple[Path | None, list[Path]]:
    """Where this process sees its cgroup hierarchies, from its mount table: (the ``cgroup2``
    mount point or None, the cgroup v1 mount points whose controllers include ``cpu``). Hybrid
    systems have both. An unreadable table gives (None, [])."""
    text = _read(mounts)
    v2, v1 = None, []
    for line in (text or "").splitlines():
        fields = line.split()
        if len(fields) < 4:
            continue
        point = Path(fields[1].replace("\\040", " "))
        if fields[2] == "cgroup2" and v2 is None:
            v2 = point
        elif fields[2] == "cgroup" and "cpu" in fields[3].split(","):
            v1.append(point)
    return v2, v1


def cgroup_cpu_limit(root: Path | None = None, proc_self_cgroup: Path = PROC_SELF_CGROUP) -> float | None:
    """CPUs allowed by the cgroup CPU quota of this process (the tightest along its path), or None.

    ``root``: a folder laid out like a cgroup mount (v2 files in it, v1 controllers in
    ``root/<controllers>``); default: the mount points of this process' mount table
    (:func:`cgroup_mounts`).

    cgroup v2 (a ``0::PATH`` line): ``cpu.max`` in ``root/PATH`` and its ancestors. cgroup v1
    (a line whose controllers include ``cpu``): ``cpu.cfs_quota_us`` / ``cpu.cfs_period_us``
    in ``root/cpu,cpuacct/PATH`` (or ``root/cpu/PATH``) and its ancestors.
    """
    v2_root, v1_mounts = cgroup_mounts() if root is None else (root, [])
    limits: list[float] = []
    for controllers, path in _self_cgroups(proc_self_cgroup):
        if controllers == "" and v2_root is not None:
            for directory in _ancestors(v2_root, path):
                text = _read(directory / "cpu.max")
                limit = parse_cpu_max(text) if text is not None else None
                if limit is not None:
                    limits.append(limit)
        elif "cpu" in controllers.split(","):
            mounts = v1_mounts if root is None else [root / controllers, root / "cpu,cpuacct", root / "cpu"]
            for mount in dict.fromkeys(mounts):
                if not mount.is_dir():
                    continue
                for directory in _ancestors(mount, path):
                    quota = _read(directory / "cpu.cfs_quota_us")
                    if quota is None:
                        continue
                    limit = parse_cfs(quota, _read(directory / "cpu.cfs_period_us"))
                    if limit is not None:
                        limits.append(limit)
                break
    return min(limits) if limits else None


def usable_cpus(affinity: int | None = None, quota: float | None = None, *, read_quota: bool = True) -> int:
    """CPUs this process may use: the affinity count, capped by the cgroup quota (rounded down, ≥ 1)."""
    count = affinity_cpus() if affinity is None else max(1, int(affinity))
    if quota is None and read_quota:
        quota = cgroup_cpu_limit()
    if quota is not None:
        count = min(count, max(1, math.floor(quota + 1e-9)))
    return count


# --------------------------------------------------------------------------- the setup
@dataclass
class ThreadSetup:
    """What was decided, and by whom (for the one log line)."""

    threads: int
    affinity: int
    quota: float | None
    wait_policy: str | None
    wait_policy_source: str      # "user" | "anomorph" | "too late" (torch was imported first)
    threads_source: str          # "user" (OMP_NUM_THREADS) | "anomorph"
    torch_loaded_first: bool
    torch_threads: int | None = None
    notes: list[str] = field(default_factory=list)

    def describe(self) -> str:
        quota = "none" if self.quota is None else f"{self.quota:g} CPUs"
        threads = self.torch_threads if self.torch_threads is not None else self.threads
        policy = self.wait_policy or "unset (active spinning)"
        line = (f"anomorph: {threads} torch threads ({self.threads_source}; usable CPUs {self.threads}: "
                f"affinity {self.affinity}, cgroup quota {quota}), OMP_WAIT_POLICY={policy} "
                f"({self.wait_policy_source})")
        if self.notes:
            line += "; " + "; ".join(self.notes)
        return line


_SETUP: ThreadSetup | None = None
_OWN_VARIABLES: set[str] = set()
_LOGGED = False
_APPLIED = False
_ANNOUNCER: Callable[[str], None] | None = None


def set_announcer(announce: Callable[[str], None] | None) -> None:
    """Where :func:`configure_threads` sends its one line when it is called without ``announce``
    (the CLI passes a stderr printer; default: the ``anomorph.runtime`` logger)."""
    global _ANNOUNCER
    _ANNOUNCER = announce


def prepare_environment(environ: MutableMapping[str, str] | None = None,
                        torch_loaded: bool | None = None, cpus: int | None = None) -> ThreadSetup:
    """Set the OpenMP/MKL environment for a torch that is not loaded yet; return the setup.

    Sets ``OMP_WAIT_POLICY=PASSIVE`` unless the variable is set, and ``OMP_NUM_THREADS`` /
    ``MKL_NUM_THREADS`` to :func:`usable_cpus` unless ``OMP_NUM_THREADS`` is set. When torch is
    already loaded, the environment is left alone (it would have no effect) and the setup says so.
    """
    environ = os.environ if environ is None else environ
    if torch_loaded is None:
        torch_loaded = "torch" in sys.modules
    affinity = affinity_cpus()
    quota = cgroup_cpu_limit() if cpus is None else None
    threads = usable_cpus(affinity, quota, read_quota=False) if cpus is None else max(1, int(cpus))
    own = environ is os.environ
    policy = environ.get("OMP_WAIT_POLICY")
    if policy and not (own and "OMP_WAIT_POLICY" in _OWN_VARIABLES):
        policy_source = "user"
    elif torch_loaded:
        policy_source = "too late: torch was imported before anomorph"
    else:
        environ["OMP_WAIT_POLICY"] = policy = "PASSIVE"
        policy_source = "anomorph"
        if own:
            _OWN_VARIABLES.add("OMP_WAIT_POLICY")
    user_threads = environ.get("OMP_NUM_THREADS")
    if user_threads and not (own and "OMP_NUM_THREADS" in _OWN_VARIABLES):
        threads_source = "user OMP_NUM_THREADS"
        try:
            threads = max(1, int(user_threads.split(",")[0]))
        except ValueError:
            pass
    else:
        threads_source = "anomorph"
        if not torch_loaded:
            for name in THREAD_VARIABLES:
                if name not in environ or (own and name in _OWN_VARIABLES):
                    environ[name] = str(threads)
                    if own:
                        _OWN_VARIABLES.add(name)
    return ThreadSetup(threads=threads, affinity=affinity, quota=quota, wait_policy=policy,
                       wait_policy_source=policy_source, threads_source=threads_source,
                       torch_loaded_first=torch_loaded)


def prepare() -> ThreadSetup:
    """Once per process, at ``import anomorph``: :func:`prepare_environment` on ``os.environ``."""
    global _SETUP
    if _SETUP is None:
        _SETUP = prepare_environment()
    return _SETUP


def configure_threads(announce: Callable[[str], None] | None = None, log: bool = True) -> ThreadSetup:
    """Apply the thread count to torch (once) and log the setup (once per process).

    ``log=False`` applies without logging (the CLI applies at start; ``fit``, ``evaluate`` and
    ``predict_files`` log when their work starts, after their inputs were checked, so a user
    error stays a single line).

    Unless the user set ``OMP_NUM_THREADS``, ``torch.set_num_threads(usable CPUs)`` is called
    when torch currently uses more threads (never raises the count). ``announce`` receives the
    one-line description instead of the logger (the CLI passes a stderr printer).
    """
    global _LOGGED, _APPLIED
    setup = prepare()
    import torch  # noqa: PLC0415 - deliberately after prepare(): the environment is set first

    if not _APPLIED:
        _APPLIED = True
        current = torch.get_num_threads()
        if setup.threads_source == "anomorph" and current > setup.threads:
            torch.set_num_threads(setup.threads)
            setup.notes.append(f"lowered from {current}")
    setup.torch_threads = torch.get_num_threads()
    if log and not _LOGGED:
        _LOGGED = True
        line = setup.describe()
        target = announce if announce is not None else _ANNOUNCER
        if target is not None:
            target(line)
        else:
            logger.info(line)
    return setup


def environment_summary(environ: Mapping[str, str] | None = None) -> dict[str, str | None]:
    """The thread-related variables as the process sees them (for benchmark JSON)."""
    environ = os.environ if environ is None else environ
    return {name: environ.get(name) for name in ("OMP_WAIT_POLICY", *THREAD_VARIABLES)}
