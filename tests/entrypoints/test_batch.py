"""Batch inference: rows in, one record per row out, exactly once, whatever the workers or kills."""

from __future__ import annotations

import json
import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import psutil
import pytest

from pagedllm import SamplingParams, infer
from pagedllm.entrypoints.batch import BatchError
from pagedllm.entrypoints.batch.board import KEEP_S, JobBoard, JobState
from pagedllm.entrypoints.batch.journal import JournalError, OutputJournal
from pagedllm.entrypoints.batch.rows import RowError, load_row, parse_row

GREEDY = SamplingParams(temperature=0.0, max_tokens=12)
ENGINE = {"kv_cache_memory": 16 * 2**20, "max_num_seqs": 16}
WORDS = "river stone lamp orbit cedar violet engine harbor quartz meadow signal copper".split()


def _rows(count: int, seed: int = 0) -> list[dict]:
    rng = random.Random(seed)
    rows = []
    for i in range(count):
        text = " ".join(rng.choice(WORDS) for _ in range(rng.randint(2, 30)))
        row = {"id": f"row-{i}", "prompt": text, "max_tokens": rng.randint(1, 16)}
        if i % 5 == 0:
            row = {"id": i, "messages": [{"role": "user", "content": text}], "max_tokens": 10}
        rows.append(row)
    return rows


def _write_rows(path: Path, rows: list, extra_lines: tuple[str, ...] = ()) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows) + "".join(line + "\n" for line in extra_lines))
    return path


def _records(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()]


def _by_line(records: list[dict]) -> dict[int, dict]:
    by_line = {r["line"]: r for r in records}
    assert len(by_line) == len(records), "an input line was recorded twice"
    return by_line


@pytest.fixture(scope="module")
def tiny(tiny_models) -> str:
    return str(tiny_models["llama"].hf_dir)


@pytest.fixture(scope="module")
def one_worker_records(tiny, tmp_path_factory) -> tuple[Path, dict[int, dict]]:
    folder = tmp_path_factory.mktemp("batch")
    data = _write_rows(folder / "data.jsonl", _rows(40))
    summary = infer(tiny, data, folder / "out.jsonl", 1, sampling_params=GREEDY, engine_options=ENGINE,
                    progress=False)
    assert summary.written == 40 and summary.errors == 0 and summary.completion_tokens > 0
    return data, _by_line(_records(folder / "out.jsonl"))


def test_one_worker_matches_the_offline_engine(tiny, one_worker_records):
    from pagedllm import LLM

    data, records = one_worker_records
    rows = [json.loads(line) for line in data.read_text().splitlines()]
    llm = LLM(tiny, **ENGINE)
    for line, row in enumerate(rows[:10], start=1):
        params = SamplingParams(temperature=0.0, max_tokens=row["max_tokens"])
        out = llm.chat(row["messages"], params)[0] if "messages" in row else llm.generate(row["prompt"], params)[0]
        record = records[line]
        assert record["id"] == row["id"]
        assert record["text"] == out.outputs[0].text
        assert record["completion_tokens"] == len(out.outputs[0].token_ids)
        assert record["prompt_tokens"] == len(out.prompt_token_ids)
        assert record["finish_reason"] == out.outputs[0].finish_reason


@pytest.mark.parametrize("workers", [2, 3])
def test_more_workers_give_the_same_records(tiny, one_worker_records, tmp_path, workers):
    data, expected = one_worker_records
    summary = infer(tiny, data, tmp_path / "out.jsonl", workers, sampling_params=GREEDY, engine_options=ENGINE,
                    rows_in_flight=4, progress=False)
    assert summary.written == 40
    assert _by_line(_records(tmp_path / "out.jsonl")) == expected


def test_tensor_parallel_replicas_give_the_same_records(tiny, one_worker_records, tmp_path):
    """Two replicas of two ranks each (four processes): each replica's ranks split the model."""
    data, expected = one_worker_records
    summary = infer(tiny, data, tmp_path / "out.jsonl", 2, sampling_params=GREEDY,
                    engine_options={**ENGINE, "tensor_parallel_size": 2}, rows_in_flight=8, progress=False)
    assert summary.written == 40
    assert _by_line(_records(tmp_path / "out.jsonl")) == expected


