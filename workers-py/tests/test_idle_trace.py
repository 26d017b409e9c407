"""KILN_IDLE_TRACE: the worker records how long it waited between a final frame and the next request."""

from __future__ import annotations

import time

from conftest import generate_message


def test_idle_trace_records_the_wait_between_a_result_and_the_next_request(spawn, tmp_path):
    trace = tmp_path / "idle.txt"
    worker = spawn({"KILN_IDLE_TRACE": str(trace)})
    worker.hello()
    worker.run(generate_message("g1", str(tmp_path / "1"), steps=1, width=64, height=64))
    time.sleep(0.3)  # the agent keeps the worker waiting this long
    worker.run(generate_message("g2", str(tmp_path / "2"), steps=1, width=64, height=64))
    worker.run(generate_message("g3", str(tmp_path / "3"), steps=1, width=64, height=64))
    worker.stop()
    lines = [line.split() for line in trace.read_text().splitlines()]
    # the first request follows no other: only the two after it are recorded
    assert [kind for kind, _ in lines] == ["generate", "generate"]
    assert float(lines[0][1]) >= 300
    assert float(lines[1][1]) >= 0


def test_no_trace_unless_asked(spawn, tmp_path):
    worker = spawn()
    worker.hello()
    worker.run(generate_message("g1", str(tmp_path / "1"), steps=1, width=64, height=64))
    worker.run(generate_message("g2", str(tmp_path / "2"), steps=1, width=64, height=64))
    worker.stop()
    assert not list(tmp_path.glob("*.txt"))
