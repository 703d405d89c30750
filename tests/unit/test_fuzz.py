"""Property-based fuzzing of everything that reads outside input: no crash, always a reason.

- messages: random headers for every kind, through the public decoder (`async_rl.wire.messages`);
- buffer ingest: random and mutated message frames (the service's parsing and validation);
- config loader: random TOML documents and dotted overrides;
- weight manifests: random and mutated manifest files.
"""

import json
import string

import numpy as np
import pyarrow as pa
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from async_rl.buffer.replay import ReplayBuffer
from async_rl.buffer.service import BufferService
from async_rl.config import ConfigError, load_config
from async_rl.types import InvalidGroup
from async_rl.weights import read_manifest
from async_rl.wire.messages import (
    REPLIES,
    REQUESTS,
    BadMessage,
    Group,
    Lease,
    WeightsReady,
    decode,
    encode,
    table_to_ipc,
)
from tests.helpers import SPEC, G, make_group

KINDS = (*REQUESTS, *REPLIES, Group, WeightsReady)
GOOD = table_to_ipc(make_group("good", 0, seed=0)).to_pybytes()
FUZZ = settings(max_examples=150, deadline=None, suppress_health_check=list(HealthCheck))


class _Parser:
    """The service's message parsing, without sockets (`BufferService._parse_group`)."""

    def __init__(self, buffer):
        self.buffer, self.max_bytes = buffer, 1 << 20

    parse = BufferService._parse_group


def _mutate(data: bytes, positions: list[int], values: list[int]) -> bytes:
    out = bytearray(data)
    for p, v in zip(positions, values, strict=False):
        out[p % len(out)] = v
    return bytes(out)


@FUZZ
@given(
    frames=st.lists(st.binary(max_size=300), min_size=0, max_size=5),
    positions=st.lists(st.integers(0, 10**6), max_size=20),
    values=st.lists(st.integers(0, 255), max_size=20),
    cut=st.integers(0, len(GOOD)),
)
def test_ingest_rejects_random_and_mutated_messages_with_a_reason(
    tmp_path_factory, frames, positions, values, cut
):
    buffer = ReplayBuffer(
        tmp_path_factory.mktemp("b"), SPEC, group_size=G, global_batch_groups=1, max_staleness=1
    )
    parser = _Parser(buffer)
    candidates = [
        frames,
        encode(Group(), _mutate(GOOD, positions, values)),
        encode(Group(), GOOD[:cut]),
        [b"group", bytes(_mutate(b'{"lease": "x"}', positions, values)), GOOD],
    ]
    for message in candidates:
        try:
            batch, _ = parser.parse(message)
        except (BadMessage, InvalidGroup) as e:
            assert e.reason  # a counted, named reason
            continue
        buffer.append([(batch, None)])  # whatever passes is a well-formed group
    for g in buffer.store.by_id.values():
        assert g.num_rows == G


JSON = st.recursive(
    st.one_of(st.none(), st.booleans(), st.integers(-5, 2**40), st.floats(), st.text(max_size=6)),
    lambda inner: st.one_of(
        st.lists(inner, max_size=3), st.dictionaries(st.text(max_size=6), inner, max_size=3)
    ),
    max_leaves=8,
)
FIELDS = sorted({f for cls in KINDS for f in cls.__dataclass_fields__} | {"nonsense"})


@FUZZ
@given(
    kind=st.sampled_from(KINDS),
    header=st.dictionaries(st.sampled_from(FIELDS), JSON, max_size=5),
)
def test_every_message_kind_decodes_to_its_type_or_refuses_with_a_reason(kind, header):
    frames = [kind.KIND.encode(), json.dumps(header).encode(), b""]
    try:
        message, _ = decode(frames, *KINDS)
    except BadMessage as e:
        assert e.reason in ("header", "kind")
        return
    assert type(message) is kind
    assert decode(encode(message), kind)[0] == message  # what decodes encodes back the same


