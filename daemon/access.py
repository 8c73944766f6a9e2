"""Who may use the daemon: its own user, and the users and groups it is told to let in.

Two gates, kept in agreement. The files (the socket, the segment, the socket's folder) stay
mode 0600/0700 and carry POSIX ACL entries for exactly the users and groups let in, so the
kernel itself refuses everyone else before a byte is read. The server then checks each peer's
credentials (SO_PEERCRED, and for groups the process's supplementary groups), so a file whose
mode someone widened by hand still lets in no one else. With nobody let in, no ACL is written
and the files are the owner's alone.

ACLs are written as the `system.posix_acl_access` extended attribute in the kernel's binary
form (linux/posix_acl_xattr.h): a version word, then (tag, permissions, id) entries in tag
order, with a mask entry bounding the named ones.
"""

import grp
import os
import stat
import struct

_ACL_XATTR = "system.posix_acl_access"
_ACL_VERSION = 2
_ENTRY = struct.Struct("<HHI")
_UNDEFINED_ID = 0xFFFFFFFF
# Entry tags, in the order the kernel requires them.
_USER_OBJ, _USER, _GROUP_OBJ, _GROUP, _MASK, _OTHER = 0x01, 0x02, 0x04, 0x08, 0x10, 0x20
READ_WRITE = 0o6  # the socket (connect needs write) and the segment (mapped read-write)
SEARCH = 0o1  # the socket's folder: reach the socket, list nothing


MAX_ID = 2**32 - 2  # uid_t and gid_t: (uid_t)-1 means "none"


def parse_id(text):
    """A uid or gid given as a number, ValueError unless it is one."""
    value = int(text)
    if not 0 <= value <= MAX_ID:
        raise ValueError(f"{text} is no user or group id (0..{MAX_ID})")
    return value


def parse_group(text):
    """A group given by name or number, as its gid; ValueError if there is no such group."""
    try:
        return parse_id(text) if text.isdigit() else grp.getgrnam(text).gr_gid
    except KeyError:
        raise ValueError(f"no group named {text!r}") from None


class Access:
    """The users (`uids`) and groups (`gids`) let in besides the daemon's own user."""

    def __init__(self, uids=(), gids=()):
        self.owner = os.getuid()
        self.uids = frozenset(uids) - {self.owner}
        self.gids = frozenset(gids)

    @property
    def shared(self):
        return bool(self.uids or self.gids)

    def admits(self, pid, uid, gid):
        """Whether the peer process `pid` (of `uid`, primary group `gid`) may connect."""
        if uid == self.owner or uid in self.uids:
            return True
        if not self.gids:
            return False
        return gid in self.gids or not self.gids.isdisjoint(_supplementary_groups(pid))

    def grant(self, path, permissions):
        """Give exactly the users and groups let in `permissions` on `path`, beside its owner's
        own bits; with nobody let in, any earlier daemon's grant is taken away. OSError
        (EOPNOTSUPP where the file system has no ACLs) if it cannot be done: sharing that
        silently fails is refused at startup."""
        # The owner's own bits; the group's and others' are nothing, whatever an earlier
        # grant left showing there (the mode's group bits show an ACL's mask).
        owner_bits = (stat.S_IMODE(os.stat(path).st_mode) >> 6) & 0o7
        if not self.shared:
            try:
                os.removexattr(path, _ACL_XATTR)
            except OSError:
                pass  # none there, or no ACLs on this file system: the mode alone rules
            os.chmod(path, owner_bits << 6)
            return
        entries = [(_USER_OBJ, owner_bits, _UNDEFINED_ID)]
        entries += [(_USER, permissions, uid) for uid in sorted(self.uids)]
        entries.append((_GROUP_OBJ, 0, _UNDEFINED_ID))
        entries += [(_GROUP, permissions, gid) for gid in sorted(self.gids)]
        entries.append((_MASK, permissions, _UNDEFINED_ID))
        entries.append((_OTHER, 0, _UNDEFINED_ID))
        acl = struct.pack("<I", _ACL_VERSION) + b"".join(_ENTRY.pack(*entry) for entry in entries)
        os.setxattr(path, _ACL_XATTR, acl)

    def describe(self):
        parts = [f"uid {uid}" for uid in sorted(self.uids)] + [f"gid {gid}" for gid in sorted(self.gids)]
        return ", ".join(parts) or "nobody else"


def _supplementary_groups(pid):
    """The groups of process `pid` from /proc (empty if it is gone: it is refused then)."""
    try:
        with open(f"/proc/{pid}/status") as status:
            for line in status:
                if line.startswith("Groups:"):
                    return {int(gid) for gid in line.split()[1:]}
    except OSError:
        pass
    return set()
