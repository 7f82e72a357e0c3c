#!/bin/bash
# PID 1 of the integration guest (no systemd). The initramfs has loaded the virtio, ext4
# and 9p modules, mounted the (snapshot) disk and switched root to it; this script sets
# up a pure cgroup-v2 system, runs the command integration/run.py left in the results
# share, writes its exit status and log there, and powers the machine off.
#
# Shares (see integration/run.py): `src` = the project's clone, read-only;
# `hostshare` = a fresh writable directory on the host holding cmd.sh, and receiving
# guest.log and rc.
set -u
export PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin
export HOME=/root LANG=C.UTF-8 TERM=dumb

say() {
    local up=""
    [ -r /proc/uptime ] && up=" $(cut -d' ' -f1 /proc/uptime)s"
    echo "guest-init${up}: $*"
}

poweroff_now() {
    sync
    echo o >/proc/sysrq-trigger
    sleep 10 2>/dev/null
    exit 1 # PID 1 exiting panics the kernel; panic=-1 then ends qemu (-no-reboot)
}

fail() {
    say "FATAL: $*"
    [ -d /mnt/host ] && mountpoint -q /mnt/host && echo 125 >/mnt/host/rc
    poweroff_now
}

mountpoint -q /proc || mount -t proc -o nosuid,nodev,noexec proc /proc || fail "mount /proc"
mountpoint -q /sys || mount -t sysfs -o nosuid,nodev,noexec sysfs /sys || fail "mount /sys"
mountpoint -q /dev || mount -t devtmpfs devtmpfs /dev || fail "mount /dev"
mkdir -p /dev/pts /dev/shm
mount -t devpts -o newinstance,ptmxmode=0666,mode=0620 devpts /dev/pts || fail "mount devpts"
ln -sf pts/ptmx /dev/ptmx
mount -t tmpfs -o nosuid,nodev,mode=1777 tmpfs /dev/shm || fail "mount /dev/shm"
mount -t tmpfs -o nosuid,nodev,mode=1777 tmpfs /tmp || fail "mount /tmp"
mount -t tmpfs -o nosuid,nodev,mode=0755 tmpfs /run || fail "mount /run"
# The whole point: the unified hierarchy only (cgroup_no_v1=all on the command line),
# with namespace delegation as a systemd host would mount it.
mount -t cgroup2 -o nosuid,nodev,noexec,nsdelegate cgroup2 /sys/fs/cgroup || fail "mount cgroup2"
mkdir -p /mnt/src /mnt/host
mount -t 9p -o trans=virtio,version=9p2000.L,msize=262144,ro src /mnt/src || fail "mount 9p src"
mount -t 9p -o trans=virtio,version=9p2000.L,msize=262144 hostshare /mnt/host ||
    fail "mount 9p hostshare"

say "mounted; copying the source"
hostname forgeone-guest
ip link set lo up || say "warning: lo not up"

# A writable copy of the clone (pytest and hypothesis write caches; tests may build
# files beside the sources). Host-only artefacts stay behind.
mkdir -p /tmp/src
tar -C /mnt/src -cf - \
    --exclude=./.git --exclude=./.venv --exclude=./.demo --exclude='*.egg-info' \
    --exclude=__pycache__ --exclude=.mypy_cache --exclude=.ruff_cache \
    --exclude=.pytest_cache --exclude=.hypothesis --exclude=./build . |
    tar -C /tmp/src -xf - || fail "copy the source to /tmp/src"

[ -r /mnt/host/cmd.sh ] || fail "no cmd.sh in the results share"

cd /tmp/src || fail "cd /tmp/src"
export PYTHONPATH=/tmp/src
export FORGEONE_MUST_ISOLATE=1 # inside the guest a missing isolation feature is a failure
export FORGEONE_GUEST=1
export FORGEONE_TIME_SCALE=8 # TCG runs Python 5-13x slower: test bounds (never speeds) scale
say "kernel $(uname -r); cgroup2 controllers: $(cat /sys/fs/cgroup/cgroup.controllers)"
say "running: $(tail -n 1 /mnt/host/cmd.sh)"

# The log goes to the share and (through init's stdout, the serial console) to run.py.
bash /mnt/host/cmd.sh </dev/null 2>&1 | tee /mnt/host/guest.log
rc=${PIPESTATUS[0]}
say "command exited with status $rc"
echo "$rc" >/mnt/host/rc
sync
umount /mnt/host 2>/dev/null
poweroff_now
