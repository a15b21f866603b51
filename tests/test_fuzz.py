"""Property-based fuzzing (hypothesis) of the parsers that face untrusted input.

Each parser here reads something a device, a fleet or an operator did not write themselves: a bundle
file, an MQTT payload, a profile or rollout plan TOML, a captured drift sample. The property is the
same for all of them: on any input the parser either succeeds or raises the project's own error
(`EdgeopsError`, or its subclass `WireError` for wire payloads) with a one-line message; it never
lets another exception (KeyError, zlib.error, OverflowError, RecursionError, ...) escape, which the
callers would not catch and which would take an agent's or the fleet's loop down.

What is fuzzed:
- bundle reader (`read_bundle`, `read_manifest`): random bytes; zip archives built with zipfile from
  random member names, contents, modes and compression, with a random or a nearly valid manifest;
  the real digits bundle (`slot_releases.v1`) with random byte flips, truncations and insertions.
- wire parsers (`decode`, `parse_fetch_request`, `parse_telemetry`, `parse_telemetry_ack`,
  `parse_block_reply`, `parse_stream_block`, `parse_topic`): random bytes, random JSON values, and
  messages shaped like the real ones with random field values.
- profile parser (`load_profile`): random TOML text; random TOML documents; the shipped profiles with
  random values put at random keys, keys removed or added.
- rollout plan parser (`load_plan`, `make_plan`): random TOML text, random `[rollout]` tables with
  plan-like and random values, and `make_plan` called with random keyword values.
- drift sample decoder (`decode_sample`): random bodies, random base64, random and corrupted .npz.

Budget: CI runs a small number of examples per property (the whole file takes well under a minute).
For a longer run, raise it with the `EDGEOPS_FUZZ_EXAMPLES` environment variable, e.g.

    EDGEOPS_FUZZ_EXAMPLES=5000 .venv/bin/python -m pytest tests/test_fuzz.py

The example database is off, so runs do not replay earlier failures: a failure prints the falsifying
example, and `@reproduce_failure` replays it. Hypothesis still caches data in `.hypothesis/` in the
working directory.
"""

from __future__ import annotations

import base64
import io
import json
import math
import os
import stat
import warnings
import zipfile
from pathlib import Path

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from edgeops.fleet.plan import PLAN_KEYS, Plan, load_plan, make_plan
from edgeops.protocol import wire
from edgeops.protocol.bundle import (
    ALLOWED_MEMBERS,
    MANIFEST,
    canonical_json,
    npz_bytes,
    read_bundle,
    read_manifest,
)
from edgeops.protocol.drift import decode_sample
from edgeops.protocol.errors import EdgeopsError
from edgeops.protocol.profiles import _shipped_dir, load_profile, shipped_profile_names, version_tuple

