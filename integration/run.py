#!/usr/bin/env python3
"""Run the guest suite on a pure cgroup-v2 Linux kernel, under qemu (TCG), and report.

    python3 integration/run.py [--rebuild] [--build-only] [--timeout S] [-- PYTEST ARGS]

1. Makes sure the host has what the build needs (apt: qemu, debootstrap, busybox-static,
   libcap-dev for python-prctl, ...). Needs root.
2. Builds (or reuses) a cached image outside the clone, in
   ``$FORGEONE_INTEGRATION_CACHE`` (default ``/var/cache/forgeone-integration``)
   ``/<sha256 of the inputs>/``: Debian 12's kernel as an uncompressed ``vmlinux`` (direct
   PVH boot), a small initramfs (busybox + virtio/ext4/9p modules), and an ext4 root
   file system made by debootstrap with the project's dependencies installed as wheels
   (the guest has no network). The inputs are this script, ``guest-init.sh`` and the
   dependency lists of ``pyproject.toml``; an image is rebuilt when missing. The build
   happens in a temporary directory renamed into place when complete.
3. Boots it: ``-accel tcg`` (KVM cannot run stock kernels on these machines), the kernel
   booted with ``cgroup_no_v1=all``, the disk as a throw-away snapshot, the clone shared
   read-only over 9p (tag ``src``) and a fresh results directory shared writable (tag
   ``hostshare``). The serial console streams to stdout. A hard timeout
   (``--timeout`` / ``$FORGEONE_INTEGRATION_TIMEOUT``, default 20 minutes) kills qemu.
4. The guest's init (``guest-init.sh``) mounts cgroup2 with nsdelegate, copies the source
   to a tmpfs, runs ``python3 -m pytest -q ARGS`` (default ARGS: ``integration/guest``)
   with ``FORGEONE_MUST_ISOLATE=1``, and writes the exit status and log to the share.
5. Exits with the guest command's exit status (124 on timeout, 125 when the guest
   failed before or around the command).
"""

from __future__ import annotations

import argparse
import contextlib
import fcntl
import gzip
import hashlib
import json
import lzma
import os
import re
import shlex
import shutil
import signal
import struct
import subprocess
import sys
import sysconfig
import tempfile
import time
import tomllib
import zlib
from collections.abc import Iterator, Sequence
from pathlib import Path
from types import FrameType

HERE = Path(__file__).resolve().parent
REPO = HERE.parent
GUEST_INIT = HERE / "guest-init.sh"
PYPROJECT = REPO / "pyproject.toml"

DEFAULT_CACHE = Path("/var/cache/forgeone-integration")
DEFAULT_TIMEOUT_S = 20 * 60
SUITE = "bookworm"
GUEST_PYTHON = "3.11"  # bookworm's; wheels (python-prctl's among them) are built here for it
PIP = (sys.executable, "-m", "pip", "--disable-pip-version-check", "--no-input")
FALLBACK_MIRROR = "http://deb.debian.org/debian"

# The guest suite by default. Arguments after `--` replace these (they go to pytest).
DEFAULT_PYTEST_ARGS = ("integration/guest",)

HOST_PACKAGES = (
    "qemu-system-x86",
    "qemu-utils",
    "debootstrap",
    "busybox-static",
    "e2fsprogs",  # mkfs.ext4 -d
    "libcap-dev",  # python-prctl is built from source against it
    "gcc",
    "debian-archive-keyring",
)
GUEST_PACKAGES = (
    "python3",
    "libseccomp2",
    "libcap2",
    "libcap2-bin",
    "iproute2",
    "kmod",
    "procps",
    "util-linux",
)
# Development tools of the dev extra that have no business in the guest.
HOST_ONLY_REQUIREMENTS = frozenset({"ruff", "mypy"})
# Loaded by the initramfs (with their dependencies, from modules.dep) to reach the disk
# and the 9p shares.
INITRAMFS_MODULES = (
    "virtio_pci",
    "virtio_blk",
    "virtio_console",
    "crc32c_generic",
    "ext4",
    "9pnet_virtio",
    "9p",
)
# Parts of the kernel's module tree copied into the root file system (modprobe works
# there: veth, sch_tbf, sch_htb, virtio_net, ...); sound, GPUs, wireless etc. stay out.
ROOTFS_MODULE_TREES = (
    "kernel/arch",
    "kernel/block",
    "kernel/crypto",
    "kernel/fs",
    "kernel/lib",
    "kernel/mm",
    "kernel/net",
    "kernel/virt",
    "kernel/drivers/block",
    "kernel/drivers/char",
    "kernel/drivers/net",
    "kernel/drivers/virtio",
)
ROOTFS_MODULE_SKIP = ("kernel/drivers/net/wireless", "kernel/drivers/net/ethernet")

