#!/usr/bin/env python3
"""Run ONNX Runtime's own Python session tests against onnxruntime and against ezrt.

The suite directory (not part of this repository) holds ONNX Runtime's test files
(``onnxruntime_test_python.py`` and optionally others), their ``helper.py`` and a
``testdata/`` folder with the models they name. Each run copies that directory into a
fresh temporary directory, applies exactly one change to the line
``import onnxruntime as onnxrt`` of every test file, and runs pytest on it in a
subprocess:

``ort``     the files unchanged (the baseline);
``module``  ``import onnxruntime as onnxrt`` becomes ``import ezrt as onnxrt``;
``patch``   that line gets ``; import ezrt; onnxrt.InferenceSession = ezrt.InferenceSession``
            appended (the global switch: the ``onnxruntime`` module itself is changed);
``name``    only the test file's own name ``onnxrt.InferenceSession`` is ezrt's class and
            the ``onnxruntime`` module is left untouched, as when a program writes
            ``from ezrt import InferenceSession`` instead of importing ONNX Runtime's.

Results come from pytest's JUnit XML. The table lists every test with its outcome under
each run and, for a test that fails under an ezrt run, the first line of the error.
The exit status is 1 when a test that passes with onnxruntime fails under any ezrt run,
2 when the runner itself could not measure (no baseline, bad suite directory), else 0.
Every variant keeps the file's line numbers, so failing calls compare across runs. An
extra run with onnxruntime counts the sessions each test builds ("session tests" are those
that build at least one). Nothing is downloaded: the runner works offline.

Example::

    python tools/ort_suite.py /path/to/suite --ezrt-src src --markdown report.md
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import xml.etree.ElementTree as ET
from dataclasses import dataclass, field
from pathlib import Path
from typing import Dict, List, Optional, Sequence, Tuple

IMPORT_LINE = re.compile(r"^import onnxruntime as (?P<alias>\w+)[ \t]*$", re.MULTILINE)

VARIANTS: Dict[str, str] = {
    "module": "import ezrt as onnxrt",
    "patch": "onnxrt.InferenceSession = ezrt.InferenceSession (global)",
    "name": "only the suite's name onnxrt.InferenceSession is ezrt's",
}

DEFAULT_TEST_FILE = "onnxruntime_test_python.py"
FAILING = ("failed", "error", "timeout")
OUTCOME_RANK = {"passed": 0, "skipped": 1, "failed": 2, "error": 3, "timeout": 4, "missing": 5}


@dataclass
class CaseResult:
    """One test's outcome in one run."""

    outcome: str
    message: str = ""
    call: str = ""
    details: str = ""


@dataclass
class Run:
    """All results of one variant."""

    variant: str
    results: Dict[str, CaseResult] = field(default_factory=dict)
    note: str = ""
    seconds: float = 0.0


def change_line(source: str, variant: str, file_name: str) -> str:
    """Return ``source`` with the one-line change of ``variant`` applied."""
    if variant == "ort":
        return source
    matches = list(IMPORT_LINE.finditer(source))
    if len(matches) != 1:
        raise SystemExit(
            f"{file_name}: expected exactly one line 'import onnxruntime as <alias>', "
            f"found {len(matches)}"
        )
    match = matches[0]
    alias = match.group("alias")
    if variant == "module":
        new = f"import ezrt as {alias}"
    elif variant == "patch":
        new = (
            f"{match.group(0).rstrip()}; import ezrt; "
            f"{alias}.InferenceSession = ezrt.InferenceSession  # noqa: E401, E702"
        )
    elif variant == "name":
        new = (
            "import types, onnxruntime as _ort, ezrt as _ezrt; "
            f'{alias} = types.SimpleNamespace(**{{**vars(_ort), "InferenceSession": '
            "_ezrt.InferenceSession})  # noqa: E401, E702"
        )
    else:
        raise SystemExit(f"unknown variant {variant!r}; expected one of ort, {', '.join(VARIANTS)}")
    return source[: match.start()] + new + source[match.end() :]


