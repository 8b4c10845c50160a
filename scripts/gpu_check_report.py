# SPDX-License-Identifier: Apache-2.0
"""The result of scripts/gpu-check.sh: reads its work folder, writes OUT/gpu-check.json (every
test by name, sanitizer verdicts, every benchmark row, GPU, driver, CUDA, commit, date), packs
the logs of what failed into OUT/gpu-check-failures.tgz, and (unless --quiet) writes and prints
the summary table (OUT/gpu-check.txt). Standard library only.

    python3 scripts/gpu_check_report.py WORK_DIR OUT_DIR [--quiet]
"""
import io
import json
import os
import re
import sys
import tarfile

SCHEMA = "kvcomp-gpu-check/1"
LOG_TAIL_BYTES = 2 << 20  # per log in the archive: the end, where the failures are


def read(path, default=""):
    try:
        with open(path, encoding="utf-8", errors="replace") as f:
            return f.read()
    except OSError:
        return default


def load_json(path):
    text = read(path, None)
    if text is None:
        return None
    try:
        return json.loads(text)
    except ValueError:
        return {"unparsed": text[-4000:]}


def env_of(work):
    env = {}
    for line in read(os.path.join(work, "env.txt")).splitlines():
        key, _, value = line.partition("=")
        env[key] = value
    gpu = [p.strip() for p in env.get("gpu", "").split(",")]
    return {
        "mode": env.get("mode"),
        "commit": env.get("commit"),
        "date": env.get("date"),
        "gpu": {
            "name": gpu[0] if gpu else "",
            "driver": gpu[1] if len(gpu) > 1 else None,
            "memory": gpu[2] if len(gpu) > 2 else None,
            "compute_capability": gpu[3] if len(gpu) > 3 else None,
        },
        "cuda": env.get("cuda", "").replace("release ", "") or None,
        "host_cores": env.get("cores"),
        "budget_s": env.get("budget"),
    }


def steps_of(work):
    steps = []
    for line in read(os.path.join(work, "steps.tsv")).splitlines():
        name, status, seconds, limit, rc = (line.split("\t") + [""] * 5)[:5]
        steps.append({"name": name, "status": status, "seconds": int(seconds or 0),
                      "limit_s": int(limit or 0), "rc": rc})
    return steps


# ctest's console lines: "12/40 Test #12: CodecGpu.Foo ......***Failed    1.23 sec"
CTEST_LINE = re.compile(
    r"Test\s+#\d+: (\S+) \.*\s*(?:\*\*\*)?"
    r"(Passed|Failed|Skipped|Not Run|Timeout|Exception: [^\d]*?)\s+[\d.]+ sec")


def tests_of(work, steps):
    if os.path.exists(os.path.join(work, "tests-unavailable.txt")):
        reason = read(os.path.join(work, "tests-unavailable.txt")).strip()
        return {"status": "unavailable", "reason": reason}
    log = read(os.path.join(work, "tests.log"), None)
    if log is None:
        return {"status": "not run"}
    out = {"passed": [], "failed": [], "skipped": []}
    for name, result in CTEST_LINE.findall(log):
        if result == "Passed":
            out["passed"].append(name)
        elif result in ("Skipped", "Not Run"):
            out["skipped"].append(name)
        else:
            out["failed"].append(name if result == "Failed" else f"{name} ({result.strip()})")
    step = next((s for s in steps if s["name"] == "tests"), {})
    out["status"] = step.get("status", "unknown")
    summary = re.findall(r"\d+% tests passed.*", log)
    out["summary"] = summary[-1] if summary else None
    return out


def gtest_counts(path):
    data = load_json(path)
    if not isinstance(data, dict) or "testsuites" not in data:
        return None
    ran = skipped = 0
    for suite in data["testsuites"]:
        for t in suite.get("testsuite", []):
            if t.get("result") == "SKIPPED":
                skipped += 1
            elif t.get("status") == "RUN":
                ran += 1
    return ran, skipped


