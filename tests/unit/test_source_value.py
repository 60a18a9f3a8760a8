"""The `Source` value (zimage_batch/source.py): every kind parsed in one place, local paths made
absolute, odd strings; fingerprints and job.json strings pinned from before it existed; no
string tests of source kinds anywhere else in the package."""

from __future__ import annotations

import ast
import dataclasses
import os
import re
from pathlib import Path

import pytest

from zimage_batch.jobspec import load_job
from zimage_batch.output.status import OutputState
from zimage_batch.run.preflight import resolve
from zimage_batch.source import Source, SourceError

PACKAGE = Path(__file__).resolve().parents[2] / "zimage_batch"


# ------------------------------------------------------------------------------ kinds
@pytest.mark.parametrize("text, location", [("tiny:turbo", "turbo"), ("tiny:base", "base"), ("tiny:omni", "omni"),
                                            ("tiny:2.1", "2.1"), ("tiny:prompt", "prompt"), ("tiny:", "")])
def test_tiny_names_are_kept_for_their_use_to_check(text, location):
    source = Source.parse(text)
    assert (source.kind, source.location, source.text, str(source)) == ("tiny", location, text, text)
    assert source.draws_noise and source.identity is None and source.portable == text


def test_only_tiny_sources_draw_noise(tmp_path):
    for text in ("Tongyi-MAI/Z-Image-Turbo", "s3://b/models/z/", str(tmp_path), "tiny-model", "TINY:turbo"):
        assert not Source.parse(text).draws_noise, text


@pytest.mark.parametrize("text, names_file", [
    ("s3://bucket/models/z-image/", False),
    ("s3://bucket/models/z-image", False),
    ("s3://bucket", False),
    ("s3://bucket/loras/style.safetensors", True),
    ("s3://bucket/loras/style.bin", False),  # refused as a pickle where it is fetched, not here
])
def test_s3_files_and_folders(text, names_file):
    source = Source.parse(text)
    assert (source.kind, source.location, source.names_file) == ("s3", text, names_file)
    assert source.portable == text and source.hub_repo is None and source.hub_file is None


