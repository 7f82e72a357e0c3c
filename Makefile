# The two commands of the README: `make demo` and `make test`. Both set up first.
SHELL := /bin/bash
VENV := .venv
PY := $(VENV)/bin/python
DEMO := .demo

.PHONY: setup demo test lint typecheck unit native integration bench clean

setup:
	@bash scripts/setup.sh

native: setup
	@$(MAKE) -s -C native

# keygen (first run only), pack, verify, inspect, then launch the sample isolated.
demo: setup native
	@mkdir -p $(DEMO)
	@test -f $(DEMO)/keys/signer.key || $(PY) -m forgeone_isolate keygen --out $(DEMO)/keys
	$(PY) -m forgeone_isolate pack examples/hello --key $(DEMO)/keys/signer.key --out $(DEMO)/hello.forgepkg
	$(PY) -m forgeone_isolate pack native/build/sample --key $(DEMO)/keys/signer.key --out $(DEMO)/csample.forgepkg
	$(PY) -m forgeone_isolate verify $(DEMO)/hello.forgepkg --trust $(DEMO)/keys/signer.pub
	$(PY) -m forgeone_isolate verify $(DEMO)/csample.forgepkg --trust $(DEMO)/keys/signer.pub
	$(PY) -m forgeone_isolate inspect $(DEMO)/hello.forgepkg
	$(PY) -m forgeone_isolate doctor
	$(PY) -m forgeone_isolate launch $(DEMO)/hello.forgepkg --trust $(DEMO)/keys/signer.pub --state-dir $(DEMO)/state
	$(PY) -m forgeone_isolate launch $(DEMO)/csample.forgepkg --trust $(DEMO)/keys/signer.pub --state-dir $(DEMO)/state --json

lint: setup
	$(VENV)/bin/ruff check forgeone_isolate tests bench integration
	$(VENV)/bin/ruff format --check forgeone_isolate tests bench integration

typecheck: setup
	$(VENV)/bin/mypy

unit: setup native
	$(VENV)/bin/pytest -q

test: lint typecheck unit

# The guest-kernel stage: a pure cgroup-v2 Debian kernel under qemu (TCG) runs the guest
# smoke suite and the host tests that exercise isolation and limits, on the v2 code path.
# --basetemp: the guest's /tmp is a tmpfs; io.max needs test files on the (virtio) disk.
# (The broker suite stays on the host: its flood tests measure throughput, which emulation
# does not have; the broker is the same code on v1 and v2.)
GUEST_TESTS := integration/guest tests/test_launch.py tests/test_death.py tests/test_cgroup.py \
	tests/test_limits.py tests/test_lifecycle.py

integration: setup
	$(PY) integration/run.py -- -p no:cacheprovider -rfEs --basetemp=/var/tmp/forgeone-pytest $(GUEST_TESTS)

bench: setup native
	$(PY) bench/launch.py

clean:
	rm -rf $(DEMO) native/build build *.egg-info