KERNEL_CMDLINE = (
    "console=ttyS0 root=/dev/vda rw cgroup_no_v1=all panic=-1 quiet loglevel=3 "
    "mitigations=off no_timer_check 8250.nr_uarts=1 random.trust_cpu=on"
)

INITRAMFS_INIT = """#!/bin/busybox sh
# forgeone integration initramfs: load the modules, mount the disk, hand over to its init.
bb=/bin/busybox
$bb mount -t devtmpfs devtmpfs /dev
$bb mount -t proc proc /proc
die() { echo "initramfs: $*"; echo o > /proc/sysrq-trigger; $bb sleep 10; }
for m in $($bb cat /modules.load); do
    $bb insmod "/lib/modules/$m" || echo "initramfs: insmod $m failed"
done
i=0
while [ ! -b /dev/vda ] && [ $i -lt 200 ]; do $bb usleep 50000; i=$((i + 1)); done
$bb mount -t ext4 -o rw /dev/vda /newroot || die "cannot mount /dev/vda"
$bb umount /proc
$bb mount --move /dev /newroot/dev || die "cannot move /dev"
exec $bb switch_root /newroot /sbin/forgeone-init
"""


# --------------------------------------------------------------------------- utilities


def say(message: str) -> None:
    print(f"integration: {message}", file=sys.stderr, flush=True)


class RunError(Exception):
    """A step of the runner failed; the message names it."""


def run(
    argv: Sequence[str | os.PathLike[str]],
    *,
    quiet: bool = False,
    env: dict[str, str] | None = None,
    cwd: Path | None = None,
) -> str:
    """Run a command; with quiet, its output is kept and shown only when it fails."""
    cmd = [os.fspath(a) for a in argv]
    proc = subprocess.run(
        cmd,
        check=False,
        env=env,
        cwd=cwd,
        stdout=subprocess.PIPE if quiet else None,
        stderr=subprocess.STDOUT if quiet else None,
        text=True,
        errors="replace",
    )
    if proc.returncode != 0:
        sys.stderr.write((proc.stdout or "")[-8000:])
        raise RunError(f"{shlex.join(cmd)} exited with status {proc.returncode}")
    return proc.stdout or ""


@contextlib.contextmanager
def step(name: str, timings: dict[str, float]) -> Iterator[None]:
    say(f"{name} ...")
    start = time.monotonic()
    yield
    timings[name] = round(time.monotonic() - start, 1)
    say(f"{name}: done in {timings[name]:.1f} s")


def env_number(name: str, default: float) -> float:
    raw = os.environ.get(name, "").strip()
    if not raw:
        return default
    try:
        return float(raw)
    except ValueError:
        raise RunError(f"{name}={raw!r} is not a number") from None


# ------------------------------------------------------------------- host preparation


def dpkg_installed(package: str) -> bool:
    proc = subprocess.run(
        ["dpkg-query", "-W", "-f=${Status}", package],
        check=False,
        capture_output=True,
        text=True,
    )
    return proc.returncode == 0 and "install ok installed" in proc.stdout


def apt_env() -> dict[str, str]:
    return {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}


