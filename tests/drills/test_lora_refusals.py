"""LoRA refusals through the CLI (issue 17): a row naming an undeclared adapter, a bad scale or a
malformed spec, a pickle or missing source, an adapter file that does not fit the model. Each is
one `error:` line on stderr, exit status 2, before a model loads, and nothing is written.

All cases run in one module-scoped fixture, in this process through click's CliRunner (the
hub-offline case in a subprocess); each test checks one case.
"""

from __future__ import annotations

import os
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch
from cli_in_process import cli_in_process, ray_not_started
from safetensors.torch import load_file, save_file

from zimage_batch.model.tiny import make_tiny_model
from zimage_batch.model.tiny_adapters import make_tiny_adapter


@dataclass
class Case:
    args: list[str]
    expected: list[str]  # substrings of the one error line
    env: dict | None = None
    command: str = "run"


def _manifest(path: Path, lora: list | None) -> Path:
    columns = {"id": [f"r{i}" for i in range(4)], "prompt": [f"a cat {i}" for i in range(4)]}
    if lora is not None:
        columns["lora"] = pa.array(lora, pa.string())
    pq.write_table(pa.table(columns), path)
    return path


def _reshaped(src: Path, dst: Path) -> Path:
    """The adapter with one lora_A matrix too wide for its layer."""
    state = load_file(src)
    key = next(k for k in sorted(state) if k.endswith("layers.0.attention.to_q.lora_A.weight"))
    state[key] = torch.zeros(state[key].shape[0], 48)
    save_file(state, dst)
    return dst


def _renamed(src: Path, dst: Path) -> Path:
    """The adapter with its layers.1 keys moved to a layer the model does not have."""
    state = {k.replace("layers.1.", "layers.9."): v for k, v in load_file(src).items()}
    save_file(state, dst)
    return dst


def _cases(d: Path, tiny: Path, style: Path) -> dict[str, Case]:
    declared = ["--set", f"loras.style={style}"]
    junk = d / "junk.safetensors"
    junk.write_bytes(b"this is not a safetensors file at all")
    two = d / "two"
    two.mkdir()
    for name in ("a", "b"):
        (two / f"{name}.safetensors").write_bytes(style.read_bytes())
    row = lambda name, values: _manifest(d / f"{name}.parquet", values)  # noqa: E731
    return {
        "undeclared": Case(["--manifest", str(row("undeclared", ["style", "ink", "style:0.5", "ink:0.2,style"]))] + declared,
                           ["undeclared.parquet", "column 'lora'", "row 1 (id='r1')", "row 3 (id='r3')", "(ink;",
                            "declared: style"]),
        "nan_scale": Case(["--manifest", str(row("nan", ["style", None, "style:nan", None]))] + declared,
                          ["nan.parquet", "column 'lora'", "row 2 (id='r2')", "finite"]),
        "word_scale": Case(["--manifest", str(row("word", ["style:abc", None, None, None]))] + declared,
                           ["column 'lora'", "row 0 (id='r0')", "not a number"]),
        "huge_scale": Case(["--manifest", str(row("huge", [None, None, None, "style:25"]))] + declared,
                           ["column 'lora'", "row 3 (id='r3')", "-10..10"]),
        "malformed": Case(["--manifest", str(row("malformed", ["style,,style", None, None, None]))] + declared,
                          ["column 'lora'", "row 0", "not name or name:scale"]),
        "twice": Case(["--manifest", str(row("twice", [None, "style:0.5,style", None, None]))] + declared,
                      ["column 'lora'", "row 1", "twice"]),
        "validate": Case([str(row("validate", ["style", "ink", None, None]))] + declared,
                         ["validate.parquet", "column 'lora'", "row 1 (id='r1')", "ink"], command="validate"),
        "default_undeclared": Case(["--manifest", str(row("plain", None)), "--set", "lora=ink:0.5"] + declared,
                                   ["lora names adapters the job does not declare (ink)"]),
        "bad_name": Case(["--manifest", str(row("plain2", None)), "--set", f"loras.my.style={style}"],
                         ["adapter name 'my.style'"]),
        "pickle": Case(["--manifest", str(row("plain3", None)), "--set", f"loras.style={d / 'style.ckpt'}"],
                       ["refusing adapter 'style'", "pickle", "style.ckpt"]),
        "missing": Case(["--manifest", str(row("plain4", None)), "--set", "loras.style=./no/such/style.safetensors"],
                        ["adapter 'style'", "no such file"]),
        "junk": Case(["--manifest", str(row("plain5", None)), "--set", f"loras.style={junk}"],
                     ["adapter 'style'", "junk.safetensors", "not a readable safetensors file"]),
        "two_files": Case(["--manifest", str(row("plain6", None)), "--set", f"loras.style={two}"],
                          ["adapter 'style'", "2 .safetensors files", "a.safetensors", "name one of them"]),
        "wrong_shape": Case(["--manifest", str(row("plain7", None)),
                             "--set", f"loras.wide={_reshaped(style, d / 'wide.safetensors')}"],
                            ["adapter 'wide'", "does not fit this model", "to_q.lora_A.weight", "[4, 48]", "[4, 32]"]),
        "wrong_keys": Case(["--manifest", str(row("plain8", None)),
                            "--set", f"loras.lost={_renamed(style, d / 'lost.safetensors')}"],
                           ["adapter 'lost'", "layers.9.attention", "not a linear layer of this transformer"]),
        "not_a_lora": Case(["--manifest", str(row("plain9", None)),
                            "--set", f"loras.whole={tiny / 'transformer' / 'diffusion_pytorch_model.safetensors'}"],
                           ["adapter 'whole'", "holds no LoRA weights for the transformer"]),
        "hub_offline": Case(["--manifest", str(row("plain10", None)),
                             "--set", "loras.style=some-org/some-lora/style.safetensors"],
                            ["adapter 'style'", "not a local file, and the hub cannot give it"],
                            env={"HF_HUB_OFFLINE": "1", "HF_HOME": str(d / "hf")}),
    }