@pytest.mark.parametrize("text, repo, file", [
    ("Tongyi-MAI/Z-Image-Turbo", "Tongyi-MAI/Z-Image-Turbo", None),
    ("org/repo/file.safetensors", "org/repo", "file.safetensors"),
    ("org/repo/sub/dir/net.safetensors", "org/repo", "sub/dir/net.safetensors"),
    ("org/repo/README.md", "org/repo", "README.md"),  # a file each use accepts or refuses
])
def test_hub_ids_and_files(text, repo, file, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    source = Source.parse(text)
    assert (source.kind, source.location, source.hub_repo, source.hub_file) == ("hub", text, repo, file)
    assert source.names_file == (file is not None and file.endswith(".safetensors"))
    assert source.portable == text and str(source) == text


def test_a_path_that_exists_is_local_even_when_it_reads_as_a_hub_id(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "org" / "repo").mkdir(parents=True)
    source = Source.parse("org/repo")
    assert (source.kind, source.location, source.text) == ("local", str(tmp_path / "org" / "repo"), "org/repo")
    assert source.portable == str(tmp_path / "org" / "repo") and source.hub_repo is None


@pytest.mark.parametrize("text", ["models/mine", "./models/mine", "models/../models/mine/", "mine.safetensors"])
def test_local_paths_are_made_absolute(text, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "models" / "mine").mkdir(parents=True)
    (tmp_path / "mine.safetensors").write_bytes(b"x")
    source = Source.parse(text)
    assert source.kind == "local" and os.path.isabs(source.location)
    assert source.location == os.path.normpath(tmp_path / text)
    assert source.portable == source.location and source.text == text and not source.names_file


def test_home_paths_are_expanded(tmp_path, monkeypatch):
    monkeypatch.setenv("HOME", str(tmp_path))
    (tmp_path / "nets").mkdir()
    source = Source.parse("~/nets")
    assert (source.kind, source.location, source.portable) == ("local", str(tmp_path / "nets"), str(tmp_path / "nets"))


@pytest.mark.parametrize("text", ["./missing", "../missing/net.safetensors", "/no/such/folder", "~/missing", "missing",
                                  "org//repo", "/org/repo", "org/"])
def test_paths_that_do_not_exist_are_local_and_kept_as_written(text, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    source = Source.parse(text)
    assert source.kind == "local" and os.path.isabs(source.location)
    assert source.portable == text  # the use that fetches it says it is missing


@pytest.mark.parametrize("text", ["", None, 3, "gs://bucket/model", "file:///models/z", "https://hf.co/org/repo"])
def test_text_that_names_no_source_is_refused(text):
    with pytest.raises(SourceError):
        Source.parse(text)
    assert Source.try_parse(text) is None


def test_a_source_parses_as_itself_and_carries_its_identity():
    source = Source.parse("org/repo/net.safetensors")
    assert Source.parse(source) is source and Source.try_parse(source) is source
    pinned = source.identified("hub:org/repo@abc/net.safetensors")
    assert pinned.identity == "hub:org/repo@abc/net.safetensors" and source.identity is None
    assert (pinned.kind, pinned.location, str(pinned)) == (source.kind, source.location, str(source))
    with pytest.raises(dataclasses.FrozenInstanceError):
        pinned.kind = "local"  # type: ignore[misc]


# ------------------------------------------------------------------------------ each use's kinds
def _model(text):
    from zimage_batch.model.sources import resolve_model

    return resolve_model(text)


def _addon(text):
    from zimage_batch.model.addons import resolve_addon

    return resolve_addon(text)


def _adapter(text):
    from zimage_batch.model.adapters import resolve_adapter

    return resolve_adapter("style", text)


@pytest.mark.parametrize("use, text, message", [
    (_model, "gs://bucket/model", "model source 'gs://bucket/model' is not a folder, an s3:// prefix"),
    (_model, "org/repo/unet.safetensors", "is not a folder, an s3:// prefix, a hub id or tiny:<variant>"),
    (_model, "./missing", "model source './missing' is not a folder"),
    (_model, "", "model source '' is not a folder"),
    (_addon, "org/repo/README.md", "controlnet source 'org/repo/README.md' is not a local .safetensors file"),
    (_addon, "file:///nets/net.safetensors", "is not a local .safetensors file or folder, an s3:// URI"),
    (_addon, "  ", "controlnet source is empty"),
    (_adapter, "tiny:2.1", "adapter 'style' (tiny:2.1): no such file or folder, and not an s3:// URI or a hub file"),
    (_adapter, "https://example.com/style.safetensors", "no such file or folder, and not an s3:// URI"),
])
def test_each_use_refuses_the_kinds_it_cannot_take_before_any_fetch(use, text, message, tmp_path, monkeypatch):
    from zimage_batch.model.checkpoint import ModelSourceError

    monkeypatch.chdir(tmp_path)
    with pytest.raises(ModelSourceError, match=re.escape(message)):
        use(text)


@pytest.mark.parametrize("record, noise", [
    ({"job": {"model": "tiny:turbo"}}, True),
    ({"job": {"model": "tiny:base"}, "model_draws_noise": False}, True),  # job.json before the flag existed
    ({"job": {"model": "/models/made-by-make-tiny-model"}, "model_draws_noise": True}, True),
    ({"job": {"model": "Tongyi-MAI/Z-Image-Turbo"}, "model_draws_noise": False}, False),
    ({"job": {"model": "s3://bucket/models/z/"}}, False),
    ({"job": {}}, False),
])
def test_the_report_and_card_note_of_noise_comes_from_the_recorded_source(record, noise):
    assert OutputState(storage=None, job=record, markers=[]).model_draws_noise is noise  # type: ignore[arg-type]


# ------------------------------------------------------------------------------ pinned from before
# Fingerprints and job strings written by the version before `Source` existed: an OUTPUT written
# then must resume with the same fingerprint.
_PINNED = {
    "tiny": ({"model": "tiny:turbo"}, [], "5f42864ecf8adf1b", "7af68da500a8e4b8"),
    "tiny_base": ({"model": "tiny:base"}, ["num_images=2"], "ebc50d1fc709011b", "ff19c7037ff9f83f"),
    "hub_lora": ({"model": "Tongyi-MAI/Z-Image-Turbo"}, ["loras.style=org/repo/style.safetensors", "lora=style:0.5"],
                 "15cf23fdf82f3322", "648a6957695e16a5"),
    "local": ({"model": "models/mine"}, ["loras.style=loras/style.safetensors", "controlnet=tiny:2.1", "scores=[clip]",
                                         "scorers.clip=openai/clip-vit-base-patch32"], "0c00172bd878b18c",
              "af54f4d10b98fb5c"),
    "s3": ({"model": "s3://bucket/models/z/"}, ["variant=turbo", "prompt_expansion=tiny:prompt",
                                                "segmenter=CIDAS/clipseg-rd64-refined",
                                                "controlnet=s3://b/nets/net.safetensors"],
           "1851c76eed72f069", "6809767afddadfa6"),
}


def _resolved_ids(spec):
    return dataclasses.replace(spec, controlnet_id="sha256:00", prompt_expansion_id="tiny:prompt-v1",
                               scorer_ids={"clip": "hub:x@1"})


@pytest.fixture
def workdir(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "models" / "mine").mkdir(parents=True)
    (tmp_path / "loras").mkdir()
    (tmp_path / "loras" / "style.safetensors").write_bytes(b"x")
    return tmp_path


@pytest.mark.parametrize("case", sorted(_PINNED))
def test_fingerprints_are_the_ones_from_before(case, workdir):
    flags, settings, fingerprint, with_ids = _PINNED[case]
    job = load_job(None, {"manifest": "m.parquet", "output": "out", **flags}, settings)
    resolved = resolve(job)
    assert resolved.fingerprint == fingerprint
    assert _resolved_ids(resolved.spec).fingerprint() == with_ids
    assert resolved.spec.model == flags["model"]  # job.json keeps the model as written


def test_job_strings_are_the_ones_from_before(workdir):
    job = load_job(None, {"manifest": "m.parquet", "output": "out", "model": "models/mine"},
                   ["loras.style=loras/style.safetensors", "loras.hub=org/repo/x.safetensors", "controlnet=tiny:2.1",
                    "scores=[clip]", "scorers.clip=openai/clip-vit-base-patch32", "prompt_expansion=models/mine"])
    settings = job.to_dict()
    assert settings["loras"] == {"style": str(workdir / "loras" / "style.safetensors"), "hub": "org/repo/x.safetensors"}
    assert settings["scorers"] == {"clip": "openai/clip-vit-base-patch32"}
    assert (settings["model"], settings["controlnet"], settings["prompt_expansion"]) == ("models/mine", "tiny:2.1",
                                                                                         "models/mine")
    resolved = resolve(job)
    workers = resolved.worker_settings(resolved.variant)
    assert workers.model == str(workdir / "models" / "mine")  # local folders absolute for workers elsewhere
    assert workers.job.prompt_expansion == str(workdir / "models" / "mine")


def test_job_file_paths_are_the_ones_from_before(workdir):
    (workdir / "jobs").mkdir()
    (workdir / "jobs" / "job.yaml").write_text(
        "manifest: m.parquet\noutput: out\nmodel: ./../models/mine\ncontrolnet: tiny:2.1\n"
        "loras: {style: ../loras/style.safetensors}\nlora: style:0.5\nprompt_expansion: tiny:prompt\n")
    job = load_job(str(workdir / "jobs" / "job.yaml"), {}, [])
    assert (job.model, job.controlnet, job.prompt_expansion) == (str(workdir / "models" / "mine"), "tiny:2.1",
                                                                  "tiny:prompt")
    assert job.loras == {"style": str(workdir / "loras" / "style.safetensors")}
    same = load_job(None, {"manifest": str(workdir / "jobs" / "m.parquet"), "output": str(workdir / "jobs" / "out"),
                           "model": str(workdir / "models" / "mine"), "controlnet": "tiny:2.1",
                           "prompt_expansion": "tiny:prompt"},
                    [f"loras.style={workdir / 'loras' / 'style.safetensors'}", "lora=style:0.5"])
    assert resolve(job).fingerprint == resolve(same).fingerprint


# ------------------------------------------------------------------------------ no string tests elsewhere
MARKERS = ("tiny:", "s3://")
TESTS = {"startswith", "endswith", "removeprefix", "removesuffix", "split", "rsplit", "partition", "rpartition",
         "find", "index", "count", "replace", "match", "fullmatch", "search"}
# Tests of the storage's own URIs (OUTPUT, manifests, image URIs), which are not sources: module
# (or package) without .py, marker.
ALLOWED = {
    ("storage", "s3://"),  # is_s3, split_s3_uri: the storage backends' scheme (storage.py or a storage/ package)
    ("model/cache", "s3://"),  # a cache entry's readable slug from its S3 folder's URI
}


def allowed(module: str, text: str) -> bool:
    name = module.removesuffix(".py")
    return any(m in text and (name == where or name.startswith(where + "/")) for where, m in ALLOWED)


def kind_tests(tree: ast.AST) -> list[tuple[int, str]]:
    """String constants holding a source marker that are tested against text: an argument of
    startswith and the like, an operand of ==, != or in, or a bare marker bound to a name."""
    found = []
    for node in ast.walk(tree):
        operands: list[ast.AST] = []
        if isinstance(node, ast.Call):
            name = node.func.attr if isinstance(node.func, ast.Attribute) else getattr(node.func, "id", "")
            if name in TESTS:
                operands = [*node.args, *([node.func.value] if isinstance(node.func, ast.Attribute) else [])]
        elif isinstance(node, ast.Compare):
            operands = [node.left, *node.comparators]
        elif isinstance(node, (ast.Assign, ast.AnnAssign)) and isinstance(node.value, ast.Constant):
            if node.value.value in MARKERS:
                operands = [node.value]
        for operand in operands:
            for sub in ast.walk(operand):
                if isinstance(sub, ast.Constant) and isinstance(sub.value, str) and any(m in sub.value for m in MARKERS):
                    found.append((sub.lineno, sub.value))
    return found


def test_the_check_finds_kind_tests():
    code = ('a = s.startswith("tiny:")\nb = "s3://" in s\nc = s == "tiny:prompt"\nd = s.removeprefix("s3://")\n'
            'e = s.startswith(("x", "tiny:"))\nP = "tiny:"\nf = re.match(r"^s3://", s)\n'
            'raise E(f"use tiny:{v} or s3://")\ng = f"s3://{bucket}/{key}"\n"""tiny: in a docstring"""\n')
    assert sorted(line for line, _ in kind_tests(ast.parse(code))) == [1, 2, 3, 4, 5, 6, 7]


def test_no_string_tests_of_source_kinds_outside_the_source_module():
    offenders = []
    for path in sorted(PACKAGE.rglob("*.py")):
        module = path.relative_to(PACKAGE).as_posix()
        if module == "source.py":
            continue
        for line, text in kind_tests(ast.parse(path.read_text(), module)):
            if not allowed(module, text):
                offenders.append(f"{module}:{line}: {text!r}")
    assert not offenders, "parse sources with zimage_batch.source.Source instead:\n" + "\n".join(offenders)


def test_the_source_module_imports_no_stage():
    tree = ast.parse((PACKAGE / "source.py").read_text())
    imported = [n.module or "" for n in ast.walk(tree) if isinstance(n, ast.ImportFrom)]
    imported += [a.name for n in ast.walk(tree) if isinstance(n, ast.Import) for a in n.names]
    assert imported and not [name for name in imported if name.startswith("zimage_batch")]
