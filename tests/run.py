#!/usr/bin/env python3
"""The one test harness script/test calls.

    python3 tests/run.py [BUILD_DIR] [--unit-only | --integration-only]
                         [--fuzz-build=DIR]... [--fuzz-seconds=N] [SUITE...]

Runs (1) every unit test binary BUILD_DIR/tests/test_* (TAP output, cwd =
tests/) and (2) every integration suite tests/integration/test_*.py against
BUILD_DIR/smimed and (3) with --fuzz-build, every libFuzzer harness
DIR/tests/fuzz/fuzz_* for N seconds (default 10) on its seed corpus, one
case per harness and build (tests/fuzz/fuzzrun.py). SUITE names filter every
kind ("test_cms", "sign", "fuzz_json", ...). Each case is printed as
"ok - suite: name" or "not ok - suite: name: reason"; failure details follow
as "#" lines and are summed up again before the final line, which is exactly
"N passed, M failed". The exit status is 1 when any case failed.

A skipped case (a TAP "# SKIP", a unit binary's exit status 77, an
integration case printed with "# SKIP") counts as failed: script/bootstrap
installs every peer the tests use, so a skip only ever means a set-up that
failed and a case that was never checked.
"""

import os
import re
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
TESTS = REPO / "tests"
UNIT_TIMEOUT = 300
SUITE_TIMEOUT = 900

TAP_LINE = re.compile(r"^(not ok|ok)\b\s*(\d+)?\s*(?:-\s*)?(.*)$")
PLAN = re.compile(r"^1\.\.(\d+)")


SKIPPED = "skipped, which fails the run: script/bootstrap installs every peer"


class Totals:
    def __init__(self):
        self.passed = 0
        self.failed = 0
        self.failures = []  # (case, detail)

    def add(self, kind, case, detail=""):
        if kind == "ok":
            self.passed += 1
        else:
            self.failed += 1
            self.failures.append((case, detail))


def sanitizer_env():
    env = dict(os.environ)
    env.setdefault("ASAN_OPTIONS", "detect_leaks=1:abort_on_error=0")
    env.setdefault("UBSAN_OPTIONS", "halt_on_error=1:print_stacktrace=1")
    supp = TESTS / "lsan.supp"
    if supp.exists():
        env.setdefault("LSAN_OPTIONS", "suppressions=%s" % supp)
    return env


def tail(text, n=25):
    return "\n".join(text.rstrip().splitlines()[-n:])


def run_unit(exe, totals):
    suite = "unit/" + exe.name
    t0 = time.time()
    try:
        p = subprocess.run([str(exe)], cwd=str(TESTS), env=sanitizer_env(),
                           stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                           stderr=subprocess.PIPE, timeout=UNIT_TIMEOUT)
        out = p.stdout.decode(errors="replace")
        err = p.stderr.decode(errors="replace")
        rc = p.returncode
    except subprocess.TimeoutExpired as e:
        out = (e.stdout or b"").decode(errors="replace")
        err = (e.stderr or b"").decode(errors="replace")
        rc = "timeout after %ds" % UNIT_TIMEOUT
    if rc == 77:
        print("not ok - %s: exit status 77, %s" % (suite, SKIPPED), flush=True)
        totals.add("fail", suite, tail(out + "\n" + err))
        return
    seen = failed = 0
    plan = None
    for line in out.splitlines():
        m = PLAN.match(line)
        if m:
            plan = int(m.group(1))
            continue
        if line.startswith("Bail out!"):
            print("not ok - %s: %s" % (suite, line), flush=True)
            totals.add("fail", suite, line)
            failed += 1
            continue
        m = TAP_LINE.match(line)
        if not m:
            continue
        seen += 1
        status, _, desc = m.groups()
        name = "%s: %s" % (suite, desc.strip() or "#%d" % seen)
        directive = re.search(r"#\s*(SKIP|TODO)\b(.*)$", desc, re.I)
        if directive and directive.group(1).upper() == "SKIP":
            failed += 1
            print("not ok - %s: %s" % (name, SKIPPED), flush=True)
            totals.add("fail", name, SKIPPED)
        elif status == "ok" or (directive and directive.group(1).upper() == "TODO"):
            print("ok - %s" % name, flush=True)
            totals.add("ok", name)
        else:
            failed += 1
            print("not ok - %s" % name, flush=True)
            totals.add("fail", name, tail(err, 15))
    problem = None
    if rc != 0 and failed == 0:
        problem = "exit status %s with no failing case" % rc
    elif plan is not None and plan != seen:
        problem = "planned %d cases, ran %d" % (plan, seen)
    elif plan is None and seen == 0:
        problem = "no TAP output"
    if problem:
        print("not ok - %s: %s" % (suite, problem), flush=True)
        detail = tail(out + "\n" + err)
        for line in detail.splitlines():
            print("#   " + line, flush=True)
        totals.add("fail", suite, detail)
    elif failed and err.strip():
        for line in tail(err).splitlines():
            print("#   " + line, flush=True)
    print("# %s: %.1fs" % (suite, time.time() - t0), flush=True)


