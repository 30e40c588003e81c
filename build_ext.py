"""Compile the native tunnel engine (lbproxy/_splice.c) in place.

Used by the hatch build hook (``pip install``) and by ``make``. Without a C
compiler the build is skipped with a warning and lbproxy runs its Python tunnel.
"""

from __future__ import annotations

import os
import shlex
import shutil
import subprocess
import sys
import sysconfig
from pathlib import Path

ROOT = Path(__file__).resolve().parent
SOURCE = ROOT / "lbproxy" / "_splice.c"


def target() -> Path:
    return ROOT / "lbproxy" / f"_splice{sysconfig.get_config_var('EXT_SUFFIX')}"


def build(force: bool = False, strict: bool = True) -> Path | None:
    """Build the extension if it is missing or older than its source; None if no compiler.

    With ``strict=False`` (the pip build hook) a failing compile is a warning too: lbproxy
    then runs its Python tunnel. ``make`` builds strictly.
    """
    out = target()
    if not force and out.exists() and out.stat().st_mtime >= SOURCE.stat().st_mtime:
        return out
    cc = os.environ.get("CC") or shutil.which("cc") or shutil.which("gcc")
    if cc is None:
        print("lbproxy: no C compiler: the native tunnel engine is not built", file=sys.stderr)
        return None
    try:
        subprocess.run(compile_command(cc, out), check=True)
    except (OSError, subprocess.CalledProcessError) as exc:
        if strict:
            raise
        print(f"lbproxy: the native tunnel engine did not compile: {exc}", file=sys.stderr)
        return None
    return out


def compile_command(cc: str, out: Path, flags: tuple[str, ...] = ("-O2",)) -> list[str]:
    """The compiler command line (warnings on; the tests add sanitizer ``flags``)."""
    include = sysconfig.get_paths()["include"]
    return [
        *shlex.split(cc),
        *flags,
        "-Wall",
        "-Wextra",
        "-Wno-unused-parameter",
        "-Wno-missing-field-initializers",
        "-shared",
        "-fPIC",
        f"-I{include}",
        "-o",
        str(out),
        str(SOURCE),
    ]


if __name__ == "__main__":
    built = build(force="--force" in sys.argv)
    print(built if built is not None else "not built")
