"""Results that cannot mix: task data edited in place is refused, files keep the user's umask,
a killed save's staging folder is cleaned by the next one (see the package docstring)."""

from __future__ import annotations

import json
import os
import signal
import stat
import subprocess
import sys
from pathlib import Path

import pytest
from typer.testing import CliRunner

from lnsdiag import runs
from lnsdiag.checkpoint.save import save_without_layers
from lnsdiag.cli import app
from lnsdiag.errors import UserError
from lnsdiag.model.load import LoadedModel, load_model
from lnsdiag.runners import prune
from lnsdiag.runs import STAGING_MARKER, atomic_write, current_umask, process_gone, process_stamp, write_json
from lnsdiag.scoring.lmeval.scorer import LmEvalScorer
from lnsdiag.scoring.lmeval.tasks import load_tasks
from tests.families import tiny_model
from tests.lmeval_tasks import write_generation_task, write_tasks
from tests.test_cli_basic import assert_one_line_error

ROOT = Path(__file__).resolve().parents[2]
runner = CliRunner()


def invoke(*args):
    return runner.invoke(app, [str(a) for a in args], catch_exceptions=False)


def _python(script: str, *args: str, **kwargs) -> subprocess.Popen:
    """``script`` in a fresh interpreter that imports this checkout, talking through pipes."""
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")]),
           "PYTHONUNBUFFERED": "1"}
    return subprocess.Popen([sys.executable, "-c", script, *args], stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, env=env, cwd=ROOT, **kwargs)


def _dead_stamp() -> dict:
    """The stamp of a process that has ended (and been reaped)."""
    child = _python("import json; from lnsdiag.runs import process_stamp; print(json.dumps(process_stamp()))")
    out, err = child.communicate(timeout=120)
    assert child.returncode == 0, err
    return json.loads(out)


# --- task data edited in place ---------------------------------------------------------------

def _rotate_labels(path: Path) -> None:
    """The careless edit: the same file, the same size, every gold label moved by one."""
    docs = [json.loads(line) for line in path.read_text().splitlines()]
    path.write_text("".join(json.dumps({**d, "label": (d["label"] + 1) % len(d["choices"])}) + "\n" for d in docs))


def _acc(folder: Path, variant: str = "baseline") -> float:
    data = json.loads((folder / "variants" / f"{variant}.json").read_text())
    return next(m["value"] for m in data["metrics"] if m["task"] == "tiny_mc" and m["metric"] == "acc")


def test_task_data_edited_in_place_is_refused_not_mixed(tiny_llama_dir, tmp_path):
    tasks = write_tasks(tmp_path / "tasks", docs=12)
    out = tmp_path / "out"
    base = ["prune", tiny_llama_dir, "--tasks", "tiny_mc", "--include-path", tasks, "--no-angular",
            "--limit", 10]
    assert invoke(*base, "--out", out, "--layers", "1").exit_code == 0
    before = {p.name: p.read_bytes() for p in (out / "variants").iterdir()}
    _rotate_labels(tasks / "mc.jsonl")

    res = invoke(*base, "--out", out, "--layers", "1,2")  # resuming would pair the old baseline with new layers
    assert res.exit_code == 2
    assert_one_line_error(res, "task_data")
    assert "--fresh" in res.output
    assert {p.name: p.read_bytes() for p in (out / "variants").iterdir()} == before

    config = prune.PruneConfig(tasks=("tiny_mc",), include_path=str(tasks), limit=10, layers="1,2", angular=False)
    with pytest.raises(UserError, match="task_data"):
        prune.run(load_model(str(tiny_llama_dir)), config, out)

    assert invoke(*base, "--out", out, "--layers", "1,2", "--fresh").exit_code == 0
    assert invoke(*base, "--out", tmp_path / "clean", "--layers", "1,2").exit_code == 0
    for variant in ("baseline", "layer_001", "layer_002"):
        assert _acc(out, variant) == _acc(tmp_path / "clean", variant)


@pytest.fixture(scope="module")
def small_loaded(tokenizer):
    return LoadedModel.wrap(tiny_model("llama", vocab_size=len(tokenizer)), tokenizer, name="llama")


def _digest(small_loaded, folder: Path, names: list[str], **kwargs) -> str:
    taskset = load_tasks(names, folder, num_fewshot=kwargs.pop("num_fewshot", 1))
    return LmEvalScorer(small_loaded, taskset, batch_size=4, **kwargs).settings()["task_data"]


def test_the_task_data_digest_sees_every_edit_that_changes_a_number(small_loaded, tmp_path):
    """Labels, few-shot examples, the prompt template, a generation task's targets: each edit in
    place changes the digest; loading the same files again does not."""
    folder = write_tasks(tmp_path / "tasks", docs=6)
    write_generation_task(folder)
    names = ["tiny_mc", "tiny_ppl", "tiny_gen"]
    first = _digest(small_loaded, folder, names)
    assert len(first) == 16 and _digest(small_loaded, folder, names) == first
    assert _digest(small_loaded, folder, names, limit=3) != first

    seen = {first}

    def changed(edit) -> None:
        edit()
        digest = _digest(small_loaded, folder, names)
        assert digest not in seen
        seen.add(digest)

    changed(lambda: _rotate_labels(folder / "mc.jsonl"))
    changed(lambda: _rotate_labels(folder / "mc_train.jsonl"))  # only seen through the few-shot prompts
    yaml = folder / "tiny_mc.yaml"
    changed(lambda: yaml.write_text(yaml.read_text().replace("Answer:", "A:")))
    changed(lambda: write_generation_task(folder, answer="norm"))
    ppl = folder / "ppl.jsonl"
    changed(lambda: ppl.write_text(ppl.read_text().replace("the", "a")))