def test_malformed_rows_become_error_records(tiny, tmp_path):
    good = [{"id": "a", "prompt": "river stone"}, {"prompt": "lamp orbit", "metadata": {"k": [1, 2]}},
            {"id": "c", "messages": [{"role": "user", "content": "hi"}], "n": 2, "temperature": 0.7, "seed": 3}]
    bad = ['{"id": "j", "prompt": "x"',  # bad JSON
           '{"id": "p", "max_tokens": 3}',  # no prompt
           '{"id": "t", "prompt": "x", "temperature": -1}',  # bad parameter
           '{"id": "u", "prompt": "x", "temprature": 1}',  # unknown field
           '{"id": "m", "messages": [{"role": "robot", "content": "x"}]}',
           '{"id": "long", "prompt": "' + "stone " * 400 + '"}',  # past the tiny model's context: refused by the engine
           '{"id": "a", "prompt": "again"}',  # duplicate id
           '[1, 2, 3]',
           '{"id": true, "prompt": "x"}']
    data = _write_rows(tmp_path / "data.jsonl", good, ("",) + tuple(bad))
    board = JobBoard(tmp_path / "board")
    summary = infer(tiny, data, tmp_path / "out.jsonl", 1, sampling_params=GREEDY, engine_options=ENGINE,
                    progress=False, board=board)
    records = _by_line(_records(tmp_path / "out.jsonl"))
    assert summary.rows == 12 and summary.written == 12 and summary.errors == 9
    [job] = board.jobs()
    assert (job["state"], job["input"], job["output"], job["rows"], job["done"], job["errors"], job["workers"]) == \
        ("finished", "data.jsonl", "out.jsonl", 12, 12, 9, 1)
    assert job["completion_tokens"] == summary.completion_tokens and job["tokens_per_s"] > 0
    assert set(records) == {1, 2, 3} | set(range(5, 14))  # line 4 is blank: not a row
    assert records[2]["id"] == 2 and records[2]["metadata"] == {"k": [1, 2]} and records[2]["text"] is not None
    assert len(records[3]["choices"]) == 2
    errors = {r["id"]: r["error"] for r in records.values() if "error" in r}
    assert "not valid JSON" in errors[5]
    assert "exactly one of 'prompt' or 'messages'" in errors["p"]
    assert "temperature" in errors["t"]
    assert "'temprature'" in errors["u"]
    assert "messages: 0.role" in errors["m"]
    assert "context" in errors["long"]
    assert "duplicate id 'a' (first on line 1)" in [r["error"] for r in records.values() if r["line"] == 11][0]
    assert "JSON object" in errors[12]
    assert "id must be a string or an integer" in errors[13]


def test_rows_that_killed_a_worker_become_error_records(tiny, tmp_path):
    """top_k past int64 and a schema too deep for the grammar compiler killed the worker, and every rerun
    died at the same row (issue 34); a lone surrogate could not be tokenised."""
    defs = {f"d{i}": {"type": "object", "properties": {"x": {"$ref": f"#/$defs/d{i + 1}"}}} for i in range(1000)}
    deep = {"type": "json_schema", "json_schema": {"name": "deep", "schema": {"$ref": "#/$defs/d0", "$defs": defs}}}
    rows = [{"id": "k", "prompt": "x", "top_k": 2**63}, {"id": "g", "prompt": "x", "response_format": deep},
            {"id": "s", "prompt": "river \udfff stone"}, {"id": "ok", "prompt": "river stone"},
            {"id": "m", "prompt": "x", "max_tokens": 10**9}]  # refused as the server refuses it, not cut short
    data = _write_rows(tmp_path / "data.jsonl", rows)
    summary = infer(tiny, data, tmp_path / "out.jsonl", 1, sampling_params=GREEDY, engine_options=ENGINE,
                    progress=False)
    errors = {r["id"]: r.get("error") for r in _records(tmp_path / "out.jsonl")}
    assert summary.written == 5 and summary.errors == 4, errors
    assert "top_k" in errors["k"] and "deep" in errors["g"] and "surrogate" in errors["s"] and errors["ok"] is None
    assert "context" in errors["m"]


