"""forgeone-isolate: a Linux-native isolation supervisor for WebAssembly plugins.

Glossary:

- **package** (``.forgepkg``): a signed tar.gz of ``manifest.json``, ``manifest.sig`` and
  the files the manifest lists; read in memory only (``package``).
- **signer**: an ed25519 key; its **fingerprint** is the sha256 of the raw public key
  (``signing``). The **trust store** lists the signers an operator accepts.
- **plan** (``SandboxPlan``): everything a launch will do, decided before anything runs
  (``plan``); ``launch --dry-run`` prints one.
- **keeper**: the first child; it unshares the namespaces, makes **PID 1** as the
  parent's own child (the parent reaps it) and exits; PID 1 builds the rest of the
  sandbox and runs the guest (``child``).
- **broker**: the parent's judge of every request the guest makes over the socketpair
  (``broker``, ``protocol``).
- **guest**: the plugin's WebAssembly module running in wasmtime (``guest``, ``wasm``).
- mechanism modules, one kernel mechanism each, no policy: ``ns``, ``mounts``, ``caps``,
  ``rlimits``, ``fds``, ``seccomp_filter``, ``cgroup``; all kernel calls of the child go
  through the ``kernel`` seam.
"""

from forgeone_isolate.errors import (
    BadInputError,
    BrokerProtocolError,
    IsolateError,
    ManifestError,
    PackageError,
    PluginTrap,
    PolicyError,
    SetupError,
    UsageError,
    VerificationError,
)

__version__ = "0.1.0"

__all__ = [
    "BadInputError",
    "BrokerProtocolError",
    "IsolateError",
    "ManifestError",
    "PackageError",
    "PluginTrap",
    "PolicyError",
    "SetupError",
    "UsageError",
    "VerificationError",
    "__version__",
]
