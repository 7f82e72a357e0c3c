"""Scale of the root host service: N idle plugins under one ``serve``.

Starts ``python -m forgeone_isolate serve`` on a temporary socket and state directory,
installs N copies of the C sample (``native/build/sample``, under N names), then measures:

- launches per second through the fork server: every plugin started by concurrent
  ``start`` requests (each returns once its guest idles), wall time for all of them;
- the single-launch latency (``start`` request to idle guest, one at a time);
- memory per idle plugin: USS and PSS (psutil ``memory_full_info``) summed over the
  plugin host, the keeper and PID 1 of each plugin;
- control-socket latency: ``ping`` (socket + JSON + dispatch) and ``call`` (through the
  plugin host, the broker and the guest's ``handle``), p50 and p99;
- the time ``list`` takes with N plugins, and the SIGTERM stop of all of them.

Prints a table and writes bench/results/scale.json (or --out).

Usage (root): .venv/bin/python bench/scale.py [--n 100] [--clients 8]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

import psutil

from forgeone_isolate import control, package, signing

REPO = Path(__file__).resolve().parent.parent
SAMPLE = REPO / "native" / "build" / "sample"
MIB = 1024 * 1024


def pct(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, round(q * (len(ordered) - 1)))]


def wait_for_socket(path: Path, proc: subprocess.Popen[bytes], timeout: float = 60.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise SystemExit(f"serve exited with {proc.returncode}")
        try:
            with control.Client(path, timeout=5) as c:
                c.request("ping")
        except control.ServiceUnavailable:
            time.sleep(0.05)
        else:
            return
    raise SystemExit("serve did not come up")


def pack_all(root: Path, n: int) -> tuple[Path, list[bytes]]:
    pair = signing.keygen(root / "keys")
    key = signing.load_private_key(pair.private_path)
    base = json.loads((SAMPLE / "manifest.json").read_text())
    out = []
    for i in range(n):
        src = root / "src"
        shutil.rmtree(src, ignore_errors=True)
        src.mkdir()
        shutil.copyfile(SAMPLE / "plugin.wasm", src / "plugin.wasm")
        (src / "manifest.json").write_text(json.dumps(dict(base, name=f"scale-{i:04d}")))
        out.append(package.build_package(src, key))
    return pair.public_path, out


def _same_memory(a: int, b: int) -> bool:
    """kcmp(2) KCMP_VM: do processes a and b share one address space?"""
    import ctypes

    sys_kcmp = {"x86_64": 312, "aarch64": 272}[os.uname().machine]
    return bool(ctypes.CDLL(None).syscall(sys_kcmp, a, b, 1, 0, 0) == 0)


def own_memory(procs: list[psutil.Process]) -> list[psutil.Process]:
    """``procs`` less those sharing an address space with a later one (the keeper shares
    PID 1's: those pages are PID 1's, counted once, there)."""
    out: list[psutil.Process] = []
    for p in reversed(procs):
        if not any(_same_memory(p.pid, q.pid) for q in out):
            out.append(p)
    return out[::-1]


def plugin_memory(host_pid: int) -> dict[str, int]:
    """USS/PSS of a plugin host and its descendants (keeper, PID 1), each address space
    once."""
    host = psutil.Process(host_pid)
    procs = [host, *host.children(recursive=True)]
    uss = pss = rss = 0
    for p in own_memory(procs):
        info = p.memory_full_info()
        uss += info.uss
        pss += info.pss
        rss += info.rss
    return {"uss": uss, "pss": pss, "rss": rss, "processes": len(procs)}


def cpu_busy_s() -> float:
    """Seconds of CPU time the whole machine spent busy (from /proc/stat)."""
    with open("/proc/stat") as f:
        fields = [int(x) for x in f.readline().split()[1:]]
    user, nice, system, _idle, _iowait, irq, softirq = fields[:7]
    return (user + nice + system + irq + softirq) / os.sysconf("SC_CLK_TCK")


def cpu_s(proc: psutil.Process | None) -> float:
    """CPU seconds a process has run, from /proc/<pid>/task/*/schedstat (nanoseconds; the
    tick-sampled user/system times of /proc/<pid>/stat miss processes that run < 10 ms).
    Threads that have ended are not listed there: see :func:`process_cpu_s`."""
    if proc is None:
        return 0.0
    total = 0
    try:
        for tid in os.listdir(f"/proc/{proc.pid}/task"):
            with open(f"/proc/{proc.pid}/task/{tid}/schedstat") as f:
                total += int(f.read().split()[0])
    except (OSError, ValueError, IndexError):
        pass
    return total / 1e9


def process_cpu_s(proc: psutil.Process | None) -> float:
    """CPU seconds of a long-lived process, ended threads included (user + system times of
    /proc/<pid>/stat, in clock ticks: for the service, whose connection threads end)."""
    if proc is None:
        return 0.0
    times = proc.cpu_times()
    return float(times.user + times.system)


def minor_faults(pid: int) -> int:
    """Minor page faults a process has taken (field 10 of /proc/<pid>/stat): mostly
    copy-on-write of the image it was forked from."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            return int(f.read().rsplit(")", 1)[1].split()[7])
    except (OSError, ValueError, IndexError):
        return 0


def _trivial_host(spec: dict[str, Any], chan: Any) -> Any:
    os._exit(0)


def forkserver_spawn_rate(n: int) -> float:
    """Spawns per second of the bare fork server (a host that exits at once), with the
    service's preload: the fork server's own ceiling, before any sandbox work."""
    from forgeone_isolate.forkserver import ForkServer
    from forgeone_isolate.pluginhost import preload

    fs = ForkServer.start(_trivial_host, preload=preload)
    try:
        t0 = time.perf_counter()
        for _ in range(n):
            fs.spawn({"name": "bench"}).close()
        return n / (time.perf_counter() - t0)
    finally:
        fs.close()


def summary(values: list[float]) -> dict[str, float]:
    return {
        "mean": round(statistics.fmean(values), 3),
        "p50": round(pct(values, 0.5), 3),
        "p90": round(pct(values, 0.9), 3),
        "max": round(max(values), 3),
    }


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--n", type=int, default=100, help="idle plugins (100, 500, 1000...)")
    ap.add_argument("--clients", type=int, default=8, help="concurrent start requests")
    ap.add_argument("--pings", type=int, default=2000)
    ap.add_argument("--calls", type=int, default=1000)
    ap.add_argument("--single", type=int, default=20, help="one-at-a-time launches timed")
    ap.add_argument("--out", type=Path, default=Path(__file__).parent / "results" / "scale.json")
    ap.add_argument(
        "--perf", type=Path, help="record the concurrent starts machine-wide (perf record -a -g)"
    )
    args = ap.parse_args()
    if os.geteuid() != 0:
        raise SystemExit("bench/scale.py runs the service: run it as root")

    spawn_rate = forkserver_spawn_rate(200)  # first: the fork server needs a thread-free caller
    tmp = Path(tempfile.mkdtemp(prefix="forgeone-scale-"))
    sock = tmp / "control.sock"
    proc: subprocess.Popen[bytes] | None = None
    results: dict[str, Any] = {
        "n": args.n,
        "forkserver_spawns_per_s": round(spawn_rate, 1),
        "host": {
            "cpus": os.cpu_count(),
            "kernel": platform.release(),
            "python": platform.python_version(),
            "mem_total_mib": round(psutil.virtual_memory().total / MIB),
        },
    }
    try:
        trust, pkgs = pack_all(tmp, args.n)
        config = tmp / "config.toml"
        config.write_text(
            f'state_dir = "{tmp}/state"\ntrust = "{trust}"\nlog_level = "warning"\n'
            f"max_plugins = {args.n + 10}\n"
            f'[control]\nsocket = "{sock}"\nmax_connections = {args.clients + 8}\n'
            '[restart]\npolicy = "no"\n'
        )
        log = open(tmp / "service.log", "wb")  # noqa: SIM115 - lives as long as the service
        proc = subprocess.Popen(
            [sys.executable, "-m", "forgeone_isolate", "serve", "--config", str(config)],
            cwd=REPO,
            stdout=log,
            stderr=log,
            start_new_session=True,
        )
        t0 = time.perf_counter()
        wait_for_socket(sock, proc)
        results["service_start_s"] = round(time.perf_counter() - t0, 3)

        import base64

        with control.Client(sock) as c:
            t0 = time.perf_counter()
            for data in pkgs:
                c.request("install", package_b64=base64.b64encode(data).decode())
            install_s = time.perf_counter() - t0
        results["installs_per_s"] = round(args.n / install_s, 1)
        names = [f"scale-{i:04d}" for i in range(args.n)]

        # One at a time: the latency of a launch through the fork server.
        single: list[float] = []
        errors: list[str] = []
        with control.Client(sock) as c:
            for name in names[: args.single]:
                t = time.perf_counter()
                try:
                    c.request("start", name=name)
                except control.ServiceError as e:
                    errors.append(f"{name}: {e}")
                    continue
                single.append((time.perf_counter() - t) * 1000)
            for name in names[: args.single]:
                c.request("stop", name=name)
        results["launch_latency_ms"] = summary(single)

        # All of them, concurrently.
        queue = list(names)
        lock = threading.Lock()

        def starter() -> None:
            with control.Client(sock) as c:
                while True:
                    with lock:
                        if not queue:
                            return
                        name = queue.pop()
                    try:
                        c.request("start", name=name)
                    except (control.ServiceError, control.ServiceUnavailable) as e:
                        errors.append(f"{name}: {e}")

        threads = [threading.Thread(target=starter) for _ in range(args.clients)]
        svc_proc = psutil.Process(proc.pid)
        fs_proc = next(
            (k for k in svc_proc.children() if k.name().startswith("forgeone-forksv")), None
        )
        own0 = {"service": process_cpu_s(svc_proc), "fork server": process_cpu_s(fs_proc)}
        perf = None
        if args.perf is not None:
            perf = subprocess.Popen(
                ["perf", "record", "-a", "-g", "-F", "1999", "-o", str(args.perf)],
                stdout=subprocess.DEVNULL,
                stderr=subprocess.DEVNULL,
            )
            time.sleep(1.0)  # perf needs a moment before it samples
        busy0 = cpu_busy_s()
        t0 = time.perf_counter()
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        wall = time.perf_counter() - t0
        if perf is not None:
            perf.send_signal(signal.SIGINT)
            perf.wait()
        results["cpu_ms_per_launch"] = round((cpu_busy_s() - busy0) * 1000 / args.n, 1)
        # Where that CPU went: the service and fork server during the starts, and what each
        # plugin's processes have used since they were forked (they are all still alive).
        by_role = {
            "service": process_cpu_s(svc_proc) - own0["service"],
            "fork server": process_cpu_s(fs_proc) - own0["fork server"],
        }
        results["cpu_ms_by_role"] = by_role
        results["launch_all_s"] = round(wall, 3)
        results["launches_per_s"] = round(args.n / wall, 1)
        results["launch_errors"] = errors[:10]
        results["launch_error_count"] = len(errors)

        time.sleep(2.0)  # let them settle into idle
        with control.Client(sock) as c:
            t = time.perf_counter()
            listed = c.request("list")["plugins"]
            results["list_ms"] = round((time.perf_counter() - t) * 1000, 1)
        running = [p for p in listed if p["state"] == "running"]
        results["running"] = len(running)
        mems = []
        for p in running:
            try:
                mems.append(plugin_memory(int(p["host_pid"])))
            except psutil.NoSuchProcess:
                continue
        roles: dict[str, list[float]] = {"host": [], "keeper": [], "pid1": []}
        role_cpu: dict[str, float] = {"host": 0.0, "keeper": 0.0, "pid1": 0.0}
        role_faults: dict[str, int] = {"host": 0, "keeper": 0, "pid1": 0}
        for p in running:
            try:
                host = psutil.Process(int(p["host_pid"]))
                chain = [host, *host.children(recursive=True)]
                own = own_memory(chain)
                for role, proc_ in zip(roles, chain, strict=False):
                    shared = proc_ not in own
                    roles[role].append(0.0 if shared else proc_.memory_full_info().uss / MIB)
                    role_cpu[role] += cpu_s(proc_)
                    role_faults[role] += minor_faults(proc_.pid)
            except psutil.NoSuchProcess:
                continue
        for role, total in role_cpu.items():
            results["cpu_ms_by_role"][role] = total
        results["cpu_ms_by_role"] = {
            k: round(v * 1000 / args.n, 2) for k, v in results["cpu_ms_by_role"].items()
        }
        results["minor_faults_by_process"] = {
            role: round(total / max(1, len(running))) for role, total in role_faults.items()
        }
        results["uss_mib_by_process"] = {
            role: round(statistics.fmean(v), 2) for role, v in roles.items() if v
        }
        uss = [m["uss"] / MIB for m in mems]
        pss = [m["pss"] / MIB for m in mems]
        results["uss_mib_per_plugin"] = summary(uss)
        results["pss_mib_per_plugin"] = summary(pss)
        results["processes_per_plugin"] = statistics.mode(m["processes"] for m in mems)
        svc = psutil.Process(proc.pid)
        kids = svc.children()
        fs = next((k for k in kids if k.name().startswith("forgeone-forksv")), None)
        results["service_uss_mib"] = round(svc.memory_full_info().uss / MIB, 1)
        if fs is not None:
            results["forkserver_uss_mib"] = round(fs.memory_full_info().uss / MIB, 1)
            results["forkserver_rss_mib"] = round(fs.memory_full_info().rss / MIB, 1)
        results["total_pss_mib"] = round(
            sum(pss)
            + svc.memory_full_info().pss / MIB
            + (fs.memory_full_info().pss / MIB if fs else 0),
            1,
        )

        with control.Client(sock) as c:
            pings = []
            for _ in range(args.pings):
                t = time.perf_counter()
                c.request("ping")
                pings.append((time.perf_counter() - t) * 1e6)
            calls = []
            for i in range(args.calls):
                name = running[i % len(running)]["name"]
                t = time.perf_counter()
                out = c.request("call", name=name, input="scale")
                calls.append((time.perf_counter() - t) * 1e6)
                assert out["output"] == "SCALE"
        results["ping_us"] = {"p50": round(pct(pings, 0.5)), "p99": round(pct(pings, 0.99))}
        results["call_us"] = {"p50": round(pct(calls, 0.5)), "p99": round(pct(calls, 0.99))}

        t0 = time.perf_counter()
        proc.send_signal(signal.SIGTERM)
        proc.wait(timeout=300)
        results["sigterm_stop_s"] = round(time.perf_counter() - t0, 2)
        results["sigterm_exit_status"] = proc.returncode
        left = [
            p
            for p in psutil.process_iter(["name"])
            if (p.info["name"] or "").startswith("fo-scale")
        ]
        results["processes_left"] = len(left)
    finally:
        if proc is not None and proc.poll() is None:
            proc.kill()
            proc.wait()
        shutil.rmtree(tmp, ignore_errors=True)

    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(results, indent=2, sort_keys=True) + "\n")
    u, ps = results["uss_mib_per_plugin"], results["pss_mib_per_plugin"]
    rows = [
        ("idle plugins running", f"{results['running']} / {args.n}"),
        ("processes per plugin", str(results["processes_per_plugin"])),
        ("USS per plugin (MiB)", f"mean {u['mean']:.2f}  p50 {u['p50']:.2f}  max {u['max']:.2f}"),
        (
            "PSS per plugin (MiB)",
            f"mean {ps['mean']:.2f}  p50 {ps['p50']:.2f}  max {ps['max']:.2f}",
        ),
        (
            "USS by process (MiB)",
            "  ".join(f"{k} {v}" for k, v in results["uss_mib_by_process"].items()),
        ),
        ("total PSS (MiB)", f"{results['total_pss_mib']}"),
        (
            "service / fork server USS (MiB)",
            f"{results['service_uss_mib']} / {results.get('forkserver_uss_mib')}",
        ),
        ("fork server spawns/s (bare host)", str(results["forkserver_spawns_per_s"])),
        (
            "launches/s (concurrent starts)",
            f"{results['launches_per_s']} ({args.clients} clients;"
            f" {results['cpu_ms_per_launch']} ms CPU each, machine-wide)",
        ),
        (
            "  CPU ms per launch, by process",
            "  ".join(f"{k} {v}" for k, v in results["cpu_ms_by_role"].items()),
        ),
        (
            "  minor faults per launch, by process",
            "  ".join(f"{k} {v}" for k, v in results["minor_faults_by_process"].items()),
        ),
        (
            "launch latency (ms, one at a time)",
            f"p50 {results['launch_latency_ms']['p50']}  p90 {results['launch_latency_ms']['p90']}",
        ),
        ("control ping (us)", f"p50 {results['ping_us']['p50']}  p99 {results['ping_us']['p99']}"),
        ("control call (us)", f"p50 {results['call_us']['p50']}  p99 {results['call_us']['p99']}"),
        ("list with N plugins (ms)", str(results["list_ms"])),
        ("installs/s", str(results["installs_per_s"])),
        (
            "SIGTERM stop of all (s)",
            f"{results['sigterm_stop_s']} (exit {results['sigterm_exit_status']})",
        ),
        ("launch errors", str(results["launch_error_count"])),
    ]
    width = max(len(k) for k, _ in rows)
    print(f"forgeone-isolate service scale, N={args.n}, {os.cpu_count()} CPUs")
    for k, v in rows:
        print(f"  {k:<{width}}  {v}")
    print(f"written to {args.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
