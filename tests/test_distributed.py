"""Data-parallel runs under torchrun (CPU, gloo): the same files as one process, rank 0 alone writing
and printing, a killed rank failing the job quickly, and a relaunch with another rank count resuming."""

from __future__ import annotations

import contextlib
import json
import os
import random
import socket
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest
import torch
import typer
from typer.testing import CliRunner

from lnsdiag import distributed
from lnsdiag.cli import app, ui
from lnsdiag.distributed import World, balanced_shares, replica_gpus, replica_max_memory
from lnsdiag.engine.fast import PASS_PHASE
from lnsdiag.errors import UserError
from lnsdiag.interventions.units import Removal
from lnsdiag.model.load import ModelOptions, replica_placement
from tests.conftest import SAMPLE_TEXT
from tests.lmeval_tasks import write_tasks

LAUNCH_ENV = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT",
              "GROUP_RANK", "ROLE_RANK", "TORCHELASTIC_RUN_ID")
#: The collectives' timeout in these runs: far above any healthy wait on a loaded machine, so it is
#: never hit unless something hangs; a job whose rank died must end before it (no hang).
TIMEOUT_S = 600
ROOT = Path(__file__).resolve().parents[1]
runner = CliRunner()


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def _torchrun(target: list, ranks: int = 2, **env_extra: str) -> subprocess.Popen:
    """``torchrun --nproc-per-node RANKS TARGET`` (from the repository's root), in the background."""
    env = {k: v for k, v in os.environ.items() if k not in LAUNCH_ENV}
    env.update({"HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1", "COLUMNS": "200",
                "LNSDIAG_DIST_TIMEOUT": str(TIMEOUT_S), **env_extra})
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", str(ranks), "--master-port",
           str(_free_port()), *map(str, target)]
    return subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=env, text=True, cwd=ROOT)


def _finish(proc: subprocess.Popen) -> tuple[int, str, str]:
    out, err = proc.communicate(timeout=2 * TIMEOUT_S)
    return proc.returncode, out, err


@contextlib.contextmanager
def _one_thread():
    """One intra-op thread, as OMP_NUM_THREADS=1 gives each rank (and gave the one-process runs)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(threads)


def _one_process(args: list):
    """``lnsdiag ARGS`` as one plain process, run in this one (no launcher in its environment: a
    single process without a world; no interpreter start-up). Must succeed; its result (stdout, stderr)."""
    assert not any(os.environ.get(name) for name in ("WORLD_SIZE", "RANK"))
    with _one_thread():
        res = runner.invoke(app, [str(a) for a in args], catch_exceptions=False)
    assert res.exit_code == 0, res.output
    return res


@pytest.fixture(scope="module")
def inputs(tmp_path_factory) -> dict[str, Path]:
    folder = tmp_path_factory.mktemp("dist-inputs")
    text = folder / "sample.txt"
    text.write_text(SAMPLE_TEXT * 20, encoding="utf-8")
    calib = folder / "calib.txt"  # the sample's words in another order: no run of tokens in common with it
    rng = random.Random(3)
    calib.write_text(" ".join(rng.choice(SAMPLE_TEXT.split()) for _ in range(1500)), encoding="utf-8")
    return {"tasks": write_tasks(folder / "tasks", docs=10), "text": text, "calib": calib}


def _prune_args(model: Path, inputs: dict[str, Path], *extra: str) -> list:
    return ["prune", model, "--tasks", "tiny_mc", "--include-path", inputs["tasks"], "--ppl-text", inputs["text"],
            "--batch-size", "2", "--batch-tokens", "64", "--fidelity-tasks", "--generate", "4", *extra]


#: The naive prune's own options: each variant scored by its own evaluation.
NAIVE = ("--engine", "naive", "--no-angular")


def _commands(model: Path, inputs: dict[str, Path]) -> dict[str, list]:
    """The command lines run both ways: as one process and with two ranks."""
    measure = ["--text-file", inputs["text"], "--seq-len", "32", "--batch-size", "2"]
    return {
        # prune, fast engine: a task and built-in perplexity, angular column, KL on the text and the task's
        # tokens, and along the full model's continuations (generated on rank 0 only)
        "fast": _prune_args(model, inputs),
        # prune, naive engine: one evaluation per variant
        "naive": _prune_args(model, inputs, *NAIVE),
        # the same over the blocks' attention and MLP sub-layers
        "sublayers": _prune_args(model, inputs, *NAIVE, "--unit", "attn,mlp", "--layers", "1-2"),
        "angular": ["angular", model, *measure],
        "variance": ["variance", model, *measure],
        # shrink, every pick healed too (the fits dealt to the ranks, the healed sets scored by the naive engine)
        "shrink": ["shrink", model, "--remove", "2", "--tasks", "tiny_mc", "--include-path", inputs["tasks"],
                   "--ppl-text", inputs["text"], "--batch-size", "2", "--batch-tokens", "64", "--heal", "linear",
                   "--calib-text", inputs["calib"], "--calib-max-tokens", "1024"],
    }


@dataclass
class Pair:
    """One command line's two runs: folders ``one`` and ``two``, the one process's stdout, and
    each rank's stdout, stderr and exit status (None: not reached, an earlier command failed)."""

    one: Path
    two: Path
    out1: str
    rank_out: list[str]
    rank_err: list[str]
    rank_code: list[int | None]
    launcher: str

    def check_two_ranks_succeeded(self) -> None:
        assert self.rank_code == [0, 0], "\n".join([*map(str, self.rank_err), self.launcher])