def ensure_host_packages() -> None:
    wanted = list(HOST_PACKAGES)
    if not Path(sysconfig.get_paths()["include"], "Python.h").exists():
        wanted.append("python3-dev")  # only a system interpreter lacks its headers
    missing = [p for p in wanted if not dpkg_installed(p)]
    if not missing:
        return
    say(f"installing host packages: {' '.join(missing)}")
    run(["apt-get", "update", "-qq"], quiet=True, env=apt_env())
    run(
        ["apt-get", "install", "-y", "-qq", "--no-install-recommends", *missing],
        quiet=True,
        env=apt_env(),
    )


def apt_mirror() -> str:
    """The Debian mirror this host's apt uses for bookworm (only registries are reachable)."""
    override = os.environ.get("FORGEONE_INTEGRATION_MIRROR")
    if override:
        return override
    candidates: list[Path] = [Path("/etc/apt/sources.list")]
    sources_d = Path("/etc/apt/sources.list.d")
    if sources_d.is_dir():
        candidates += sorted(sources_d.iterdir())
    for path in candidates:
        if not path.is_file():
            continue
        text = path.read_text(errors="replace")
        if path.suffix == ".sources":
            for stanza in re.split(r"\n\s*\n", text):
                fields: dict[str, str] = {}
                for line in stanza.splitlines():
                    if ":" in line and not line.lstrip().startswith("#"):
                        key, _, value = line.partition(":")
                        fields[key.strip().lower()] = value.strip()
                if (
                    "deb" in fields.get("types", "").split()
                    and SUITE in fields.get("suites", "").split()
                    and "main" in fields.get("components", "").split()
                    and fields.get("uris")
                ):
                    return fields["uris"].split()[0]
        else:
            for line in text.splitlines():
                words = re.sub(r"\[[^]]*\]", "", line).split()
                if len(words) >= 4 and words[0] == "deb" and words[2] == SUITE:
                    return words[1]
    return FALLBACK_MIRROR


# -------------------------------------------------------------------------- the inputs


def guest_requirements() -> list[str]:
    """The project's dependencies and its dev extra (pytest, hypothesis), minus host tools."""
    project = tomllib.loads(PYPROJECT.read_text())["project"]
    reqs = list(project.get("dependencies", []))
    reqs += list(project.get("optional-dependencies", {}).get("dev", []))
    keep = []
    for req in reqs:
        name = re.split(r"[\s<>=!~;\[(]", req, maxsplit=1)[0].lower().replace("_", "-")
        if name not in HOST_ONLY_REQUIREMENTS:
            keep.append(req)
    return keep


def input_hash(requirements: Sequence[str]) -> str:
    digest = hashlib.sha256()
    for path in (Path(__file__).resolve(), GUEST_INIT):
        digest.update(path.name.encode() + b"\0" + path.read_bytes() + b"\0")
    digest.update(json.dumps(list(requirements)).encode())
    return digest.hexdigest()


# ----------------------------------------------------------------------- the kernel


def kernel_package() -> str:
    """The versioned kernel package that Debian's linux-image-amd64 currently points at."""
    for attempt in range(2):
        proc = subprocess.run(
            ["apt-cache", "depends", "linux-image-amd64"],
            check=False,
            capture_output=True,
            text=True,
        )
        match = re.search(r"Depends:\s*(linux-image-6\.1\.0-[0-9]+-amd64)\b", proc.stdout)
        if match:
            return match.group(1)
        if attempt == 0:
            run(["apt-get", "update", "-qq"], quiet=True, env=apt_env())
    raise RunError("apt-cache knows no linux-image-6.1.0-*-amd64 (is bookworm in sources?)")


def apt_download(package: str, into: Path) -> Path:
    into.mkdir(parents=True, exist_ok=True)
    found = sorted(into.glob(f"{package}_*.deb"))
    if not found:
        run(
            ["apt-get", "download", "-q", "-o", "APT::Sandbox::User=root", package],
            quiet=True,
            cwd=into,
            env=apt_env(),
        )
        found = sorted(into.glob(f"{package}_*.deb"))
    if not found:
        raise RunError(f"apt-get download {package} left no .deb in {into}")
    return found[-1]