def _run(case: Case, d: Path, tiny: Path, name: str) -> tuple[subprocess.CompletedProcess, Path]:
    """The case's command: in this process, or in a subprocess where the case sets environment
    that a library reads when it is imported (HF_HUB_OFFLINE)."""
    output = d / f"out-{name}"
    args = [case.command, *case.args]
    if case.command == "run":
        args += ["--output", str(output), "--model", str(tiny), "--set", "width=64", "--set", "height=64"]
    env = {"RAY_ADDRESS": "", "ZIMAGE_BATCH_CACHE": str(d / "cache"), **(case.env or {})}
    if not case.env:
        with ray_not_started():
            return cli_in_process(*args, env=env), output
    result = subprocess.run([sys.executable, "-m", "zimage_batch.cli", *args], capture_output=True, text=True,
                            env={**os.environ, **env}, timeout=600)
    return result, output


@pytest.fixture(scope="module")
def results(tmp_path_factory):
    d = tmp_path_factory.mktemp("lora-refusals")
    tiny = make_tiny_model(d / "tiny", "turbo")
    style = make_tiny_adapter(tiny, d / "style.safetensors", "style")
    cases = _cases(d, tiny, style)
    return {name: (case, *_run(case, d, tiny, name)) for name, case in cases.items()}


CASES = ["undeclared", "nan_scale", "word_scale", "huge_scale", "malformed", "twice", "validate", "default_undeclared",
         "bad_name", "pickle", "missing", "junk", "two_files", "wrong_shape", "wrong_keys", "not_a_lora", "hub_offline"]


@pytest.mark.parametrize("name", CASES)
def test_refused_in_one_line_and_nothing_written(results, name):
    case, result, output = results[name]
    assert result.returncode == 2, (result.returncode, result.stdout, result.stderr)
    lines = result.stderr.splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), result.stderr
    for text in case.expected:
        assert text in lines[0], (text, lines[0])
    assert not output.exists(), "a refused run wrote to OUTPUT"


def test_every_case_is_checked(results):
    assert sorted(results) == sorted(CASES)