@pytest.fixture(scope="module")
def runs(tiny_llama_dir, inputs, tmp_path_factory) -> dict[str, Pair]:
    """Every command line of :func:`_commands` as one process and with two ranks, side by side: the
    two-rank runs in one torchrun launch (tests/dist_driver.py: each rank runs them in turn through
    the CLI's entry point, its stdout and stderr per command in files), the one-process runs here
    meanwhile."""
    base = tmp_path_factory.mktemp("runs")
    commands = _commands(tiny_llama_dir, inputs)
    plan = [{"name": name, "args": [*map(str, args), "--out", str(base / name / "two")], "logs": str(base / name)}
            for name, args in commands.items()]
    (base / "plan.json").write_text(json.dumps(plan))
    # the ranks print as wide a page as this process's console (its width is fixed when lnsdiag is imported)
    proc = _torchrun(["-m", "tests.dist_driver", base / "plan.json"], COLUMNS=str(ui.console.width))
    try:
        out1 = {name: _one_process([*args, "--out", base / name / "one"]).stdout for name, args in commands.items()}
    except BaseException:
        proc.terminate()  # torchrun stops its workers
        _finish(proc)
        raise
    code, stdout, stderr = _finish(proc)

    def read(name: str, suffix: str) -> list:
        paths = [base / f"{name}.rank-{rank}.{suffix}" for rank in range(2)]
        return [p.read_text(errors="replace") if p.exists() else None for p in paths]

    pairs = {name: Pair(base / name / "one", base / name / "two", out1[name], read(name, "out"), read(name, "err"),
                        [None if c is None else int(c) for c in read(name, "code")], stdout + stderr)
             for name in commands}
    assert code == 0 or any(p.rank_code not in ([0, 0], [None, None]) for p in pairs.values()), stdout + stderr
    return pairs


# --- the same results as one process ---------------------------------------------------------

def test_prune_fast_engine_two_ranks_write_what_one_process_writes(runs):
    run = runs["fast"]
    run.check_two_ranks_succeeded()
    one, two = run.one, run.two
    for name in ("prune.csv", "prune_wide.csv", "angular.csv"):
        assert (two / name).read_bytes() == (one / name).read_bytes(), name
    stats = json.loads((two / "meta.json").read_text())["engine_stats"]
    assert stats["ranks"] == 2 and stats["computed_tokens"] == stats["tokens"]
    assert json.loads((one / "meta.json").read_text())["engine_stats"]["ranks"] == 1
    # rank 0 alone printed (one table, one list of files) and wrote (no partial file of any rank left)
    assert run.rank_out[1] == ""
    assert run.rank_out[0].replace(str(two), "OUT") == run.out1.replace(str(one), "OUT")
    assert run.rank_out[0].count("prune.csv") == 1
    assert not list(two.glob("engine-partial*")) and not list(two.glob(".*.tmp"))


