"""Copies the pinned async-profiler release's library into a wheel build.

    python vendor/async-profiler/bundle.py asprof/lib

Downloads the official release tarball for this machine's architecture
(see README.md), verifies it against SHA256SUMS when listed, and copies
lib/libasyncProfiler.so and LICENSE into the target directory.
"""
from __future__ import annotations

import hashlib
import io
import os
import platform
import sys
import tarfile
import urllib.request

HERE = os.path.dirname(os.path.abspath(__file__))
URL = "https://github.com/async-profiler/async-profiler/releases/download/v{v}/{name}"
ARCH = {"x86_64": "x64", "amd64": "x64", "aarch64": "arm64", "arm64": "arm64"}


def main(target: str) -> int:
    version = open(os.path.join(HERE, "VERSION")).read().strip()
    arch = ARCH.get(platform.machine().lower())
    if arch is None:
        print(f"bundle.py: no async-profiler release for {platform.machine()}", file=sys.stderr)
        return 1
    name = f"async-profiler-{version}-linux-{arch}.tar.gz"
    with urllib.request.urlopen(URL.format(v=version, name=name), timeout=120) as r:
        data = r.read()
    digest = hashlib.sha256(data).hexdigest()
    sums = {}
    for line in open(os.path.join(HERE, "SHA256SUMS")):
        parts = line.split()
        if len(parts) == 2 and not line.startswith("#"):
            sums[parts[1]] = parts[0]
    if name in sums and sums[name] != digest:
        print(f"bundle.py: checksum mismatch for {name}: {digest} != {sums[name]}", file=sys.stderr)
        return 1
    if name not in sums:
        print(f"bundle.py: WARNING {name} is not in SHA256SUMS; its sha256 is {digest}", file=sys.stderr)
    os.makedirs(target, exist_ok=True)
    with tarfile.open(fileobj=io.BytesIO(data), mode="r:gz") as tar:
        for member in tar.getmembers():
            base = member.name.split("/", 1)[-1]
            if base in ("lib/libasyncProfiler.so", "LICENSE") and member.isfile():
                src = tar.extractfile(member)
                assert src is not None
                out = os.path.join(target, os.path.basename(base))
                with open(out, "wb") as f:
                    f.write(src.read())
    if not os.path.exists(os.path.join(target, "libasyncProfiler.so")):
        print(f"bundle.py: {name} has no lib/libasyncProfiler.so", file=sys.stderr)
        return 1
    print(f"bundled async-profiler {version} ({arch}) into {target}")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1] if len(sys.argv) > 1 else "asprof/lib"))