@pytest.mark.parametrize("device", ["/dev/full", "/dev/zero"])
def test_an_output_that_is_a_device_is_refused(tiny, tmp_path, device):
    """/dev/zero read back forever (24 GB, then the OOM killer); /dev/full could record nothing."""
    data = _write_rows(tmp_path / "data.jsonl", _rows(2))
    with pytest.raises(BatchError, match="not a regular file"):
        infer(tiny, data, device, 1, sampling_params=GREEDY, engine_options=ENGINE, progress=False)


def test_rows_too_deep_or_too_long_in_digits_are_error_records(tiny, tmp_path):
    data = _write_rows(tmp_path / "data.jsonl", [{"id": "ok", "prompt": "river stone"}],
                       ('{"id": "deep", "prompt": ' + "[" * 100_000 + "]" * 100_000 + "}",
                        '{"id": "digits", "prompt": "x", "seed": ' + "9" * 5000 + "}"))
    summary = infer(tiny, data, tmp_path / "out.jsonl", 1, sampling_params=GREEDY, engine_options=ENGINE,
                    progress=False)
    errors = {r["line"]: r.get("error") for r in _records(tmp_path / "out.jsonl")}
    assert summary.written == 3 and summary.errors == 2
    assert "nested too deep" in errors[2] and "too many digits" in errors[3]


def test_a_finished_job_run_again_does_nothing(tiny, one_worker_records, tmp_path):
    data, _ = one_worker_records
    out = tmp_path / "out.jsonl"
    infer(tiny, data, out, 1, sampling_params=GREEDY, engine_options=ENGINE, progress=False)
    before = out.read_bytes()
    started = time.monotonic()
    summary = infer(tiny, data, out, 2, sampling_params=GREEDY, engine_options=ENGINE, progress=False)
    assert summary.written == 0 and summary.already_done == 40 and "nothing to do" in summary.format()
    assert time.monotonic() - started < 5  # no replica was started
    assert out.read_bytes() == before


def test_an_output_of_another_input_is_refused(tiny, one_worker_records, tmp_path):
    data, _ = one_worker_records
    out = tmp_path / "out.jsonl"
    infer(tiny, data, out, 1, sampling_params=GREEDY, engine_options=ENGINE, progress=False)
    other = _write_rows(tmp_path / "other.jsonl", [{"id": "x", "prompt": "river"}])
    with pytest.raises(BatchError, match="input changed"):
        infer(tiny, other, out, 1, progress=False)


def test_journal_cuts_a_torn_record_and_locks(tmp_path):
    out = tmp_path / "out.jsonl"
    out.write_bytes(b'{"id": "a", "line": 1, "text": "x"}\n{"id": "b", "line": 2, "te')
    journal = OutputJournal(out)
    assert journal.done == {1: "a"}
    with pytest.raises(JournalError, match="another job"):
        OutputJournal(out)
    journal.write([{"id": "b", "line": 2, "text": "y"}])
    journal.close()
    assert [r["id"] for r in _records(out)] == ["a", "b"]
    for foreign in ('{"hello": 1}\n{"id": "b", "line": 2, "te', '{"id": "a", "line": 1}\nsomeone else\'s text'):
        (tmp_path / "foreign.jsonl").write_text(foreign)
        with pytest.raises(JournalError, match="not a pagedllm record"):
            OutputJournal(tmp_path / "foreign.jsonl")
        assert (tmp_path / "foreign.jsonl").read_text() == foreign  # refused, and left as it was


def test_row_settings_override_the_job_defaults():
    task = parse_row(load_row('{"id": "x", "prompt": "hi", "max_tokens": 5, "stop": ["a", "b"], '
                              '"response_format": {"type": "json_object"}}'), 1, GREEDY)
    assert task.params.max_tokens == 5 and task.params.stop == ("a", "b") and task.params.temperature == 0.0
    assert task.params.structured_output is not None
    with pytest.raises(RowError, match="top_p"):
        parse_row({"prompt": "hi", "top_p": 0}, 1, GREEDY)
    with pytest.raises(RowError, match="non-empty"):
        parse_row({"prompt": []}, 1, GREEDY)
    with pytest.raises(RowError, match="messages: this model reads text only"):
        parse_row({"messages": [{"role": "user", "content": [{"type": "input_audio", "input_audio": {}}]}]}, 1, GREEDY)


def _cli(*args: str) -> list[str]:
    return [sys.executable, "-m", "pagedllm.entrypoints.cli", "infer", *args]