@pytest.mark.parametrize("command", ["naive", "sublayers"])
def test_prune_naive_engine_two_ranks_write_what_one_process_writes(runs, command):
    run = runs[command]
    run.check_two_ranks_succeeded()
    one, two = run.one, run.two
    for name in ("prune.csv", "prune_wide.csv"):
        assert (two / name).read_bytes() == (one / name).read_bytes(), name
    assert sorted(p.name for p in (two / "variants").iterdir()) == sorted(p.name for p in (one / "variants").iterdir())


@pytest.mark.parametrize("command, files", [("angular", ("angular.csv", "angular_blocks.csv")),
                                            ("variance", ("variance.csv",))])
def test_measurements_two_ranks_sum_to_the_same_bits(command, files, runs):
    """Batches shared over ranks, sums made in one process's order: bitwise the same CSVs."""
    run = runs[command]
    run.check_two_ranks_succeeded()
    for name in files:
        assert (run.two / name).read_bytes() == (run.one / name).read_bytes(), name
    assert "".join(run.rank_out).count(f"{command}.csv") == 1


def test_shrink_two_ranks_write_what_one_process_writes(runs):
    run = runs["shrink"]
    run.check_two_ranks_succeeded()
    assert (run.two / "shrink.csv").read_bytes() == (run.one / "shrink.csv").read_bytes()
    assert b",linear," in (run.two / "shrink.csv").read_bytes()  # the healed picks, computed the same way
    assert sorted(p.name for p in (run.two / "heal-linear" / "patches").iterdir()) == \
        sorted(p.name for p in (run.one / "heal-linear" / "patches").iterdir())


# --- faults ----------------------------------------------------------------------------------

def test_a_killed_rank_fails_the_job_fast_and_one_process_resumes_its_work(runs, tiny_llama_dir, inputs, tmp_path):
    """Rank 1 kills itself after its second batch (the progress hook): the job exits non-zero
    before the collectives' timeout (no hang), both ranks' partial files stay, and a plain one-process rerun
    merges them, computes only the rest, and writes the uninterrupted run's prune.csv."""
    out = tmp_path / "killed"
    args = [*_prune_args(tiny_llama_dir, inputs), "--out", out]
    start = time.monotonic()
    code, stdout, stderr = _finish(_torchrun(["-m", "lnsdiag", *args], LNSDIAG_CHECKPOINT_SECONDS="0",
                                             LNSDIAG_TEST_SIGNAL=f"{PASS_PHASE}:2:KILL", LNSDIAG_TEST_SIGNAL_RANK="1"))
    elapsed = time.monotonic() - start
    assert code != 0, stdout + stderr
    assert elapsed < TIMEOUT_S, elapsed  # rank 0 did not sit out a collective's timeout: torchrun ended it
    partials = sorted(p.name for p in out.glob("engine-partial*"))
    assert partials == ["engine-partial.rank-000.npz", "engine-partial.rank-001.npz"], partials
    with np.load(out / "engine-partial.rank-001.npz") as saved:
        assert 2 <= saved["done"].sum() < len(saved["done"])
    assert not (out / "prune.csv").exists()

    _one_process(args)
    assert (out / "prune.csv").read_bytes() == (runs["fast"].one / "prune.csv").read_bytes()
    stats = json.loads((out / "meta.json").read_text())["engine_stats"]
    assert stats["ranks"] == 1 and stats["resumed_tokens"] > 0
    assert stats["resumed_tokens"] + stats["computed_tokens"] == stats["tokens"]
    assert not list(out.glob("engine-partial*"))