# --- files and folders keep the user's umask -------------------------------------------------

@pytest.fixture(params=[0o022, 0o002], ids=["umask022", "umask002"])
def umask(request):
    old = os.umask(request.param)
    try:
        yield request.param
    finally:
        os.umask(old)


def _mode(path: Path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


def test_result_files_keep_the_users_umask(umask, tmp_path, monkeypatch):
    assert current_umask() == umask
    assert _mode(atomic_write(tmp_path / "prune.csv", "a,b\n")) == 0o666 & ~umask
    assert _mode(atomic_write(tmp_path / "x.csv.gz", b"\x1f\x8b")) == 0o666 & ~umask
    assert _mode(write_json(tmp_path / "settings.json", {"a": 1})) == 0o666 & ~umask

    def no_proc(path, *args, **kwargs):  # a system without /proc: os.umask is read and restored
        raise FileNotFoundError(path)

    monkeypatch.setattr(runs, "open", no_proc, raising=False)
    assert current_umask() == umask
    assert os.umask(umask) == umask  # and left as it was


def test_saved_checkpoints_keep_the_users_umask(umask, tmp_path):
    folder = save_without_layers(tiny_model("llama"), [1], tmp_path / "pruned").folder
    assert _mode(folder) == 0o777 & ~umask
    modes = {p.name: _mode(p) for p in folder.iterdir()}
    assert modes and set(modes.values()) == {0o666 & ~umask}, modes
    assert STAGING_MARKER not in modes


# --- temporary folders a killed save left behind ---------------------------------------------

def _staged(parent: Path, name: str, stamp: dict, *, replaces: str | None = None, suffix: str = ".tmp") -> Path:
    folder = parent / f".{name}{runs.STAGING_TAG}x1y2z3{suffix}"
    folder.mkdir()
    (folder / STAGING_MARKER).write_text(json.dumps({**stamp, "replaces": replaces}))
    (folder / "model.safetensors").write_bytes(b"\0" * 4096)
    return folder


def test_only_stale_staging_folders_of_our_own_are_removed(tmp_path):
    dead = _dead_stamp()
    assert process_gone(dead) and not process_gone(process_stamp())
    assert not process_gone({**dead, "host": "elsewhere"}) and not process_gone({"pid": "?"})
    stale = _staged(tmp_path, "a", dead)
    live = _staged(tmp_path, "b", process_stamp())
    remote = _staged(tmp_path, "c", {**dead, "host": "another-machine"})
    replaced_done = _staged(tmp_path, "d", dead, replaces="d", suffix=".old")
    (tmp_path / "d").mkdir()
    only_copy = _staged(tmp_path, "e", dead, replaces="e", suffix=".old")  # killed between two renames
    unmarked = tmp_path / f".f{runs.STAGING_TAG}abc.tmp"
    unmarked.mkdir()
    user_hidden = tmp_path / ".cache"
    user_hidden.mkdir()

    assert runs.remove_stale_staging(tmp_path) == [stale, replaced_done]
    assert not stale.exists() and not replaced_done.exists()
    assert all(p.is_dir() for p in (live, remote, only_copy, unmarked, user_hidden, tmp_path / "d"))


_KILLED_SAVE = """
import sys
from lnsdiag.checkpoint import save
from tests.families import tiny_model

real = save._save_shard

def stalled(tensors, path):
    real(tensors, path)
    print("staged", flush=True)
    sys.stdin.readline()

save._save_shard = stalled
save.save_without_layers(tiny_model("llama"), [1], sys.argv[1])
"""


_LIVE = """
import json, sys
from lnsdiag.runs import process_stamp
print(json.dumps(process_stamp()), flush=True)
sys.stdin.readline()
"""


def test_a_save_killed_midway_is_cleaned_by_the_next_save(tmp_path):
    child = _python(_KILLED_SAVE, str(tmp_path / "pruned"))
    try:
        assert child.stdout.readline().strip() == "staged", child.stderr.read()
        leftovers = [p for p in tmp_path.iterdir() if p.name.startswith(".pruned.")]
        assert len(leftovers) == 1 and any(leftovers[0].iterdir())
        other = _python(_LIVE)  # another save in the same folder, still running
        live = _staged(tmp_path, "busy", json.loads(other.stdout.readline()))
    finally:
        child.send_signal(signal.SIGKILL)
        child.wait(timeout=60)
    try:
        save_without_layers(tiny_model("llama"), [2], tmp_path / "pruned")
        assert sorted(p.name for p in tmp_path.iterdir()) == sorted([live.name, "pruned"])
    finally:
        other.communicate("\n", timeout=60)
