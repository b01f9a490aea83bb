"""Run trial and end with one plain line: ``N passed, N failed, N skipped``.

Used by ``./dev test`` and ``.ci/run``.  Exit status 0 only when nothing
failed and at least one test ran.

Trial runs its tests in ``TICRYPT_TEST_JOBS`` worker processes (default:
one more than the CPUs, at most 6, since most slow tests wait on daemons
they start rather than compute); ``TICRYPT_TEST_JOBS=1`` runs them in this
order in one process.  Every test is independent of the others (own
temporary folder, ports picked by the kernel, own namespaces and cgroups).
"""

from __future__ import annotations

import os
import re
import subprocess
import sys

_SUMMARY = re.compile(r"^(PASSED|FAILED) \((.*)\)\s*$")


def summarize(output: str) -> tuple[int, int, int] | None:
    """(passed, failed, skipped) from trial's closing line, or None."""
    for line in reversed(output.splitlines()):
        m = _SUMMARY.match(line.strip())
        if not m:
            continue
        counts = {k: int(v) for k, v in re.findall(r"(\w+)=(\d+)", m.group(2))}
        passed = counts.get("successes", 0)
        failed = (counts.get("failures", 0) + counts.get("errors", 0)
                  + counts.get("unexpectedSuccesses", 0))
        skipped = counts.get("skips", 0) + counts.get("expectedFailures", 0)
        return passed, failed, skipped
    return None


def jobs(environ: dict[str, str] | None = None) -> int:
    """The number of trial workers (see the module docstring)."""
    value = (os.environ if environ is None else environ).get("TICRYPT_TEST_JOBS", "")
    if value.strip():
        n = int(value)
        if n < 1:
            raise ValueError("TICRYPT_TEST_JOBS must be 1 or more")
        return n
    return min(6, (os.cpu_count() or 1) + 1)


def main(argv: list[str] | None = None) -> int:
    args = list(sys.argv[1:] if argv is None else argv) or ["test"]
    n = jobs()
    parallel = [f"--jobs={n}"] if n > 1 and not any(a.startswith(("-j", "--jobs")) for a in args) \
        else []
    cmd = [sys.executable, "-m", "twisted.trial", "--temp-directory=_trial_temp", *parallel,
           *args]
    # trial starts each worker as the script .../twisted/trial/_dist/workertrial.py,
    # whose folder (prepended to sys.path) holds a package named "test" that
    # would hide ours: keep script folders off sys.path (Python 3.11+)
    env = dict(os.environ, PYTHONSAFEPATH="1")
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            env=env)
    assert proc.stdout is not None
    lines = []
    for line in proc.stdout:
        sys.stdout.write(line)
        sys.stdout.flush()
        lines.append(line)
    code = proc.wait()
    result = summarize("".join(lines[-50:]))
    if result is None:
        print("0 passed, 1 failed, 0 skipped (trial printed no summary)")
        return 1
    passed, failed, skipped = result
    print(f"{passed} passed, {failed} failed, {skipped} skipped")
    if failed or code != 0 or passed == 0:
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
