"""Target streams, piece by piece: the `want` bitmap, the agent's partial download log, and the
fleet's coalescing of block requests (end to end over real brokers: test_fleet_*.py)."""

from __future__ import annotations

import os
import threading
import time
from pathlib import Path

import pytest

from edgeops.agent.partial import PartialDownload, discard
from edgeops.fleet.streams import HOLD_S, Streams
from edgeops.protocol import wire
from edgeops.protocol.wire import MAX_BLOCK

TARGET = f"targets/{'ab' * 32}.digits-1.0.0-rpi4.edgeops"


@pytest.mark.parametrize("blocks", [[0], [0, 1, 2, 3, 4, 5, 6, 7, 8, 9], [7, 8], [3, 100, 4095]])
def test_want_bitmap_round_trips(blocks):
    request = wire.parse_fetch_request(wire.stream_request(9, TARGET, blocks))
    assert request["blocks"] == sorted(blocks) and request["req"] == 9


def test_want_bitmap_is_lsb_first():
    assert wire.decode(wire.stream_request(1, TARGET, range(10)), {})["want"] == "/wM="  # docs/protocol.md


@pytest.mark.parametrize("want, reason", [("!!", "base64"), ("", "no block"), ("AAA=", "no block"), (5, "base64")])
def test_malformed_want_is_refused(want, reason):
    with pytest.raises(wire.WireError, match=reason):
        wire.parse_fetch_request(wire.encode({"req": 1, "path": TARGET, "want": want}))


def test_only_targets_are_streamed():
    with pytest.raises(wire.WireError, match="only targets"):
        wire.parse_fetch_request(wire.stream_request(1, "metadata/timestamp.json", [0]))
    with pytest.raises(wire.WireError):
        wire.stream_topic("metadata/timestamp.json")


@pytest.mark.parametrize("payload", [
    wire.stream_block(TARGET, 100, 1000, b"x"),  # not at a block boundary
    wire.stream_block(TARGET, 0, 10, b"x" * 11),  # more data than the total
    wire.error_reply(1, TARGET, "not found"),  # errors go to the device's own topic
    b"no header line",
])
def test_malformed_stream_blocks_are_refused(payload):
    with pytest.raises(wire.WireError):
        wire.parse_stream_block(payload)


def test_telemetry_acks_round_trip_as_ranges():
    payload = wire.telemetry_ack([5, 3, 4, 9, 10, 12])
    assert wire.decode(payload, {}) == {"seqs": [[3, 5], [9, 10], [12, 12]]}
    assert wire.parse_telemetry_ack(payload) == [3, 4, 5, 9, 10, 12]


@pytest.mark.parametrize("seqs", [[[2, 1]], [[0, 3]], [[1]], [["1", 2]], [[1, 20_000]], "1-3"])
def test_malformed_telemetry_acks_are_refused(seqs):
    with pytest.raises(wire.WireError):
        wire.parse_telemetry_ack(wire.encode({"seqs": seqs}))


# ------------------------------------------------------------------------------------ partial downloads

