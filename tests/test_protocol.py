"""The sans-IO protocol: framing, bounds and request checking, with no sockets."""

import msgpack
import pytest

from shmheap.errors import ProtocolError, WinError
from shmheap.protocol import (MAX_FRAME, MAX_STR, Decoder, RequestError, encode_reply,
                              encode_request, parse_reply, parse_request)


def test_frames_split_anywhere_reassemble():
    payload = encode_request(1, "virtual_alloc", (0, 4096, 0x3000, 4)) + encode_request(2, "echo", ("x",))
    decoder = Decoder()
    frames = []
    for i in range(len(payload)):
        frames += decoder.feed(payload[i:i + 1])
    assert frames == [[1, "virtual_alloc", 0, 4096, 0x3000, 4], [2, "echo", "x"]]


def test_request_round_trip_checks_types():
    assert parse_request([7, "virtual_query", 65536]) == (7, "virtual_query", [65536])
    with pytest.raises(RequestError) as info:
        parse_request([7, "virtual_query", "65536"])
    assert info.value.msgid == 7 and info.value.code == WinError.ERROR_INVALID_PARAMETER
    with pytest.raises(RequestError) as info:
        parse_request([8, "virtual_query"])
    assert info.value.code == WinError.ERROR_INVALID_PARAMETER
    with pytest.raises(RequestError) as info:
        parse_request([9, "format_disk"])
    assert info.value.code == WinError.ERROR_INVALID_FUNCTION
    with pytest.raises(RequestError):
        parse_request([10, "virtual_query", -1])
    with pytest.raises(RequestError):
        parse_request([11, "virtual_query", True])  # bool is not an address


@pytest.mark.parametrize("frame", [{"op": 1}, [], ["1", "echo", 1], [-1, "echo", 1], 5, None])
def test_frames_without_msgid_break_the_protocol(frame):
    with pytest.raises(ProtocolError):
        parse_request(frame)


def test_oversized_frame_is_refused_before_buffering():
    decoder = Decoder()
    decoder.feed(b"\xc6" + (MAX_FRAME * 4).to_bytes(4, "big"))  # bin32 header announcing 4 MiB
    with pytest.raises(ProtocolError):
        for _ in range(2 * MAX_FRAME // 65536):  # the decoder gives up within 2 frames' worth
            decoder.feed(b"\0" * 65536)
    with pytest.raises(ProtocolError):
        Decoder().feed(msgpack.packb([1, "echo", "x" * (MAX_STR + 1)]))


def test_garbage_is_a_protocol_error():
    with pytest.raises(ProtocolError):
        Decoder().feed(b"\xc1" * 8)  # 0xc1 is never used by msgpack
    with pytest.raises(ProtocolError):
        Decoder().feed(b"\xa3\xff\xfe\xfd")  # a str that is not UTF-8


def test_reply_shape():
    frame = msgpack.unpackb(encode_reply(3, WinError.ERROR_INVALID_ADDRESS, "no region"))
    assert parse_reply(frame) == (3, 487, "no region", None)
    frame = msgpack.unpackb(encode_reply(4, 0, 1, [[0x10000, 0x1000, 3]]))
    assert parse_reply(frame) == (4, 0, 1, [[0x10000, 0x1000, 3]])
    for bad in ([[1, 2]], [[1, 2, 2]], "runs", [[-1, 2, 3]]):  # prot 2 (write only) is no access
        with pytest.raises(ProtocolError):
            parse_reply([5, 0, None, bad])
    with pytest.raises(ProtocolError):
        parse_reply([3, 0])
