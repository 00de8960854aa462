#!/usr/bin/env python3
"""Runs the libFuzzer harnesses of one or more fuzz builds.

    python3 tests/fuzz/fuzzrun.py SECONDS BUILD_DIR... [--only NAME,...]

Every harness BUILD_DIR/tests/fuzz/fuzz_NAME runs for SECONDS on its seed
corpus tests/fuzz/corpus/NAME/, two at a time. What it finds stays in
BUILD_DIR/fuzz-out/NAME/: corpus/ (inputs it added, fresh each run),
artifacts/ (crash-*, leak-*, timeout-* inputs; kept), tmp/ (its TMPDIR) and
log.txt. A build without AddressSanitizer (b_sanitize none: OpenSSL and
GMime are not instrumented, so ASan cannot see their heap bugs) runs under
glibc's heap checker, which on glibc 2.36 needs its library preloaded;
libFuzzer can then deadlock in its crash handler instead of reporting, so
every run is killed from outside at its deadline and a kill is a failure.

Each run is one case, printed as "ok - fuzz/KIND: NAME: ..." or "not ok -
fuzz/KIND: NAME: ..." with "#" detail lines; the last line is "N passed, M
failed" and the exit status 1 when a run failed. tests/run.py imports
run_builds() for script/test's fuzz phase.
"""

import json
import os
import re
import shutil
import signal
import subprocess
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

HERE = Path(__file__).resolve().parent
CORPUS = HERE / "corpus"
MALLOC_DEBUG = "/lib/x86_64-linux-gnu/libc_malloc_debug.so.0"
PARALLEL = 2
# past the fuzzing time: replaying the seeds, the final stats, a leak check
GRACE_S = 60

STATUS = re.compile(r"^#(\d+)\s+(?:INITED|NEW|REDUCE|pulse|DONE|RELOAD)\s+cov: (\d+) ft: (\d+)"
                    r"(?: corp: (\d+)/)?")
FINDING = re.compile(r"(fuzz check failed|ERROR: (?:\w+Sanitizer|libFuzzer)|"
                     r"runtime error:|Test unit written to|#[0-3] 0x|"
                     r"malloc\(\): |free\(\): |double free|corrupted)")

# libFuzzer's own frames under a deadly signal say nothing about the finding
NOISE = re.compile(r"in fuzzer::|__sanitizer_print_stack_trace|libc\.so|"
                   r"CrashCallback|PrintStackTrace")


def build_kind(build):
    """'asan' for a build with -Db_sanitize=address..., else 'plain'."""
    info = Path(build) / "meson-info" / "intro-buildoptions.json"
    try:
        options = json.loads(info.read_text())
    except (OSError, ValueError):
        return "plain"
    for opt in options:
        if opt.get("name") == "b_sanitize":
            return "asan" if "address" in str(opt.get("value")) else "plain"
    return "plain"


def harnesses(build):
    d = Path(build) / "tests" / "fuzz"
    return sorted(p for p in d.glob("fuzz_*")
                  if p.is_file() and os.access(p, os.X_OK))


def environment(kind, tmp):
    env = dict(os.environ)
    env["TMPDIR"] = str(tmp)
    if kind == "asan":
        env["ASAN_OPTIONS"] = "detect_leaks=1:abort_on_error=0:symbolize=1"
        env["UBSAN_OPTIONS"] = "halt_on_error=1:print_stacktrace=1"
    else:
        env["LD_PRELOAD"] = MALLOC_DEBUG
        env["MALLOC_CHECK_"] = "3"
        env["MALLOC_PERTURB_"] = "165"
    return env


class Result:
    def __init__(self, kind, name):
        self.kind = kind
        self.name = name
        self.ok = False
        self.summary = ""
        self.detail = []

    def case(self):
        return "fuzz/%s: %s" % (self.kind, self.name)