def prepare(suite: Path, work: Path, test_files: Sequence[str], variant: str) -> None:
    """Copy the suite into ``work`` with the variant's change applied to the test files."""
    for entry in suite.iterdir():
        target = work / entry.name
        if entry.name in test_files or entry.name.startswith("."):
            continue
        if entry.is_dir():
            if entry.name == "__pycache__":
                continue
            shutil.copytree(entry, target)
        else:
            shutil.copy2(entry, target)
    for name in test_files:
        source = (suite / name).read_text(encoding="utf-8")
        (work / name).write_text(change_line(source, variant, name), encoding="utf-8")


def has_pytest_timeout(python: str) -> bool:
    """Whether the pytest-timeout plugin is importable by ``python``."""
    if python == sys.executable:
        return importlib.util.find_spec("pytest_timeout") is not None
    probe = subprocess.run(
        [python, "-c", "import pytest_timeout"], capture_output=True, check=False, timeout=60
    )
    return probe.returncode == 0


def run_pytest(
    python: str,
    work: Path,
    targets: Sequence[str],
    junit: Path,
    env: Dict[str, str],
    per_test: int,
    total: int,
    use_plugin: bool,
    extra: Sequence[str],
) -> Tuple[bool, str]:
    """Run pytest once; return (finished in time, tail of its output)."""
    cmd = [python, "-m", "pytest", "-p", "no:cacheprovider", "-q", "--tb=short", "-rN"]
    cmd += ["--junitxml", str(junit), "-o", "junit_family=xunit1"]
    if use_plugin:
        cmd += [f"--timeout={per_test}", "--timeout-method=signal"]
    cmd += list(extra) + list(targets)
    with subprocess.Popen(
        cmd,
        cwd=work,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        start_new_session=True,
    ) as proc:
        try:
            out, _ = proc.communicate(timeout=total)
            return True, out.decode("utf-8", "replace")[-4000:]
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            out, _ = proc.communicate()
            return False, out.decode("utf-8", "replace")[-4000:]


def collect(python: str, work: Path, targets: Sequence[str], env: Dict[str, str]) -> List[str]:
    """Test ids pytest collects (used when a run must be split test by test)."""
    cmd = [python, "-m", "pytest", "-p", "no:cacheprovider", "--collect-only", "-q", *targets]
    proc = subprocess.run(cmd, cwd=work, env=env, capture_output=True, check=False, timeout=300)
    lines = proc.stdout.decode("utf-8", "replace").splitlines()
    return [line.strip() for line in lines if "::" in line and " " not in line.strip()]


PROBE_PLUGIN = """
import json, os
import pytest
import onnxruntime.capi.onnxruntime_inference_collection as _collection

_counts = {}
_current = [None]
_original = _collection.InferenceSession.__init__


def _counting_init(self, *args, **kwargs):
    if _current[0] is not None:
        _counts[_current[0]] = _counts.get(_current[0], 0) + 1
    return _original(self, *args, **kwargs)


_collection.InferenceSession.__init__ = _counting_init


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_call(item):
    _current[0] = item.nodeid
    yield
    _current[0] = None


def pytest_sessionfinish(session):
    with open(os.environ["ORT_SUITE_PROBE_OUT"], "w") as handle:
        json.dump(_counts, handle)
"""


def probe_sessions(
    args: argparse.Namespace, test_files: Sequence[str], use_plugin: bool
) -> Dict[str, int]:
    """How many onnxruntime sessions each test builds (an extra run with onnxruntime)."""
    env = dict(os.environ)
    env["PYTHONDONTWRITEBYTECODE"] = "1"
    env.pop("PYTEST_ADDOPTS", None)
    with tempfile.TemporaryDirectory(prefix="ort_suite_probe_") as tmp:
        work = Path(tmp)
        prepare(Path(args.suite), work, test_files, "ort")
        (work / "_ort_suite_probe.py").write_text(PROBE_PLUGIN, encoding="utf-8")
        out = work / "probe.json"
        env["ORT_SUITE_PROBE_OUT"] = str(out)
        extra = ["-p", "_ort_suite_probe", *(["-k", args.k] if args.k else [])]
        run_pytest(
            args.python,
            work,
            test_files,
            work / "junit.xml",
            env,
            args.timeout,
            args.total_timeout,
            use_plugin,
            extra,
        )
        if not out.exists():
            return {}
        counts: Dict[str, int] = json.loads(out.read_text(encoding="utf-8"))
        return counts


