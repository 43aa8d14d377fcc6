"""Copies the pinned async-profiler release's library into a wheel build.

    python vendor/async-profiler/bundle.py asprof/lib
    python vendor/async-profiler/bundle.py --tarball async-profiler-4.5-linux-x64.tar.gz asprof/lib

Downloads the official release tarball for this machine's architecture (or takes the
one given with ``--tarball``, no network), refuses it unless its sha256 matches a pinned
digest, and copies lib/libasyncProfiler.so and LICENSE into the target directory.

The pinned digest is the tarball's line in SHA256SUMS; when SHA256SUMS has none, the
build's environment may give it as ASPROF_BUNDLE_SHA256 (64 hex digits). Without either
nothing is bundled (exit status 1) and the message says how to pin it. A digest in the
environment that contradicts SHA256SUMS is an error too.
"""
from __future__ import annotations

import argparse
import hashlib
import io
import os
import platform
import re
import sys
import tarfile
import urllib.request
from typing import Dict, List, Mapping, Optional

HERE = os.path.dirname(os.path.abspath(__file__))
URL = "https://github.com/async-profiler/async-profiler/releases/download/v{v}/{name}"
ARCH = {"x86_64": "x64", "amd64": "x64", "aarch64": "arm64", "arm64": "arm64"}
ENV_DIGEST = "ASPROF_BUNDLE_SHA256"
_HEX64 = re.compile(r"[0-9a-f]{64}")
_MAX_TARBALL = 256 << 20


class BundleError(Exception):
    """The tarball cannot be bundled; the message says why and what to do."""


def tarball_name(version: str, machine: Optional[str] = None) -> str:
    arch = ARCH.get((machine or platform.machine()).lower())
    if arch is None:
        raise BundleError(f"no async-profiler release for {machine or platform.machine()}")
    return f"async-profiler-{version}-linux-{arch}.tar.gz"


def read_sums(path: str) -> Dict[str, str]:
    """{tarball name: sha256} from a ``sha256sum``-style file (comments and blanks ignored)."""
    sums: Dict[str, str] = {}
    with open(path) as f:
        for line in f:
            parts = line.split()
            if len(parts) == 2 and not line.lstrip().startswith("#"):
                sums[parts[1].lstrip("*")] = parts[0].lower()
    return sums


def expected_digest(name: str, sums: Mapping[str, str], environ: Mapping[str, str]) -> str:
    """The digest ``name`` must have: SHA256SUMS's, else ASPROF_BUNDLE_SHA256's; BundleError without one."""
    given = environ.get(ENV_DIGEST, "").strip().lower()
    if given and not _HEX64.fullmatch(given):
        raise BundleError(f"{ENV_DIGEST}={given!r} is not a sha256 digest (64 hex digits)")
    pinned = sums.get(name)
    if pinned is not None:
        if given and given != pinned:
            raise BundleError(f"{ENV_DIGEST}={given} contradicts SHA256SUMS ({pinned}) for {name}; "
                              "unset it or fix SHA256SUMS")
        return pinned
    if given:
        return given
    raise BundleError(
        f"no pinned digest for {name}: nothing bundled. Pin it: get the tarball's sha256 from a source you "
        f"trust (the release page, or `sha256sum {name}` of a copy you verified), then add the line "
        f"'<sha256>  {name}' to vendor/async-profiler/SHA256SUMS (or give the build {ENV_DIGEST}=<sha256>)")


def verify(name: str, data: bytes, expected: str) -> None:
    digest = hashlib.sha256(data).hexdigest()
    if digest != expected:
        raise BundleError(f"checksum mismatch for {name}: got {digest}, pinned {expected}; nothing bundled")


def extract(data: bytes, target: str) -> List[str]:
    """Copy lib/libasyncProfiler.so and LICENSE (regular files only) into ``target``."""
    os.makedirs(target, exist_ok=True)
    written = []
    with tarfile.open(fileobj=io.BytesIO(data), mode="r:gz") as tar:
        for member in tar.getmembers():
            base = member.name.split("/", 1)[-1]
            if base in ("lib/libasyncProfiler.so", "LICENSE") and member.isfile():
                src = tar.extractfile(member)
                if src is None:
                    continue
                out = os.path.join(target, os.path.basename(base))
                with open(out, "wb") as f:
                    f.write(src.read())
                written.append(out)
    if not os.path.exists(os.path.join(target, "libasyncProfiler.so")):
        raise BundleError("the tarball has no lib/libasyncProfiler.so")
    return written


def bundle(target: str, tarball: Optional[str] = None, environ: Optional[Mapping[str, str]] = None,
           sums_path: Optional[str] = None, machine: Optional[str] = None) -> str:
    """Check and copy; returns the tarball's name. BundleError when anything is wrong."""
    env = os.environ if environ is None else environ
    with open(os.path.join(HERE, "VERSION")) as f:
        version = f.read().strip()
    name = tarball_name(version, machine)
    # The pin is checked before any download: an unpinned build fails fast.
    expected = expected_digest(name, read_sums(sums_path or os.path.join(HERE, "SHA256SUMS")), env)
    if tarball is not None:
        with open(tarball, "rb") as f:
            data = f.read(_MAX_TARBALL + 1)
    else:
        with urllib.request.urlopen(URL.format(v=version, name=name), timeout=120) as r:
            data = r.read(_MAX_TARBALL + 1)
    if len(data) > _MAX_TARBALL:
        raise BundleError(f"{name} is larger than {_MAX_TARBALL >> 20} MiB")
    verify(name, data, expected)
    extract(data, target)
    return name


def main(argv: Optional[List[str]] = None) -> int:
    p = argparse.ArgumentParser(description="bundle the pinned async-profiler release into a wheel build")
    p.add_argument("target", nargs="?", default="asprof/lib")
    p.add_argument("--tarball", help="use this local release tarball instead of downloading it")
    args = p.parse_args(argv)
    try:
        name = bundle(args.target, args.tarball)
    except (BundleError, OSError, tarfile.TarError) as e:
        print(f"bundle.py: {e}", file=sys.stderr)
        return 1
    print(f"bundled {name} (sha256 verified) into {args.target}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