def _complete_records(path: Path) -> list[dict]:
    if not path.exists():
        return []
    text = path.read_text()
    return [json.loads(line) for line in text[:text.rfind("\n") + 1].splitlines()]


def _kill_when(proc: subprocess.Popen, out: Path, more_records: int, delay_s: float, deadline_s: float = 120) -> None:
    """SIGKILL the job `delay_s` after `more_records` more records have landed (or let it end first)."""
    start_count = len(_complete_records(out))
    end = time.monotonic() + deadline_s
    while proc.poll() is None and time.monotonic() < end:
        if len(_complete_records(out)) >= start_count + more_records:
            break
        time.sleep(0.01)
    time.sleep(delay_s)
    workers = psutil.Process(proc.pid).children(recursive=True) if proc.poll() is None else []
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    _, alive = psutil.wait_procs(workers, timeout=15)
    assert not alive, "worker processes outlived their killed coordinator"


def test_sigkill_at_random_points_then_resume_is_exactly_once(tiny, tmp_path):
    rows = _rows(90, seed=7)
    data = _write_rows(tmp_path / "data.jsonl", rows, ('{"broken',))
    out = tmp_path / "out.jsonl"
    args = _cli(tiny, "-i", str(data), "-o", str(out), "--workers", "2", "--rows-in-flight", "3", "--no-progress",
                "--kv-cache-memory", "16MiB", "--max-num-seqs", "16")
    rng = random.Random(11)
    kills = [(0, rng.uniform(0.5, 3.0)),  # while the replicas load
             (rng.randint(1, 10), rng.uniform(0, 0.05)), (rng.randint(10, 30), rng.uniform(0, 0.05)),
             (rng.randint(1, 5), rng.uniform(0, 0.05))]
    for more, delay in kills:
        _kill_when(subprocess.Popen(args, stderr=subprocess.DEVNULL), out, more, delay)
        _by_line(_complete_records(out))  # no duplicate so far
    assert 0 < len(_complete_records(out)) < 91, "the kills should land mid-job"
    finished = subprocess.run(args, capture_output=True, text=True, timeout=300)
    assert finished.returncode == 0, finished.stderr
    records = _by_line(_records(out))
    assert set(records) == set(range(1, 92))
    assert [records[i]["id"] for i in range(1, 91)] == [r["id"] for r in rows]
    assert "error" in records[91]
    again = subprocess.run(args, capture_output=True, text=True, timeout=300)
    assert again.returncode == 0 and "nothing to do" in again.stderr
    assert len(_records(out)) == 91


def test_cli_reports_bad_arguments_in_one_line(tiny, tmp_path):
    data = _write_rows(tmp_path / "data.jsonl", [{"prompt": "hi"}])
    for extra, message in ((["--workers", "0"], "number of workers"), (["--devices", "tpu"], "device 'tpu'"),
                           (["--temperature", "-2"], "temperature")):
        result = subprocess.run(_cli(tiny, "-i", str(data), "-o", str(tmp_path / "o.jsonl"), *extra),
                                capture_output=True, text=True, timeout=120)
        assert result.returncode == 2 and message in result.stderr and "Traceback" not in result.stderr
    missing = subprocess.run(_cli(tiny, "-i", str(tmp_path / "none.jsonl"), "-o", str(tmp_path / "o.jsonl")),
                             capture_output=True, text=True, timeout=120)
    assert missing.returncode == 2 and "is not a file" in missing.stderr


def test_ray_backend_writes_the_same_records(tiny, one_worker_records, tmp_path):
    pytest.importorskip("ray")
    data, expected = one_worker_records
    summary = infer(tiny, data, tmp_path / "out.jsonl", 2, backend="ray", threads_per_worker=1,
                    sampling_params=GREEDY, engine_options=ENGINE, rows_in_flight=4, progress=False)
    assert summary.written == 40
    assert _by_line(_records(tmp_path / "out.jsonl")) == expected


