"""Fuzz the daemon through its real socket: random well-typed requests for every op, with
values picked to hit edges. The daemon must answer every one with a Win32 code (never an
internal error), keep serving, and keep its invariants."""

import random

import pytest

from shmheap.errors import ShmheapError, WinError
from shmheap.protocol import OPS, _list_u32, _list_u64, _map, _opt_str, _str, _u32, _u64

EDGES = [0, 1, 15, 16, 4095, 4096, 0x10000, 0x10001, 0xFE000, 0xFE001, 2**31, 2**32 - 1,
         2**32, 2**40, 2**62, 2**63, 2**64 - 1]
SKIP = {"hello", "shutdown"}  # re-greeting and stopping are tested elsewhere
# Answered only when something happens (a change, a render): fuzzed below, each on a
# connection of its own with a deadline, not in a batch that waits for every reply.
WAITING = {"clipboard_wait", "clipboard_listen", "clipboard_get"}


def value_for(check, rng, addresses):
    if check in (_u64, _u32):
        pool = EDGES + addresses + [a + rng.choice([8, 16, 4096]) for a in addresses]
        value = rng.choice(pool) if rng.random() < 0.8 else rng.randrange(2**rng.choice([8, 16, 28, 40]))
        return value & (0xFFFFFFFF if check is _u32 else 2**64 - 1)
    if check in (_str, _opt_str):
        return rng.choice(["", "x", "name", "ü" * 10, "a" * 300] + ([None] if check is _opt_str else []))
    if check is _list_u32:
        return [rng.choice(EDGES[:12]) for _ in range(rng.randint(0, 20))]
    if check is _list_u64:
        return [rng.choice(EDGES[:8]) for _ in range(rng.randint(0, 20))]
    if check is _map:
        return {}
    return rng.choice([0, "s", None, [1, 2], {"k": 1}])


@pytest.mark.parametrize("seed", [11, 12, 13, 14])
def test_random_requests_never_break_the_daemon(client, seed):
    rng = random.Random(seed)
    ops = sorted(op for op in OPS if op not in SKIP | WAITING)
    addresses = []
    internal = []
    for _ in range(60):
        batch = []
        for _ in range(50):
            op = rng.choice(ops)
            batch.append((op, tuple(value_for(check, rng, addresses) for check in OPS[op])))
        for (op, args), result in zip(batch, client.connection.call_many(batch, return_exceptions=True)):
            if isinstance(result, ShmheapError):
                if result.winerror == WinError.ERROR_GEN_FAILURE:
                    internal.append((op, args, str(result)))
            elif isinstance(result, int) and result > 0xFFFF:
                addresses.append(result)  # feed live addresses and handles back in
            elif isinstance(result, list) and result and isinstance(result[0], int):
                addresses.append(result[0])
        addresses = addresses[-50:]
    assert internal == [], internal[:5]
    assert client.echo("alive") == "alive"
    client.check()


@pytest.mark.parametrize("seed", [21, 22])
def test_requests_that_wait_never_break_the_daemon(client, seed):
    """The clipboard's waiting requests with random arguments, mixed with promises and
    renders: each is answered or times out cleanly, and the daemon keeps serving."""
    rng = random.Random(seed)
    internal = []
    for _ in range(40):
        op = rng.choice(sorted(WAITING | {"clipboard_set", "clipboard_open", "clipboard_close", "clipboard_empty"}))
        args = tuple(value_for(check, rng, []) for check in OPS[op])
        try:
            if op in WAITING:
                client._call_waiting(op, *args, timeout=0.05)
            else:
                client.connection.call(op, *args)
        except ShmheapError as exc:
            if exc.winerror == WinError.ERROR_GEN_FAILURE:
                internal.append((op, args, str(exc)))
    assert internal == [], internal[:5]
    assert client.echo("alive") == "alive"
    client.check()