FRAME = re.compile(r"^(?P<file>[^\s:]+\.py):(?P<line>\d+): in (?P<func>\S+)\s*$")


def failing_call(text: str, test_files: Sequence[str]) -> str:
    """The last source line executed in a test file, from a ``--tb=short`` traceback."""
    lines = text.splitlines()
    found = ""
    for index, line in enumerate(lines):
        match = FRAME.match(line.strip())
        if not match or Path(match.group("file")).name not in test_files:
            continue
        code = lines[index + 1].strip() if index + 1 < len(lines) else ""
        found = f"line {match.group('line')}: {code}"
    return found


def first_line(message: str, text: str) -> str:
    """A one-line summary of a failure: its message's first line, else the last 'E' line."""
    for candidate in (message or "").splitlines():
        if candidate.strip():
            return candidate.strip()[:300]
    e_lines = [line[1:].strip() for line in text.splitlines() if line.startswith("E ")]
    return (e_lines[0] if e_lines else "").strip()[:300]


def test_id(classname: str, name: str) -> str:
    """``file::Class::test`` from a JUnit testcase's ``classname`` and ``name``."""
    parts = classname.split(".") if classname else []
    if len(parts) >= 2:
        return f"{'/'.join(parts[:-1])}.py::{parts[-1]}::{name}"
    if len(parts) == 1:
        return f"{parts[0]}.py::{name}"
    return name


def parse_junit(junit: Path, test_files: Sequence[str]) -> Tuple[Dict[str, CaseResult], str]:
    """Results per test id, and the message of a collection error if there was one."""
    results: Dict[str, CaseResult] = {}
    collection_error = ""
    if not junit.exists():
        return results, "pytest wrote no JUnit report"
    root = ET.parse(junit).getroot()
    for case in root.iter("testcase"):
        classname = case.get("classname", "")
        name = case.get("name", "")
        outcome, message, text = "passed", "", ""
        for tag in ("error", "failure", "skipped"):
            node = case.find(tag)
            if node is not None:
                outcome = {"error": "error", "failure": "failed", "skipped": "skipped"}[tag]
                message = node.get("message", "")
                text = node.text or ""
                break
        if outcome == "failed" and "Timeout" in message:
            outcome = "timeout"
        if not classname and outcome == "error":
            e_lines = [ln[1:].strip() for ln in text.splitlines() if ln.startswith("E ")]
            reason = e_lines[-1] if e_lines else first_line(message, text)
            collection_error = f"collecting {name}: {reason[:300]}"
            continue
        result = CaseResult(
            outcome=outcome,
            message=first_line(message, text) if outcome != "passed" else "",
            call=failing_call(text, test_files) if outcome in FAILING else "",
            details=text,
        )
        key = test_id(classname, name)
        previous = results.get(key)
        # Subtests and teardown errors give several entries for one test: keep the worst.
        if previous is None or OUTCOME_RANK[outcome] > OUTCOME_RANK[previous.outcome]:
            results[key] = result
    return results, collection_error


def run_variant(
    args: argparse.Namespace, variant: str, test_files: Sequence[str], use_plugin: bool
) -> Run:
    """Prepare a copy of the suite for ``variant``, run pytest on it and parse the results."""
    run = Run(variant)
    env = dict(os.environ)
    env["PYTHONDONTWRITEBYTECODE"] = "1"
    env.pop("PYTEST_ADDOPTS", None)
    if variant != "ort":
        paths = [str(Path(args.ezrt_src).resolve())] if args.ezrt_src else []
        if env.get("PYTHONPATH"):
            paths.append(env["PYTHONPATH"])
        env["PYTHONPATH"] = os.pathsep.join(paths)
    started = time.monotonic()
    with tempfile.TemporaryDirectory(prefix=f"ort_suite_{variant}_") as tmp:
        work = Path(tmp)
        prepare(Path(args.suite), work, test_files, variant)
        extra = ["-k", args.k] if args.k else []
        junit = work / "junit.xml"
        finished, tail = run_pytest(
            args.python,
            work,
            test_files,
            junit,
            env,
            args.timeout,
            args.total_timeout,
            use_plugin,
            extra,
        )
        if finished:
            run.results, run.note = parse_junit(junit, test_files)
            if not run.results and not run.note:
                run.note = "no results; pytest said: " + tail.strip().splitlines()[-1:][0]
        else:
            # The whole run outlived its limit: run each test alone under its own limit.
            run.note = f"whole run exceeded {args.total_timeout}s; reran test by test"
            for index, node in enumerate(collect(args.python, work, test_files, env)):
                one = work / f"junit_{index}.xml"
                done, _ = run_pytest(
                    args.python, work, [node], one, env, args.timeout, args.timeout, False, []
                )
                if done:
                    run.results.update(parse_junit(one, test_files)[0])
                else:
                    run.results[node] = CaseResult("timeout", f"exceeded {args.timeout}s")
    run.seconds = time.monotonic() - started
    return run


