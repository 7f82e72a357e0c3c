"""Generate small WAT guests that make a scripted sequence of ABI v1 calls.

Each step logs ``<label>=<result>`` (decimal) at level 1, and reads log the bytes they got,
so a test reads the outcome of every call from the launch report's ``logs``. Results of
opening calls are kept in numbered slots for later fd_read / fd_write / fd_close steps.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

from conftest import time_scale

# Memory layout: 0..1023 scratch for itoa, 1024..65535 I/O buffer, 65536.. string data.
BUF = 1024
BUF_LEN = 60000
DATA = 65536

PRELUDE = """
  (import "forgeone" "log" (func $log (param i32 i32 i32) (result i32)))
  (import "forgeone" "clock_now" (func $clock_now (result i64)))
  (import "forgeone" "random_fill" (func $random_fill (param i32 i32) (result i32)))
  (import "forgeone" "config_get" (func $config_get (param i32 i32 i32 i32) (result i32)))
  (import "forgeone" "kv_get" (func $kv_get (param i32 i32 i32 i32) (result i32)))
  (import "forgeone" "kv_set" (func $kv_set (param i32 i32 i32 i32) (result i32)))
  (import "forgeone" "fs_open" (func $fs_open (param i32 i32 i32) (result i32)))
  (import "forgeone" "net_connect" (func $net_connect (param i32 i32 i32) (result i32)))
  (import "forgeone" "fd_read" (func $fd_read (param i32 i32 i32) (result i32)))
  (import "forgeone" "fd_write" (func $fd_write (param i32 i32 i32) (result i32)))
  (import "forgeone" "fd_close" (func $fd_close (param i32) (result i32)))
  (import "forgeone" "output" (func $output (param i32 i32) (result i32)))
  (memory (export "memory") 4)
  (global $slots (mut i32) (i32.const 0))
  ;; log "<label>=<value>": label at (lp, ll); writes label then the decimal value at 0..
  (func $report (param $lp i32) (param $ll i32) (param $v i32)
    (local $n i32) (local $neg i32) (local $i i32) (local $j i32) (local $t i32)
    (memory.copy (i32.const 0) (local.get $lp) (local.get $ll))
    (i32.store8 (local.get $ll) (i32.const 61))
    (local.set $i (i32.add (local.get $ll) (i32.const 1)))
    (local.set $n (local.get $v))
    (if (i32.lt_s (local.get $n) (i32.const 0))
      (then (local.set $neg (i32.const 1)) (local.set $n (i32.sub (i32.const 0) (local.get $n)))))
    (local.set $j (i32.const 900))
    (loop $digits
      (local.set $j (i32.sub (local.get $j) (i32.const 1)))
      (i32.store8 (local.get $j) (i32.add (i32.const 48) (i32.rem_u (local.get $n) (i32.const 10))))
      (local.set $n (i32.div_u (local.get $n) (i32.const 10)))
      (br_if $digits (i32.ne (local.get $n) (i32.const 0))))
    (if (local.get $neg) (then
      (i32.store8 (local.get $i) (i32.const 45))
      (local.set $i (i32.add (local.get $i) (i32.const 1)))))
    (local.set $t (i32.sub (i32.const 900) (local.get $j)))
    (memory.copy (local.get $i) (local.get $j) (local.get $t))
    (drop (call $log (i32.const 1) (i32.const 0) (i32.add (local.get $i) (local.get $t)))))