def run_one(exe, build, seconds, kind):
    name = exe.name[len("fuzz_"):]
    res = Result(kind, name)
    out = Path(build).resolve() / "fuzz-out" / name
    corpus, artifacts, tmp = out / "corpus", out / "artifacts", out / "tmp"
    shutil.rmtree(corpus, ignore_errors=True)
    shutil.rmtree(tmp, ignore_errors=True)
    for d in (corpus, artifacts, tmp):
        d.mkdir(parents=True, exist_ok=True)
    log = out / "log.txt"
    seeds = CORPUS / name
    cmd = ["nice", "-n", "10", str(exe), "-max_total_time=%d" % seconds, "-timeout=25",
           "-rss_limit_mb=2048", "-print_final_stats=1",
           "-artifact_prefix=%s/" % artifacts, str(corpus)]
    if seeds.is_dir():
        cmd.append(str(seeds))
    before = set(artifacts.iterdir())
    deadline = seconds + GRACE_S
    t0 = time.time()
    killed = False
    with open(log, "wb") as f:
        proc = subprocess.Popen(cmd, stdin=subprocess.DEVNULL, stdout=f, stderr=subprocess.STDOUT,
                                env=environment(kind, tmp), start_new_session=True)
        try:
            rc = proc.wait(timeout=deadline)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            rc = proc.wait()
            killed = True
    # a harness that forks (none does) would leave nothing behind either
    try:
        os.killpg(proc.pid, signal.SIGKILL)
    except ProcessLookupError:
        pass
    elapsed = time.time() - t0
    text = log.read_text(errors="replace")
    execs = re.search(r"stat::number_of_executed_units: (\d+)", text)
    status = [m for m in (STATUS.match(line) for line in text.splitlines()) if m]
    last = status[-1] if status else None
    # slow-unit-* is a note (an input that took over 10 s), not a finding
    new = sorted(p for p in set(artifacts.iterdir()) - before
                 if not p.name.startswith("slow-unit-"))
    res.summary = "%s execs, cov %s, ft %s, corpus %s, %.0f s" % (
        execs.group(1) if execs else (last.group(1) if last else "?"),
        last.group(2) if last else "?", last.group(3) if last else "?",
        (last.group(4) or "?") if last else "?", elapsed)
    res.ok = rc == 0 and not killed and not new
    if res.ok:
        return res
    if killed:
        res.summary = ("killed after %d s without finishing: under the malloc checker "
                       "libFuzzer deadlocks in its crash handler, so count this as a crash"
                       % deadline)
    else:
        res.summary = "exit status %d after %.0f s" % (rc, elapsed)
    findings = [line for line in text.splitlines()
                if FINDING.search(line) and not NOISE.search(line)]
    res.detail = findings[:10] or text.strip().splitlines()[-8:]
    res.detail += ["input: %s" % p for p in new[:4]]
    res.detail.append("log: %s" % log)
    return res


def run_builds(builds, seconds, wanted=lambda name: True, report=print):
    """Runs every harness of every build, PARALLEL at a time; calls
    report(line) for output and returns the list of Results."""
    jobs = []
    for build in builds:
        kind = build_kind(build)
        for exe in harnesses(build):
            if wanted(exe.name):
                jobs.append((exe, build, kind))
    lock = threading.Lock()
    results = []

    def work(job):
        exe, build, kind = job
        res = run_one(exe, build, seconds, kind)
        with lock:
            results.append(res)
            if res.ok:
                report("ok - %s: %s" % (res.case(), res.summary))
            else:
                report("not ok - %s: %s" % (res.case(), res.summary))
                for line in res.detail:
                    report("#   " + line)
        return res

    with ThreadPoolExecutor(max_workers=PARALLEL) as pool:
        list(pool.map(work, jobs))
    return results


def main(argv):
    only = None
    args = []
    i = 0
    while i < len(argv):
        if argv[i] == "--only" and i + 1 < len(argv):
            only = set(argv[i + 1].split(","))
            i += 2
            continue
        args.append(argv[i])
        i += 1
    if len(args) < 2 or not args[0].isdigit():
        sys.exit(__doc__)
    seconds = int(args[0])
    builds = args[1:]
    for build in builds:
        if not harnesses(build):
            print("not ok - fuzz: no harnesses under %s/tests/fuzz" % build, flush=True)
            print("0 passed, 1 failed", flush=True)
            return 1

    def wanted(exe_name):
        return only is None or exe_name[len("fuzz_"):] in only

    results = run_builds(builds, seconds, wanted, lambda line: print(line, flush=True))
    failed = sum(1 for r in results if not r.ok)
    print("%d passed, %d failed" % (len(results) - failed, failed), flush=True)
    return 1 if failed or not results else 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
