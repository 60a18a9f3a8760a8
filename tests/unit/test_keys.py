import hashlib
import os
import re

import pytest

from zimage_batch.output.keys import KEY_RE, safe_key

HOSTILE_IDS = [
    "plain",
    "a/b",
    "a_b",
    "a\\b",
    "../../etc/passwd",
    "../",
    "..",
    ".",
    "./x",
    "/abs/path.png",
    "C:\\Windows\\system32",
    "\\\\server\\share",
    "nul\x00byte",
    "\x00",
    "ctrl\x01\x1f\x7f\r\n\t",
    "evil\u202egnp.exe",
    "\u200f\u202a\u202b\u202c\u202d\u2066\u2067\u2068\u2069",
    "x" * 10_000,
    "a/" * 5_000,
    "中文提示词",
    "emoji 🎨🖼️",
    "-leading-dash",
    "--",
    "_",
    ".hidden",
    "name.with.dots.json",
    "sample.png",
    "trailing.",
    " ",
    "CON",
    "NUL.txt",
    "%2e%2e%2f",
    "a:b*c?d\"e<f>g|h",
    "\ud800lone-surrogate",
]


@pytest.mark.parametrize("row_id", HOSTILE_IDS, ids=lambda s: repr(s)[:40])
def test_hostile_ids_are_safe(row_id, tmp_path):
    key = safe_key(row_id)
    assert key
    assert KEY_RE.match(key)
    assert re.fullmatch(r"[A-Za-z0-9_-]+", key)
    assert "." not in key and "/" not in key and "\\" not in key
    assert not key.startswith(("-", "."))
    assert len(key) <= 64 + 1 + 16
    assert key.endswith(hashlib.sha256(row_id.encode("utf-8", "surrogatepass")).hexdigest()[:16])
    root = str(tmp_path / "images" / "shard")
    for ext in ("png", "json", "tar"):
        full = os.path.normpath(os.path.join(root, f"{key}.{ext}"))
        assert os.path.dirname(full) == root
    # a WebDataset sample key is everything before the first dot
    assert f"{key}.png".split(".", 1)[0] == key


def test_format():
    h = hashlib.sha256(b"hello world").hexdigest()[:16]
    assert safe_key("hello world") == f"hello_world-{h}"
    assert safe_key("a//..//b") == f"a_b-{hashlib.sha256(b'a//..//b').hexdigest()[:16]}"
    assert safe_key("中文") == hashlib.sha256("中文".encode()).hexdigest()[:16]
    assert safe_key("x" * 10_000) == "x" * 64 + "-" + hashlib.sha256(b"x" * 10_000).hexdigest()[:16]


def test_deterministic():
    for row_id in HOSTILE_IDS:
        assert safe_key(row_id) == safe_key(row_id)
    # pinned value: keys must not change between versions, or resumes would miss their outputs
    assert safe_key("row-000001") == "row-000001-" + hashlib.sha256(b"row-000001").hexdigest()[:16]


def test_unique_across_case_and_slug_collisions():
    groups = [
        ["abc", "ABC", "Abc", "aBc"],
        ["a/b", "a_b", "a b", "a.b", "a\\b", "a//b", "a__b", "a\x00b", "a\u202eb", "a中b"],
        ["x" * 64, "x" * 65, "x" * 10_000],
        ["", " ", ".", "..", "/", "中", "文"],  # empty slugs: hash only
    ]
    for group in groups:
        keys = [safe_key(i) for i in group]
        assert len(set(keys)) == len(keys), dict(zip(group, keys))
        # case-insensitive file systems: keys must differ there too
        assert len({k.lower() for k in keys}) == len(keys)
    every = [safe_key(i) for i in set(HOSTILE_IDS)]
    assert len(set(every)) == len(every)
    many = [safe_key(f"row/{i}") for i in range(20_000)]
    assert len(set(many)) == len(many)


def test_empty_and_non_str():
    assert safe_key("") == hashlib.sha256(b"").hexdigest()[:16]
    with pytest.raises(TypeError):
        safe_key(123)  # type: ignore[arg-type]
    with pytest.raises(TypeError):
        safe_key(None)  # type: ignore[arg-type]