EXAMPLES = int(os.environ.get("EDGEOPS_FUZZ_EXAMPLES", "60"))
FUZZ = settings(
    max_examples=EXAMPLES,
    deadline=None,
    database=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large, HealthCheck.filter_too_much],
)
# Strategies that draw a lot per example (whole zip archives) get a fraction of the budget.
FUZZ_HEAVY = settings(FUZZ, max_examples=max(10, EXAMPLES // 2))


def one_line(exc: BaseException) -> None:
    message = str(exc)
    assert message, f"{type(exc).__name__} with an empty message"
    assert len(message.splitlines()) == 1, f"message is not one line: {message!r}"


def expect_clean(call, error: type[Exception] = EdgeopsError):
    """Run `call`; success is fine, `error` must be one line, anything else fails the property."""
    try:
        return call()
    except error as exc:
        one_line(exc)
        return None


# --------------------------------------------------------------------------------------------------
# Shared strategies
# --------------------------------------------------------------------------------------------------

# Text that can be written to a UTF-8 file (no lone surrogates).
texts = st.text(st.characters(blacklist_categories=("Cs",)), max_size=40)
huge_ints = st.integers(min_value=-(10**400), max_value=10**400)
numbers = st.one_of(st.integers(-(2**70), 2**70), huge_ints, st.floats(allow_nan=True, allow_infinity=True))
json_scalars = st.one_of(st.none(), st.booleans(), st.integers(-(2**70), 2**70),
                         st.floats(allow_nan=False, allow_infinity=False), texts)
json_values = st.recursive(
    json_scalars,
    lambda children: st.one_of(st.lists(children, max_size=5), st.dictionaries(texts, children, max_size=5)),
    max_leaves=25,
)
json_objects = st.dictionaries(texts, json_values, max_size=6)

toml_scalars = st.one_of(st.booleans(), st.integers(-(2**70), 2**70), huge_ints, st.floats(), texts)
toml_values = st.recursive(
    toml_scalars,
    lambda children: st.one_of(st.lists(children, max_size=4), st.dictionaries(texts, children, max_size=4)),
    max_leaves=15,
)


def toml_value(value) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, int):
        return str(value)
    if isinstance(value, float):
        if math.isnan(value):
            return "nan"
        if math.isinf(value):
            return "inf" if value > 0 else "-inf"
        text = repr(value)
        return text if any(c in text for c in ".e") else text + ".0"
    if isinstance(value, str):
        return json.dumps(value, ensure_ascii=False)  # JSON's string escapes are valid TOML basic strings
    if isinstance(value, list):
        return "[" + ", ".join(toml_value(v) for v in value) + "]"
    if isinstance(value, dict):
        return "{" + ", ".join(f"{toml_value(str(k))} = {toml_value(v)}" for k, v in value.items()) + "}"
    raise TypeError(value)


def toml_document(table: dict) -> str:
    """A TOML document for `table`: scalars and arrays first, then each sub-table as a [section]."""
    lines, sections = [], []
    for key, value in table.items():
        if isinstance(value, dict):
            sections.append((key, value))
        else:
            lines.append(f"{toml_value(key)} = {toml_value(value)}")
    for key, value in sections:
        lines.append(f"[{toml_value(key)}]")
        lines.extend(f"{toml_value(k)} = {toml_value(v)}" for k, v in value.items())
    return "\n".join(lines) + "\n"


@pytest.fixture(scope="module")
def scratch(tmp_path_factory) -> Path:
    """One folder for the whole module: hypothesis runs many examples per test, each overwrites its file."""
    return tmp_path_factory.mktemp("fuzz")


# --------------------------------------------------------------------------------------------------
# 1. Bundle reader
# --------------------------------------------------------------------------------------------------

def check_bundle_file(path: Path) -> None:
    expect_clean(lambda: read_manifest(path))
    expect_clean(lambda: read_bundle(path))


@FUZZ
@given(data=st.binary(max_size=4096))
def test_bundle_random_bytes(scratch, data):
    path = scratch / "random.edgeops"
    path.write_bytes(data)
    check_bundle_file(path)


@FUZZ
@given(data=st.binary(max_size=512))
def test_bundle_random_bytes_after_zip_magic(scratch, data):
    """Bytes that look like a zip at both ends, so zipfile gets past its first checks."""
    path = scratch / "magic.edgeops"
    path.write_bytes(b"PK\x03\x04" + data + b"PK\x05\x06" + data[:18])
    check_bundle_file(path)


member_names = st.one_of(
    st.sampled_from(ALLOWED_MEMBERS),
    st.sampled_from(["../manifest.json", "/manifest.json", "a/../../x", "C:model.onnx", "dir\\model.onnx",
                     "model.onnx/", "./manifest.json", ""]),
    st.text(st.characters(blacklist_categories=("Cs",), blacklist_characters="\x00"), max_size=20),
)
file_modes = st.sampled_from([0, stat.S_IFREG | 0o644, stat.S_IFLNK | 0o777, stat.S_IFDIR | 0o755,
                              stat.S_IFCHR | 0o600, stat.S_IFIFO | 0o600])
compressions = st.sampled_from([zipfile.ZIP_STORED, zipfile.ZIP_DEFLATED, zipfile.ZIP_BZIP2, zipfile.ZIP_LZMA])


def zip_of(members: list[tuple[str, bytes, int, int]]) -> bytes:
    buffer = io.BytesIO()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # duplicate names are on purpose
        with zipfile.ZipFile(buffer, "w") as archive:
            for name, content, mode, compression in members:
                info = zipfile.ZipInfo(name or "_", date_time=(1980, 1, 1, 0, 0, 0))
                if not name:
                    info.filename = ""
                info.external_attr = mode << 16
                info.compress_type = compression
                archive.writestr(info, content)
    return buffer.getvalue()


def manifest_for(members: dict[str, bytes]) -> dict:
    """A manifest that passes the reader's checks for these members."""
    model = next((m for m in ("model.onnx", "model.tflite") if m in members), "model.onnx")
    files = {name: {"sha256": __import__("hashlib").sha256(data).hexdigest(), "size": len(data)}
             for name, data in members.items()}
    return {"schema": 1, "name": "m", "version": "1.0.0", "profile": "rpi4", "inputs": [], "outputs": [],
            "runtime": {}, "selftest": {}, "files": files, "model": {"file": model, **files.get(model, {})}}


@FUZZ_HEAVY
@given(members=st.lists(st.tuples(member_names, st.binary(max_size=64), file_modes, compressions), max_size=6),
       manifest=st.one_of(json_values, json_objects).map(lambda v: json.dumps(v).encode()),
       manifest_mode=file_modes, manifest_compression=compressions, with_manifest=st.booleans())
def test_bundle_random_zip(scratch, members, manifest, manifest_mode, manifest_compression, with_manifest):
    if with_manifest:
        members = [*members, (MANIFEST, manifest, manifest_mode, manifest_compression)]
    path = scratch / "zip.edgeops"
    path.write_bytes(zip_of(members))
    check_bundle_file(path)


# A manifest that passes, then one random change somewhere in it: hits the checks past the shape.
manifest_paths = st.sampled_from([
    (), ("schema",), ("name",), ("model",), ("model", "file"), ("model", "sha256"), ("model", "size"),
    ("files",), ("files", "model.onnx"), ("files", "model.onnx", "size"), ("files", "model.onnx", "sha256"),
    ("files", "reference.json"), ("files", "selftest.npz"), ("files", "reference.json", "size"),
    ("selftest",), ("inputs",), ("runtime",),
])


def set_path(document, path, value):
    if not path:
        return value
    target = document
    for key in path[:-1]:
        if not isinstance(target, dict):
            return document
        target = target.setdefault(key, {})
    if isinstance(target, dict):
        target[path[-1]] = value
    return document


@FUZZ_HEAVY
@given(contents=st.dictionaries(st.sampled_from([m for m in ALLOWED_MEMBERS if m != MANIFEST]),
                                st.binary(max_size=64), max_size=4),
       where=manifest_paths, value=st.one_of(json_values, numbers.filter(lambda v: not isinstance(v, float)),
                                             st.just(None)),
       delete=st.booleans(), compression=compressions)
def test_bundle_mutated_manifest(scratch, contents, where, value, delete, compression):
    manifest = manifest_for(contents)
    if delete and where:
        parent = manifest
        for key in where[:-1]:
            parent = parent.get(key) if isinstance(parent, dict) else None
        if isinstance(parent, dict):
            parent.pop(where[-1], None)
    else:
        manifest = set_path(manifest, where, value)
    entries = [(name, data, stat.S_IFREG | 0o644, compression) for name, data in contents.items()]
    entries.append((MANIFEST, canonical_json(manifest), stat.S_IFREG | 0o644, compression))
    path = scratch / "mutated.edgeops"
    path.write_bytes(zip_of(entries))
    check_bundle_file(path)


class Blob(bytes):
    """The real bundle's bytes, with a short repr so a falsifying example prints readably."""

    def __repr__(self) -> str:
        return f"<{len(self)} bytes of slot_releases.v1>"


@pytest.fixture(scope="module")
def real_bundle(slot_releases) -> Blob:
    read_bundle(slot_releases.v1)  # the unmodified bundle is valid, so failures below are the fuzzing's
    return Blob(slot_releases.v1.read_bytes())


edits = st.lists(
    st.one_of(
        st.tuples(st.just("flip"), st.integers(min_value=0), st.integers(1, 255)),
        st.tuples(st.just("set"), st.integers(min_value=0), st.integers(0, 255)),
        st.tuples(st.just("truncate"), st.integers(min_value=0), st.just(0)),
        st.tuples(st.just("insert"), st.integers(min_value=0), st.integers(0, 255)),
        st.tuples(st.just("delete"), st.integers(min_value=0), st.integers(1, 64)),
    ),
    min_size=1, max_size=8,
)


def apply_edits(data: bytes, changes) -> bytes:
    out = bytearray(data)
    for kind, position, value in changes:
        if not out:
            break
        at = position % len(out)
        if kind == "flip":
            out[at] ^= value
        elif kind == "set":
            out[at] = value
        elif kind == "truncate":
            del out[at:]
        elif kind == "insert":
            out[at:at] = bytes([value])
        else:
            del out[at:at + value]
    return bytes(out)


def zip_structure_offsets(data: bytes) -> list[int]:
    """Where the zip headers are: flipping bytes there reaches past the first sanity checks."""
    offsets = []
    for magic in (b"PK\x03\x04", b"PK\x01\x02", b"PK\x05\x06"):
        start = 0
        while (found := data.find(magic, start)) != -1:
            offsets.append(found)
            start = found + 1
    return offsets


@FUZZ_HEAVY
@given(changes=edits)
def test_real_bundle_random_edits(scratch, real_bundle, changes):
    path = scratch / "edited.edgeops"
    path.write_bytes(apply_edits(real_bundle, changes))
    check_bundle_file(path)


@FUZZ_HEAVY
@given(header=st.integers(min_value=0), offset=st.integers(0, 45), value=st.integers(1, 255),
       more=st.lists(st.tuples(st.integers(min_value=0), st.integers(0, 45), st.integers(1, 255)), max_size=3))
def test_real_bundle_header_flips(scratch, real_bundle, header, offset, value, more):
    """Byte flips inside the local and central zip headers: flags, compression, sizes, name lengths."""
    offsets = zip_structure_offsets(real_bundle)
    out = bytearray(real_bundle)
    for h, o, v in [(header, offset, value), *more]:
        at = offsets[h % len(offsets)] + o
        if at < len(out):
            out[at] ^= v
    path = scratch / "headers.edgeops"
    path.write_bytes(bytes(out))
    check_bundle_file(path)


# --------------------------------------------------------------------------------------------------
# 2. Wire payload parsers
# --------------------------------------------------------------------------------------------------

WIRE_PARSERS = {
    "decode": lambda p: wire.decode(p, {"req": int, "path": str}),
    "parse_fetch_request": wire.parse_fetch_request,
    "parse_telemetry": wire.parse_telemetry,
    "parse_telemetry_ack": wire.parse_telemetry_ack,
    "parse_block_reply": wire.parse_block_reply,
    "parse_stream_block": wire.parse_stream_block,
}


def check_wire(payload: bytes) -> None:
    for parse in WIRE_PARSERS.values():
        expect_clean(lambda: parse(payload), wire.WireError)


def dumps(value) -> bytes:
    return json.dumps(value, allow_nan=True).encode()


@FUZZ
@given(payload=st.binary(max_size=2048))
def test_wire_random_bytes(payload):
    check_wire(payload)
    check_wire(b'{"path":"x"}\n' + payload)


@FUZZ
@given(value=json_values)
def test_wire_random_json(value):
    check_wire(dumps(value))
    check_wire(dumps(value) + b"\n" + dumps(value))


@FUZZ
@given(depth=st.integers(1, 70_000), opener=st.sampled_from([b"[", b'{"a":', b"[{\"x\":"]))
def test_wire_deeply_nested_json(depth, opener):
    """A payload under the size limit that nests deeper than Python's recursion limit."""
    payload = opener * (depth // len(opener) + 1)
    check_wire(payload[: wire.MAX_JSON_PAYLOAD])


sha = "0" * 64
paths = st.one_of(st.sampled_from(["metadata/root.json", "metadata/3.root.json", f"targets/{sha}.model.edgeops",
                                   "targets/x", "../etc/passwd"]), texts)
field_values = st.one_of(json_values, st.integers(-(2**70), 2**70), st.sampled_from([0, 1, -1, 131072, 131073]))


@FUZZ
@given(req=field_values, path=paths, offset=field_values, length=field_values,
       want=st.one_of(field_values, st.binary(max_size=16).map(lambda b: base64.b64encode(b).decode())),
       with_want=st.booleans())
def test_wire_fetch_request_shaped(req, path, offset, length, want, with_want):
    message = {"req": req, "path": path, "offset": offset, "length": length}
    if with_want:
        message["want"] = want
    expect_clean(lambda: wire.parse_fetch_request(dumps(message)), wire.WireError)


records = st.fixed_dictionaries({}, optional={
    "seq": field_values, "kind": st.one_of(st.sampled_from(wire.TELEMETRY_KINDS), texts),
    "t": st.one_of(field_values, st.floats()), "body": st.one_of(json_objects, field_values)})


@FUZZ
@given(device=st.one_of(texts, field_values), dropped=field_values,
       items=st.one_of(st.lists(st.one_of(records, field_values), max_size=5), field_values))
def test_wire_telemetry_shaped(device, dropped, items):
    payload = dumps({"device": device, "dropped": dropped, "records": items})
    expect_clean(lambda: wire.parse_telemetry(payload), wire.WireError)


@FUZZ
@given(seqs=st.one_of(st.lists(st.one_of(st.lists(field_values, max_size=3),
                                         st.tuples(st.integers(-5, 2**40), st.integers(-5, 2**40)).map(list),
                                         field_values), max_size=6), field_values))
def test_wire_telemetry_ack_shaped(seqs):
    payload = dumps({"seqs": seqs})
    expect_clean(lambda: wire.parse_telemetry_ack(payload), wire.WireError)


@FUZZ
@given(header=st.fixed_dictionaries({}, optional={"req": field_values, "path": paths, "offset": field_values,
                                                  "total": field_values, "error": field_values}),
       data=st.binary(max_size=256))
def test_wire_blocks_shaped(header, data):
    payload = dumps(header) + b"\n" + data
    expect_clean(lambda: wire.parse_block_reply(payload), wire.WireError)
    expect_clean(lambda: wire.parse_stream_block(payload), wire.WireError)


@FUZZ
@given(name=st.one_of(texts, st.lists(st.one_of(texts, st.sampled_from(["edgeops", "v1", "devices", "d1"])),
                                      max_size=7).map("/".join)))
def test_wire_topic(name):
    expect_clean(lambda: wire.parse_topic(name), wire.WireError)
    expect_clean(lambda: wire.stream_topic(name), wire.WireError)


# --------------------------------------------------------------------------------------------------
# 3. Profile parser
# --------------------------------------------------------------------------------------------------

def check_profile(path: Path) -> None:
    profile = expect_clean(lambda: load_profile(path))
    if profile is not None:
        version_tuple(profile.runtime.version)  # what the compiler and agent do with it next


toml_text_chars = st.text(st.sampled_from(list('abc_=."\'[]{}, \n#01e+-:tfrunix\\')), max_size=120)


@FUZZ
@given(text=st.one_of(toml_text_chars, texts))
def test_profile_random_toml_text(scratch, text):
    path = scratch / "text-profile.toml"
    path.write_text(text, encoding="utf-8")
    check_profile(path)


@FUZZ
@given(data=st.binary(max_size=256))
def test_profile_random_bytes(scratch, data):
    path = scratch / "bytes-profile.toml"
    path.write_bytes(data)
    check_profile(path)


@FUZZ
@given(table=st.dictionaries(texts, toml_values, max_size=8))
def test_profile_random_toml_document(scratch, table):
    path = scratch / "doc-profile.toml"
    path.write_text(toml_document(table), encoding="utf-8")
    check_profile(path)


SHIPPED = {name: __import__("tomllib").loads((_shipped_dir() / f"{name}.toml").read_text())
           for name in shipped_profile_names()}
profile_values = st.one_of(toml_values, huge_ints, st.sampled_from(
    ["", "1.18", "1.²", "١.٢", "1.18.0.1", "aarch64", "int8", "qdq", "x y", "a\nb", "onnxruntime"]))


@st.composite
def mutated_profiles(draw):
    table = json.loads(json.dumps(SHIPPED[draw(st.sampled_from(sorted(SHIPPED)))]))
    for _ in range(draw(st.integers(1, 3))):
        section = draw(st.sampled_from([None, *[k for k, v in table.items() if isinstance(v, dict)]]))
        target = table if section is None else table[section]
        action = draw(st.sampled_from(["replace", "replace", "delete", "add"]))
        if action == "add" or not target:
            target[draw(texts)] = draw(profile_values)
        elif action == "delete":
            target.pop(draw(st.sampled_from(sorted(target))))
        else:
            target[draw(st.sampled_from(sorted(target)))] = draw(profile_values)
    return table


@FUZZ
@given(table=mutated_profiles())
def test_profile_mutated_shipped(scratch, table):
    path = scratch / "mutated-profile.toml"
    path.write_text(toml_document(table), encoding="utf-8")
    check_profile(path)


# --------------------------------------------------------------------------------------------------
# 4. Rollout plan parser
# --------------------------------------------------------------------------------------------------

digits = st.text("0123456789", min_size=1, max_size=400)
plan_strings = st.one_of(
    st.builds(lambda n, u: n + u, digits, st.sampled_from(["", "%", "dev", "devs", "devices", "ms", "s", "m", "h", "d"])),
    st.builds(lambda a, b: f"failed>{a}%,min={b}", digits, digits),
    st.lists(st.builds(lambda n, u: n + u, digits, st.sampled_from(["", "%", "dev"])), max_size=4).map(",".join),
    st.sampled_from(["rollback", "pause", "1dev,10%,100%", "10m", "failed>5%,min=5", "inf", "nan", "1e400"]),
    texts,
)
plan_values = st.one_of(plan_strings, toml_values, st.lists(plan_strings, max_size=4),
                        st.dictionaries(st.one_of(st.sampled_from(["queued", "downloading", "drift",
                                                                   "max_error_increase", "latency_slack_ms"]), texts),
                                        st.one_of(plan_strings, toml_values), max_size=3))
plan_tables = st.dictionaries(st.sampled_from(PLAN_KEYS), plan_values, max_size=5)


def check_plan(path: Path) -> None:
    plan = expect_clean(lambda: load_plan(path))
    if plan is not None:
        assert Plan.from_dict(json.loads(json.dumps(plan.to_dict()))) == plan  # the registry's round trip


@FUZZ
@given(text=st.one_of(toml_text_chars, texts), data=st.binary(max_size=64))
def test_plan_random_toml_text(scratch, text, data):
    path = scratch / "text-plan.toml"
    path.write_text(text, encoding="utf-8")
    check_plan(path)
    path.write_bytes(data)
    check_plan(path)


@FUZZ
@given(table=st.one_of(plan_tables, st.dictionaries(texts, toml_values, max_size=4)), wrap=st.booleans())
def test_plan_random_tables(scratch, table, wrap):
    path = scratch / "table-plan.toml"
    path.write_text(toml_document({"rollout": table} if wrap else table), encoding="utf-8")
    check_plan(path)


@FUZZ
@given(kwargs=st.fixed_dictionaries({}, optional={key: st.one_of(plan_values, numbers) for key in PLAN_KEYS}))
def test_make_plan_random_values(kwargs):
    expect_clean(lambda: make_plan(**kwargs))


# --------------------------------------------------------------------------------------------------
# 5. Drift sample decoder
# --------------------------------------------------------------------------------------------------

def check_sample(body) -> None:
    expect_clean(lambda: decode_sample(body))


@FUZZ
@given(body=st.one_of(json_values, st.fixed_dictionaries({"npz": st.one_of(json_values, texts)}),
                      st.binary(max_size=512).map(lambda b: {"npz": base64.b64encode(b).decode()})))
def test_sample_random_bodies(body):
    check_sample(body)


SAMPLE = npz_bytes({"x": np.arange(12, dtype=np.float32).reshape(3, 4), "y": np.array([1, 2], dtype=np.int64)})


@FUZZ
@given(changes=edits)
def test_sample_corrupted_npz(changes):
    check_sample({"npz": base64.b64encode(apply_edits(SAMPLE, changes)).decode()})


@FUZZ_HEAVY
@given(members=st.lists(st.tuples(st.one_of(st.sampled_from(["x.npy", "y.npy", "x", "../x.npy"]), texts),
                                  st.one_of(st.binary(max_size=128),
                                            st.binary(max_size=64).map(lambda b: b"\x93NUMPY\x01\x00" + b)),
                                  st.just(stat.S_IFREG | 0o644), compressions), max_size=4))
def test_sample_random_archives(members):
    check_sample({"npz": base64.b64encode(zip_of(members)).decode()})