def sanitizer_verdict(work, tool, steps):
    step = next((s for s in steps if s["name"] == f"sanitizer-{tool}"), None)
    if step is None:
        if os.path.exists(os.path.join(work, "sanitizer-unavailable.txt")):
            return {"verdict": "unavailable", "reason": "compute-sanitizer not found"}
        for other in ("memcheck", "racecheck", "synccheck"):
            if re.search(r"Device not supported|device is not supported",
                         read(os.path.join(work, f"sanitizer-{other}.log")), re.I):
                return {"verdict": "unavailable", "reason": "compute-sanitizer refused the device"}
        return {"verdict": "not run"}
    if step["status"] == "skipped":
        return {"verdict": "not run", "reason": "out of time"}
    log = read(os.path.join(work, f"sanitizer-{tool}.log"))
    errors = re.findall(r"ERROR SUMMARY: (\d+) error", log)
    n = int(errors[-1]) if errors else None
    counts = gtest_counts(os.path.join(work, f"sanitizer-{tool}.json"))
    result = {"errors": n, "tests_run": counts[0] if counts else None,
              "tests_skipped": counts[1] if counts else None, "seconds": step["seconds"]}
    if re.search(r"Device not supported|device is not supported", log, re.I):
        result.update(verdict="unavailable", reason="compute-sanitizer refused the device")
    elif step["status"] == "timeout":
        result.update(verdict="timeout")
    elif n:
        result.update(verdict="errors")
    elif counts is None or counts[0] == 0:
        # Every test skipped (the tool hid the GPU) or none ran at all: nothing was checked.
        result.update(verdict="unavailable", reason="no test ran under the tool")
    elif step["rc"] == "0" and n == 0:
        result.update(verdict="clean")
    else:
        result.update(verdict="failed",
                      reason=f"tests failed under the tool (rc {step['rc']}), no tool errors")
    return result


def benchmarks_of(work):
    out = {}
    for name in ("gpu_bench", "gpu_store_bench", "gpu_store_bench_v1", "torch_sdpa"):
        data = load_json(os.path.join(work, f"{name}.json"))
        if data is not None:
            out[name] = data
    return out


def failure_logs(work, steps, tests, sanitizers):
    names = [f"{s['name']}.log" for s in steps if s["status"] in ("failed", "timeout")]
    names += [f"sanitizer-{t}.log" for t, v in sanitizers.items()
              if v.get("verdict") in ("errors", "failed", "timeout", "unavailable")]
    if tests.get("failed"):
        names.append("tests.log")
    names.append("configure-with-tests.log")
    return sorted({n for n in names if os.path.exists(os.path.join(work, n))})


def write_archive(work, out_dir, names):
    path = os.path.join(out_dir, "gpu-check-failures.tgz")
    if not names:
        if os.path.exists(path):
            os.remove(path)
        return None
    with tarfile.open(path, "w:gz") as tar:
        for n in names:
            with open(os.path.join(work, n), "rb") as f:
                f.seek(0, os.SEEK_END)
                size = f.tell()
                f.seek(max(0, size - LOG_TAIL_BYTES))
                data = f.read()
            info = tarfile.TarInfo(n)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    return os.path.basename(path)


