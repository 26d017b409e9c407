import io
import json

from kiln_worker.protocol import FrameWriter, InvalidMessage, message_types, parse_line, scheduler_names
from conftest import IN_VALIDATOR, assert_valid_outgoing, generate_message


def test_scheduler_list_comes_from_the_generated_schema():
    enum = IN_VALIDATOR.schema["oneOf"][1]["properties"]["request"]["properties"]["scheduler"]["properties"]["type"]["enum"]
    assert scheduler_names() == enum
    assert "EulerDiscreteScheduler" in enum


def test_knows_every_message_type_of_the_contract():
    assert sorted(message_types("agent-to-worker")) == ["cancel", "generate", "hello", "load", "self_test", "shutdown", "train", "unload"]
    assert sorted(message_types("worker-to-agent")) == ["bye", "checkpoint", "error", "loaded", "log", "preview", "progress", "ready", "result", "self_test_result", "trained"]


def test_parses_a_valid_generate():
    msg = generate_message("g1", "/tmp/x")
    assert parse_line(json.dumps(msg).encode()) == msg


def test_names_field_and_rule_of_each_problem():
    msg = generate_message("g1", "/tmp/x")
    msg["request"]["hyperparameters"]["width"] = 1001
    msg["request"]["scheduler"]["steps"] = 0
    del msg["request"]["conditioning"]["prompt"]
    msg["request"]["hyperparameters"]["sampler"] = "x"
    bad = parse_line(json.dumps(msg))
    assert isinstance(bad, InvalidMessage)
    assert (bad.id, bad.type) == ("g1", "generate")
    text = bad.description
    assert "request.hyperparameters.width: multipleOf" in text
    assert "request.scheduler.steps: minimum" in text
    assert "request.conditioning.prompt: required" in text
    assert "request.hyperparameters.sampler: additionalProperties" in text


def test_rejects_non_json_non_objects_and_unknown_types():
    for line, fragment in [(b"{oops", "not JSON"), (b"\xff\xfe", "not UTF-8"), (b"[1, 2]", "JSON object"),
                           (b'{"v": 1, "type": "launch", "id": "x"}', "type: enum"), (b'{"v": 1, "type": "cancel", "id": "x", "n": NaN}', "not JSON")]:
        bad = parse_line(line)
        assert isinstance(bad, InvalidMessage), line
        assert fragment in bad.description, (line, bad.description)


def test_id_is_only_pulled_out_when_it_is_a_usable_string():
    assert parse_line('{"type": "generate", "id": 5}').id is None
    assert parse_line('{"type": "generate", "id": ""}').id is None
    assert parse_line('{"type": "generate", "id": "abc"}').id == "abc"


def test_frame_writer_writes_one_versioned_line_per_message():
    out = io.StringIO()
    writer = FrameWriter(out)
    writer.log(None, "info", "line one\nline two")
    writer.send({"type": "bye", "id": "s1"})
    lines = out.getvalue().splitlines()
    assert len(lines) == 2
    for line in lines:
        msg = json.loads(line)
        assert msg["v"] == 1
        assert_valid_outgoing(msg)


def test_frame_writer_survives_a_closed_stream():
    out = io.StringIO()
    writer = FrameWriter(out)
    out.close()
    writer.send({"type": "bye", "id": "s1"})  # must not raise