"""


@dataclass
class Guest:
    """A scripted guest; add steps, then :meth:`wat`."""

    steps: list[str] = field(default_factory=list)
    strings: list[bytes] = field(default_factory=list)
    _offset: int = DATA

    def _str(self, data: bytes) -> tuple[int, int]:
        ptr = self._offset
        self.strings.append(data)
        self._offset += len(data) + 1
        return ptr, len(data)

    def _report(self, label: str, expr: str) -> None:
        lp, ll = self._str(label.encode())
        self.steps.append(f"(call $report (i32.const {lp}) (i32.const {ll}) {expr})")

    def call(self, label: str, expr: str) -> None:
        """Report the i32 result of a raw WAT expression."""
        self._report(label, expr)

    def fs_open(self, label: str, path: str, flags: int, slot: int) -> None:
        pp, pl = self._str(path.encode())
        self.steps.append(
            f"(i32.store (i32.const {900 + 4 * slot}) (call $fs_open (i32.const {pp}) (i32.const {pl}) (i32.const {flags})))"
        )
        self._report(label, f"(i32.load (i32.const {900 + 4 * slot}))")

    def net_connect(self, label: str, host: str, port: int, slot: int) -> None:
        hp, hl = self._str(host.encode())
        self.steps.append(
            f"(i32.store (i32.const {900 + 4 * slot}) (call $net_connect (i32.const {hp}) (i32.const {hl}) (i32.const {port})))"
        )
        self._report(label, f"(i32.load (i32.const {900 + 4 * slot}))")

    def fd_read_log(self, label: str, slot: int, length: int = 256) -> None:
        """fd_read into the buffer, report the count, then log the bytes read."""
        self.steps.append(
            f"(i32.store (i32.const 980) (call $fd_read (i32.load (i32.const {900 + 4 * slot})) (i32.const {BUF}) (i32.const {length})))"
        )
        self._report(label, "(i32.load (i32.const 980))")
        self.steps.append(
            f"(if (i32.gt_s (i32.load (i32.const 980)) (i32.const 0)) (then (drop (call $log (i32.const 1) (i32.const {BUF}) (i32.load (i32.const 980))))))"
        )

    def fd_write(self, label: str, slot: int, data: bytes) -> None:
        dp, dl = self._str(data)
        self._report(
            label,
            f"(call $fd_write (i32.load (i32.const {900 + 4 * slot})) (i32.const {dp}) (i32.const {dl}))",
        )

    def fd_close(self, label: str, slot: int) -> None:
        self._report(label, f"(call $fd_close (i32.load (i32.const {900 + 4 * slot})))")

    def kv_set(self, label: str, key: bytes, value: bytes) -> None:
        kp, kl = self._str(key)
        vp, vl = self._str(value)
        self._report(
            label,
            f"(call $kv_set (i32.const {kp}) (i32.const {kl}) (i32.const {vp}) (i32.const {vl}))",
        )

    def kv_get_log(self, label: str, key: bytes) -> None:
        kp, kl = self._str(key)
        self.steps.append(
            f"(i32.store (i32.const 980) (call $kv_get (i32.const {kp}) (i32.const {kl}) (i32.const {BUF}) (i32.const 4096)))"
        )
        self._report(label, "(i32.load (i32.const 980))")
        self.steps.append(
            f"(if (i32.gt_s (i32.load (i32.const 980)) (i32.const 0)) (then (drop (call $log (i32.const 1) (i32.const {BUF}) (i32.load (i32.const 980))))))"
        )

    def config_get_log(self, label: str, key: bytes) -> None:
        kp, kl = self._str(key)
        self.steps.append(
            f"(i32.store (i32.const 980) (call $config_get (i32.const {kp}) (i32.const {kl}) (i32.const {BUF}) (i32.const 4096)))"
        )
        self._report(label, "(i32.load (i32.const 980))")
        self.steps.append(
            f"(if (i32.gt_s (i32.load (i32.const 980)) (i32.const 0)) (then (drop (call $log (i32.const 1) (i32.const {BUF}) (i32.load (i32.const 980))))))"
        )

    def output(self, label: str, data: bytes) -> None:
        dp, dl = self._str(data)
        self._report(label, f"(call $output (i32.const {dp}) (i32.const {dl}))")

    def wat(self) -> str:
        data = "".join(
            f'  (data (i32.const {off}) "{_escape(s)}")\n'
            for off, s in zip(_offsets(self.strings), self.strings, strict=True)
        )
        body = "\n    ".join(self.steps)
        return f'(module{PRELUDE}{data}  (func (export "start") (result i32)\n    {body}\n    (i32.const 0)))\n'


def _offsets(strings: list[bytes]) -> list[int]:
    out, off = [], DATA
    for s in strings:
        out.append(off)
        off += len(s) + 1
    return out


def _escape(data: bytes) -> str:
    return "".join(f"\\{b:02x}" for b in data)


def write_plugin(
    directory: Path,
    name: str,
    wat: str,
    permissions: dict[str, object] | None = None,
    limits: dict[str, int] | None = None,
) -> Path:
    """A plugin source directory (manifest.json + plugin.wat) ready for ``pack``."""
    directory.mkdir(parents=True, exist_ok=True)
    manifest = {
        "name": name,
        "version": "1.0.0",
        "abi": 1,
        "entry": "plugin.wasm",
        "permissions": permissions or {},
        "limits": {"memory_mb": 16, "timeout_s": round(20 * time_scale()), **(limits or {})},
    }
    (directory / "manifest.json").write_text(json.dumps(manifest))
    (directory / "plugin.wat").write_text(wat)
    return directory


def results(logs: list[dict[str, str]]) -> dict[str, int]:
    """``label=value`` log lines of a report, as a dict (later labels win)."""
    out: dict[str, int] = {}
    for entry in logs:
        label, sep, value = entry["text"].partition("=")
        if sep and value.lstrip("-").isdigit():
            out[label] = int(value)
    return out