def table(result):
    env, lines = result, []
    gpu = env["gpu"]
    lines.append(f"=== kvcomp GPU check ({env['mode']}): commit {env['commit']}, {env['date']}")
    lines.append(f"    {gpu['name']}, driver {gpu['driver']}, CUDA {env['cuda']}")
    lines.append(f"{'step':<26} {'status':<10} {'s':>5} {'limit':>6}")
    for s in result["steps"]:
        lines.append(f"{s['name']:<26} {s['status']:<10} {s['seconds']:>5} {s['limit_s']:>6}")
    t = result["tests"]
    if "passed" in t:
        lines.append(f"tests: {len(t['passed'])} passed, {len(t['failed'])} failed, "
                     f"{len(t['skipped'])} skipped")
        for name in t["failed"][:20]:
            lines.append(f"  FAILED {name}")
    else:
        lines.append(f"tests: {t.get('status')} {t.get('reason', '')}")
    for tool, v in result["sanitizers"].items():
        extra = v.get("reason") or (f"{v['errors']} errors" if v.get("errors") else "")
        ran = f", {v['tests_run']} tests" if v.get("tests_run") is not None else ""
        lines.append(f"sanitizer {tool:<10} {v['verdict']}{ran} {extra}".rstrip())
    b = result["benchmarks"].get("gpu_bench")
    if isinstance(b, dict) and "rows" in b:
        lines.append(f"{'codec (gpu_bench)':<30} {'ms':>9} {'GB/s':>9} {'ratio':>7}")
        for r in b["rows"]:
            check = "" if r.get("verified", True) else "  FAILED its check"
            lines.append(f"{r['name']:<30} {r['ms']:>9.3f} {r['gbps']:>9.1f} {r['ratio']:>7.2f}"
                         f"{check}")
        if b.get("attention"):
            lines.append(f"{'attention B x L':<18} {'v1 ms':>10} {'tiles ms':>10} "
                         f"{'compact ms':>10} {'dense ms':>10}")

            def ms(v):
                return f"{v:>10.4f}" if isinstance(v, (int, float)) else f"{'n/a':>10}"
            for a in b["attention"]:
                lines.append(f"{a['batch']:>4} x {a['len']:<10} {ms(a.get('compressed_ms'))} "
                             f"{ms(a.get('tiles_ms'))} {ms(a.get('tiles_compact_ms'))} "
                             f"{a['dense_ms']:>10.4f}")
    for name in ("gpu_store_bench", "gpu_store_bench_v1"):
        s = result["benchmarks"].get(name)
        if not (isinstance(s, dict) and "rows" in s):
            continue
        lines.append(f"{'store (' + name + ', ' + str(s.get('format')) + ')':<44} {'us':>10} "
                     f"{'baseline':>10}")
        for r in s["rows"]:
            lines.append(f"{r['name'][:44]:<44} {r['us']:>10.2f} {r['baseline_us']:>10.2f}")
        lines.append(f"store verified: {s.get('verified')}, "
                     f"bytes/token/layer {s.get('bytes_per_token')}")
    sdpa = result["benchmarks"].get("torch_sdpa")
    if isinstance(sdpa, list):
        lines.append("torch SDPA ms: " + ", ".join(
            f"{r['batch']}x{r['len']}={r['ms']:.4f}" if r.get("ms") is not None else
            f"{r['batch']}x{r['len']}=n/a" for r in sdpa))
    replay = result["extra"].get("replay")
    if replay:
        lines.append("real-model replay: " + ("PASS" if replay.get("passed") else "FAIL") + "; " +
                     ", ".join(f"{name}: output error {f['output_error']:.2e}, read-back "
                               f"{f['readback_error']:g}, block bytes {f['block_bytes']} "
                               f"(CPU {f['cpu_block_bytes']})"
                               + ("" if f["passed"] else " FAILED: " + ", ".join(
                                   k for k, ok in f["checks"].items() if not ok))
                               for name, f in replay.get("formats", {}).items()))
    lines.append(f"result: gpu-check.json; failure logs: {result['failure_logs'] or 'none'}")
    return "\n".join(lines)


def main():
    work, out_dir = sys.argv[1], sys.argv[2]
    quiet = "--quiet" in sys.argv[3:]
    result = env_of(work)
    result["schema"] = SCHEMA
    result["steps"] = steps_of(work)
    result["tests"] = tests_of(work, result["steps"])
    result["sanitizers"] = {t: sanitizer_verdict(work, t, result["steps"])
                            for t in ("memcheck", "racecheck", "synccheck")}
    result["benchmarks"] = benchmarks_of(work)
    replay = load_json(os.path.join(work, "replay.json"))
    result["extra"] = {"replay": replay} if replay is not None else {}
    logs = failure_logs(work, result["steps"], result["tests"], result["sanitizers"])
    result["failure_logs"] = write_archive(work, out_dir, logs)
    result["failure_log_files"] = logs
    with open(os.path.join(out_dir, "gpu-check.json"), "w") as f:
        json.dump(result, f, indent=1)
    if not quiet:
        text = table(result)
        with open(os.path.join(out_dir, "gpu-check.txt"), "w") as f:
            f.write(text + "\n")
        print()
        print(text)


if __name__ == "__main__":
    main()
