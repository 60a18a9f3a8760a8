"""Prompt expansion (generate/expansion.py): a causal LM rewrites each prompt on the worker before
the text encoder. It equals transformers' own greedy generate(); a shard that fails before its
commit expands identically when it runs again; the expansion is committed in the metadata beside
`prompt_original`; a changed model or instructions is another job; bad sources are refused."""

from __future__ import annotations

import io
import json
import tarfile

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch
from cli_in_process import cli_in_process

from zimage_batch.generate.expansion import DEFAULT_INSTRUCTIONS, PromptExpander
from zimage_batch.jobspec import load_job
from zimage_batch.model.checkpoint import ModelSourceError
from zimage_batch.model.prompt_model import make_tiny_prompt_model, resolve_prompt_model
from zimage_batch.output.keys import sample_key
from zimage_batch.output.ledger import JobMismatch, Ledger
from zimage_batch.run.plan import make_plan
from zimage_batch.run.preflight import job_record, prepare, resolve, with_prompt_expansion
from zimage_batch.run.worker import FAIL_BEFORE_COMMIT_ENV, ShardRunner
from zimage_batch.storage import open_storage

pytestmark = pytest.mark.usefixtures("one_torch_thread")

PROMPTS = ["a cat", "一只可爱的小猫坐在窗台上，阳光明媚", "a lighthouse at dusk, long exposure, the sea calm"]


@pytest.fixture(scope="module")
def tiny_lm(tmp_path_factory) -> str:
    return make_tiny_prompt_model(str(tmp_path_factory.mktemp("lm") / "tiny-lm"))


def test_expansion_equals_transformers_generate_on_each_prompt_alone(tiny_lm):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    expanded = PromptExpander(tiny_lm, "cpu", max_new_tokens=12).expand(PROMPTS, batch_size=3)  # left-padded batch
    tokenizer = AutoTokenizer.from_pretrained(tiny_lm)
    model = AutoModelForCausalLM.from_pretrained(tiny_lm)
    for prompt, got in zip(PROMPTS, expanded):
        messages = [{"role": "system", "content": DEFAULT_INSTRUCTIONS}, {"role": "user", "content": prompt}]
        ids = tokenizer.apply_chat_template(messages, add_generation_prompt=True, enable_thinking=False,
                                            return_tensors="pt", return_dict=True)
        with torch.no_grad():
            out = model.generate(**ids, do_sample=False, max_new_tokens=12, pad_token_id=tokenizer.pad_token_id)
        want = tokenizer.decode(out[0, ids["input_ids"].shape[1]:], skip_special_tokens=True).strip()
        assert want and got == want  # the tiny LM writes text (noise), and the same text


def _job(tmp_path, tiny_lm, *settings):
    rows = [{"id": f"r{i}", "prompt": p, "seed": i} for i, p in enumerate(PROMPTS)] + [
        {"id": "r3", "prompt": PROMPTS[0], "seed": 3}]  # a repeated prompt expands once, the same
    pq.write_table(pa.Table.from_pylist(rows), tmp_path / "m.parquet")
    return load_job(None, {"manifest": str(tmp_path / "m.parquet"), "output": str(tmp_path / "out"),
                           "model": "tiny:turbo", "shard_size": 4, "batch_size": 2},
                    ["report=false", f"prompt_expansion={tiny_lm}", "max_new_tokens=10", "num_inference_steps=2",
                     *settings])


def test_a_shard_that_failed_before_its_commit_expands_identically_when_it_runs_again(tmp_path, tiny_lm, monkeypatch):
    job = _job(tmp_path, tiny_lm, "format=webdataset", "caption=original")
    prepared = prepare(job)
    resolved = prepared.job
    Ledger(open_storage(job.output)).claim_output(job_record(resolved), False)
    (shard,) = make_plan(prepared.manifest, {}, job.shard_size, resolved.variant).todo
    first = ShardRunner(resolved.worker_settings(resolved.variant))
    seen: list[list[str]] = []
    expand = first.expander.expand
    first.expander.expand = lambda prompts, *a: seen.append(expand(prompts, *a)) or seen[-1]
    monkeypatch.setenv(FAIL_BEFORE_COMMIT_ENV, shard.name)
    with pytest.raises(RuntimeError, match="injected failure"):
        first.run_shard(shard)
    monkeypatch.delenv(FAIL_BEFORE_COMMIT_ENV)
    again = ShardRunner(resolved.worker_settings(resolved.variant))  # a fresh worker, as a retry gets
    assert again.run_shard(shard) is not None
    metadata = pq.read_table(tmp_path / "out" / "metadata" / f"{shard.name}.parquet").to_pylist()
    assert [r["prompt_original"] for r in metadata] == [*PROMPTS, PROMPTS[0]]
    expanded = dict(zip(PROMPTS, seen[0]))
    assert [r["prompt"] for r in metadata] == [expanded[r["prompt_original"]] for r in metadata]
    assert all(r["prompt"] != r["prompt_original"] for r in metadata)
    assert again.stats()["expansion_s"] > 0
    with tarfile.open(tmp_path / "out" / "shards" / f"{shard.name}.tar") as tar:
        caption = tar.extractfile(f"{sample_key('r1')}.txt").read().decode()
        sample = json.load(io.BytesIO(tar.extractfile(f"{sample_key('r1')}.json").read()))
    assert caption == PROMPTS[1]  # caption: original
    assert sample["prompt"] == expanded[PROMPTS[1]] and sample["prompt_original"] == PROMPTS[1]