def test_decoded_fields_have_their_declared_types_and_ranges():
    message, _ = decode(encode(Lease(rid="r", actor_id="a0", count=3, wait_s=2)), Lease)
    assert message == Lease(rid="r", actor_id="a0", count=3, version=None, wait_s=2.0)
    for header, reason in [
        ({"rid": "r", "actor_id": ""}, "non-empty string"),
        ({"rid": "r", "actor_id": "a0", "count": -1}, "non-negative integer"),
        ({"rid": "r", "actor_id": "a0", "count": True}, "non-negative integer"),
        ({"rid": "r", "actor_id": "a0", "wait_s": 1e9}, "0..3600"),
        ({"rid": "r", "actor_id": "a0", "wait_s": float("nan")}, "0..3600"),
        ({"rid": "r"}, "missing 'actor_id'"),
        ({"rid": "r", "actor_id": "a0", "extra": 1}, "unknown field"),
    ]:
        try:
            decode([b"lease", json.dumps(header).encode(), b""], Lease)
        except BadMessage as e:
            assert reason in str(e), (header, str(e))
        else:
            raise AssertionError(f"{header} was accepted")


@FUZZ
@given(
    st.dictionaries(
        st.sampled_from(["run", "model", "algo", "buffer", "actor", "nonsense"]),
        st.dictionaries(
            st.text(string.ascii_lowercase + "_", min_size=1, max_size=15),
            st.one_of(
                st.integers(-5, 10**6),
                st.floats(allow_nan=True),
                st.text(max_size=8),
                st.booleans(),
                st.lists(st.integers(), max_size=3),
            ),
            max_size=4,
        ),
        max_size=4,
    )
)
def test_config_loader_names_the_key_or_accepts(tmp_path_factory, document):
    def value(v):
        if isinstance(v, str):
            return json.dumps(v)
        if isinstance(v, bool):
            return str(v).lower()
        if isinstance(v, float) and not np.isfinite(v):
            return "nan" if np.isnan(v) else ("inf" if v > 0 else "-inf")
        return json.dumps(v)

    text = "\n".join(
        f"[{section}]\n" + "\n".join(f"{k} = {value(v)}" for k, v in body.items())
        for section, body in document.items()
    )
    path = tmp_path_factory.mktemp("c") / "fuzz.toml"
    path.write_text(text)
    try:
        load_config(path)
    except ConfigError as e:
        assert e.key  # the message names a key
    except ValueError as e:  # a file that is not TOML at all
        assert "toml" in str(e).lower() or str(path) in str(e)


@FUZZ
@given(st.lists(st.text(max_size=30), max_size=4))
def test_overrides_name_the_key_or_apply(overrides):
    try:
        load_config(None, overrides)
    except ConfigError as e:
        assert e.key


@FUZZ
@given(
    st.one_of(
        st.binary(max_size=200),
        st.recursive(
            st.one_of(st.none(), st.booleans(), st.integers(), st.text(max_size=10)),
            lambda inner: st.one_of(
                st.lists(inner, max_size=3),
                st.dictionaries(st.text(max_size=10), inner, max_size=3),
            ),
            max_leaves=10,
        ).map(lambda x: json.dumps(x).encode()),
        st.fixed_dictionaries(
            {
                "version": st.one_of(st.integers(-3, 5), st.text(max_size=3), st.none()),
                "files": st.dictionaries(
                    st.sampled_from(["model.safetensors", "../x", ".hidden", "a/b", "config.json"]),
                    st.one_of(st.integers(-2, 10), st.text(max_size=3)),
                    max_size=3,
                ),
            }
        ).map(lambda x: json.dumps(x).encode()),
    )
)
def test_manifest_reader_refuses_with_a_reason(tmp_path_factory, manifest):
    directory = tmp_path_factory.mktemp("m")
    (directory / "model.safetensors").write_bytes(b"1234")
    (directory / "manifest.json").write_bytes(manifest)
    try:
        data = read_manifest(directory)
    except ValueError as e:
        assert "manifest.json" in str(e)
        return
    assert data["files"]["model.safetensors"] == 4  # accepted only when it is right


def test_a_clean_message_still_passes_the_parser(tmp_path):
    buffer = ReplayBuffer(tmp_path, SPEC, group_size=G, global_batch_groups=1, max_staleness=1)
    batch, lease = _Parser(buffer).parse(encode(Group(lease="l1"), GOOD))
    assert lease == "l1" and pa.Table.from_batches([batch]).num_rows == G