def blocks_of(data: bytes) -> dict[int, bytes]:
    return {i // MAX_BLOCK: data[i : i + MAX_BLOCK] for i in range(0, len(data), MAX_BLOCK)}


def test_blocks_in_any_order_make_the_file(tmp_path):
    data = os.urandom(3 * MAX_BLOCK + 123)
    part = PartialDownload(tmp_path / "t.part", len(data))
    chunks = blocks_of(data)
    part.write({3: chunks[3], 1: chunks[1]})
    assert part.missing() == [0, 2]
    part.write({0: chunks[0], 2: chunks[2]})
    assert part.missing() == [] and part.finish().read_bytes() == data
    assert not (tmp_path / "t.have").exists()


def test_progress_survives_a_restart_and_reading_it_changes_nothing(tmp_path):
    data = os.urandom(4 * MAX_BLOCK)
    path = tmp_path / "t.part"
    PartialDownload(path, len(data)).write({2: blocks_of(data)[2], 0: blocks_of(data)[0]})
    log = path.with_suffix(".have").read_bytes()
    resumed = PartialDownload(path, len(data))
    assert resumed.have == {0, 2} and resumed.resumed == 2 and resumed.missing() == [1, 3]
    assert path.with_suffix(".have").read_bytes() == log


def test_a_torn_log_record_is_ignored_then_cut_off(tmp_path):
    data = os.urandom(3 * MAX_BLOCK)
    path = tmp_path / "t.part"
    PartialDownload(path, len(data)).write({0: blocks_of(data)[0]})
    with open(path.with_suffix(".have"), "ab") as fh:
        fh.write(b"\x01\x00")  # a crash in the middle of appending the record of block 1
    part = PartialDownload(path, len(data))
    assert part.have == {0}
    part.write({2: blocks_of(data)[2]})  # the next append stays aligned
    assert PartialDownload(path, len(data)).have == {0, 2}


def test_a_log_without_its_data_names_nothing(tmp_path):
    path = tmp_path / "t.part"
    PartialDownload(path, 2 * MAX_BLOCK).write({0: b"x" * MAX_BLOCK})
    path.unlink()  # e.g. its directory entry was lost in a power cut
    part = PartialDownload(path, 2 * MAX_BLOCK)
    assert part.have == set()
    part.write({1: b"y" * MAX_BLOCK})  # starts a fresh log
    assert PartialDownload(path, 2 * MAX_BLOCK).have == {1}
    discard(path)
    assert list(tmp_path.iterdir()) == []


# ------------------------------------------------------------------------------------- fleet coalescing

class Published:
    """What the stream sender published, in order; each publish is acknowledged at once."""

    def __init__(self):
        self.blocks: list[tuple[str, int]] = []
        self.times: list[float] = []

    def __call__(self, topic: str, payload: bytes):
        header, _ = wire.parse_stream_block(payload)
        assert topic == wire.stream_topic(header["path"])
        self.blocks.append((header["path"], header["offset"] // MAX_BLOCK))
        self.times.append(time.monotonic())
        return self

    def wait_for_publish(self, timeout: float) -> None:
        pass


@pytest.fixture
def streams():
    files = {TARGET: os.urandom(5 * MAX_BLOCK), f"targets/{'cd' * 32}.other.edgeops": os.urandom(2 * MAX_BLOCK)}

    def read(path: str) -> bytes:
        if path not in files:
            raise FileNotFoundError(path)
        return files[path]

    published = Published()
    stop = threading.Event()
    yield Streams(read, published), published, files, stop
    stop.set()


def run_until_idle(sender: Streams, stop: threading.Event, expected: int, published: Published) -> None:
    thread = threading.Thread(target=sender.run, args=(stop,), daemon=True)
    thread.start()
    deadline = time.monotonic() + 10
    while (len(published.blocks) < expected or sender.pending()) and time.monotonic() < deadline:
        time.sleep(0.01)
    stop.set()
    thread.join(5)


def test_requests_for_the_same_blocks_coalesce(streams):
    sender, published, files, stop = streams
    for _ in range(50):  # fifty devices ask for the whole target before the sender runs
        sender.request(TARGET, range(5))
    sender.request(TARGET, [3, 99])  # past the end: ignored
    run_until_idle(sender, stop, 5, published)
    assert published.blocks == [(TARGET, i) for i in range(5)]


def test_targets_are_served_round_robin(streams):
    sender, published, files, stop = streams
    other = next(p for p in files if p != TARGET)
    sender.request(TARGET, range(5))
    sender.request(other, range(2))
    run_until_idle(sender, stop, 7, published)
    assert published.blocks[:4] == [(TARGET, 0), (other, 0), (TARGET, 1), (other, 1)]


def test_a_block_just_sent_waits_for_the_next_pass(streams):
    sender, published, files, stop = streams
    sender.request(TARGET, [0])
    run_until_idle(sender, stop, 1, published)
    stop.clear()
    sender.request(TARGET, [0])  # a device that subscribed just after block 0 went by
    run_until_idle(sender, stop, 2, published)
    assert published.blocks == [(TARGET, 0), (TARGET, 0)]
    assert published.times[1] - published.times[0] >= HOLD_S


def test_an_unknown_target_is_refused_at_request(streams):
    sender = streams[0]
    with pytest.raises(FileNotFoundError):
        sender.request(f"targets/{'ef' * 32}.missing.edgeops", [0])
