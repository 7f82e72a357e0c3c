"""The one exception tree of forgeone-isolate.

Every error the supervisor raises on purpose derives from :class:`IsolateError`. The CLI
maps each to an exit status (``exit_status``) and prints ``str(error)`` as one line; no
traceback reaches an operator.

Exit statuses (see ARCHITECTURE.md): 0 ok; 1 the plugin failed or was killed, or the host
could not build the sandbox; 2 bad input (package, signature, manifest, policy, arguments).
"""

from __future__ import annotations

import errno as _errno
import os

EXIT_OK = 0
EXIT_PLUGIN_FAILED = 1
EXIT_BAD_INPUT = 2


class IsolateError(Exception):
    """Root of every error forgeone-isolate raises deliberately."""

    exit_status: int = EXIT_PLUGIN_FAILED


class BadInputError(IsolateError):
    """Input from outside (a package, a manifest, a policy, an argument) is unacceptable."""

    exit_status = EXIT_BAD_INPUT


class UsageError(BadInputError):
    """Raised when a command-line argument or option is wrong, or a command is not built."""


class PackageError(BadInputError):
    """Raised when a .forgepkg cannot be read safely (archive structure, bounds, members)."""


class VerificationError(BadInputError):
    """Raised when a package fails attestation: signature, signer, revocation, hashes, ABI."""


class ManifestError(BadInputError):
    """Raised when manifest.json is malformed or violates the schema."""


class PolicyError(BadInputError):
    """Raised when an operator policy or config file is malformed; names the line and key."""


class KeyFileError(BadInputError):
    """Raised when a key file or trust store cannot be read or parsed."""


class SetupError(IsolateError):
    """Raised when one step of building the sandbox fails; names the step and errno."""

    def __init__(self, step: str, err: int, message: str = "") -> None:
        self.step = step
        self.errno = err
        self.message = message
        name = _errno.errorcode.get(err, str(err)) if err else ""
        detail = f"{name} ({os.strerror(err)})" if err else ""
        text = f"sandbox setup failed at step '{step}'"
        if detail:
            text += f": {detail}"
        if message:
            text += f": {message}"
        super().__init__(text)


class WireError(IsolateError):
    """What one of our processes sent another (a plan, say) is not what we write: a bug or
    a mismatch of versions, never the plugin's or the operator's input."""


class BrokerProtocolError(IsolateError):
    """Raised when a message from the child breaks the broker protocol."""


class PluginTrap(IsolateError):
    """Raised when the guest traps or a lifecycle export returns non-zero."""