def test_ctrl_c_stops_cleanly_and_the_job_resumes(tiny, tmp_path):
    data = _write_rows(tmp_path / "data.jsonl", _rows(60, seed=3))
    out = tmp_path / "out.jsonl"
    args = _cli(tiny, "-i", str(data), "-o", str(out), "--workers", "2", "--rows-in-flight", "2", "--no-progress",
                "--kv-cache-memory", "16MiB")
    board = JobBoard(tmp_path / "board")
    env = {**os.environ, "PAGEDLLM_JOBS_DIR": str(board.folder)}
    # SIGINT back to its default in the job: a test run started as a background job inherits it ignored.
    proc = subprocess.Popen(args, stderr=subprocess.PIPE, text=True, env=env,
                            preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
    while len(_complete_records(out)) < 5 and proc.poll() is None:
        time.sleep(0.01)
    proc.send_signal(signal.SIGINT)
    _, stderr = proc.communicate(timeout=60)
    assert proc.returncode == 130 and "run the same command to resume" in stderr, stderr
    assert "Traceback" not in stderr, stderr
    [stopped] = board.jobs()
    assert stopped["state"] == "stopped" and stopped["done"] == len(_complete_records(out)) and stopped["rows"] == 60
    finished = subprocess.run(args, capture_output=True, text=True, timeout=300, env=env)
    assert finished.returncode == 0, finished.stderr
    assert set(_by_line(_records(out))) == set(range(1, 61))
    assert sorted(job["state"] for job in board.jobs()) == ["finished", "stopped"]


def test_the_job_board_skips_bad_files_and_clears_old_jobs(tmp_path):
    board = JobBoard(tmp_path)
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    running = JobState(int(dead.stdout), "in.jsonl", "out.jsonl", 2, rows=10, done=3, state="running")
    board.publish(running)
    board.publish(JobState(os.getpid(), "a.jsonl", "b.jsonl", 1, rows=5, done=1, state="running", started_at=1.0))
    (tmp_path / "7.json").write_text('{"pid": 7, "state": "running"}')  # not a job's state
    (tmp_path / "8.json").write_text("not json")
    (tmp_path / "9.json").write_bytes(b"\xff\xfe")
    states = {job["pid"]: job["state"] for job in board.jobs()}
    assert states == {running.pid: "stopped", os.getpid(): "running"}  # its process is gone: resumable
    old = tmp_path / f"{running.pid}.json"
    record = json.loads(old.read_text())
    old.write_text(json.dumps({**record, "state": "finished", "updated_at": time.time() - KEEP_S - 1}))
    assert [job["pid"] for job in board.jobs()] == [os.getpid()] and not old.exists()


def test_replicas_get_their_own_cores_and_devices_in_turn(monkeypatch):
    from pagedllm.entrypoints.batch.runner import plan_placements

    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: {0, 1, 2, 3})
    two = plan_placements(2, None, None)
    assert [(p.device, p.threads, p.cpus) for p in two] == [("cpu", 2, (0, 1)), ("cpu", 2, (2, 3))]
    three = plan_placements(3, ["cuda:0", "cuda:1"], None)
    assert [p.device for p in three] == ["cuda:0", "cuda:1", "cuda:0"] and three[0].threads == 1
    assert plan_placements(3, None, 2)[0].cpus == ()  # 6 threads on 4 cores: the OS shares them
    groups = plan_placements(2, ["cuda:0", "cuda:1", "cuda:2", "cuda:3"], None, tensor_parallel_size=2)
    assert [p.group for p in groups] == [("cuda:0", "cuda:1"), ("cuda:2", "cuda:3")]
    assert [p.device for p in groups] == ["cuda:0", "cuda:2"]
    with pytest.raises(BatchError, match="threads per worker"):
        plan_placements(1, None, 0)


def test_rows_can_ask_for_logprobs(tiny, tmp_path):
    data = _write_rows(tmp_path / "data.jsonl", [{"prompt": "river stone lamp", "max_tokens": 4, "logprobs": 2,
                                                 "prompt_logprobs": 1, "ignore_eos": True}])
    infer(tiny, data, tmp_path / "out.jsonl", 1, engine_options=ENGINE, progress=False)
    [record] = _records(tmp_path / "out.jsonl")
    assert len(record["logprobs"]) == record["completion_tokens"] == 4
    assert all(len(p["top_logprobs"]) == 2 and p["logprob"] <= 0 for p in record["logprobs"])
    assert "".join(p["token"] for p in record["logprobs"]) == record["text"]
    prompt = record["prompt_logprobs"]
    assert len(prompt) == record["prompt_tokens"] and prompt[0] is None and all(p is not None for p in prompt[1:])