def extract_vmlinux(bzimage: bytes) -> bytes:
    """The uncompressed ELF kernel inside a bzImage (boot protocol >= 2.08 header)."""
    if bzimage[0x202:0x206] != b"HdrS":
        raise RunError("vmlinuz is not a bzImage")
    setup_sects = bzimage[0x1F1] or 4
    payload_offset, payload_length = struct.unpack_from("<II", bzimage, 0x248)
    start = (setup_sects + 1) * 512 + payload_offset
    payload = bzimage[start : start + payload_length]
    if payload.startswith(b"\xfd7zXZ\x00"):
        out = lzma.LZMADecompressor(format=lzma.FORMAT_XZ).decompress(payload)
    elif payload.startswith(b"\x5d\x00\x00"):
        out = lzma.LZMADecompressor(format=lzma.FORMAT_ALONE).decompress(payload)
    elif payload.startswith(b"\x1f\x8b"):
        out = zlib.decompressobj(16 + zlib.MAX_WBITS).decompress(payload)
    else:
        raise RunError(f"unsupported kernel compression (magic {payload[:6].hex()})")
    if not out.startswith(b"\x7fELF"):
        raise RunError("the decompressed kernel is not an ELF image")
    return out


# ----------------------------------------------------------------------- the initramfs


class Cpio:
    """A minimal writer of the kernel's initramfs format (SVR4 'newc', no checksums)."""

    def __init__(self) -> None:
        self.data = bytearray()
        self.inode = 0

    def _pad(self) -> None:
        self.data += b"\0" * (-len(self.data) % 4)

    def _entry(
        self, name: str, mode: int, body: bytes = b"", rdev: tuple[int, int] = (0, 0)
    ) -> None:
        self.inode += 1
        encoded = name.encode() + b"\0"
        fields = (
            self.inode,
            mode,
            0,  # uid
            0,  # gid
            2 if mode & 0o040000 else 1,
            0,  # mtime
            len(body),
            0,  # devmajor
            0,  # devminor
            rdev[0],
            rdev[1],
            len(encoded),
            0,  # check
        )
        self.data += b"070701" + b"".join(b"%08X" % v for v in fields) + encoded
        self._pad()
        self.data += body
        self._pad()

    def directory(self, name: str) -> None:
        self._entry(name, 0o040755)

    def file(self, name: str, body: bytes, perms: int = 0o644) -> None:
        self._entry(name, 0o100000 | perms, body)

    def char_device(self, name: str, major: int, minor: int) -> None:
        self._entry(name, 0o020600, rdev=(major, minor))

    def finish(self) -> bytes:
        self._entry("TRAILER!!!", 0)
        return bytes(self.data)


def module_name(path: str) -> str:
    base = path.rsplit("/", 1)[-1]
    base = re.sub(r"\.ko(\.xz|\.zst|\.gz)?$", "", base)
    return base.replace("-", "_")


def module_load_order(moddir: Path, wanted: Sequence[str]) -> list[str]:
    """Paths (relative to moddir) of the wanted modules and their dependencies, in load order."""
    deps: dict[str, list[str]] = {}
    paths: dict[str, str] = {}
    for line in (moddir / "modules.dep").read_text().splitlines():
        if ":" not in line:
            continue
        path, _, rest = line.partition(":")
        paths[module_name(path)] = path
        deps[path] = rest.split()
    builtin = {module_name(p) for p in (moddir / "modules.builtin").read_text().split()}
    order: list[str] = []

    def visit(path: str) -> None:
        if path in order:
            return
        for dep in deps.get(path, []):
            visit(dep)
        order.append(path)

    for name in wanted:
        if name in paths:
            visit(paths[name])
        elif name not in builtin:
            raise RunError(f"kernel module {name} is neither in modules.dep nor built in")
    return order


def module_bytes(path: Path) -> bytes:
    raw = path.read_bytes()
    if path.name.endswith(".xz"):
        return lzma.decompress(raw)
    if path.name.endswith(".gz"):
        return gzip.decompress(raw)
    if path.name.endswith(".zst"):
        raise RunError(f"zstd-compressed module {path.name} is not supported")
    return raw


