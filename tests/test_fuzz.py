"""Property-based fuzzers for the two parsers that read untrusted files.

1. The safetensors reader (``read_header``/``read_tensor`` and ``open_checkpoint``), against the reference
   ``safetensors`` library: valid files are mutated (bytes anywhere, the length prefix, the JSON header's
   text and structure, the data section), and then EITHER our reader refuses with a ``SoupError``, OR it
   loads and the reference loads the same names, dtypes, shapes, metadata and bytes. Refusing what the
   reference loads is allowed (stricter); loading what it refuses, or loading it differently, is not.
2. The recipe loader (``load_yaml``/``recipe_from_yaml_text``): mutated recipes and random text either give a
   ``Recipe`` or raise ``RecipeError``, never anything else, each in bounded time.

Each parser bug the fuzzers found is fixed and kept as a regression test (``REGRESSIONS``).
Hypothesis runs derandomized with no example database, so CI sees the same examples every run.
"""

from __future__ import annotations

import json
import math
import os
import re
import struct
import tempfile
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
import torch
from hypothesis import HealthCheck, event, example, given, settings
from hypothesis import strategies as st
from hypothesis.control import currently_in_test_context
from safetensors import safe_open
from safetensors.torch import save as save_safetensors

from modelsoup.plan import tensor_rules
from modelsoup.recipe import DTYPES, KEY_MODES, OUTPUT_FORMATS, TAKE_CHOICES, Recipe, load_yaml, recipe_from_yaml_text
from modelsoup.errors import CheckpointError, RecipeError, SoupError
from modelsoup.io import open_checkpoint
from modelsoup.io.safetensors_format import MAX_HEADER, read_header, read_tensor
from modelsoup.methods import get_method

