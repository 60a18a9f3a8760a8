"""A malformed manifest fails before any GPU work (before Ray starts), with one line
naming the file, the column and the first offending rows, and writes nothing.

Every case below is run through both ``zimage-batch validate`` and ``zimage-batch run`` in this
process (click's CliRunner; a traceback or a stray line on stderr, from click, warnings, logging
or a C library, is caught, and a command that gets as far as Ray fails the case), all in one
module-scoped fixture; each test then checks one case's
results. The job-default refusals and a good manifest, through the real command in a subprocess:
tests/drills/test_manifest_cli.py.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from cli_in_process import cli_in_process, ray_not_started

RUN_DEADLINE_S = 15.0  # a refusal reads little more than the manifest (reaching Ray fails on its own)


# ---------------------------------------------------------------------- building manifests
def _write(path: Path, columns: dict, schema: pa.Schema | None = None, **kwargs) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    pq.write_table(pa.table(columns, schema=schema), path, **kwargs)
    return path


def _good_columns(n: int = 4) -> dict:
    return {"id": [f"r{i}" for i in range(n)], "prompt": [f"a cat number {i}" for i in range(n)]}


def _with(**overrides) -> dict:
    cols = _good_columns()
    cols.update(overrides)
    return cols


def _single(**columns) -> Callable[[Path], Path]:
    """A builder writing one file ``m.parquet`` with the given columns over _good_columns()."""

    def build(d: Path) -> Path:
        return _write(d / "m.parquet", _with(**columns))

    return build


def _missing_id(d: Path) -> Path:
    return _write(d / "m.parquet", {"prompt": ["a", "b"], "seed": [1, 2]})


def _missing_prompt(d: Path) -> Path:
    return _write(d / "m.parquet", {"id": ["a", "b"], "seed": [1, 2]})


def _typed(name: str, values: list, arrow_type: pa.DataType) -> Callable[[Path], Path]:
    def build(d: Path) -> Path:
        cols = _good_columns()
        cols[name] = pa.array(values, type=arrow_type)
        return _write(d / "m.parquet", cols)

    return build


def _dup_in_folder(d: Path) -> Path:
    folder = d / "manifest"
    _write(folder / "part-0.parquet", {"id": ["a", "b", "c"], "prompt": ["x", "y", "z"]})
    _write(folder / "part-1.parquet", {"id": ["d", "b"], "prompt": ["x", "y"]})
    return folder


def _bad_row_in_second_file(d: Path) -> Path:
    folder = d / "manifest"
    _write(folder / "part-0.parquet", {"id": ["a", "b"], "prompt": ["x", "y"], "width": [64, 128]})
    _write(folder / "part-1.parquet", {"id": ["c", "d", "e"], "prompt": ["x", "y", "z"], "width": [64, 64, 100]})
    return folder


def _mistyped_in_second_file(d: Path) -> Path:
    folder = d / "manifest"
    _write(folder / "part-0.parquet", {"id": ["a"], "prompt": ["x"], "seed": [1]})
    _write(folder / "part-1.parquet", {"id": ["b"], "prompt": ["y"], "seed": ["one"]})
    return folder


def _late_bad_row(d: Path) -> Path:
    """100k rows in several row groups (and several read batches); row 70_001 is bad."""
    n = 100_000
    steps = np.full(n, 8, dtype=np.int64)
    steps[70_001] = 0
    cols = {"id": [f"id{i}" for i in range(n)], "prompt": ["p"] * n, "num_inference_steps": steps}
    return _write(d / "m.parquet", cols, row_group_size=30_000)


def _many_bad_rows(d: Path) -> Path:
    n = 20
    cols = {"id": [f"id{i}" for i in range(n)], "prompt": ["p"] * n, "height": [72] * n}
    return _write(d / "m.parquet", cols)


def _text_file(d: Path) -> Path:
    p = d / "m.parquet"
    p.write_text("id,prompt\na,a cat\nb,a dog\n")
    return p


def _truncated(d: Path) -> Path:
    p = _write(d / "full.parquet", {"id": [f"r{i}" for i in range(1000)], "prompt": ["a cat"] * 1000})
    data = p.read_bytes()
    p.unlink()
    out = d / "m.parquet"
    out.write_bytes(data[: len(data) // 2])
    return out


def _corrupt_body(d: Path) -> Path:
    """Footer intact (schema and row counts readable), column data overwritten with garbage."""
    n = 2000
    ids = [f"row-{i:06d}-{'x' * 20}" for i in range(n)]
    p = _write(d / "full.parquet", {"id": ids, "prompt": ["a cat"] * n}, compression="snappy",
               use_dictionary=False)
    data = bytearray(p.read_bytes())
    p.unlink()
    footer_len = int.from_bytes(data[-8:-4], "little")
    body_end = len(data) - 8 - footer_len
    rng = np.random.default_rng(0)
    data[4:body_end] = rng.integers(0, 256, body_end - 4, dtype=np.uint8).tobytes()
    out = d / "m.parquet"
    out.write_bytes(bytes(data))
    return out


def _empty_file(d: Path) -> Path:
    p = d / "m.parquet"
    p.write_bytes(b"")
    return p


def _prompt_and_edit_files(d: Path) -> Path:
    """One file of prompts, one of edits: the folder is an edit manifest whose first file lacks sources."""
    folder = d / "manifest"
    _write(folder / "part-0.parquet", {"id": ["a"], "prompt": ["x"]})
    _write(folder / "part-1.parquet", {"id": ["b"], "prompt": ["x"], "source": [str(d / "b.png")]})
    return folder


def _passthrough_types_clash(d: Path) -> Path:
    folder = d / "manifest"
    _write(folder / "part-0.parquet", {"id": ["a"], "prompt": ["x"], "score": [1]})
    _write(folder / "part-1.parquet", {"id": ["b"], "prompt": ["x"], "score": ["high"]})
    return folder


def _not_utf8(name: str, string_type: pa.DataType = pa.string()) -> Callable[[Path], Path]:
    """Raw bytes in a string column (other writers than pyarrow do not always check them)."""

    def build(d: Path) -> Path:
        cols = _good_columns()
        cols[name] = pa.array([c.encode() for c in cols.get(name, ["x"] * 4)[:2]] + [b"\xff\xfe bad", b"ok"],
                              pa.binary()).view(pa.string()).cast(string_type)
        return _write(d / "m.parquet", cols)

    return build


def _partition_clashes_with_column(d: Path) -> Path:
    folder = d / "manifest"
    _write(folder / "date=2026-11-27" / "part-0.parquet", {"id": ["a"], "prompt": ["x"], "date": ["2026-11-26"]})
    return folder


def _missing_path(d: Path) -> Path:
    return d / "does-not-exist.parquet"


def _empty_folder(d: Path) -> Path:
    folder = d / "manifest"
    folder.mkdir()
    (folder / "README.txt").write_text("no parquet here")
    return folder


@dataclass(frozen=True)
class Case:
    name: str
    build: Callable[[Path], Path]
    column: str | None = None  # the column the message must name
    rows: tuple[str, ...] = ()  # fragments naming offending rows (row number / id)
    files: tuple[str, ...] | None = None  # file names the message must hold (default: the manifest's name)
    extra: tuple[str, ...] = field(default=())  # other fragments the message must hold


CASES = [
    Case("missing_id", _missing_id, column="id"),
    Case("missing_prompt", _missing_prompt, column="prompt"),
    Case("width_as_string", _typed("width", ["64", "64", "128", "64"], pa.string()), column="width"),
    Case("seed_as_float", _typed("seed", [1.0, 2.5, 3.0, 4.0], pa.float64()), column="seed", rows=("row 1", "'r1'")),
    Case("width_as_huge_float", _typed("width", [64.0, 64.0, 2.0**60, 64.0], pa.float64()), column="width",
         rows=("row 2", "'r2'")),
    Case("prompt_not_utf8", _not_utf8("prompt"), column="prompt", rows=("row 2", "'r2'")),
    Case("id_not_utf8", _not_utf8("id"), column="id", rows=("row 2",)),
    Case("passthrough_not_utf8", _not_utf8("caption"), column="caption", rows=("row 2", "'r2'")),
    Case("string_view_not_utf8", _not_utf8("caption", pa.string_view()), column="caption", rows=("row 2", "'r2'")),
    Case("prompt_as_int", _typed("prompt", [1, 2, 3, 4], pa.int64()), column="prompt"),
    # integer ids are their decimal text; other id types are refused naming the type as stored
    Case("id_as_float", _typed("id", [1.0, 2.0, 3.0, 4.0], pa.float64()), column="id", extra=("double",)),
    Case("id_as_large_binary", _typed("id", [b"a", b"b", b"c", b"d"], pa.large_binary()), column="id",
         extra=("large_binary",)),
    Case("id_as_bool", _typed("id", [True, False, True, False], pa.bool_()), column="id", extra=("bool",)),
    Case("id_as_timestamp", _typed("id", [0, 1, 2, 3], pa.timestamp("us")), column="id", extra=("timestamp",)),
    Case("duplicate_int_ids", _typed("id", [7, 2**40, 7, 3], pa.int64()), column="id", rows=("'7'",)),
    Case("null_int_id", _typed("id", [7, None, 8, 9], pa.uint64()), column="id", rows=("row 1",)),
    Case("empty_string_view_id", _typed("id", ["a", "b", "", "d"], pa.string_view()), column="id", rows=("row 2",)),
    Case("width_as_large_string", _typed("width", ["64"] * 4, pa.large_string()), column="width",
         extra=("large_string",)),
    Case("steps_as_string", _typed("num_inference_steps", ["8"] * 4, pa.string()), column="num_inference_steps"),
    Case("mistyped_in_second_file", _mistyped_in_second_file, column="seed", files=("part-1.parquet",)),
    Case("duplicate_ids_in_file", _single(id=["a", "b", "a", "c"]), column="id", rows=("'a'",)),
    Case("duplicate_ids_across_files", _dup_in_folder, column="id", rows=("'b'",),
         files=("part-0.parquet", "part-1.parquet")),
    Case("empty_id", _single(id=["a", "", "c", "d"]), column="id", rows=("row 1",)),
    Case("null_id", _single(id=["a", "b", None, "d"]), column="id", rows=("row 2",)),
    Case("null_prompt", _single(prompt=["x", None, "y", "z"]), column="prompt", rows=("row 1", "'r1'")),
    Case("width_not_multiple_of_16", _single(width=[64, 64, 100, 64]), column="width", rows=("row 2", "'r2'")),
    Case("height_too_large", _single(height=[64, 8192, 64, 64]), column="height", rows=("row 1", "'r1'")),
    Case("width_zero", _single(width=[64, 64, 64, 0]), column="width", rows=("row 3", "'r3'")),
    Case("width_negative", _single(width=[-64, 64, 64, 64]), column="width", rows=("row 0", "'r0'")),
    Case("width_negative_odd", _single(width=[64, -5, 64, 64]), column="width", rows=("row 1", "'r1'")),
    Case("steps_zero", _single(num_inference_steps=[8, 0, 8, 8]), column="num_inference_steps",
         rows=("row 1", "'r1'")),
    Case("steps_negative", _single(num_inference_steps=[8, 8, -3, 8]), column="num_inference_steps",
         rows=("row 2", "'r2'")),
    Case("guidance_negative", _single(guidance_scale=[0.0, -1.5, 0.0, 0.0]), column="guidance_scale",
         rows=("row 1", "'r1'")),
    Case("guidance_nan", _single(guidance_scale=[0.0, 0.0, float("nan"), 0.0]), column="guidance_scale",
         rows=("row 2", "'r2'")),
    Case("guidance_infinite", _single(guidance_scale=[0.0, float("inf"), 0.0, 0.0]), column="guidance_scale",
         rows=("row 1", "'r1'")),
    Case("cfg_truncation_nan", _single(cfg_truncation=[1.0, 1.0, 1.0, float("nan")]), column="cfg_truncation",
         rows=("row 3", "'r3'")),
    Case("cfg_normalization_negative", _single(cfg_normalization=[0.0, -3.0, 0.0, 0.0]), column="cfg_normalization",
         rows=("row 1", "'r1'")),
    Case("width_beyond_int64", _typed("width", [64, 2**64 - 1, 64, 64], pa.uint64()), column="width",
         rows=("row 1", "'r1'")),
    Case("steps_beyond_int64", _typed("num_inference_steps", [8, 8, 2**63, 8], pa.uint64()),
         column="num_inference_steps", rows=("row 2", "'r2'")),
    Case("edit_column_in_prompt_manifest", _single(mask=["m.png", None, None, None]), column="mask",
         extra=("'source'",)),
    Case("edit_source_of_another_scheme", _single(source=["a.png", "http://host/b.png", "a.png", "S3://b/c.png"]),
         column="source", rows=("row 1", "'r1'", "row 3")),
    Case("prompt_file_in_edit_folder", _prompt_and_edit_files, column="source", files=("part-0.parquet",)),
    Case("passthrough_types_clash", _passthrough_types_clash, column="score", files=("part-1.parquet",)),
    Case("seed_negative", _single(seed=[1, 2, 3, -4]), column="seed", rows=("row 3", "'r3'")),
    Case("unknown_variant", _single(variant=["turbo", "turbo", "mega", None]), column="variant",
         rows=("row 2", "'r2'")),
    Case("bad_row_in_second_file", _bad_row_in_second_file, column="width", rows=("row 2", "'e'"),
         files=("part-1.parquet",)),
    Case("bad_row_late_in_file", _late_bad_row, column="num_inference_steps", rows=("row 70001", "'id70001'")),
    Case("many_bad_rows", _many_bad_rows, column="height",
         rows=("row 0", "row 4", "'id4'", "15 more")),
    Case("text_file_named_parquet", _text_file),
    Case("empty_file_named_parquet", _empty_file),
    Case("truncated_parquet", _truncated),
    Case("corrupt_parquet_body", _corrupt_body),
    Case("partition_clashes_with_column", _partition_clashes_with_column, column="date", files=("part-0.parquet",)),
    Case("missing_path", _missing_path),
    Case("empty_folder", _empty_folder),
]


# ---------------------------------------------------------------------- running them
@dataclass
class Result:
    returncode: int
    stdout: str
    stderr: str
    elapsed_s: float


@dataclass
class Outcome:
    case: Case
    manifest: Path
    output: Path
    workdir: Path
    files_before: set[str]
    validate: Result
    run: Result


def _cli_in_process(*args: str) -> Result:
    """The command in this process (click's CliRunner: no interpreter start-up). A refusal comes
    before Ray starts: a command that gets as far as Ray fails here, with its own error line."""
    started = time.monotonic()
    with ray_not_started():
        result = cli_in_process(*args)
    return Result(result.returncode, result.stdout, result.stderr, time.monotonic() - started)


def _listing(root: Path) -> set[str]:
    return {str(p.relative_to(root)) for p in root.rglob("*")}


@pytest.fixture(scope="module")
def outcomes(tmp_path_factory) -> dict[str, Outcome]:
    base = tmp_path_factory.mktemp("bad_manifests")
    prepared = []
    for case in CASES:
        d = base / case.name
        d.mkdir()
        manifest = case.build(d)
        prepared.append((case, manifest, d / "out", d, _listing(d)))

    outcomes = {}
    for case, manifest, output, d, before in prepared:
        validate = _cli_in_process("validate", str(manifest))
        run = _cli_in_process("run", "--manifest", str(manifest), "--output", str(output), "--model", "tiny:turbo",
                              "--workers", "1")
        outcomes[case.name] = Outcome(case, manifest, output, d, before, validate, run)
    return outcomes


def _check_error(result: Result, outcome: Outcome, command: str) -> str:
    case = outcome.case
    both = result.stdout + result.stderr
    context = f"{command} {case.name}: rc={result.returncode}\nstdout:\n{result.stdout}\nstderr:\n{result.stderr}"
    assert result.returncode != 0, context
    assert "Traceback" not in both, context
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    errors = [line for line in lines if line.startswith("error:")]
    assert len(errors) == 1, context
    assert lines == errors, f"stderr holds more than the one error line\n{context}"
    assert not result.stdout.strip(), f"nothing but the error line expected\n{context}"
    message = errors[0]
    assert message.isprintable(), f"control characters in the message: {message!r}"

    names = case.files if case.files is not None else (outcome.manifest.name,)
    for name in names:
        assert name in message, f"message does not name the file {name!r}: {message}"
    if case.column:
        assert f"'{case.column}'" in message, f"message does not name column {case.column!r}: {message}"
    for fragment in (*case.rows, *case.extra):
        assert fragment in message, f"message lacks {fragment!r}: {message}"
    return message


@pytest.mark.parametrize("case", CASES, ids=[c.name for c in CASES])
def test_validate_refuses(outcomes, case):
    outcome = outcomes[case.name]
    _check_error(outcome.validate, outcome, "validate")


@pytest.mark.parametrize("case", CASES, ids=[c.name for c in CASES])
def test_run_refuses_fast_and_writes_nothing(outcomes, case):
    outcome = outcomes[case.name]
    message = _check_error(outcome.run, outcome, "run")
    assert "plan:" not in outcome.run.stdout
    assert outcome.run.elapsed_s < RUN_DEADLINE_S, f"took {outcome.run.elapsed_s:.1f}s: {message}"
    assert not outcome.output.exists() or not any(outcome.output.iterdir()), _listing(outcome.output)
    # nothing appeared beside the manifest either
    assert _listing(outcome.workdir) - outcome.files_before <= {"out"}


@pytest.mark.parametrize("case", CASES, ids=[c.name for c in CASES])
def test_validate_and_run_agree(outcomes, case):
    """The same manifest gets the same reason from `validate` and from `run`."""
    outcome = outcomes[case.name]
    assert outcome.validate.stderr.strip() == outcome.run.stderr.strip()
