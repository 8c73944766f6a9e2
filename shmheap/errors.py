"""Win32 error codes and the one table that turns them into Python exceptions.

Every failure in shmheap is a Win32 error code: the daemon sends it in the reply, the Win32
facade stores it for `GetLastError()`, and the Pythonic API raises the exception class that
`error_class()` maps it to. Each class subclasses the builtin that fits (so `except MemoryError`
works) and carries the code as `.winerror`, like `OSError.winerror` on Windows.
"""

from enum import IntEnum


class WinError(IntEnum):
    """Win32 error codes, with Win32 values (winerror.h)."""

    ERROR_SUCCESS = 0
    ERROR_INVALID_FUNCTION = 1
    ERROR_FILE_NOT_FOUND = 2
    ERROR_PATH_NOT_FOUND = 3
    ERROR_TOO_MANY_OPEN_FILES = 4
    ERROR_ACCESS_DENIED = 5
    ERROR_INVALID_HANDLE = 6
    ERROR_NOT_ENOUGH_MEMORY = 8
    ERROR_INVALID_BLOCK = 9
    ERROR_OUTOFMEMORY = 14
    ERROR_BAD_LENGTH = 24
    ERROR_GEN_FAILURE = 31
    ERROR_SHARING_VIOLATION = 32
    ERROR_HANDLE_DISK_FULL = 39
    ERROR_NOT_SUPPORTED = 50
    ERROR_FILE_EXISTS = 80
    ERROR_INVALID_PARAMETER = 87
    ERROR_DISK_FULL = 112
    ERROR_INSUFFICIENT_BUFFER = 122
    ERROR_INVALID_NAME = 123
    ERROR_DISCARDED = 157
    ERROR_NOT_LOCKED = 158
    ERROR_BUSY = 170
    ERROR_ALREADY_EXISTS = 183
    ERROR_FILENAME_EXCED_RANGE = 206
    ERROR_MORE_DATA = 234
    ERROR_NO_MORE_ITEMS = 259
    ERROR_PARTIAL_COPY = 299
    ERROR_INVALID_ADDRESS = 487
    ERROR_IO_PENDING = 997
    ERROR_NOACCESS = 998
    ERROR_FILE_INVALID = 1006
    ERROR_MAPPED_ALIGNMENT = 1132
    ERROR_NOT_FOUND = 1168
    ERROR_INVALID_WINDOW_HANDLE = 1400
    ERROR_CLIPBOARD_NOT_OPEN = 1418
    ERROR_COMMITMENT_LIMIT = 1455
    ERROR_TIMEOUT = 1460
    # Not a Win32 error code: STATUS_GUARD_PAGE_VIOLATION, raised once by the first access to a
    # PAGE_GUARD page (the exception code Windows raises there).
    STATUS_GUARD_PAGE_VIOLATION = 0x80000001
    # Raised, not returned, by heaps with HEAP_GENERATE_EXCEPTIONS (HC-14).
    STATUS_NO_MEMORY = 0xC0000017
    STATUS_ACCESS_VIOLATION = 0xC0000005


globals().update(WinError.__members__)


class ShmheapError(Exception):
    """Base of every shmheap exception; `.winerror` is the Win32 code."""

    winerror = WinError.ERROR_GEN_FAILURE

    def __init__(self, winerror, message=None):
        self.winerror = _as_code(winerror)
        super().__init__(message or _describe(self.winerror))

    def __str__(self):
        return f"[WinError {int(self.winerror)}] {self.args[0]}"


class ShmheapMemoryError(ShmheapError, MemoryError):
    """Out of address space, commit or heap memory."""


class ShmheapPermissionError(ShmheapError, PermissionError):
    """Access refused: another owner's memory, wrong page protection, foreign uid."""


class ShmheapValueError(ShmheapError, ValueError):
    """An argument the call refuses: bad flags, address, size or handle."""


class ShmheapLookupError(ShmheapError, LookupError):
    """What was asked for is not there: a clipboard format nobody set, or one whose owner
    did not render it."""


class GuardPageError(ShmheapPermissionError):
    """First touch of a PAGE_GUARD page; the guard is cleared, a second touch succeeds."""


class ProtocolError(ShmheapError, ConnectionError):
    """The peer broke the wire protocol or went away (as opposed to misuse by the caller)."""


_ERROR_CLASSES = {
    WinError.ERROR_NOT_ENOUGH_MEMORY: ShmheapMemoryError,
    WinError.ERROR_OUTOFMEMORY: ShmheapMemoryError,
    WinError.ERROR_COMMITMENT_LIMIT: ShmheapMemoryError,
    WinError.STATUS_NO_MEMORY: ShmheapMemoryError,
    WinError.STATUS_ACCESS_VIOLATION: ShmheapPermissionError,
    WinError.ERROR_ACCESS_DENIED: ShmheapPermissionError,
    WinError.ERROR_NOACCESS: ShmheapPermissionError,
    WinError.STATUS_GUARD_PAGE_VIOLATION: GuardPageError,
    WinError.ERROR_INVALID_PARAMETER: ShmheapValueError,
    WinError.ERROR_INVALID_ADDRESS: ShmheapValueError,
    WinError.ERROR_INVALID_HANDLE: ShmheapValueError,
    WinError.ERROR_INVALID_BLOCK: ShmheapValueError,
    WinError.ERROR_BAD_LENGTH: ShmheapValueError,
    WinError.ERROR_INVALID_FUNCTION: ShmheapValueError,
    WinError.ERROR_ALREADY_EXISTS: ShmheapValueError,
    WinError.ERROR_NOT_LOCKED: ShmheapValueError,
    WinError.ERROR_DISCARDED: ShmheapValueError,
    WinError.ERROR_FILE_NOT_FOUND: ShmheapValueError,
    WinError.ERROR_PATH_NOT_FOUND: ShmheapValueError,
    WinError.ERROR_FILE_EXISTS: ShmheapValueError,
    WinError.ERROR_FILE_INVALID: ShmheapValueError,
    WinError.ERROR_FILENAME_EXCED_RANGE: ShmheapValueError,
    WinError.ERROR_SHARING_VIOLATION: ShmheapPermissionError,
    WinError.ERROR_BUSY: ShmheapPermissionError,
    WinError.ERROR_DISK_FULL: ShmheapMemoryError,
    WinError.ERROR_HANDLE_DISK_FULL: ShmheapMemoryError,
    WinError.ERROR_TOO_MANY_OPEN_FILES: ShmheapMemoryError,
    WinError.ERROR_MAPPED_ALIGNMENT: ShmheapValueError,
    WinError.ERROR_INVALID_NAME: ShmheapValueError,
    WinError.ERROR_INVALID_WINDOW_HANDLE: ShmheapValueError,
    WinError.ERROR_NOT_FOUND: ShmheapLookupError,
    WinError.ERROR_CLIPBOARD_NOT_OPEN: ShmheapPermissionError,
}


def _as_code(code):
    try:
        return WinError(code)
    except ValueError:
        return int(code)


def _describe(code):
    return code.name if isinstance(code, WinError) else f"Win32 error {code}"


def error_class(code):
    """The exception class for a Win32 error code."""
    return _ERROR_CLASSES.get(code, ShmheapError)


def error_for(code, message=None):
    """The exception (not raised) for a Win32 error code."""
    return error_class(code)(code, message)


def raise_for(code, message=None):
    raise error_for(code, message)
