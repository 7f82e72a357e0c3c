"""Launch latency: fork to the guest's first instruction, next to bwrap and unshare(1).

Runs N launches of a tiny guest whose first instruction calls ``clock_now`` (so the parent
sees it as the first broker request), timed from the preparation of the guest's store and
linker, then ``run_plan`` (cgroup creation, the forks and every step included; the module
was compiled once, as a service would), side by side in one run with
``bwrap --unshare-all ... true`` and ``unshare -Urmpn --fork true``, interleaved so machine
noise hits all three alike. Prints a table and writes bench/results/launch.json.

Usage (root): .venv/bin/python bench/launch.py [--n 200]
"""

from __future__ import annotations

import argparse
import json
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from forgeone_isolate import cgroup, child, launch, package, plan, policy, wasm
from forgeone_isolate.uidpool import lease_uid

GUEST = """(module
  (import "forgeone" "clock_now" (func $clock_now (result i64)))
  (memory (export "memory") 1)
  (func (export "init") (result i32) (drop (call $clock_now)) (i32.const 0)))"""

MANIFEST = {
    "name": "bench",
    "version": "1.0.0",
    "abi": 1,
    "entry": "plugin.wasm",
    "limits": {"memory_mb": 16, "timeout_s": 10},
}


def pct(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, round(q * (len(ordered) - 1)))]


def time_cmd(cmd: list[str]) -> float:
    t = time.perf_counter()
    subprocess.run(cmd, check=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    return (time.perf_counter() - t) * 1000


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--n", type=int, default=200)
    ap.add_argument("--out", type=Path, default=Path(__file__).parent / "results" / "launch.json")
    args = ap.parse_args()

    with tempfile.TemporaryDirectory() as tmp:
        src = Path(tmp) / "src"
        src.mkdir()
        (src / "manifest.json").write_text(json.dumps(MANIFEST))
        (src / "plugin.wat").write_text(GUEST)
        key = Ed25519PrivateKey.generate()
        data = package.build_package(src, key)
        pkg = package.inspect_bytes(data)
        wasm_bytes = package.read_members(data)["plugin.wasm"]
        info = wasm.check_module(wasm_bytes)
        serialized = wasm.compile_serialized(wasm_bytes)
        hosts = cgroup.detect()
        bwrap = shutil.which("bwrap")
        unshare = shutil.which("unshare")
        rows: dict[str, list[float]] = {"forgeone (launch -> first wasm call)": []}
        steps: dict[str, list[float]] = {}
        if bwrap:
            rows["bwrap --unshare-all true"] = []
        if unshare:
            rows["unshare -Urmpn --fork true"] = []
        with lease_uid(Path(tmp) / "uids") as lease:
            p = plan.build_plan(
                pkg.manifest, pkg.claimed_signer, lease.uid, info.lifecycle, policy.Effective()
            )
            for _ in range(args.n):
                # The per-launch store and linker count: only compiling is done once.
                t = time.perf_counter()
                payload = child.make_guest_payload(serialized, p)
                prepare_ms = (time.perf_counter() - t) * 1000
                r = launch.run_plan(p, payload, hosts)
                if r.status != "ok":
                    print(f"launch failed: {r.status} {r.reason}", file=sys.stderr)
                    return 1
                rows["forgeone (launch -> first wasm call)"].append(
                    prepare_ms + r.timings["first_call_ms"]
                )
                steps.setdefault("prepare_ms", []).append(prepare_ms)
                for name, ms in r.child_steps.items():
                    steps.setdefault(f"pid1:{name}", []).append(ms)
                prev = 0.0
                for name in (
                    "cgroup_ms",
                    "forked_ms",
                    "unshared_ms",
                    "mapped_ms",
                    "keeper_attached_ms",
                    "pid1_ms",
                    "placed_ms",
                    "observed_ms",
                    "first_call_ms",
                ):
                    steps.setdefault(name, []).append(r.timings[name] - prev)
                    prev = r.timings[name]
                if bwrap:
                    rows["bwrap --unshare-all true"].append(
                        time_cmd(
                            [
                                bwrap,
                                "--unshare-all",
                                "--ro-bind",
                                "/",
                                "/",
                                "--dev",
                                "/dev",
                                "--proc",
                                "/proc",
                                "true",
                            ]
                        )
                    )
                if unshare:
                    rows["unshare -Urmpn --fork true"].append(
                        time_cmd([unshare, "-Urmpn", "--fork", "true"])
                    )

    result = {
        "n": args.n,
        "launch": {
            k: {"p50_ms": pct(v, 0.5), "p99_ms": pct(v, 0.99), "mean_ms": statistics.mean(v)}
            for k, v in rows.items()
        },
        "steps": {k: {"p50_ms": pct(v, 0.5), "p99_ms": pct(v, 0.99)} for k, v in steps.items()},
    }
    base = result["launch"].get("bwrap --unshare-all true", {}).get("p50_ms")
    print(f"{'launch':<40} {'p50 ms':>9} {'p99 ms':>9} {'x bwrap':>8}")
    for k, v in result["launch"].items():
        ratio = f"{v['p50_ms'] / base:.2f}" if base else "-"
        print(f"{k:<40} {v['p50_ms']:9.2f} {v['p99_ms']:9.2f} {ratio:>8}")
    print(f"\n{'step (delta from the previous marker)':<40} {'p50 ms':>9} {'p99 ms':>9}")
    labels = {
        "prepare_ms": "guest store + linker (before run_plan)",
        "cgroup_ms": "broker, sweep, cgroup create",
        "forked_ms": "fork (parent's view)",
        "unshared_ms": "keeper: pdeathsig, unshare, UNSHARED",
        "mapped_ms": "uid/gid maps",
        "keeper_attached_ms": "keeper cgroup attach",
        "pid1_ms": "(PID 1 reported)",
        "placed_ms": "PID 1 attached, PLACED sent",
        "observed_ms": "cgroupns..seccomp + /proc read",
        "first_call_ms": "instantiate + first guest call",
    }
    for k, v in result["steps"].items():
        label = labels.get(k, "  " + k.replace("pid1:", "PID 1 step: "))
        print(f"{label:<40} {v['p50_ms']:9.2f} {v['p99_ms']:9.2f}")
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2))
    print(f"\nwrote {args.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