def is_static_elf(binary: bytes) -> bool:
    """An ELF64 executable without a program interpreter (PT_INTERP)."""
    if not binary.startswith(b"\x7fELF\x02"):
        return False
    phoff = struct.unpack_from("<Q", binary, 0x20)[0]
    phentsize, phnum = struct.unpack_from("<HH", binary, 0x36)
    types = [struct.unpack_from("<I", binary, phoff + i * phentsize)[0] for i in range(phnum)]
    return 3 not in types


def build_initramfs(moddir: Path, busybox: Path) -> bytes:
    if not is_static_elf(busybox.read_bytes()):
        raise RunError(f"{busybox} is not statically linked (is busybox-static installed?)")
    order = module_load_order(moddir, INITRAMFS_MODULES)
    cpio = Cpio()
    for directory in ("bin", "dev", "proc", "sys", "newroot", "lib", "lib/modules"):
        cpio.directory(directory)
    cpio.char_device("dev/console", 5, 1)
    cpio.char_device("dev/null", 1, 3)
    cpio.file("bin/busybox", busybox.read_bytes(), 0o755)
    cpio.file("init", INITRAMFS_INIT.encode(), 0o755)
    names = []
    for rel in order:
        name = module_name(rel) + ".ko"
        cpio.file(f"lib/modules/{name}", module_bytes(moddir / rel))
        names.append(name)
    cpio.file("modules.load", ("\n".join(names) + "\n").encode())
    return cpio.finish()


# ------------------------------------------------------------------- the root file system


def own_mounts_under(root: Path) -> list[str]:
    """Mount points below root (debootstrap mounts proc/sys in its target), deepest first."""
    prefix = str(root.resolve()) + "/"
    points = []
    with open("/proc/self/mountinfo") as mountinfo:
        for line in mountinfo:
            point = line.split()[4].encode().decode("unicode_escape")
            if point.startswith(prefix):
                points.append(point)
    return sorted(points, key=len, reverse=True)


def remove_tree(path: Path) -> None:
    for point in own_mounts_under(path):
        subprocess.run(["umount", "-l", point], check=False)
    if path.exists():
        shutil.rmtree(path, ignore_errors=True)


def copy_module_trees(kernel_moddir: Path, rootfs_moddir: Path) -> None:
    for name in ("modules.builtin", "modules.builtin.modinfo", "modules.order"):
        if (kernel_moddir / name).exists():
            rootfs_moddir.mkdir(parents=True, exist_ok=True)
            shutil.copy2(kernel_moddir / name, rootfs_moddir / name)
    skip = tuple(str(kernel_moddir / s) for s in ROOTFS_MODULE_SKIP)
    for tree in ROOTFS_MODULE_TREES:
        source = kernel_moddir / tree
        if source.is_dir():
            shutil.copytree(
                source,
                rootfs_moddir / tree,
                ignore=lambda d, _names: _names if d.startswith(skip) else [],
            )


def manylinux_platforms() -> list[str]:
    # Bookworm's glibc is 2.36; pip does not widen an explicit --platform by itself.
    tags = [f"manylinux_2_{minor}_x86_64" for minor in range(36, 4, -1)]
    tags += ["manylinux2014_x86_64", "manylinux2010_x86_64", "manylinux1_x86_64"]
    tags.append("linux_x86_64")  # python-prctl, built here against bookworm's libcap
    return tags


def install_wheels(rootfs: Path, wheels: Path, requirements: Sequence[str]) -> None:
    if not (rootfs / f"usr/lib/python{GUEST_PYTHON}").is_dir():
        raise RunError(f"debootstrap left no python{GUEST_PYTHON} in the root file system")
    platforms = [arg for tag in manylinux_platforms() for arg in ("--platform", tag)]
    target = rootfs / f"usr/local/lib/python{GUEST_PYTHON}/dist-packages"
    run(
        [
            *PIP,
            "install",
            "-q",
            "--no-index",
            "--find-links",
            wheels,
            "--only-binary=:all:",
            "--python-version",
            GUEST_PYTHON,
            "--implementation",
            "cp",
            "--abi",
            f"cp{GUEST_PYTHON.replace('.', '')}",
            *platforms,
            "--target",
            target,
            *requirements,
        ],
        quiet=True,
    )


