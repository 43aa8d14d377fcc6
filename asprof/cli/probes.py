"""What ``asprof doctor`` reads of this machine: perf_event settings and a ``perf_event_open``
probe like async-profiler's own, capabilities, open-file and container limits, writable
directories, where AWS credentials would come from. Read-only probes, no verdicts: the checks
and their advice are in :mod:`asprof.cli.doctor`.
"""
from __future__ import annotations

import ctypes
import importlib
import os
import platform
import threading
from typing import Any, Dict, List, Mapping, Optional, Tuple

__all__ = ["perf_event_probe", "container_limits", "read_file", "effective_capabilities", "nofile_limit",
           "writable_dir", "credentials_source", "CAP_SYS_ADMIN", "CAP_PERFMON"]

# perf_event_open's syscall number per machine (no libc wrapper exists).
_PERF_EVENT_OPEN = {"x86_64": 298, "amd64": 298, "aarch64": 241, "arm64": 241, "riscv64": 241,
                    "ppc64le": 319, "ppc64": 319, "s390x": 331, "i386": 336, "i686": 336, "armv7l": 364}
CAP_SYS_ADMIN, CAP_PERFMON = 21, 38


def read_file(path: str) -> Optional[str]:
    try:
        with open(path) as f:
            return f.read().strip()
    except OSError:
        return None


def effective_capabilities() -> int:
    status = read_file("/proc/self/status") or ""
    for line in status.splitlines():
        if line.startswith("CapEff:"):
            try:
                return int(line.split()[1], 16)
            except (IndexError, ValueError):
                return 0
    return 0


def perf_event_probe() -> Tuple[bool, str]:
    """Opens a perf event the way async-profiler's ``PerfEvents::supported()`` does
    (software cpu-clock, kernel not excluded, this thread); (works, why not)."""
    nr = _PERF_EVENT_OPEN.get(platform.machine().lower())
    if nr is None:
        return False, f"unknown perf_event_open syscall number on {platform.machine()}"
    try:
        libc = ctypes.CDLL(None, use_errno=True)
    except OSError as e:
        return False, f"no libc: {e}"
    attr = (ctypes.c_uint8 * 128)()
    ctypes.memmove(attr, (ctypes.c_uint32 * 2)(1, 128), 8)  # type=PERF_TYPE_SOFTWARE, size
    # config=PERF_COUNT_SW_CPU_CLOCK (0) at 8; sample_period at 16; sample_type=PERF_SAMPLE_CALLCHAIN at 24;
    # flags at 40: disabled (bit 0).
    ctypes.memmove(ctypes.byref(attr, 16), (ctypes.c_uint64 * 2)(1_000_000_000, 1 << 5), 16)
    ctypes.memmove(ctypes.byref(attr, 40), (ctypes.c_uint64 * 1)(1), 8)
    syscall = libc.syscall
    syscall.restype = ctypes.c_long
    fd = syscall(ctypes.c_long(nr), ctypes.byref(attr), ctypes.c_int(0), ctypes.c_int(-1), ctypes.c_int(-1),
                 ctypes.c_ulong(0))
    if fd < 0:
        err = ctypes.get_errno()
        return False, f"perf_event_open failed: {os.strerror(err)} (errno {err})"
    os.close(int(fd))
    return True, "perf_event_open works"

def nofile_limit() -> str:
    try:
        import resource

        soft, _ = resource.getrlimit(resource.RLIMIT_NOFILE)
        return "unlimited" if soft == resource.RLIM_INFINITY else str(soft)
    except (ImportError, OSError, ValueError):
        return "unknown"


def _cgroup_dirs() -> List[Tuple[str, str]]:
    """(controller list, directory) for this process's cgroups, v2 first."""
    out: List[Tuple[str, str]] = []
    text = read_file("/proc/self/cgroup") or ""
    for line in text.splitlines():
        parts = line.split(":", 2)
        if len(parts) != 3:
            continue
        _, controllers, path = parts
        if controllers == "":
            base = "/sys/fs/cgroup"
            out.insert(0, ("v2", base + path if os.path.isdir(base + path) else base))
        else:
            for c in controllers.split(","):
                for mount in (f"/sys/fs/cgroup/{controllers}", f"/sys/fs/cgroup/{c}"):
                    if os.path.isdir(mount):
                        out.append((c, mount + path if os.path.isdir(mount + path) else mount))
                        break
    return out