def run_suite(script, build, it_dir, totals):
    suite = script.stem[len("test_"):]
    env = dict(os.environ)
    env["SMIMED_BUILD"] = str(build)
    env["SMIMED_IT_DIR"] = str(it_dir)
    env["PYTHONDONTWRITEBYTECODE"] = "1"
    env["PYTHONUNBUFFERED"] = "1"
    t0 = time.time()
    proc = subprocess.Popen([sys.executable, "-u", str(script)], cwd=str(REPO), env=env,
                            stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, start_new_session=True)
    cases = failed = 0
    current = None
    details = {}
    timed_out = False
    deadline = time.time() + SUITE_TIMEOUT

    import selectors
    sel = selectors.DefaultSelector()
    sel.register(proc.stdout, selectors.EVENT_READ)
    buf = b""
    while True:
        remaining = deadline - time.time()
        if remaining <= 0:
            timed_out = True
            break
        if not sel.select(timeout=min(remaining, 5)):
            continue
        chunk = os.read(proc.stdout.fileno(), 65536)
        if not chunk:
            break
        buf += chunk
        while b"\n" in buf:
            raw, buf = buf.split(b"\n", 1)
            line = raw.decode(errors="replace")
            print(line, flush=True)
            if line.startswith("not ok - "):
                cases += 1
                failed += 1
                current = line[len("not ok - "):]
                details[current] = []
                totals.add("fail", current)
            elif line.startswith("ok - ") and " # SKIP" in line:
                cases += 1
                failed += 1
                current = None
                print("not ok - %s: %s" % (line[5:], SKIPPED), flush=True)
                totals.add("fail", line[5:], SKIPPED)
            elif line.startswith("ok - "):
                cases += 1
                current = None
                totals.add("ok", line[5:])
            elif line.startswith("#") and current is not None:
                details[current].append(line)
    sel.close()
    if timed_out:
        os.killpg(proc.pid, signal.SIGKILL)
    try:
        rc = proc.wait(timeout=30)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        rc = proc.wait()
    if buf:
        print(buf.decode(errors="replace"), flush=True)
    # attach the collected detail lines to the failures just recorded
    for i, (case, _) in enumerate(totals.failures):
        if case in details:
            totals.failures[i] = (case, "\n".join(details.pop(case)))
    problem = None
    if timed_out:
        problem = "timed out after %ds" % SUITE_TIMEOUT
    elif rc != 0 and failed == 0:
        problem = "exit status %d with no failing case" % rc
    elif rc == 0 and cases == 0:
        problem = "ran no case"
    if problem:
        print("not ok - %s: %s" % (suite, problem), flush=True)
        totals.add("fail", suite, problem)
    # never leave a daemon of this suite behind
    try:
        os.killpg(proc.pid, signal.SIGKILL)
    except ProcessLookupError:
        pass
    print("# %s: %.1fs" % (suite, time.time() - t0), flush=True)


def run_fuzz(builds, seconds, wanted, totals):
    sys.path.insert(0, str(TESTS / "fuzz"))
    import fuzzrun

    t0 = time.time()
    for build in builds:
        if not fuzzrun.harnesses(build):
            print("not ok - fuzz: no harnesses under %s/tests/fuzz" % build, flush=True)
            totals.add("fail", "fuzz: %s" % build, "no harnesses built")
    results = fuzzrun.run_builds(builds, seconds, wanted,
                                 lambda line: print(line, flush=True))
    for res in results:
        totals.add("ok" if res.ok else "fail", res.case(),
                   "\n".join([res.summary] + res.detail))
    print("# fuzz: %.1fs" % (time.time() - t0), flush=True)


def main(argv):
    args = [a for a in argv if not a.startswith("--")]
    flags = {a for a in argv if a.startswith("--") and "=" not in a}
    fuzz_builds = [a.split("=", 1)[1] for a in argv if a.startswith("--fuzz-build=")]
    fuzz_seconds = int(next((a.split("=", 1)[1] for a in argv
                             if a.startswith("--fuzz-seconds=")), "10"))
    build = Path(args[0] if args else "build-test")
    if not build.is_absolute():
        build = (Path.cwd() / build).resolve()
    filters = args[1:]
    totals = Totals()
    t0 = time.time()

    def wanted(name):
        return not filters or any(f in name for f in filters)

    if "--integration-only" not in flags:
        units = sorted(p for p in (build / "tests").glob("test_*")
                       if p.is_file() and os.access(p, os.X_OK) and wanted(p.name))
        if not units and not filters:
            print("not ok - unit: no unit test binaries under %s/tests" % build, flush=True)
            totals.add("fail", "unit", "no unit test binaries")
        for exe in units:
            run_unit(exe, totals)

    if "--unit-only" not in flags:
        suites = sorted(p for p in (TESTS / "integration").glob("test_*.py") if wanted(p.stem))
        binary = build / "smimed"
        it_dir = build / "it"
        if suites and not binary.exists():
            print("not ok - integration: daemon binary %s is missing" % binary, flush=True)
            totals.add("fail", "integration", "missing %s" % binary)
        elif suites:
            # a fresh demo token and scratch space for every run
            shutil.rmtree(it_dir, ignore_errors=True)
            it_dir.mkdir(parents=True)
            p = subprocess.run([str(REPO / "script" / "demo-token"), str(it_dir / "demo")],
                               stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                               stderr=subprocess.STDOUT, timeout=300)
            if p.returncode != 0:
                out = p.stdout.decode(errors="replace")
                print("not ok - integration: script/demo-token failed", flush=True)
                for line in tail(out).splitlines():
                    print("#   " + line, flush=True)
                totals.add("fail", "integration: demo-token", tail(out))
            else:
                print("ok - integration: demo token created", flush=True)
                totals.add("ok", "integration: demo token created")
                for script in suites:
                    run_suite(script, build, it_dir, totals)

    if fuzz_builds:
        run_fuzz(fuzz_builds, fuzz_seconds, wanted, totals)

    if totals.failures:
        print("#")
        print("# FAILED (%d):" % len(totals.failures))
        for case, detail in totals.failures:
            print("#  - %s" % case)
            for line in detail.splitlines()[:12]:
                print("#      " + line.lstrip("# "))
    print("# total time %.0fs" % (time.time() - t0))
    print("%d passed, %d failed" % (totals.passed, totals.failed), flush=True)
    return 1 if totals.failed else 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
