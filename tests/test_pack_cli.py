"""keygen / pack / verify / inspect through the command line, and the CLI's surface."""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from helpers import (
    HELLO_DIR,
    REPO,
    KeyPair,
    base_manifest,
    one_line,
    plugin_source,
    record_writes,
    sha256,
    snapshot,
)

from forgeone_isolate import cli, package
from forgeone_isolate import manifest as mf
from forgeone_isolate.errors import EXIT_BAD_INPUT

pytest_plugins = ["helpers"]

ARCHITECTURE_COMMANDS = [
    "keygen",
    "pack",
    "verify",
    "inspect",
    "launch",
    "call",
    "doctor",
    "serve",
    "list",
    "stop",
    "pause",
    "resume",
    "logs",
    "audit",
    "metrics",
]
GOOD_PLUGINS = ["hello", "wait", "fail", "handler", "logflood", "memgrow", "noexports", "spin"]


def run(capsys: pytest.CaptureFixture[str], *argv: str) -> tuple[int, str, str]:
    capsys.readouterr()
    status = cli.main(list(argv))
    out, err = capsys.readouterr()
    return status, out, err


def pack(
    capsys: pytest.CaptureFixture[str], src: Path, key: KeyPair, out: Path
) -> tuple[int, str, str]:
    return run(capsys, "pack", str(src), "--key", str(key.private_path), "--out", str(out))


def refused(capsys: pytest.CaptureFixture[str], *argv: str) -> str:
    status, out, err = run(capsys, *argv)
    assert status == EXIT_BAD_INPUT, (out, err)
    line = one_line(err)
    assert line.startswith("forgeone-isolate: error: ")
    return line


# ------------------------------------------------------------------ round trips


@pytest.mark.parametrize("plugin", ["hello", "wait"])
def test_pack_verify_inspect_round_trip(
    plugin: str, tmp_path: Path, keypair: KeyPair, capsys: pytest.CaptureFixture[str]
) -> None:
    src = plugin_source(plugin, tmp_path / "src")
    out = tmp_path / f"{plugin}.forgepkg"

    status, stdout, err = pack(capsys, src, keypair, out)
    assert (status, err) == (0, "")
    data = out.read_bytes()
    assert f"packed {plugin} 1.0.0 -> {out} ({len(data)} bytes, sha256 {sha256(data)})" in stdout
    assert f"signer fingerprint: {keypair.fingerprint}" in stdout
    assert oct(out.stat().st_mode & 0o777) == oct(0o644)
    assert sorted(os.listdir(tmp_path)) == sorted(["src", out.name])  # no temp file left

    status, stdout, err = run(capsys, "verify", str(out), "--trust", str(keypair.public_path))
    assert (status, err) == (0, "")
    assert stdout.startswith(f"OK: {plugin} 1.0.0 (abi 1) signed by {keypair.fingerprint};")
    assert "1 file(s) match their sha256" in stdout

    # a trust directory works the same (the keygen directory: *.pub only)
    status, _, err = run(capsys, "verify", str(out), "--trust", str(keypair.directory))
    assert (status, err) == (0, "")

    status, stdout, err = run(capsys, "inspect", str(out))
    assert (status, err) == (0, "")
    assert stdout.startswith("NOT ATTESTED")
    table = dict(re.split(r"\s{2,}", line.strip(), maxsplit=1) for line in stdout.splitlines()[1:])
    source = json.loads((src / "manifest.json").read_text())
    assert table["name"] == plugin
    assert table["version"] == "1.0.0"
    assert table["abi"] == "1"
    assert table["entry"] == "plugin.wasm"
    assert table["signer (claimed)"] == keypair.fingerprint
    assert table["package sha256"] == sha256(data)
    assert table["file plugin.wasm"].endswith(" bytes")
    for key, value in source["limits"].items():
        assert table[f"limit {key}"] == str(value)
    for key, value in source["permissions"].items():
        assert json.loads(table[f"permission {key}"]) == value

    status, stdout, err = run(capsys, "inspect", str(out), "--json")
    assert (status, err) == (0, "")
    report = json.loads(stdout)
    assert report["attested"] is False
    assert report["signer"] == keypair.fingerprint
    assert report["package_sha256"] == sha256(data)
    assert set(report["sizes"]) == {"manifest.json", "manifest.sig", "plugin.wasm"}
    wasm = package.read_members(data)["plugin.wasm"]
    assert report["sizes"]["plugin.wasm"] == len(wasm)
    assert report["manifest"] == {**source, "files": {"plugin.wasm": sha256(wasm)}}