def container_limits() -> Dict[str, str]:
    """CPU and memory limits of this process's cgroup, as text."""
    limits: Dict[str, str] = {}
    for controller, directory in _cgroup_dirs():
        if controller == "v2":
            cpu = read_file(os.path.join(directory, "cpu.max"))
            if cpu and "cpu" not in limits:
                quota, _, period = cpu.partition(" ")
                limits["cpu"] = "no limit" if quota == "max" else \
                    f"{int(quota) / int(period or 100000):g} CPUs (cpu.max {cpu})"
            mem = read_file(os.path.join(directory, "memory.max"))
            if mem and "memory" not in limits:
                limits["memory"] = "no limit" if mem == "max" else f"{int(mem) / 2**20:.0f} MiB"
        elif controller == "cpu" and "cpu" not in limits:
            v1_quota = read_file(os.path.join(directory, "cpu.cfs_quota_us"))
            v1_period = read_file(os.path.join(directory, "cpu.cfs_period_us"))
            if v1_quota is not None:
                limits["cpu"] = ("no limit" if int(v1_quota) < 0 else
                                 f"{int(v1_quota) / int(v1_period or 100000):g} CPUs")
        elif controller == "memory" and "memory" not in limits:
            mem = read_file(os.path.join(directory, "memory.limit_in_bytes"))
            if mem is not None:
                limits["memory"] = "no limit" if int(mem) >= 1 << 60 else f"{int(mem) / 2**20:.0f} MiB"
    return limits

def writable_dir(path: str) -> Tuple[bool, str]:
    """Whether profiles could be written in ``path`` (created if missing)."""
    probe = os.path.abspath(path)
    missing = []
    while not os.path.exists(probe):
        missing.append(probe)
        parent = os.path.dirname(probe)
        if parent == probe:
            break
        probe = parent
    if not os.path.isdir(probe):
        return False, f"{probe} is not a directory"
    if not os.access(probe, os.W_OK | os.X_OK):
        return False, f"{probe} is not writable by this user (uid {os.geteuid()})"
    if missing:
        return True, f"{os.path.abspath(path)} would be created (in {probe}, writable)"
    return True, f"{probe} exists and is writable"

def credentials_source(env: Mapping[str, str], offline: bool, timeout: float) -> Tuple[Optional[str], str]:
    """(where credentials come from, or None; a note). Never returns a secret."""
    if offline:
        if env.get("AWS_ACCESS_KEY_ID") and env.get("AWS_SECRET_ACCESS_KEY"):
            return "environment variables", "offline: only the environment and files were looked at"
        if env.get("AWS_WEB_IDENTITY_TOKEN_FILE"):
            return "web identity token file", "offline: not exchanged for credentials"
        if env.get("AWS_CONTAINER_CREDENTIALS_RELATIVE_URI") or env.get("AWS_CONTAINER_CREDENTIALS_FULL_URI"):
            return "container credentials endpoint", "offline: not contacted"
        files = [env.get("AWS_SHARED_CREDENTIALS_FILE") or os.path.expanduser("~/.aws/credentials"),
                 env.get("AWS_CONFIG_FILE") or os.path.expanduser("~/.aws/config")]
        for f in files:
            if os.path.isfile(f) and os.path.getsize(f) > 0:
                return f"file {f}", "offline: its content was not checked"
        return None, "offline: instance roles were not looked for"
    result: Dict[str, Any] = {}

    def probe() -> None:
        try:
            botocore_session: Any = importlib.import_module("botocore.session")
            session = botocore_session.get_session()
            creds = session.get_credentials()
            result["method"] = None if creds is None else str(getattr(creds, "method", "found"))
        except Exception as e:  # noqa: BLE001
            result["error"] = f"{type(e).__name__}: {e}"

    t = threading.Thread(target=probe, name="asprof-doctor-credentials", daemon=True)
    t.start()
    t.join(max(timeout * 4, 2.0))
    if t.is_alive():
        return None, "the credential providers did not answer in time"
    if "error" in result:
        return None, str(result["error"]).replace("\n", " ")[:300]
    method = result.get("method")
    return (str(method), "") if method else (None, "no credential provider found any")
