"""The native engine under AddressSanitizer and UndefinedBehaviorSanitizer.

The engine is compiled with ``-fsanitize=address,undefined`` (and ``-Werror`` on the
project's warnings) into a temporary directory; a subprocess with the ASan runtime
preloaded loads that build as ``lbproxy._splice`` and runs the native half of the
tunnel contract suites (tunnel rules and the websocket policy) plus the engine's own
tests. Any memory error or undefined behaviour aborts the run
(``-fno-sanitize-recover``), failing this test.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from build_ext import compile_command
from tests.support import REPO

pytestmark = pytest.mark.timeout(180)

FLAGS = (
    "-O1",
    "-g",
    "-fno-omit-frame-pointer",
    "-fsanitize=address,undefined",
    "-fno-sanitize-recover=undefined",
    "-Werror",
)

# Loads the sanitized build as lbproxy._splice, checks the ASan runtime is really there,
# then runs pytest with the remaining arguments.
RUNNER = """
import ctypes, importlib.machinery, importlib.util, sys
path = sys.argv[1]
loader = importlib.machinery.ExtensionFileLoader("lbproxy._splice", path)
spec = importlib.util.spec_from_file_location("lbproxy._splice", path, loader=loader)
module = importlib.util.module_from_spec(spec)
loader.exec_module(module)
import lbproxy
sys.modules["lbproxy._splice"] = module
lbproxy._splice = module
from lbproxy.proxy.splice import engine_class
assert engine_class() is module.Engine, "not the sanitized build"
assert hasattr(ctypes.CDLL(None), "__asan_init"), "the ASan runtime is not loaded"
import pytest
sys.exit(pytest.main(sys.argv[2:]))
"""


def runtime(cc: str, name: str) -> str | None:
    out = subprocess.run([cc, f"-print-file-name={name}"], capture_output=True, text=True)
    path = out.stdout.strip()
    return path if out.returncode == 0 and os.path.isabs(path) and os.path.exists(path) else None


def test_the_engine_is_clean_under_asan_and_ubsan(tmp_path: Path) -> None:
    cc = os.environ.get("CC") or shutil.which("cc") or shutil.which("gcc")
    if cc is None:
        pytest.skip("no C compiler")
    libasan = runtime(cc, "libasan.so")
    if libasan is None or runtime(cc, "libubsan.so") is None:
        pytest.skip("the sanitizer runtimes (libasan, libubsan) are not installed")
    out = tmp_path / "_splice_asan.so"
    built = subprocess.run(compile_command(cc, out, FLAGS), capture_output=True, text=True)
    assert built.returncode == 0 and not built.stderr, built.stderr  # (warning-free too)
    env = dict(os.environ)
    env.update(
        LD_PRELOAD=libasan,
        ASAN_OPTIONS="detect_leaks=0:halt_on_error=1",
        UBSAN_OPTIONS="print_stacktrace=1:halt_on_error=1",
        LBPROXY_SPLICE="1",
    )
    env.pop("PYTEST_XDIST_WORKER", None)
    args = [
        # (-s: a sanitizer report goes to the real stderr, not to pytest's capture)
        *("-q", "-s", "-p", "no:cacheprovider", "-p", "no:xdist"),
        *("-k", "native or test_splice", "-W", "ignore::pytest.PytestUnknownMarkWarning"),
        "tests/contract/test_tunnel_contract.py",
        "tests/contract/test_ws_policy_contract.py",  # (limits, pings, dead peers, messages)
        "tests/e2e/test_splice.py",
        "tests/e2e/test_splice_handover.py",
    ]
    run = subprocess.run(
        [sys.executable, "-c", RUNNER, str(out), *args],
        cwd=REPO,
        env=env,
        capture_output=True,
        text=True,
        timeout=150,
    )
    report = run.stdout[-3000:] + run.stderr[-3000:]
    assert "Sanitizer" not in run.stderr and "runtime error" not in run.stderr, report
    assert run.returncode == 0, report
    assert " passed" in run.stdout and " failed" not in run.stdout, report