def test_a_changed_model_or_instructions_is_another_job(tmp_path, tiny_lm):
    base = with_prompt_expansion(resolve(_job(tmp_path, tiny_lm)))
    assert base.spec.prompt_expansion_instructions == DEFAULT_INSTRUCTIONS
    other_instructions = with_prompt_expansion(resolve(_job(tmp_path, tiny_lm, "prompt_expansion_instructions=Be brief.")))
    other_lm = make_tiny_prompt_model(str(tmp_path / "other-lm"), seed=1)
    other_model = with_prompt_expansion(resolve(_job(tmp_path, other_lm)))
    plain = resolve(load_job(None, {"manifest": "m", "output": "o", "model": "tiny:turbo"}, []))
    assert len({base.fingerprint, other_instructions.fingerprint, other_model.fingerprint, plain.fingerprint}) == 4
    ledger = Ledger(open_storage(str(tmp_path / "out")))
    ledger.claim_output(job_record(base), False)
    for changed in (other_instructions, other_model):
        with pytest.raises(JobMismatch):
            ledger.claim_output(job_record(changed), False)
    ledger.claim_output(job_record(other_model), True)  # --overwrite


def test_a_job_without_expansion_keeps_its_fingerprint():
    job = load_job(None, {"manifest": "m", "output": "o", "model": "tiny:turbo", "variant": "turbo"}, [])
    assert job.fingerprint() == "5f42864ecf8adf1b"  # as before prompt expansion existed


def test_bad_expansion_sources_are_refused(tmp_path):
    from safetensors.torch import save_file

    encoder = tmp_path / "encoder"
    encoder.mkdir()
    (encoder / "config.json").write_text(json.dumps({"model_type": "bert", "architectures": ["BertModel"]}))
    save_file({"w": torch.zeros(1)}, str(encoder / "model.safetensors"))
    with pytest.raises(ModelSourceError, match="is not a causal LM"):
        resolve_prompt_model(str(encoder))
    pickled = tmp_path / "pickled"
    pickled.mkdir()
    (pickled / "config.json").write_text(json.dumps({"model_type": "qwen3"}))
    (pickled / "pytorch_model.bin").write_bytes(b"not loaded")
    with pytest.raises(ModelSourceError, match="pickle weights are not loaded"):
        resolve_prompt_model(str(pickled))
    with pytest.raises(ModelSourceError, match="pickle weights are not loaded"):
        resolve_prompt_model("org/repo/model.bin")


def test_run_refuses_a_model_that_is_not_a_causal_lm_in_one_line(tmp_path):
    pq.write_table(pa.table({"id": ["a"], "prompt": ["a cat"]}), tmp_path / "m.parquet")
    zimage = tmp_path / "zimage"
    assert cli_in_process("make-tiny-model", str(zimage)).returncode == 0
    result = cli_in_process("run", "--manifest", str(tmp_path / "m.parquet"), "--output", str(tmp_path / "out"),
                            "--model", "tiny:turbo", "--set", f"prompt_expansion={zimage}")
    assert result.returncode == 2
    assert result.stderr.strip().splitlines() == [
        f"error: prompt_expansion {zimage} is not a transformers model folder (no readable config.json)"]
    assert not (tmp_path / "out" / "job.json").exists()


def test_an_edit_manifest_is_refused_with_expansion(tmp_path, tiny_lm):
    from zimage_batch.jobspec import JobError
    from zimage_batch.run.preflight import check_manifest

    pq.write_table(pa.table({"id": ["a"], "prompt": ["make the sky red"], "source": ["a.png"]}), tmp_path / "e.parquet")
    job = load_job(None, {"manifest": str(tmp_path / "e.parquet"), "output": str(tmp_path / "o"),
                          "model": "tiny:omni"}, [f"prompt_expansion={tiny_lm}"])
    with pytest.raises(JobError, match="is an edit manifest"):
        check_manifest(job)