@pytest.mark.parametrize("plugin", GOOD_PLUGINS)
def test_every_sample_plugin_packs_and_verifies(
    plugin: str, tmp_path: Path, keypair: KeyPair, capsys: pytest.CaptureFixture[str]
) -> None:
    out = tmp_path / "p.forgepkg"
    assert pack(capsys, plugin_source(plugin, tmp_path / "src"), keypair, out)[0] == 0
    assert run(capsys, "verify", str(out), "--trust", str(keypair.public_path))[0] == 0


def test_pack_is_deterministic(
    tmp_path: Path, keypair: KeyPair, capsys: pytest.CaptureFixture[str]
) -> None:
    src = plugin_source("hello", tmp_path / "src")
    a, b, c = tmp_path / "a.forgepkg", tmp_path / "b.forgepkg", tmp_path / "c.forgepkg"
    assert pack(capsys, src, keypair, a)[0] == 0
    assert pack(capsys, src, keypair, b)[0] == 0
    assert a.read_bytes() == b.read_bytes()
    # a copy with other timestamps and modes packs to the same bytes
    copy = tmp_path / "copy"
    shutil.copytree(src, copy)
    os.utime(copy / "plugin.wat", (86400, 86400))
    os.chmod(copy / "plugin.wat", 0o600)
    assert pack(capsys, copy, keypair, c)[0] == 0
    assert c.read_bytes() == a.read_bytes()


def test_pack_overwrites_its_output(
    tmp_path: Path, keypair: KeyPair, capsys: pytest.CaptureFixture[str]
) -> None:
    out = tmp_path / "p.forgepkg"
    out.write_bytes(b"old")
    assert pack(capsys, plugin_source("hello", tmp_path / "src"), keypair, out)[0] == 0
    assert out.read_bytes()[:2] == b"\x1f\x8b"


def test_packed_manifest_keeps_the_source_fields(
    tmp_path: Path, keypair: KeyPair, capsys: pytest.CaptureFixture[str]
) -> None:
    out = tmp_path / "p.forgepkg"
    pack(capsys, plugin_source("hello", tmp_path / "src"), keypair, out)
    members = package.read_members(out.read_bytes())
    packed = json.loads(members["manifest.json"])
    source = json.loads((HELLO_DIR / "manifest.json").read_text())
    assert {k: v for k, v in packed.items() if k != "files"} == source
    assert packed["files"] == {"plugin.wasm": sha256(members["plugin.wasm"])}


# -------------------------------------------------------------- pack refusals


@pytest.mark.parametrize(
    ("plugin", "expect"),
    [
        ("badimport", "import 'wasi_snapshot_preview1.fd_write' is outside ABI v1"),
        ("badsig", "import 'forgeone.log' has type (i32) -> (i32), ABI v1 says (i32, i32, i32)"),
        ("badexport", "export 'start' has type (i32) -> (i32), ABI v1 says () -> (i32)"),
    ],
)
def test_pack_refuses_bad_plugins(
    plugin: str,
    expect: str,
    tmp_path: Path,
    keypair: KeyPair,
    capsys: pytest.CaptureFixture[str],
) -> None:
    src = plugin_source(plugin, tmp_path / "src")
    out = tmp_path / "out" / "p.forgepkg"
    out.parent.mkdir()
    line = refused(capsys, "pack", str(src), "--key", str(keypair.private_path), "--out", str(out))
    assert expect in line
    assert os.listdir(out.parent) == []


def _src(tmp_path: Path) -> Path:
    return plugin_source("hello", tmp_path / "src")


def _symlinked_file(src: Path) -> None:
    (src / "data.txt").symlink_to("/etc/passwd")


def _symlinked_dir(src: Path) -> None:
    (src / "etc").symlink_to("/etc")


