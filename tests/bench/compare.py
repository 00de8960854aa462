#!/usr/bin/env python3
"""The daemon's CPU time per signing request, two builds against each other
(script/bench --compare COMMIT builds the older one):

    python3 tests/bench/compare.py OLD_BUILD NEW_BUILD DEMO_DIR RESULTS_JSON

Per round, for each key (RSA-2048, P-256), the old build then the new one:
a fresh daemon, `wrk` at BENCH_CONNECTIONS keep-alive connections (default
8) for BENCH_SECONDS (default 4) on POST /v1/sign of the benchmark's 1 KiB
message, and the CPU time of the daemon's whole process tree divided by
the requests answered. BENCH_RUNS rounds (default 5) alternate the two
builds so that the machine's other load falls on both alike; the medians
and new/old are printed and written to RESULTS_JSON. The CPU time per
request, unlike the rate, hardly changes with other load on the machine.
"""

import json
import os
import statistics
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import bench as B  # noqa: E402

RUNS = int(os.environ.get("BENCH_RUNS", "5"))
SECS = float(os.environ.get("BENCH_SECONDS", "4"))
CONNS = int(os.environ.get("BENCH_CONNECTIONS", "8"))


def one_run(build, demo, logf, work, key):
    body = B.sign_body(work, key)
    d = B.Daemon(build, demo, logf)
    try:
        r = B.run_wrk(work, d.url("/v1/sign"), body, "application/json", CONNS, SECS,
                      d.proc.pid)
    finally:
        d.stop()
    if r["errors"]:
        raise RuntimeError("%s: %d errors %s" % (build, r["errors"], r["errors_detail"]))
    return r


def main():
    old, new, demo = (Path(a).resolve() for a in sys.argv[1:4])
    out = Path(sys.argv[4])
    if (demo / "api-token").exists():
        B.AUTH["Authorization"] = "Bearer " + (demo / "api-token").read_text().strip()
    os.environ["SOFTHSM2_CONF"] = str(demo / "softhsm2.conf")
    res = {"old": str(old), "new": str(new), "runs": RUNS, "seconds": SECS,
           "connections": CONNS, "cpus": os.cpu_count(),
           "load_average_at_start": os.getloadavg()[0], "keys": {}}
    with tempfile.TemporaryDirectory(prefix="smimed-compare.") as w, \
            open(new / "compare-daemon.log", "w") as logf:
        work = Path(w)
        B.bench_config(demo)
        for key, alg in B.KEYS:
            res["keys"][key] = {"algorithm": alg, "old": [], "new": [],
                                "old_rate": [], "new_rate": []}
        for i in range(RUNS):
            for key, _ in B.KEYS:
                for which, build in (("old", old), ("new", new)):
                    r = one_run(build, demo, logf, work, key)
                    k = res["keys"][key]
                    k[which].append(r["daemon_cpu_us_per_req"])
                    k[which + "_rate"].append(r["rate"])
                    B.log("  run %d %-8s %-3s %7.1f us/request  %8.1f/s"
                          % (i + 1, key, which, r["daemon_cpu_us_per_req"], r["rate"]))
    B.log("")
    B.log("daemon CPU per POST /v1/sign (median of %d alternating runs, %d connections, %g s)"
          % (RUNS, CONNS, SECS))
    B.log("%-9s %-9s %10s %10s %7s" % ("key", "alg", "old us", "new us", "new/old"))
    for key, k in res["keys"].items():
        k["old_median"] = statistics.median(k["old"])
        k["new_median"] = statistics.median(k["new"])
        k["ratio"] = round(k["new_median"] / k["old_median"], 3)
        B.log("%-9s %-9s %10.1f %10.1f %7.3f" % (key, k["algorithm"], k["old_median"],
                                                  k["new_median"], k["ratio"]))
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(res, indent=2) + "\n")
    B.log("results: %s" % out)


if __name__ == "__main__":
    main()