def table(runs: Sequence[Run], baseline: Run, sessions: Dict[str, int]) -> List[List[str]]:
    """Rows: test, sessions built, outcome per run, first error line of each failing ezrt run."""
    ids = sorted({key for run in runs for key in run.results})
    rows = []
    for key in ids:
        row = [key, str(sessions.get(key, 0))]
        errors = []
        for run in runs:
            result = run.results.get(key)
            if result is None:
                collecting = run.note.startswith("collecting")
                row.append("error*" if collecting else "missing")
                if run is not baseline:
                    reason = "collection error*" if collecting else run.note
                    errors.append(f"[{run.variant}] {reason}")
                continue
            row.append(result.outcome)
            if run is not baseline and result.outcome not in ("passed", "skipped"):
                errors.append(f"[{run.variant}] {result.message}")
        row.append(" / ".join(errors))
        rows.append(row)
    return rows


def passed(run: Run, key: str) -> bool:
    """Whether ``key`` passed in ``run``."""
    result = run.results.get(key)
    return result is not None and result.outcome == "passed"


def summary(runs: Sequence[Run], baseline: Run, sessions: Dict[str, int]) -> Tuple[List[str], int]:
    """Summary lines, and how many (test, variant) pairs regressed."""
    good = sorted(key for key in baseline.results if passed(baseline, key))
    session_good = [key for key in good if sessions.get(key, 0) > 0]
    lines = [
        f"tests: {len(baseline.results)}; pass with onnxruntime: {len(good)} "
        f"(others: {count_outcomes(baseline, exclude='passed')}); of those, session tests "
        f"(build at least one onnxruntime session): {len(session_good)}"
    ]
    regressions = 0
    for run in runs:
        if run is baseline:
            continue
        kept = sum(1 for key in good if passed(run, key))
        kept_sessions = sum(1 for key in session_good if passed(run, key))
        regressions += len(good) - kept
        label = VARIANTS.get(run.variant, run.variant)
        note = f"; {run.note}" if run.note else ""
        lines.append(
            f"ezrt[{run.variant}] ({label}): {kept}/{len(good)} pass; session tests "
            f"{kept_sessions}/{len(session_good)}{note}"
        )
    return lines, regressions


def count_outcomes(run: Run, exclude: str = "") -> str:
    """``outcome=count`` pairs of a run, for the summary."""
    counts: Dict[str, int] = {}
    for result in run.results.values():
        if result.outcome != exclude:
            counts[result.outcome] = counts.get(result.outcome, 0) + 1
    return ", ".join(f"{k}={v}" for k, v in sorted(counts.items())) or "none"


def print_table(rows: List[List[str]], header: List[str], width: int) -> None:
    """Aligned plain-text table on stdout; long error lines are cut to ``width``."""
    widths = [max(len(r[i]) for r in [header, *rows]) for i in range(len(header) - 1)]
    for row in [header, *rows]:
        cells = [cell.ljust(widths[i]) for i, cell in enumerate(row[:-1])]
        print("  ".join([*cells, row[-1][:width]]).rstrip())