def _dangling_symlink(src: Path) -> None:
    (src / "gone").symlink_to(src / "nowhere")


def _symlinked_wat(src: Path) -> None:
    (src / "real.wat").write_bytes((src / "plugin.wat").read_bytes())
    (src / "plugin.wat").unlink()
    (src / "plugin.wat").symlink_to("real.wat")


def _nested_symlink(src: Path) -> None:
    (src / "sub").mkdir()
    (src / "sub" / "link").symlink_to("../plugin.wat")


def _both_wat_and_wasm(src: Path) -> None:
    (src / "plugin.wasm").write_bytes(b"\0asm\x01\0\0\0")


def _manifest_with_files(src: Path) -> None:
    obj = json.loads((src / "manifest.json").read_text())
    obj["files"] = {"plugin.wasm": "0" * 64}
    (src / "manifest.json").write_text(json.dumps(obj))


def _no_manifest(src: Path) -> None:
    (src / "manifest.json").unlink()


def _no_entry(src: Path) -> None:
    (src / "plugin.wat").unlink()


def _bad_wat(src: Path) -> None:
    (src / "plugin.wat").write_text("(module (func (export")


def _hidden_file(src: Path) -> None:
    (src / ".DS_Store").write_bytes(b"\0")


def _fifo(src: Path) -> None:
    os.mkfifo(src / "pipe")


def _manifest_invalid(src: Path) -> None:
    (src / "manifest.json").write_bytes(
        mf.canonical_bytes(base_manifest(limits={"memory_mb": 999999}))
    )


def _manifest_too_large(src: Path) -> None:
    (src / "manifest.json").write_bytes(b" " * (mf.MAX_MANIFEST_BYTES + 1))


def _wat_with_other_entry(src: Path) -> None:
    (src / "manifest.json").write_bytes(mf.canonical_bytes(base_manifest(entry="main.wasm")))


def _too_long_for_ustar(src: Path) -> None:
    deep = src / ("a" * 100) / ("b" * 100)
    deep.mkdir(parents=True)
    (deep / ("c" * 60)).write_bytes(b"x")


PACK_REFUSALS = {
    "symlinked file": (_symlinked_file, "pack: data.txt is a symlink"),
    "symlinked directory": (_symlinked_dir, "pack: etc is a symlink"),
    "dangling symlink": (_dangling_symlink, "pack: gone is a symlink"),
    "symlinked plugin.wat": (_symlinked_wat, "pack: plugin.wat is a symlink"),
    "nested symlink": (_nested_symlink, "pack: sub/link is a symlink"),
    "plugin.wat and plugin.wasm": (_both_wat_and_wasm, "both plugin.wat and plugin.wasm"),
    "manifest with files": (_manifest_with_files, "leave out 'files'"),
    "no manifest": (_no_manifest, "manifest.json not found"),
    "no entry": (_no_entry, "entry 'plugin.wasm' not found"),
    "wat does not compile": (_bad_wat, "plugin.wat: does not compile"),
    "hidden file": (_hidden_file, "'.DS_Store' is not an allowed member name"),
    "fifo": (_fifo, "pack: pipe is not a regular file"),
    "limit out of range": (_manifest_invalid, "'limits.memory_mb' = 999999 is outside"),
    "manifest too large": (_manifest_too_large, f"larger than {mf.MAX_MANIFEST_BYTES}"),
    "wat with another entry": (_wat_with_other_entry, "plugin.wat compiles to plugin.wasm"),
    "name too long for ustar": (_too_long_for_ustar, "name is too long"),
}


@pytest.mark.parametrize("case", sorted(PACK_REFUSALS))
def test_pack_refuses_bad_sources(
    case: str, tmp_path: Path, keypair: KeyPair, capsys: pytest.CaptureFixture[str]
) -> None:
    mutate, expect = PACK_REFUSALS[case]
    src = _src(tmp_path)
    mutate(src)
    out = tmp_path / "out.forgepkg"
    line = refused(capsys, "pack", str(src), "--key", str(keypair.private_path), "--out", str(out))
    assert expect in line
    assert not out.exists()
    assert [n for n in os.listdir(tmp_path) if n.startswith(".")] == []