def debootstrap_command(rootfs: Path, debs: Path) -> list[str]:
    return [
        "debootstrap",
        "--variant=minbase",
        f"--include={','.join(GUEST_PACKAGES)}",
        f"--cache-dir={debs}",
        SUITE,
        str(rootfs),
        apt_mirror(),
    ]


def finish_rootfs(rootfs: Path) -> None:
    for sub in ("mnt/src", "mnt/host", "sys/fs/cgroup"):
        (rootfs / sub).mkdir(parents=True, exist_ok=True)
    init = rootfs / "sbin/forgeone-init"
    shutil.copy2(GUEST_INIT, init)
    init.chmod(0o755)
    (rootfs / "etc/hostname").write_text("forgeone-guest\n")
    (rootfs / "etc/hosts").write_text("127.0.0.1 localhost\n127.0.1.1 forgeone-guest\n")
    for cache in ("var/cache/apt/archives", "var/lib/apt/lists"):
        for entry in (rootfs / cache).glob("*"):
            if entry.is_file():
                entry.unlink()


def disk_usage(path: Path) -> int:
    out = run(["du", "-sxb", path], quiet=True)
    return int(out.split()[0])


def make_ext4(rootfs: Path, image: Path) -> None:
    # Room beyond the files for what the tests write (the disk is a snapshot at run time).
    size = disk_usage(rootfs) * 5 // 4 + (768 << 20)
    size -= size % (1 << 20)
    with open(image, "wb") as handle:
        handle.truncate(size)
    run(
        [
            "mkfs.ext4",
            "-q",
            "-F",
            "-L",
            "forgeone-root",
            "-E",
            "root_owner=0:0",
            "-d",
            rootfs,
            image,
        ],
        quiet=True,
    )


def build_image(out: Path, cache_root: Path, requirements: Sequence[str], key: str) -> None:
    timings: dict[str, float] = {}
    debs = cache_root / "debs"
    debs.mkdir(parents=True, exist_ok=True)
    rootfs = out / "rootfs"
    log_path = out / "debootstrap.log"
    started = time.monotonic()
    say(f"building the guest image in {out}")
    # debootstrap takes longest: it runs while the kernel and the wheels are prepared.
    with open(log_path, "wb") as log:
        deboot = subprocess.Popen(
            debootstrap_command(rootfs, debs),
            stdout=log,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
            env=apt_env(),
            start_new_session=True,  # its own process group: stopped whole on failure
        )
    try:
        with step("kernel (apt-get download, dpkg -x, vmlinux)", timings):
            package = kernel_package()
            deb = apt_download(package, debs)
            kernel_dir = out / "kernel"
            run(["dpkg-deb", "-x", deb, kernel_dir], quiet=True)
            (version,) = [p.name for p in (kernel_dir / "lib/modules").iterdir()]
            vmlinuz = kernel_dir / f"boot/vmlinuz-{version}"
            (out / "vmlinux").write_bytes(extract_vmlinux(vmlinuz.read_bytes()))
        with step("wheels (pip wheel)", timings):
            wheels = out / "wheels"
            run([*PIP, "wheel", "-q", "--wheel-dir", wheels, *requirements], quiet=True)
        with step("root file system (debootstrap)", timings):
            rc = deboot.wait()
            if rc != 0:
                sys.stderr.write(log_path.read_text(errors="replace")[-8000:])
                raise RunError(f"debootstrap exited with status {rc} (log: {log_path})")
    finally:
        if deboot.poll() is None:
            os.killpg(deboot.pid, signal.SIGKILL)
            deboot.wait()
    with step("root file system contents (modules, wheels, init)", timings):
        leftover_mounts = own_mounts_under(rootfs)
        if leftover_mounts:
            raise RunError(f"debootstrap left mounts behind: {leftover_mounts}")
        moddir = rootfs / f"lib/modules/{version}"
        copy_module_trees(kernel_dir / f"lib/modules/{version}", moddir)
        run(["chroot", rootfs, "/sbin/depmod", "-a", version], quiet=True)
        install_wheels(rootfs, wheels, requirements)
        finish_rootfs(rootfs)
    with step("initramfs", timings):
        (out / "initramfs.cpio").write_bytes(build_initramfs(moddir, Path("/bin/busybox")))
    with step("ext4 image", timings):
        make_ext4(rootfs, out / "root.img")
    for leftover in (rootfs, kernel_dir, wheels):
        remove_tree(leftover)
    timings["total"] = round(time.monotonic() - started, 1)
    manifest = {
        "key": key,
        "kernel_package": package,
        "kernel_version": version,
        "suite": SUITE,
        "guest_packages": list(GUEST_PACKAGES),
        "requirements": list(requirements),
        "built": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "timings_s": timings,
    }
    # Written last: an image directory with a manifest is complete.
    (out / "manifest.json").write_text(json.dumps(manifest, indent=2) + "\n")