def test_a_killed_naive_rank_keeps_the_variants_each_rank_saved(runs, tiny_llama_dir, inputs, tmp_path):
    """Naive engine: each rank stores its variants as it finishes them, so a relaunch with one
    process scores only the rest."""
    out = tmp_path / "killed"
    args = [*_prune_args(tiny_llama_dir, inputs, *NAIVE), "--out", out]
    code, stdout, stderr = _finish(_torchrun(["-m", "lnsdiag", *args], LNSDIAG_TEST_SIGNAL="variants:2:KILL",
                                             LNSDIAG_TEST_SIGNAL_RANK="1"))
    assert code != 0, stdout + stderr
    kept = sorted(p.name for p in (out / "variants").glob("*.json"))
    # rank 1's share is layers 0, 1, 3 (balanced by blocks run: the baseline runs one more): it stopped after two
    assert {"layer_000.json", "layer_001.json"} <= set(kept) and "layer_003.json" not in kept, kept
    res = _one_process(args)
    assert f"resuming: {len(kept)} variant(s)" in res.stderr
    assert (out / "prune.csv").read_bytes() == (runs["naive"].one / "prune.csv").read_bytes()


def test_errors_say_their_rank_and_rank_0s_error_is_said_once(monkeypatch, capsys):
    from lnsdiag.cli.common import _exit_for

    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setenv("RANK", "1")
    with pytest.raises(typer.Exit) as exit_info:
        _exit_for(UserError("no such text file"), debug=False)
    assert exit_info.value.exit_code == 2
    assert "rank 1: error: no such text file" in capsys.readouterr().err
    with pytest.raises(typer.Exit) as exit_info:
        _exit_for(distributed.MirroredError("rank 0 said it"), debug=False)
    assert exit_info.value.exit_code == 2 and capsys.readouterr().err == ""
    monkeypatch.delenv("WORLD_SIZE")
    with pytest.raises(typer.Exit):
        _exit_for(UserError("plain"), debug=False)
    assert capsys.readouterr().err.startswith("error: plain")


# --- shares, the world, rank-0-only writing --------------------------------------------------

def test_balanced_shares_deal_every_index_once_and_balance_the_load():
    weights = [5, 1, 8, 3, 3, 9, 2, 7, 1, 4, 6, 6]
    for size in (1, 2, 3, 5, 16):
        shares = balanced_shares(weights, size)
        assert shares == balanced_shares(weights, size)  # deterministic
        assert len(shares) == size and sorted(i for s in shares for i in s) == list(range(len(weights)))
        assert all(s == sorted(s) for s in shares)
        loads = [sum(weights[i] for i in s) for s in shares]
        assert max(loads) - min(loads) <= max(weights)
    assert balanced_shares([1, 1, 1, 1], 2) == [[0, 2], [1, 3]]  # ties: lower index, lower rank
    assert balanced_shares([], 3) == [[], [], []]
    with pytest.raises(ValueError):
        balanced_shares([1], 0)


def test_a_single_process_is_no_world(monkeypatch):
    import torch.distributed as dist

    for name in LAUNCH_ENV:
        monkeypatch.delenv(name, raising=False)
    assert distributed.world() == World() and distributed.is_main()
    assert distributed.all_gather(3) == [3] and distributed.gather_to_main(3) == [3]
    assert distributed.broadcast_from_main("x") == "x" and distributed.on_main(lambda: 5) == 5
    distributed.barrier()
    distributed.init_from_env()
    assert not dist.is_initialized()
    assert distributed.my_share([3, 1, 2]) == [0, 1, 2]
    monkeypatch.setenv("WORLD_SIZE", "4")
    monkeypatch.setenv("RANK", "2")
    monkeypatch.setenv("LOCAL_RANK", "0")
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "2")
    assert distributed.world() == World(2, 4, 0, 2) and not distributed.is_main()
    monkeypatch.setenv("LNSDIAG_DIST_TIMEOUT", "soon")
    with pytest.raises(UserError, match="LNSDIAG_DIST_TIMEOUT"):
        distributed.timeout_seconds()