# Deterministic: same examples every run, nothing remembered between runs.
FUZZ = dict(deadline=None, derandomize=True, database=None, suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
TIME_LIMIT_S = 2.0


# ================================================================================================
# Regressions: each reproducer asserts the correct behaviour.


def _expect(exc_type: type[BaseException], fn: Callable[[], Any], *, within: float = TIME_LIMIT_S) -> None:
    """Assert that ``fn`` raises ``exc_type`` (and nothing else) within ``within`` seconds."""
    t0 = time.perf_counter()
    try:
        fn()
    except exc_type:
        pass
    except Exception as e:
        raise AssertionError(f"raised {type(e).__name__}: {e!s:.200}, not {exc_type.__name__}") from e
    else:
        raise AssertionError(f"loaded; expected {exc_type.__name__}")
    took = time.perf_counter() - t0
    assert took < within, f"took {took:.2f}s (limit {within}s)"


def _entry(dtype: str, shape: list[int], b: int, e: int) -> str:
    return json.dumps({"dtype": dtype, "shape": shape, "data_offsets": [b, e]})


def _file(header_text: str, data: bytes = b"", prefix: int | None = None) -> bytes:
    raw = header_text.encode("utf-8", "surrogatepass")
    return struct.pack("<Q", len(raw) if prefix is None else prefix) + raw + data


def _ours_read_all(path: Path) -> None:
    infos, _ = read_header(path)
    fd = os.open(path, os.O_RDONLY)
    try:
        for info in infos.values():
            read_tensor(fd, info)
    finally:
        os.close(fd)


def _in_tmp(blob: bytes, fn: Callable[[Path], Any]) -> Any:
    with tempfile.TemporaryDirectory() as d:
        p = Path(d) / "bug.safetensors"
        p.write_bytes(blob)
        return fn(p)


def _repro_st_surrogate() -> None:
    # The reference (serde_json) refuses a lone surrogate escape anywhere in the header; Python's json decodes
    # it into a str that cannot be encoded back to UTF-8 (an output naming this tensor would crash). Names and
    # metadata are checked now; the key or value of an entry's unknown field is not.
    one = _entry("F32", [1], 0, 4)
    for header in ('{"a\\ud800":' + one + "}", '{"a":' + one[:-1] + ', "\\ud800": 0}}', '{"a":' + one[:-1] + ', "x": "\\udc00"}}'):
        _in_tmp(_file(header, b"\0\0\x80\x3f"), lambda p: _expect(CheckpointError, lambda: read_header(p)))


def _repro_st_nonfinite() -> None:
    # Python's json takes NaN, Infinity and 1e999 (-> inf); JSON and the reference do not. An unknown
    # field of an entry is not looked at, so the file loads where the reference refuses it. (parse_constant
    # stops NaN/Infinity; an out-of-range literal like 1e999 goes through parse_float.)
    for token in ("NaN", "Infinity", "-Infinity", "1e999", "-1e999", "1e400"):
        entry = _entry("F32", [1], 0, 4)[:-1] + f', "extra": {token}}}'
        blob = _file('{"a":' + entry + "}", b"\0\0\x80\x3f")
        _in_tmp(blob, lambda p: _expect(CheckpointError, lambda: read_header(p)))


def _repro_st_huge_empty() -> None:
    # An empty tensor whose other dims do not fit int64 (or whose product overflows): the header is
    # accepted (0 bytes), then torch.empty raises TypeError/RuntimeError. The reference refuses
    # [2**32, 2**32, 0] ("overflow computing buffer size") and dims >= 2**64 at the header.
    for shape in ([0, 2**63], [0, 2**64], [2**32, 2**32, 0]):
        blob = _file('{"a":' + _entry("F32", shape, 0, 0) + "}")
        _in_tmp(blob, lambda p: _expect(CheckpointError, lambda: _ours_read_all(p)))


def _repro_st_quadratic_strings() -> None:
    # _nesting_depth's string regex restarts at every quote and scans to the end when a string never
    # closes: '{"' + '\\"' * n costs O(n**2) (24 KB: ~1.7 s, 32 KB: ~3 s; a 1 MB header: ~an hour) before json.loads.
    blob = _file('{"' + '\\"' * 12_000)
    _in_tmp(blob, lambda p: _expect(CheckpointError, lambda: read_header(p), within=0.2))


def _repro_yaml_reader_error() -> None:
    # yaml.SafeLoader(text) checks for non-printable characters in its constructor, outside load_yaml's try.
    for text in ("a: \x00\n", "a: \x07\n", "a: \ufffe\n", "a: \ud800\n"):
        _expect(RecipeError, lambda: load_yaml(text, "r.yaml"))


def _repro_yaml_constructor() -> None:
    # SafeLoader's scalar constructors raise plain ValueError/KeyError/AttributeError/IndexError on values that
    # pass its resolver: an impossible date, bad or empty explicit !!int/!!float/!!bool/!!timestamp, an int over
    # 4300 digits.
    for text in ("seed: 2001-13-45\n", "a: 2001-02-30\n", "a: !!int abc\n", "a: !!float abc\n", "a: !!bool abc\n",
                 "a: !!timestamp foo\n", "a: !!int\n", "a: " + "1" * 5000 + "\n"):
        _expect(RecipeError, lambda: load_yaml(text, "r.yaml"))


def _repro_yaml_float_overflow() -> None:
    # A huge int (hex escapes the 4300-digit limit) reaches float(value): OverflowError (a model weight is checked,
    # then _zero_sum_problem still calls float() on it).
    big = "0x" + "f" * 300
    for text in (f"method: ties\nbase: c\nmodels: [a, b]\nparameters: {{density: {big}}}\n",
                 f"method: linear\nmodels: [{{path: a, weight: {big}}}, b]\n",
                 f"merge_method: linear\nmodels:\n  - model: a\n    parameters: {{weight: {big}}}\n"):
        _expect(RecipeError, lambda: recipe_from_yaml_text(text, "r.yaml"))


def _repro_yaml_int_repr() -> None:
    # A message that formats an int of more than 4300 digits (repr/f-string) raises ValueError.
    big = "0x" + "f" * 4000
    for text in (f"method: ties\nbase: c\nmodels: [a, b]\nseed: {big}\n",
                 f"method: ties\nbase: c\nmodels: [a, b]\nparameters: {{density: {big}}}\n",
                 f"method: linear\nmodels: [{{path: a, weight: {big}}}, b]\n",
                 f"method: linear\nmodels: [a, b]\noutput: {{shard_size: {big}}}\n",
                 f"merge_method: linear\n{big}: 1\n"):
        _expect(RecipeError, lambda: recipe_from_yaml_text(text, "r.yaml"))


def _repro_yaml_path_os_errors() -> None:
    # Path.exists() raises OSError(ENAMETOOLONG) for a too-long name and expanduser() RuntimeError for ~nosuchuser.
    for text in ("method: linear\nmodels: [" + "a" * 300 + ", b]\n", "method: linear\nmodels: ['~nosuchuser_fuzz/x', b]\n",
                 "merge_method: linear\nmodels:\n  - model: " + "a" * 300 + "\n    parameters: {weight: 1}\n"):
        _expect(RecipeError, lambda: recipe_from_yaml_text(text, "r.yaml"))


def _repro_yaml_null_method() -> None:
    # `method:` present but null skips the "is required" problem, then build_recipe's
    # `assert method is not None` fires (AssertionError, not RecipeError). Only reached when the models exist.
    with tempfile.TemporaryDirectory() as d:
        for name in "ab":
            (Path(d) / name).mkdir()
        for text in ("method:\nmodels: [a, b]\n", "method: ~\nmodels: [a, b]\n", "method: null\nmodels: [a]\n"):
            _expect(RecipeError, lambda: recipe_from_yaml_text(text, "r.yaml", root=Path(d)))


def _repro_yaml_null_models() -> None:
    # `models:` present but null is neither "is required" nor a count problem: a Recipe with no models.
    for text in ("method: linear\nmodels:\n", "method: linear\nmodels: ~\n", "method: ties\nbase: .\nmodels: null\n"):
        _expect(RecipeError, lambda: recipe_from_yaml_text(text, "r.yaml", root=Path(".")))


# Parser bugs the fuzzers found, each fixed; the reproducer asserts the correct behaviour.
REGRESSIONS: dict[str, Callable[[], None]] = {
    "st-lone-surrogate": _repro_st_surrogate,
    "st-nonfinite-json": _repro_st_nonfinite,
    "st-huge-empty-shape": _repro_st_huge_empty,
    "st-quadratic-strings": _repro_st_quadratic_strings,
    "yaml-reader-error": _repro_yaml_reader_error,
    "yaml-constructor": _repro_yaml_constructor,
    "yaml-float-overflow": _repro_yaml_float_overflow,
    "yaml-int-repr": _repro_yaml_int_repr,
    "yaml-null-method": _repro_yaml_null_method,
    "yaml-null-models": _repro_yaml_null_models,
    "yaml-path-os-errors": _repro_yaml_path_os_errors,
}


@pytest.mark.parametrize("bug", list(REGRESSIONS))
def test_regression(bug: str) -> None:
    REGRESSIONS[bug]()


# ================================================================================================
# Safetensors: base files, mutations, oracle


def _base_files() -> list[bytes]:
    mixed = {
        "enc.w_f32": torch.arange(6, dtype=torch.float32).reshape(2, 3) - 2.5,
        "enc.w_f16": torch.tensor([1.0, -2.0, float("nan"), float("inf")], dtype=torch.float16),
        "enc.w_bf16": torch.tensor([[0.5], [1e30], [-0.0]], dtype=torch.bfloat16),
        "steps": torch.tensor([-(2**62), 7], dtype=torch.int64),
        "mask": torch.tensor([True, False, True, True, False]),
        "empty": torch.zeros(0, 3),
        "scalar": torch.tensor(3.25),
    }
    wide = {
        "f64": torch.tensor([1.0, -1e300, float("nan")], dtype=torch.float64),
        "i8": torch.tensor([-128, 127, 0], dtype=torch.int8),
        "u8": torch.tensor([[0, 255]], dtype=torch.uint8),
        "i32": torch.tensor([2**31 - 1], dtype=torch.int32),
        "i16": torch.tensor([-7, 9], dtype=torch.int16),
        "f8": torch.tensor([0.5, -2.0], dtype=torch.float32).to(torch.float8_e4m3fn),
    }
    return [
        save_safetensors(mixed, metadata={"format": "pt", "note": "fuzz base"}),
        save_safetensors({"only": torch.arange(4, dtype=torch.int64)}),
        save_safetensors(wide, metadata={"format": "pt"}),
        save_safetensors({"e0": torch.zeros(0), "e1": torch.zeros(2, 0, dtype=torch.bool)}, metadata={"k": ""}),
    ]


BASES = _base_files()


def _split(blob: bytes) -> tuple[str, bytes]:
    (n,) = struct.unpack("<Q", blob[:8])
    return blob[8 : 8 + n].decode("utf-8"), blob[8 + n :]


class Raw(str):
    """A JSON token written verbatim: NaN, Infinity, 1e999, a lone-surrogate escape, a 5000-digit int."""


class Obj(list):
    """A JSON object as its (key, value) pairs, so a key can be given twice."""


def dumps(v: Any) -> str:
    if isinstance(v, Raw):
        return str(v)
    if isinstance(v, Obj):
        return "{" + ",".join(f"{dumps(k) if isinstance(k, Raw) else json.dumps(k)}:{dumps(x)}" for k, x in v) + "}"
    if isinstance(v, (list, tuple)):
        return "[" + ",".join(dumps(x) for x in v) + "]"
    return json.dumps(v)


DTYPE_CODES = ["F64", "F32", "F16", "BF16", "I64", "I32", "I16", "I8", "U8", "BOOL", "F8_E4M3", "F8_E5M2",
               "U16", "U32", "U64", "F8_E8M0", "F4", "C64", "f32", "", "float32", "BOOL "]
BIG_INTS = [-1, -(2**63), 2**31, 2**32, 2**53 + 1, 2**62, 2**63 - 1, 2**63, 2**64 - 1, 2**64, 10**30, 10**400]
RAW_TOKENS = ["NaN", "Infinity", "-Infinity", "1e999", "-1e999", "1.5", "2.0", "-0", "1E2", "0.0", "-0.0", "1e2",
              "00", "01", "+1", "0x10", "1_0", "1" * 5000, '"\\ud800"', '"\\udfff\\ud800"', '"\\u0000"', "true", "null"]

ints = st.one_of(st.integers(-3, 40), st.sampled_from(BIG_INTS))
raw_tokens = st.sampled_from(RAW_TOKENS).map(Raw)
scalars = st.one_of(ints, raw_tokens, st.floats(), st.booleans(), st.none(), st.text(max_size=6), st.sampled_from(DTYPE_CODES))
keys = st.one_of(st.text(max_size=6), st.sampled_from(["dtype", "shape", "data_offsets", "__metadata__", "", "enc.w_f32", "only"]),
                 st.sampled_from(['"a\\ud800"', '"\\u0000"', '"\\ud83d\\ude00"']).map(Raw))
json_values = st.recursive(scalars, lambda c: st.lists(c, max_size=4) | st.lists(st.tuples(keys, c), max_size=3).map(Obj), max_leaves=8)
shapes = st.one_of(st.lists(st.one_of(st.integers(0, 6), ints, raw_tokens), max_size=4), json_values)


def _tensor_entries(h: Obj) -> list[int]:
    return [i for i, (k, v) in enumerate(h) if k != "__metadata__" and isinstance(v, Obj)]


def _set(obj: Obj, key: Any, value: Any) -> None:
    for i, (k, _) in enumerate(obj):
        if k == key:
            obj[i] = (k, value)
            return
    obj.append((key, value))


def _get(obj: Obj, key: Any) -> Any:
    return next((v for k, v in obj if k == key), None)


def _nest(draw: Any, value: Any) -> Any:
    for _ in range(draw(st.integers(1, 12))):
        value = [value] if draw(st.booleans()) else Obj([("x", value)])
    return value


def _mutate_header(draw: Any, h: Obj) -> None:
    """One structural mutation of a parsed header, in place."""
    entries = _tensor_entries(h)
    op = draw(st.sampled_from(["field", "dim", "offset", "swap_offsets", "del_field", "extra_field", "dup_entry", "dup_field",
                               "rename", "metadata", "nest", "replace_entry", "remove_entry", "add_empty", "shuffle", "dtype_swap"]))
    if op == "metadata":
        meta = draw(st.one_of(json_values, st.lists(st.tuples(st.text(max_size=4), st.text(max_size=4)), max_size=3).map(Obj),
                              st.lists(st.tuples(st.text(max_size=4), scalars), min_size=1, max_size=3).map(Obj)))
        if draw(st.booleans()) or not any(k == "__metadata__" for k, _ in h):
            _set(h, "__metadata__", meta)
        else:
            h.insert(draw(st.integers(0, len(h))), ("__metadata__", meta))
        return
    if op == "shuffle":
        h[:] = draw(st.permutations(list(h)))
        return
    if op == "add_empty":
        shape = draw(st.lists(st.one_of(st.integers(0, 4), st.sampled_from(BIG_INTS)), max_size=3)) + [0]
        ends = [o[1] for _, v in h if isinstance(v, Obj) and isinstance(o := _get(v, "data_offsets"), list) and len(o) == 2 and isinstance(o[1], int)]
        at = draw(st.sampled_from(ends)) if ends else 0
        entry = Obj([("dtype", draw(st.sampled_from(DTYPE_CODES))), ("shape", draw(st.permutations(shape))), ("data_offsets", [at, at])])
        h.insert(draw(st.integers(0, len(h))), (draw(keys), entry))
        return
    if not entries:
        h.append((draw(keys), draw(json_values)))
        return
    i = draw(st.sampled_from(entries))
    name, entry = h[i]
    if op == "field":
        field = draw(st.sampled_from(["dtype", "shape", "data_offsets"]))
        value = {"dtype": st.one_of(st.sampled_from(DTYPE_CODES), json_values), "shape": shapes,
                 "data_offsets": st.one_of(st.lists(ints, min_size=0, max_size=3), json_values)}[field]
        _set(entry, field, draw(value))
    elif op == "dim":
        shape = _get(entry, "shape")
        if type(shape) is list and shape:
            shape[draw(st.integers(0, len(shape) - 1))] = draw(st.one_of(st.integers(0, 8), ints, raw_tokens))
        else:
            _set(entry, "shape", draw(shapes))
    elif op == "offset":
        off = _get(entry, "data_offsets")
        if isinstance(off, list) and len(off) == 2 and all(isinstance(x, int) for x in off):
            j = draw(st.integers(0, 1))
            off[j] = draw(st.one_of(st.integers(-8, 8).map(lambda d: off[j] + d), ints, raw_tokens))
        else:
            _set(entry, "data_offsets", draw(st.lists(ints, min_size=2, max_size=2)))
    elif op == "swap_offsets":
        j = draw(st.sampled_from(entries))
        a, b = _get(entry, "data_offsets"), _get(h[j][1], "data_offsets")
        _set(entry, "data_offsets", b)
        _set(h[j][1], "data_offsets", a)
    elif op == "del_field":
        if entry:
            del entry[draw(st.integers(0, len(entry) - 1))]
    elif op == "extra_field":
        entry.append((draw(keys), draw(json_values)))
    elif op == "dup_entry":
        copy = Obj((k, list(v) if isinstance(v, list) else v) for k, v in entry)
        h.insert(draw(st.integers(0, len(h))), (name, copy))
    elif op == "dup_field":
        if entry:
            k, v = entry[draw(st.integers(0, len(entry) - 1))]
            entry.append((k, v if draw(st.booleans()) else draw(json_values)))
    elif op == "rename":
        h[i] = (draw(keys), entry)
    elif op == "nest":
        if draw(st.booleans()) and entry:
            j = draw(st.integers(0, len(entry) - 1))
            entry[j] = (entry[j][0], _nest(draw, entry[j][1]))
        else:
            h[i] = (name, _nest(draw, entry))
    elif op == "replace_entry":
        h[i] = (name, draw(json_values))
    elif op == "remove_entry":
        del h[i]
    elif op == "dtype_swap":
        j = draw(st.sampled_from(entries))
        a, b = _get(entry, "dtype"), _get(h[j][1], "dtype")
        _set(entry, "dtype", b)
        _set(h[j][1], "dtype", a)


TEXT_INSERTS = ["{", "}", "[", "]", ",", ":", '"', "\\", " ", "\t", "\n", "NaN", "Infinity", "-", "0", "9" * 25,
                "\\ud800", "\x00", "\x7f", "\u00e9", "\ufeff", "//", "/*", "null", "1e999", ',"a":1', "}{"]


def _mutate_text(draw: Any, text: str) -> str:
    """Edit the header's JSON text: replace a number token, insert junk, delete or duplicate a span."""
    op = draw(st.sampled_from(["number", "insert", "delete", "duplicate"]))
    if op == "number":
        nums = list(re.finditer(r"-?\d+", text))
        if nums:
            m = draw(st.sampled_from(nums))
            token = draw(st.one_of(raw_tokens, ints.map(str)))
            return text[: m.start()] + token + text[m.end() :]
        return text
    at = draw(st.integers(0, len(text)))
    if op == "insert":
        return text[:at] + draw(st.one_of(st.sampled_from(TEXT_INSERTS), st.text(max_size=4))) + text[at:]
    end = draw(st.integers(at, min(len(text), at + 40)))
    if op == "delete":
        return text[:at] + text[end:]
    return text[:end] + text[at:end] + text[end:]


def _length_prefix(draw: Any, n: int, total: int) -> int:
    kind = draw(st.sampled_from(["right"] * 10 + ["delta", "cap", "huge", "all", "random"]))
    if kind == "delta":
        return max(0, n + draw(st.integers(-16, 16)))
    if kind == "cap":
        return draw(st.sampled_from([MAX_HEADER, MAX_HEADER + 1, 200 << 20]))
    if kind == "huge":
        return draw(st.sampled_from([2**63, 2**64 - 1, 2**32 + n]))
    if kind == "all":
        return total
    if kind == "random":
        return draw(st.integers(0, 2**64 - 1))
    return n


def _mutate_data(draw: Any, data: bytes) -> bytes:
    kind = draw(st.sampled_from(["same"] * 9 + ["truncate", "append", "flip"]))
    if kind == "truncate" and data:
        return data[: draw(st.integers(0, len(data) - 1))]
    if kind == "append":
        return data + draw(st.binary(min_size=1, max_size=16))
    if kind == "flip" and data:
        b = bytearray(data)
        b[draw(st.integers(0, len(b) - 1))] ^= 1 << draw(st.integers(0, 7))
        return bytes(b)
    return data


@st.composite
def structurally_mutated(draw: Any) -> bytes:
    """A base file whose JSON header was edited as a structure and/or as text, re-encoded with some length prefix."""
    text, data = _split(draw(st.sampled_from(BASES)))
    h = json.loads(text, object_pairs_hook=Obj)
    for _ in range(draw(st.integers(0, 3))):
        _mutate_header(draw, h)
    text = dumps(h)
    for _ in range(draw(st.sampled_from([0, 0, 0, 1, 2]))):
        text = _mutate_text(draw, text)
    raw = text.encode("utf-8", "surrogatepass")
    if draw(st.booleans()):
        raw += b" " * ((8 - len(raw) % 8) % 8)
    data = _mutate_data(draw, data)
    return struct.pack("<Q", _length_prefix(draw, len(raw), len(raw) + len(data))) + raw + data


@st.composite
def byte_mutated(draw: Any) -> bytes:
    """A base file with raw byte edits: in the length prefix, the header, the data; truncated, extended, spliced."""
    blob = bytearray(draw(st.sampled_from(BASES)))
    (n,) = struct.unpack("<Q", blob[:8])
    for _ in range(draw(st.integers(1, 4))):
        if not blob:
            break
        region = draw(st.sampled_from(["prefix", "header", "header", "data", "any"]))
        lo, hi = {"prefix": (0, 8), "header": (8, 8 + n), "data": (8 + n, len(blob)), "any": (0, len(blob))}[region]
        hi = min(hi, len(blob))
        if lo >= hi:
            lo, hi = 0, len(blob)
        at = draw(st.integers(lo, hi - 1))
        op = draw(st.sampled_from(["flip", "set", "truncate", "append", "insert", "delete"]))
        if op == "flip":
            blob[at] ^= 1 << draw(st.integers(0, 7))
        elif op == "set":
            blob[at : at + 1] = draw(st.binary(min_size=1, max_size=1))
        elif op == "truncate":
            del blob[at:]
        elif op == "append":
            blob += draw(st.binary(min_size=1, max_size=32))
        elif op == "insert":
            blob[at:at] = draw(st.binary(min_size=1, max_size=8))
        else:
            del blob[at : at + draw(st.integers(1, 8))]
    return bytes(blob)


# ---- oracle


def _raw_bytes(t: torch.Tensor) -> bytes:
    return bytes(t.contiguous().reshape(-1).view(torch.uint8).numpy())


def _ours(path: Path) -> tuple[dict[str, torch.Tensor], dict[str, str]] | None:
    """Our reader's view (None if it refused with a SoupError), cross-checked between its two levels and the raw file."""
    t0 = time.perf_counter()
    try:
        infos, meta = read_header(path)
    except SoupError:
        return None
    finally:
        assert time.perf_counter() - t0 < TIME_LIMIT_S, "read_header took too long"
    blob = path.read_bytes()
    (n,) = struct.unpack("<Q", blob[:8])
    tensors: dict[str, torch.Tensor] = {}
    fd = os.open(path, os.O_RDONLY)
    try:
        for name, info in infos.items():
            assert (info.file, info.name) == (path, name)
            assert 8 + n <= info.start <= info.end <= len(blob)
            assert info.nbytes == math.prod(info.shape) * info.dtype.itemsize
            t = read_tensor(fd, info)
            assert (t.dtype, tuple(t.shape)) == (info.dtype, info.shape)
            assert _raw_bytes(t) == blob[info.start : info.end]
            tensors[name] = t
    finally:
        os.close(fd)
    try:
        ck = open_checkpoint(path)
    except SoupError:
        return tensors, meta  # stricter at the higher level is allowed; the header level still has to agree
    try:
        assert sorted(ck.names()) == sorted(tensors)
        for name in ck.names():
            t = ck.read(name)
            assert (t.dtype, tuple(t.shape)) == (tensors[name].dtype, tuple(tensors[name].shape)) and ck.meta(name) == (t.dtype, tuple(t.shape))
            assert _raw_bytes(t) == _raw_bytes(tensors[name])
    finally:
        ck.close()
    return tensors, meta


def _reference(path: Path) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    with safe_open(str(path), "pt") as f:
        return {k: f.get_tensor(k) for k in f.keys()}, (f.metadata() or {})


def _check_safetensors(blob: bytes, path: Path) -> None:
    path.write_bytes(blob)
    ours = _ours(path)
    _note("ours: refused" if ours is None else "ours: loaded")
    if ours is None:
        return
    tensors, meta = ours
    try:
        ref_tensors, ref_meta = _reference(path)
    except Exception as e:
        raise AssertionError(f"our reader loaded a file the reference refuses ({type(e).__name__}: {e!s:.200})") from None
    assert sorted(tensors) == sorted(ref_tensors)
    assert meta == ref_meta
    for name, t in tensors.items():
        r = ref_tensors[name]
        assert (t.dtype, tuple(t.shape)) == (r.dtype, tuple(r.shape)), name
        assert _raw_bytes(t) == _raw_bytes(r), name  # NaN-safe equality
        if not t.is_floating_point():
            assert torch.equal(t, r), name


def _note(what: str) -> None:
    """Count an outcome in hypothesis' statistics (pytest --hypothesis-show-statistics) when under @given."""
    if currently_in_test_context():
        event(what)


def _json_leaves(v: Any) -> Iterator[Any]:
    stack = [v]
    while stack:
        x = stack.pop()
        if isinstance(x, list):
            stack.extend(x)
        elif isinstance(x, tuple):
            stack.extend(x)
        else:
            yield x


def _is_pairs(x: Any) -> bool:
    """A JSON object as json.loads(..., object_pairs_hook=list) returns it."""
    return isinstance(x, list) and all(isinstance(p, tuple) for p in x)


@pytest.fixture(scope="module")
def fuzz_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("fuzz")


# ---- properties


F4 = b"\0\0\x80\x3f"  # 1.0 as float32


@settings(max_examples=220, **FUZZ)
@given(blob=structurally_mutated())
@example(blob=_file('{"a":' + _entry("F32", [1], 0, 4) + ',"b":' + _entry("F32", [1], 2, 6) + "}", F4 + F4[:2]))  # overlap
@example(blob=_file('{"a":' + _entry("F32", [1], 0, 4) + ',"a":' + _entry("F32", [1], 4, 8) + "}", F4 * 2))  # duplicate key
@example(blob=_file('{"a":' + _entry("F32", [1], 4, 8) + "}", F4 * 2))  # gap before the first tensor
@example(blob=_file('{"a":' + _entry("F32", [1], 0, 4) + ',"b":' + _entry("F32", [1], 8, 12) + "}", F4 * 3))  # gap between
@example(blob=_file('{"a":' + _entry("F32", [1], 0, 4) + "}", F4 + b"junk"))  # trailing bytes
@example(blob=_file('{"__metadata__":["x"],"a":' + _entry("F32", [1], 0, 4) + "}", F4))
@example(blob=_file('{"__metadata__":"x","a":' + _entry("F32", [1], 0, 4) + "}", F4))
@example(blob=_file('{"a":{"dtype":"F32","shape":[Infinity],"data_offsets":[0,4]}}', F4))
@example(blob=_file('{"a":' + _entry("F32", [-1], 0, 4) + "}", F4))
@example(blob=_file('{"a":' + _entry("F32", [-1, -1], 0, 4) + "}", F4))
@example(blob=_file('{"a":{"dtype":"F32","shape":[1.0],"data_offsets":[0,4]}}', F4))
@example(blob=_file('{"a":{"dtype":"F32","shape":[2.0],"data_offsets":[0,8]}}', F4 * 2))
@example(blob=_file('{"a":' + _entry("F32", [1], 0, 4) + "}", F4, prefix=10_000))  # header length past the end
@example(blob=_file('{"a":' + _entry("F32", [1], 0, 4) + "}", F4, prefix=MAX_HEADER + 1))  # over the 100 MB cap
@example(blob=_file('{"a":' + _entry("F32", [1], 0, 4) + "}", F4, prefix=2**64 - 1))
@example(blob=_file('{"a":' + _entry("F32", [0, 4611686018427387904], 0, 0) + "}"))  # empty, huge dim that torch still takes
def test_structural_mutations_agree_with_reference(blob: bytes, fuzz_dir: Path):
    _check_safetensors(blob, fuzz_dir / "structural.safetensors")


@settings(max_examples=120, **FUZZ)
@given(blob=byte_mutated())
@example(blob=BASES[0][:7])
@example(blob=b"")
@example(blob=BASES[0][:-1])
@example(blob=BASES[0] + b"\0")
def test_byte_mutations_agree_with_reference(blob: bytes, fuzz_dir: Path):
    _check_safetensors(blob, fuzz_dir / "bytes.safetensors")


# ---- plain tests: the oracle is not vacuous, and the hostile headers the brief names are refused


def test_base_files_load_like_the_reference(fuzz_dir: Path):
    for i, blob in enumerate(BASES):
        path = fuzz_dir / f"base{i}.safetensors"
        path.write_bytes(blob)
        ours = _ours(path)
        assert ours is not None, f"base {i} refused"
        _check_safetensors(blob, path)


@pytest.mark.parametrize("edit", ["shuffle", "rename", "metadata", "pad"])
def test_benign_edits_still_load(edit: str, fuzz_dir: Path):
    """Valid variants (entry order, names, metadata, header padding) must still load: strictness has limits."""
    text, data = _split(BASES[0])
    h = json.loads(text, object_pairs_hook=Obj)
    if edit == "shuffle":
        h.reverse()
    elif edit == "rename":
        h[:] = [(k if k == "__metadata__" else f"renamed/{k}\u00e9", v) for k, v in h]
    elif edit == "metadata":
        _set(h, "__metadata__", Obj([("a", "1"), ("\u00fc", "")]))
    text = dumps(h) + (" " * 13 if edit == "pad" else "")
    blob = _file(text, data)
    path = fuzz_dir / f"benign_{edit}.safetensors"
    path.write_bytes(blob)
    assert _ours(path) is not None
    _check_safetensors(blob, path)


def _refused(blob: bytes, path: Path, match: str, within: float = 1.0) -> CheckpointError:
    path.write_bytes(blob)
    t0 = time.perf_counter()
    with pytest.raises(CheckpointError, match=match) as e:
        read_header(path)
    assert time.perf_counter() - t0 < within
    with pytest.raises(CheckpointError):
        open_checkpoint(path)
    return e.value


ONE = _entry("F32", [1], 0, 4)


@pytest.mark.parametrize("header, data, match", [
    ('{"a":' + ONE + ',"b":' + _entry("F32", [1], 2, 6) + "}", F4 + F4[:2], "overlap"),
    ('{"a":' + ONE + ',"b":' + _entry("F32", [1], 0, 4) + "}", F4, "overlap"),
    ('{"a":' + ONE + ',"a":' + _entry("F32", [1], 4, 8) + "}", F4 * 2, "'a' twice"),
    ('{"a":{"dtype":"F32","dtype":"F32","shape":[1],"data_offsets":[0,4]}}', F4, "'dtype' twice"),
    ('{"a":' + ONE + ',"b":' + _entry("F32", [1], 8, 12) + "}", F4 * 3, "belong to no tensor"),
    ('{"a":' + ONE + "}", F4 + b"xx", "after the last tensor"),
    ('{"__metadata__":["x"],"a":' + ONE + "}", F4, "__metadata__ must map strings to strings"),
    ('{"__metadata__":"x","a":' + ONE + "}", F4, "__metadata__ must map strings to strings"),
    ('{"__metadata__":{"k":1},"a":' + ONE + "}", F4, "__metadata__ must map strings to strings"),
    ('{"__metadata__":{"k":{"n":"v"}},"a":' + ONE + "}", F4, "__metadata__ must map strings to strings"),
    ('{"a":{"dtype":"F32","shape":[Infinity],"data_offsets":[0,4]}}', F4, r"shape \[inf\]|Infinity is not JSON"),
    ('{"a":' + _entry("F32", [-1], 0, 4) + "}", F4, "shape"),
    ('{"a":{"dtype":"F32","shape":[2.0],"data_offsets":[0,8]}}', F4 * 2, "shape"),
    ('{"a":{"dtype":"F32","shape":[1],"data_offsets":[0,4.0]}}', F4, "data_offsets"),
    ('{"a":' + _entry("F32", [2], 0, 4) + "}", F4, "needs 8"),
    ('["a"]', b"", "JSON object"),
    ('{"a":' + ONE + "} x", F4, "not valid JSON"),
])
def test_hostile_headers_are_refused(header: str, data: bytes, match: str, fuzz_dir: Path):
    path = fuzz_dir / "hostile.safetensors"
    _refused(_file(header, data), path, match)
    with pytest.raises(Exception):  # the reference refuses them too, so refusing is not merely strict
        _reference(path)


def test_header_nested_200000_deep_is_refused_quickly(fuzz_dir: Path):
    for nest in ("[" * 200_000 + "]" * 200_000, '{"x":' * 200_000 + "1" + "}" * 200_000):
        _refused(_file('{"a":' + nest + "}"), fuzz_dir / "deep.safetensors", "nests too deep to read")


@pytest.mark.parametrize("prefix, match", [(10_000, "header claims 10000 bytes but the file has"),
                                           (MAX_HEADER + 1, "over the 100 MB limit"), (200 << 20, "over the 100 MB limit"),
                                           (2**64 - 1, "over the 100 MB limit")])
def test_header_length_is_checked(prefix: int, match: str, fuzz_dir: Path):
    _refused(_file('{"a":' + ONE + "}", F4, prefix=prefix), fuzz_dir / "length.safetensors", match)


@pytest.mark.parametrize("blob, match", [(b"", "too short"), (b"\x08\0\0\0\0\0\0", "too short"), (struct.pack("<Q", 0), "does not start with a JSON object")])
def test_tiny_files_are_refused(blob: bytes, match: str, fuzz_dir: Path):
    _refused(blob, fuzz_dir / "tiny.safetensors", match)


# ================================================================================================
# Recipes


ROOT = "@ROOT@"  # replaced by a folder holding models a, b, c after the text is mutated

RECIPES = [
    "method: linear\nmodels: [a, b]\n",
    """\
method: ties
base: c
models:
  - a
  - path: b
    weight: 2
    parameters: {density: 0.5}
parameters: &p
  density: 0.7
dtype: bfloat16
seed: 3
keys: exact
overrides:
  - match: '*.bias'
    take: base
  - match: 're:layers\\.[0-3]\\.'
    parameters: *p
output: {shard_size: 500MB, format: safetensors}
""",
    f"""\
merge_method: ties
base_model: {ROOT}/c
models:
  - model: {ROOT}/a
    parameters: {{density: 0.5, weight: 0.3}}
  - model: {ROOT}/b
    parameters:
      density: [0.2, 0.8]
      weight: 0.7
parameters:
  normalize: true
dtype: float16
""",
]

YAML_SNIPPETS = [
    "&x ", "*x", "&a [*a]", "<<: *x\n", "<<: 5\n", "!!python/object:os.system ", "!!python/name:os.system ", "!!binary ", "!!int ",
    "!!float ", "!!bool ", "!!timestamp ", "!!set ", "!!omap ", "!!str ", "!!null ", "!custom ", "{", "[", "]", "}", "\t", "\x00",
    "\x07", "\ufeff", "\ud800", ": ", "- ", "? ", "\n", "'", '"', "#", "|\n", ">-\n", "0x" + "f" * 400, "0x" + "f" * 4000, "9" * 30,
    "9" * 5000, "1e999", "-1e400", ".inf", "-.inf", ".nan", "~", "null", "yes", "no", "on", "2001-13-45", "2001-02-03",
    "2001-02-03T04:05:06Z", "1:20:30", "0o777", "0b101", "+1_000", "-0", "---\n", "...\n", "%YAML 1.1\n", "%TAG ! tag:x,2000:\n",
    "[" * 70 + "]" * 70, "{a: " * 70 + "1" + "}" * 70, "a" * 300, "~nosuchuser_fuzz/x", "/dev/null", "..", "re:(", "re:(a*)*b",
    "method: ties\n", "models: []\n", "models: {a: 1}\n", "1: 2\n", "? [x]\n: 2\n", "~: 1\n", "true: 1\n", "parameters: [1]\n",
]
YAML_VALUES = ["0", "-1", "1.5", "2", "0.5", "1e999", ".nan", "-.inf", "0x" + "f" * 400, "0x" + "f" * 4000, "9" * 5000, "~", "[]", "{}",
               "[a, b]", "{x: 1}", "*x", "&x 1", "!!binary aGk=", "!!set {a}", "'str'", "yes", "2001-13-45", "2002-02-02", "a" * 300,
               "~nosuchuser_fuzz/x", "[0.1, 0.5, 0.9]", "[{filter: x, value: 0.5}, {value: 1}]", "re:[", "ties", "linear", "slerp",
               "model_stock", "dare_ties", "float32", "torch"]


def _mutate_recipe(draw: Any, text: str) -> str:
    lines = text.split("\n")
    op = draw(st.sampled_from(["insert", "value", "value", "delete", "dup_line", "swap", "indent", "key", "chars"]))
    i = draw(st.integers(0, len(lines) - 1))
    if op == "insert":
        line = lines[i]
        at = draw(st.integers(0, len(line)))
        lines[i] = line[:at] + draw(st.one_of(st.sampled_from(YAML_SNIPPETS), st.text(max_size=5))) + line[at:]
    elif op == "value":
        m = re.search(r"(:\s+|-\s+|\[|, )", lines[i])
        if m:
            lines[i] = lines[i][: m.end()] + draw(st.sampled_from(YAML_VALUES)) + ("]" if "[" in lines[i][: m.end()] else "")
    elif op == "delete":
        del lines[i]
    elif op == "dup_line":
        lines.insert(i, lines[i])  # duplicate keys, duplicate list items
    elif op == "swap":
        j = draw(st.integers(0, len(lines) - 1))
        lines[i], lines[j] = lines[j], lines[i]
    elif op == "indent":
        lines[i] = draw(st.sampled_from(["\t", " ", "", "    ", "  \t"])) + lines[i].lstrip(" ")
    elif op == "key":
        key = draw(st.sampled_from(["1:", "? [x]\n  :", "~:", "true:", "1.5:", '"":', "<<:", "method:", "models:", "merge_method:"]))
        lines[i] = re.sub(r"^(\s*-?\s*)\w+:", lambda m: m.group(1) + key, lines[i])
    else:
        text = "\n".join(lines)
        at = draw(st.integers(0, len(text)))
        return text[:at] + draw(st.text(max_size=3)) + text[at + draw(st.integers(0, 3)) :]
    return "\n".join(lines)


@st.composite
def mutated_recipes(draw: Any) -> str:
    text = draw(st.sampled_from(RECIPES))
    for _ in range(draw(st.sampled_from([1, 1, 1, 2, 3, 4]))):
        text = _mutate_recipe(draw, text)
    return text


YAML_ALPHABET = list(":-[]{}&*!|>'\"#%@`,?\n\t .~0123456789abcmodelsxy") + ["\x00", "\u00e9", "\ufeff"]
random_yaml_text = st.one_of(
    st.text(max_size=80),
    st.text(alphabet=st.sampled_from(YAML_ALPHABET), max_size=120),
    st.lists(st.sampled_from(YAML_SNIPPETS + YAML_VALUES + ["a", "b", "x"]), max_size=12).map("".join),
)


def _check_recipe(r: Recipe) -> None:
    """What a validated Recipe promises its users (the planner, the engine)."""
    method = get_method(r.method)
    assert len(r.models) >= method.min_models >= 1 or (r.base is not None and len(r.models) >= 1), r.models
    for m in [*r.models, *([r.base] if r.base is not None else [])]:
        assert isinstance(m.path, str) and m.resolved is not None and m.resolved.exists(), m
    assert r.dtype is None or r.dtype in DTYPES
    assert r.keys in KEY_MODES and isinstance(r.seed, int) and 0 <= r.seed < 2**63
    assert 0 < r.output.shard_size < 2**63 and r.output.format in OUTPUT_FORMATS
    names = ["embed.weight", "model.layers.0.mlp.weight", "model.layers.1.mlp.bias", "lm_head.weight"]
    rules = tensor_rules(r, names)  # a validated recipe resolves to one rule per tensor
    assert sorted(rules) == sorted(names)
    for rule in rules.values():
        assert rule.take in (None, *TAKE_CHOICES)
        assert rule.weights is None or len(rule.weights) == len(r.models)


def _check_recipe_text(text: str, root: Path) -> None:
    text = text.replace(ROOT, str(root))
    for call in (lambda: load_yaml(text, "fuzz.yaml"), lambda: recipe_from_yaml_text(text, "fuzz.yaml", root=root)):
        t0 = time.perf_counter()
        try:
            result = call()
        except RecipeError as e:
            assert e.problems and all(isinstance(p, str) and p for p in e.problems)
            assert str(e)
        else:
            assert isinstance(result, (tuple, Recipe))
            if isinstance(result, Recipe):
                _note("recipe")
                _check_recipe(result)
        took = time.perf_counter() - t0
        assert took < TIME_LIMIT_S, f"took {took:.2f}s"


@pytest.fixture(scope="module")
def recipe_root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("recipe")
    for name in "abc":
        (root / name).mkdir()
    return root


def test_base_recipes_are_valid(recipe_root: Path):
    for text in RECIPES:
        assert isinstance(recipe_from_yaml_text(text.replace(ROOT, str(recipe_root)), "r.yaml", root=recipe_root), Recipe)


@settings(max_examples=220, **FUZZ)
@given(text=mutated_recipes())
@example(text="method: linear\nmodels: [a, b]\nmethod: ties\n")  # duplicate key
@example(text="method: linear\nmodels: [a, b]\n1: 2\n")  # non-str key
@example(text="method: linear\nmodels: [a, b]\n\tseed: 1\n")  # tab
@example(text="method: linear\nmodels: [a, b]\nseed: !!python/object:os.system x\n")
@example(text="method: linear\nmodels: [a, b]\nseed: 99999999999999999999999999\n")
@example(text="x: &x [a, b]\nmethod: linear\nmodels: *x\n")
def test_mutated_recipes_give_recipe_or_recipe_error(text: str, recipe_root: Path):
    _check_recipe_text(text, recipe_root)


@settings(max_examples=150, **FUZZ)
@given(text=random_yaml_text)
@example(text="")
@example(text="\x00")
@example(text="- - - - -")
def test_random_text_gives_recipe_or_recipe_error(text: str, recipe_root: Path):
    _check_recipe_text(text, recipe_root)


def _bomb(levels: int) -> str:
    lines = ['a0: &a0 ["lol", "lol", "lol", "lol", "lol", "lol", "lol", "lol", "lol", "lol"]']
    for i in range(1, levels):
        lines.append(f"a{i}: &a{i} [" + ", ".join([f"*a{i - 1}"] * 10) + "]")
    return "\n".join(lines) + f"\nmethod: linear\nmodels: *a{levels - 1}\n"


@pytest.mark.parametrize("text, match", [
    (_bomb(9), "alias bomb"),
    ("a: &a [*a]\n", "recursive alias"),
    ("a: &a {b: *a}\n", "recursive alias"),
    ("[" * 5000 + "]" * 5000, "nesting is deeper than 64"),
    ("{a: " * 5000 + "1" + "}" * 5000, "nesting is deeper than 64"),
    ("".join(f"{' ' * (2 * i)}k{i}:\n" for i in range(200)) + " " * 400 + "v\n", "nesting is deeper than 64"),
])
def test_hostile_yaml_is_refused_quickly(text: str, match: str):
    for call in (lambda: load_yaml(text, "r.yaml"), lambda: recipe_from_yaml_text(text, "r.yaml")):
        t0 = time.perf_counter()
        with pytest.raises(RecipeError, match=match):
            call()
        assert time.perf_counter() - t0 < 1.0