@contextlib.contextmanager
def locked(path: Path) -> Iterator[None]:
    with open(path, "a+") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


def prune(cache_root: Path, keep: Path, spare: int = 2, max_age_s: float = 7 * 86400) -> None:
    """Remove images of other inputs but the `spare` most recently used (and none older than
    a week), and builds that died half-way."""
    now = time.time()
    images = []
    for entry in cache_root.iterdir():
        if entry == keep or not entry.is_dir():
            continue
        age = now - entry.stat().st_mtime
        if re.fullmatch(r"[0-9a-f]{64}", entry.name):
            images.append((age, entry))
        elif entry.name.startswith(".build-") and age > 6 * 3600:
            remove_tree(entry)
    images.sort()
    for rank, (age, entry) in enumerate(images):
        if rank >= spare or age > max_age_s:
            remove_tree(entry)


def ensure_image(cache_root: Path, requirements: Sequence[str], rebuild: bool) -> Path:
    key = input_hash(requirements)
    cache_root.mkdir(parents=True, exist_ok=True)
    target = cache_root / key
    with locked(cache_root / ".lock"):
        if (target / "manifest.json").is_file() and not rebuild:
            os.utime(target)
            say(f"cached image {target}")
            return target
        remove_tree(target)
        tmp = Path(tempfile.mkdtemp(prefix=f".build-{key[:12]}-", dir=cache_root))
        try:
            build_image(tmp, cache_root, requirements, key)
            tmp.chmod(0o755)
            tmp.rename(target)
        finally:
            remove_tree(tmp)
        prune(cache_root, keep=target)
    manifest = json.loads((target / "manifest.json").read_text())
    say(f"image built in {manifest['timings_s']['total']:.1f} s: {target}")
    return target


# ------------------------------------------------------------------------------- boot


def qemu_command(image: Path, results: Path) -> list[str]:
    return [
        "qemu-system-x86_64",
        "-accel",
        "tcg,thread=multi",
        "-cpu",
        "max",
        "-machine",
        "q35",
        "-m",
        "2048",
        "-smp",
        "2",
        "-nodefaults",
        "-display",
        "none",
        "-no-reboot",
        "-monitor",
        "none",
        "-serial",
        "stdio",
        "-kernel",
        str(image / "vmlinux"),
        "-initrd",
        str(image / "initramfs.cpio"),
        "-append",
        KERNEL_CMDLINE,
        "-drive",
        f"file={image / 'root.img'},if=virtio,format=raw,cache=unsafe,snapshot=on",
        "-virtfs",
        f"local,path={REPO},mount_tag=src,security_model=none,readonly=on",
        "-virtfs",
        f"local,path={results},mount_tag=hostshare,security_model=none",
        "-nic",
        "none",
    ]


class TerminatedError(Exception):
    """SIGTERM or SIGHUP reached the runner."""


def on_signal(signum: int, _frame: FrameType | None) -> None:
    raise TerminatedError(signal.Signals(signum).name)


def last_summary(log: str) -> str:
    lines = [line.strip() for line in log.splitlines() if line.strip()]
    for line in reversed(lines):
        if re.search(r"\b(passed|failed|error|errors|skipped|no tests ran)\b.* in [\d.]+s", line):
            return line
    return lines[-1] if lines else "(empty log)"