def test_rank_0_alone_writes_the_store_and_other_ranks_hold_their_results(tmp_path):
    """Two gloo ranks in subprocesses: rank 0 creates the folder, a result saved on rank 1 is held in
    memory (no file), one saved with ``any_rank`` is written; rank 0's UserError reaches rank 1."""
    import torch.multiprocessing as mp

    mp.start_processes(_store_worker, args=(tmp_path, _free_port()), nprocs=2, start_method="spawn")
    report = {r: json.loads((tmp_path / f"rank{r}.json").read_text()) for r in range(2)}
    assert sorted(p.name for p in (tmp_path / "run" / "variants").iterdir()) == ["baseline.json", "layer_001.json"]
    assert report[1]["done"] == [None, 1, 3] and report[0]["done"] == [None, 1]  # layer 3: held by rank 1 only
    assert report[0]["error"] == report[1]["error"] and "other settings" in report[0]["error"]
    assert report[1]["mirrored"] and not report[0]["mirrored"]


def _store_worker(rank: int, folder: Path, port: int) -> None:
    os.environ.update(RANK=str(rank), WORLD_SIZE="2", LOCAL_RANK=str(rank), LOCAL_WORLD_SIZE="2",
                      MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), LNSDIAG_DIST_TIMEOUT=str(TIMEOUT_S))
    from lnsdiag.results.store import ResultStore, VariantResult

    distributed.init_from_env()
    try:
        store = ResultStore(folder / "run", {"model": "a"})
        if rank == 0:
            store.save(VariantResult(Removal(), [], 1.0))
            store.save(VariantResult(Removal.of(1), [], 1.0))
        else:
            store.save(VariantResult(Removal.of(3), [], 1.0))  # rank 0 writes, so this one is only held
        distributed.barrier()
        done = [k.to_json() for k in sorted(store.done())]
        error, mirrored = "", False
        try:
            ResultStore(folder / "run", {"model": "b"})
        except UserError as exc:
            error, mirrored = str(exc), isinstance(exc, distributed.MirroredError)
        (folder / f"rank{rank}.json").write_text(json.dumps({"done": done, "error": error, "mirrored": mirrored}))
    finally:
        distributed.shutdown()


# --- a replica over several GPUs: arithmetic and errors --------------------------------------

def test_gpus_per_replica_picks_this_ranks_gpus():
    assert replica_gpus(0, 4, 2, 8) == [0, 1]
    assert replica_gpus(3, 4, 2, 8) == [6, 7]
    assert replica_gpus(1, 2, 4, 8) == [4, 5, 6, 7]
    assert replica_gpus(0, 1, 1, 1) == [0]
    assert replica_max_memory([6, 7], lambda i: 1000 * (i + 1), share=0.5) == {6: 3500, 7: 4000}
    with pytest.raises(UserError, match="only 2 GPU"):
        replica_gpus(0, 1, 4, 2)
    with pytest.raises(UserError, match=r"4 rank\(s\) on this node × --gpus-per-replica 4 = 16 GPUs, but 8 .*"
                                        r"--nproc-per-node 2"):
        replica_gpus(0, 4, 4, 8)
    with pytest.raises(UserError, match="no CUDA GPU"):
        replica_gpus(0, 1, 2, 0)
    with pytest.raises(UserError, match="at least 1"):
        replica_gpus(0, 1, 0, 8)


def test_gpus_per_replica_placement_and_options(monkeypatch, tiny_llama_dir):
    monkeypatch.setenv("WORLD_SIZE", "4")
    monkeypatch.setenv("RANK", "5")
    monkeypatch.setenv("LOCAL_RANK", "1")
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "4")
    placed = replica_placement(2, visible=8, capacity=lambda i: 80 * 2**30)
    assert placed["device_map"] == "auto" and sorted(placed["max_memory"]) == [2, 3]
    assert placed["max_memory"][2] == int(0.9 * 80 * 2**30)
    with pytest.raises(UserError, match="not both"):
        replica_placement(2, "auto", visible=8)
    with pytest.raises(UserError, match="= 12 GPUs, but 8"):
        replica_placement(3, visible=8)
    with pytest.raises(UserError, match="at least 1"):
        ModelOptions(str(tiny_llama_dir), gpus_per_replica=0)
    with pytest.raises(UserError, match="not both"):
        ModelOptions(str(tiny_llama_dir), gpus_per_replica=2, device_map="auto")