def markdown(
    path: Path,
    args: argparse.Namespace,
    runs: Sequence[Run],
    baseline: Run,
    rows: List[List[str]],
    header: List[str],
    lines: List[str],
) -> None:
    """Write the full table and every regression's details to ``path``."""
    out = ["# ONNX Runtime's Python session tests: onnxruntime vs ezrt", ""]
    out += [f"- suite: `{args.suite}` ({', '.join(args.test_file)})"]
    out += [f"- ezrt source: `{args.ezrt_src or '(installed ezrt)'}`; python: `{args.python}`"]
    out += [f"- {line}" for line in lines]
    out += [
        "- `sessions`: onnxruntime sessions the test builds with onnxruntime (0: the test"
        " never reaches a session on this machine, e.g. CUDA-only paths)",
        "- `error*`: the test file could not be imported in that run (see the run note below)",
    ]
    out += ["", "| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for row in rows:
        out.append("| " + " | ".join(cell.replace("|", "\\|") for cell in row) + " |")
    out += ["", "## Tests that pass with onnxruntime and fail with ezrt", ""]
    for run in runs:
        if run is baseline:
            continue
        out += [f"### ezrt[{run.variant}]: {VARIANTS.get(run.variant, run.variant)}", ""]
        if run.note:
            out += [f"Run note: {run.note}", ""]
        for key in sorted(baseline.results):
            if not passed(baseline, key) or passed(run, key):
                continue
            result = run.results.get(key, CaseResult("missing", run.note))
            out += [f"- `{key}`: **{result.outcome}**", f"  - error: `{result.message}`"]
            if result.call:
                out += [f"  - failing call: `{result.call}`"]
        out.append("")
    path.write_text("\n".join(out) + "\n", encoding="utf-8")


def main(argv: Optional[Sequence[str]] = None) -> int:
    """Command-line entry point."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("suite", help="directory with the test files, helper.py and testdata/")
    parser.add_argument(
        "--ezrt-src", help="directory holding the ezrt package (prepended to PYTHONPATH)"
    )
    parser.add_argument(
        "--python", default=sys.executable, help="interpreter with onnxruntime and pytest"
    )
    parser.add_argument(
        "--test-file",
        action="append",
        help=f"test file inside the suite (repeatable; default {DEFAULT_TEST_FILE})",
    )
    parser.add_argument(
        "--variant",
        action="append",
        choices=sorted(VARIANTS),
        help="ezrt variant to run (repeatable; default: all)",
    )
    parser.add_argument("-k", help="pytest -k expression, to run a subset")
    parser.add_argument("--timeout", type=int, default=60, help="seconds per test (default 60)")
    parser.add_argument(
        "--total-timeout", type=int, default=1200, help="seconds per pytest run (default 1200)"
    )
    parser.add_argument(
        "--no-probe",
        action="store_true",
        help="skip the extra onnxruntime run that counts the sessions each test builds",
    )
    parser.add_argument("--markdown", help="also write the full table and details to this file")
    parser.add_argument("--width", type=int, default=140, help="cut error lines to this width")
    args = parser.parse_args(argv)
    args.test_file = args.test_file or [DEFAULT_TEST_FILE]
    variants = args.variant or list(VARIANTS)
    if os.sep in args.python:  # the runs work in a temporary directory: no relative paths
        args.python = os.path.abspath(args.python)

    suite = Path(args.suite)
    missing = [name for name in [*args.test_file, "helper.py"] if not (suite / name).is_file()]
    if missing:
        print(f"suite directory {suite} lacks: {', '.join(missing)}", file=sys.stderr)
        return 2
    use_plugin = has_pytest_timeout(args.python)
    if not use_plugin:
        print(
            f"pytest-timeout not found: each run is limited to {args.total_timeout}s as a whole",
            file=sys.stderr,
        )

    runs = [run_variant(args, "ort", args.test_file, use_plugin)]
    baseline = runs[0]
    if not baseline.results:
        print(f"baseline run with onnxruntime gave no results: {baseline.note}", file=sys.stderr)
        return 2
    for variant in variants:
        runs.append(run_variant(args, variant, args.test_file, use_plugin))

    sessions = {} if args.no_probe else probe_sessions(args, args.test_file, use_plugin)
    header = [
        "test",
        "sessions",
        "onnxruntime",
        *[f"ezrt[{run.variant}]" for run in runs[1:]],
        "ezrt errors (first line)",
    ]
    rows = table(runs, baseline, sessions)
    print_table(rows, header, args.width)
    lines, regressions = summary(runs, baseline, sessions)
    print()
    for line in lines:
        print(line)
    if args.markdown:
        markdown(Path(args.markdown), args, runs, baseline, rows, header, lines)
    return 1 if regressions else 0


if __name__ == "__main__":
    sys.exit(main())