def boot(image: Path, guest_command: str, timeout_s: float) -> int:
    results = Path(tempfile.mkdtemp(prefix="forgeone-integration-"))
    try:
        (results / "cmd.sh").write_text(
            f"# written by integration/run.py; run by guest-init.sh in /tmp/src\n{guest_command}\n"
        )
        argv = qemu_command(image, results)
        say(f"booting (timeout {timeout_s:.0f} s): {shlex.join(argv)}")
        started = time.monotonic()
        # The serial console is qemu's stdout, which is ours: it streams as it comes.
        proc = subprocess.Popen(argv, stdin=subprocess.DEVNULL)
        try:
            proc.wait(timeout=timeout_s)
        except subprocess.TimeoutExpired:
            say(f"TIMEOUT: the guest ran past {timeout_s:.0f} s; killing qemu (pid {proc.pid})")
            return 124
        finally:
            if proc.poll() is None:
                proc.kill()
                proc.wait()
        elapsed = time.monotonic() - started
        rc_file = results / "rc"
        log_file = results / "guest.log"
        log = log_file.read_text(errors="replace") if log_file.exists() else ""
        if not rc_file.exists():
            say(
                f"FAILED: the guest wrote no exit status "
                f"(qemu exit {proc.returncode}, after {elapsed:.1f} s)"
            )
            return 125
        rc = int(rc_file.read_text().strip() or "125")
        say(f"guest command exited {rc}; boot+run {elapsed:.1f} s; {last_summary(log)}")
        return rc
    finally:
        shutil.rmtree(results, ignore_errors=True)


# ------------------------------------------------------------------------------- main


def parse_args(argv: Sequence[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="integration/run.py",
        description="Run the guest suite on a pure cgroup-v2 kernel under qemu.",
        epilog="Arguments after -- go to pytest in the guest (default: integration/guest).",
    )
    parser.add_argument("--rebuild", action="store_true", help="rebuild the cached image")
    parser.add_argument("--build-only", action="store_true", help="build the image, do not boot")
    parser.add_argument(
        "--timeout",
        type=float,
        default=None,
        help="seconds before qemu is killed (default $FORGEONE_INTEGRATION_TIMEOUT or 1200)",
    )
    parser.add_argument(
        "--shell",
        metavar="COMMAND",
        help="run this shell command in the guest instead of pytest",
    )
    parser.add_argument("pytest_args", nargs="*", help=argparse.SUPPRESS)
    return parser.parse_args(argv)


def main(argv: Sequence[str]) -> int:
    args = parse_args(argv)
    if os.geteuid() != 0:
        say("needs root (apt-get, debootstrap, mkfs.ext4 with root-owned files)")
        return 2
    host_py = f"{sys.version_info.major}.{sys.version_info.minor}"
    if host_py != GUEST_PYTHON:
        say(
            f"run this with Python {GUEST_PYTHON} (this is {host_py}): the guest's wheels, "
            "python-prctl's among them, are built by this interpreter for the guest's Python"
        )
        return 2
    signal.signal(signal.SIGTERM, on_signal)
    signal.signal(signal.SIGHUP, on_signal)
    started = time.monotonic()
    try:
        timeout_s = args.timeout or env_number("FORGEONE_INTEGRATION_TIMEOUT", DEFAULT_TIMEOUT_S)
        cache_root = Path(os.environ.get("FORGEONE_INTEGRATION_CACHE") or DEFAULT_CACHE)
        ensure_host_packages()
        image = ensure_image(cache_root, guest_requirements(), args.rebuild)
        if args.build_only:
            return 0
        if args.shell:
            command = args.shell
        else:
            pytest_args = args.pytest_args or list(DEFAULT_PYTEST_ARGS)
            command = shlex.join(["python3", "-m", "pytest", "-q", *pytest_args])
        rc = boot(image, command, timeout_s)
    except RunError as error:
        say(f"FAILED: {error}")
        return 125
    except TerminatedError as error:
        say(f"stopped by {error}")
        return 143
    say(f"exit {rc} after {time.monotonic() - started:.1f} s in all")
    return rc


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