def test_pack_src_is_not_a_directory(
    tmp_path: Path, keypair: KeyPair, capsys: pytest.CaptureFixture[str]
) -> None:
    (tmp_path / "file").write_bytes(b"")
    args = ["--key", str(keypair.private_path), "--out", str(tmp_path / "o")]
    assert "not found" in refused(capsys, "pack", str(tmp_path / "file"), *args)
    assert "not found" in refused(capsys, "pack", str(tmp_path / "absent"), *args)


def test_pack_into_a_missing_directory(
    tmp_path: Path, keypair: KeyPair, capsys: pytest.CaptureFixture[str]
) -> None:
    out = tmp_path / "absent" / "p.forgepkg"
    line = refused(
        capsys, "pack", str(_src(tmp_path)), "--key", str(keypair.private_path), "--out", str(out)
    )
    assert "cannot write" in line


def test_verify_and_inspect_write_nothing(
    tmp_path: Path,
    keypair: KeyPair,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:
    out = tmp_path / "p.forgepkg"
    pack(capsys, _src(tmp_path), keypair, out)
    monkeypatch.chdir(tmp_path)
    before = snapshot(tmp_path)
    with record_writes() as writes:
        assert run(capsys, "verify", str(out), "--trust", str(keypair.public_path))[0] == 0
        assert run(capsys, "inspect", str(out))[0] == 0
        assert run(capsys, "inspect", "--json", str(out))[0] == 0
    assert writes == []
    assert snapshot(tmp_path) == before


# ------------------------------------------------------------- the CLI surface


def test_help_lists_every_architecture_command(capsys: pytest.CaptureFixture[str]) -> None:
    status, out, err = run(capsys, "--help")
    assert status == 0
    assert err == ""
    for command in ARCHITECTURE_COMMANDS:
        assert re.search(rf"^\s+{command}\s", out, re.MULTILINE), f"{command} missing from --help"


def test_help_via_python_dash_m() -> None:
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(REPO), env.get("PYTHONPATH")]))
    proc = subprocess.run(
        [sys.executable, "-m", "forgeone_isolate", "--help"],
        capture_output=True,
        text=True,
        env=env,
        timeout=60,
        check=False,
    )
    assert proc.returncode == 0
    assert proc.stderr == ""
    for command in ARCHITECTURE_COMMANDS:
        assert command in proc.stdout


def test_every_architecture_command_is_built(capsys: pytest.CaptureFixture[str]) -> None:
    # Commands not built yet would be listed in cli.NOT_BUILT and exit 2 saying so.
    assert not set(cli.NOT_BUILT) & set(ARCHITECTURE_COMMANDS), cli.NOT_BUILT
    for command in ARCHITECTURE_COMMANDS:
        assert command in cli.COMMANDS, command


def test_not_built_commands_say_so_in_help(capsys: pytest.CaptureFixture[str]) -> None:
    flat = " ".join(run(capsys, "--help")[1].split())  # argparse wraps long lines
    for command, text in cli.NOT_BUILT.items():
        assert f"{command} {text} (not built yet)" in flat


@pytest.mark.parametrize(
    ("argv", "expect"),
    [
        ([], "a command is required"),
        (["frobnicate"], "invalid choice"),
        (["verify"], "required"),
        (["verify", "p.forgepkg"], "--trust"),
        (["pack", "src"], "required"),
        (["keygen"], "--out"),
        (["inspect", "a", "b"], "unrecognized arguments"),
        (["verify", "p", "--trust", "t", "--bogus"], "unrecognized arguments"),
    ],
)
def test_usage_errors_are_one_line_exit_2(
    argv: list[str], expect: str, capsys: pytest.CaptureFixture[str]
) -> None:
    assert expect in refused(capsys, *argv)


@pytest.mark.parametrize("brk", ["\n", "\r", "\u2028", "\x85"])
def test_errors_stay_on_one_line_whatever_the_path(
    brk: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    weird = str(tmp_path / f"evil{brk}name")
    line = refused(capsys, "verify", weird, "--trust", weird)
    assert "evil" in line
    assert "name" in line
