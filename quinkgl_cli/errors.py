"""Exit codes and the one error type every layer raises.

The exit codes are a documented public interface (README, "Exit codes"): scripts branch on them.
"""

from __future__ import annotations

from enum import IntEnum


class ExitCode(IntEnum):
    OK = 0
    USAGE = 1  # bad flag, bad value, invalid file content
    IO = 2  # file missing, unreadable, unwritable
    CRYPTO = 3  # signature or key problem
    TRUST = 4  # manifest refused by the trust policy
    ARCH = 5  # architecture / hash mismatch
    NETWORK = 6  # network or wire-format failure
    NODE = 7  # peer script or node configuration
    NOT_REACHABLE = 8  # `quinkgl doctor`: peers met, but they cannot reach this node's ports (NAT, firewall)
    NO_PEERS = 9  # `quinkgl doctor`: no peer met within --timeout
    INTERRUPTED = 130


class QuinkglError(Exception):
    """An error with a one-line message, a hint on what to do, and the exit code to leave with."""

    code: ExitCode = ExitCode.USAGE

    def __init__(self, message: str, hint: str | None = None, code: ExitCode | None = None) -> None:
        super().__init__(message)
        self.message = message
        self.hint = hint
        if code is not None:
            self.code = code

    def one_line(self) -> str:
        text = self.message.replace("\n", " ")
        if self.hint:
            text += f" ({self.hint.replace(chr(10), ' ')})"
        return text


class UsageError(QuinkglError):
    code = ExitCode.USAGE


class IOFailure(QuinkglError):
    code = ExitCode.IO


class CryptoError(QuinkglError):
    code = ExitCode.CRYPTO


class TrustError(QuinkglError):
    code = ExitCode.TRUST


class ArchMismatch(QuinkglError):
    code = ExitCode.ARCH


class NetworkError(QuinkglError):
    code = ExitCode.NETWORK


class NodeConfigError(QuinkglError):
    code = ExitCode.NODE
