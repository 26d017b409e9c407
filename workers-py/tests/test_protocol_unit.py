import copy
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


# --- the fast validator (fastjsonschema) agrees with jsonschema -------------------------------

def _corpus() -> list[dict]:
    """One valid message of every agent-to-worker type, the generate one with its optional parts."""
    gen = generate_message("g1", "/tmp/x")
    full = generate_message("g2", "/tmp/x")
    full["request"]["model"]["refiner"] = "stabilityai/stable-diffusion-xl-refiner-1.0"
    full["request"]["output"]["previews"] = {"every_n_steps": 5, "max_size": 256}
    train = {"v": 1, "type": "train", "id": "t1", "job_id": "job-t1", "attempt": 1, "job_dir": "/tmp/x", "dataset_dir": "/tmp/d", "resume": None,
             "request": {"base_model": "stabilityai/stable-diffusion-xl-base-1.0", "dataset": {"items": [{"image": "a.png", "caption": "a kiln"}]},
                         "output": {"name": "team/lora"}, "priority": "normal", "timeout_s": 3600,
                         "hyperparameters": {"rank": 4, "learning_rate": 1e-3, "steps": 4, "batch_size": 1, "gradient_accumulation": 1,
                                             "resolution": 256, "seed": 7, "train_text_encoder": False, "checkpoint_every": 2}}}
    return [
        gen,
        full,
        train,
        {"v": 1, "type": "hello", "id": "h1", "agent_id": "agent-test", "gpu_id": "0"},
        {"v": 1, "type": "load", "id": "l1", "models": ["m"], "location": "vram", "pin": False},
        {"v": 1, "type": "unload", "id": "u1", "models": ["m"]},
        {"v": 1, "type": "cancel", "id": "g1"},
        {"v": 1, "type": "shutdown", "id": "s1"},
        {"v": 1, "type": "self_test", "id": "st1", "job_id": "job-st1", "attempt": 1, "job_dir": "/tmp/x", "checks": ["environment"], "benchmark": {}},
    ]


def _paths(node, path=()):
    yield path
    if isinstance(node, dict):
        for k, v in node.items():
            yield from _paths(v, path + (k,))
    elif isinstance(node, list):
        for i, v in enumerate(node):
            yield from _paths(v, path + (i,))


def _with(msg, path, value=None, delete=False):
    out = copy.deepcopy(msg)
    node = out
    for p in path[:-1]:
        node = node[p]
    if delete:
        del node[path[-1]]
    else:
        node[path[-1]] = value
    return out


def _variants(msg):
    """The message broken (or not) at every place: each value replaced by values of every JSON
    type and by out-of-range numbers and strings, each key deleted, an unknown key added to
    each object."""
    for path in _paths(msg):
        if not path:
            continue
        for value in (None, True, "x", "", "x" * 5000, 0, 1, -1, 1.5, 10**12, -(10**12), [], [1], {}, {"k": 1}):
            yield _with(msg, path, value)
        if not isinstance(path[-1], int):
            yield _with(msg, path, delete=True)
    for path in _paths(msg):
        node = msg
        for p in path:
            node = node[p]
        if isinstance(node, dict):
            yield _with(msg, path + ("not_a_field",), 1)


def test_the_fast_validator_accepts_exactly_what_jsonschema_accepts():
    from kiln_worker.protocol import _branches, _fast

    branches = _branches("agent-to-worker")
    checked = disagreements = 0
    for msg in _corpus():
        assert not list(branches[msg["type"]].iter_errors(msg)), msg["type"]
        for variant in _variants(msg):
            t = variant.get("type")
            if not isinstance(t, str) or t not in branches:
                continue
            slow_ok = not any(True for _ in branches[t].iter_errors(variant))
            try:
                _fast("agent-to-worker", t)(copy.deepcopy(variant))
                fast_ok = True
            except Exception:  # noqa: BLE001 — a JsonSchemaException, or its own TypeError on some wrong types: a refusal either way
                fast_ok = False
            checked += 1
            if fast_ok and not slow_ok:
                disagreements += 1
                raise AssertionError(f"fast path accepts what jsonschema refuses: {json.dumps(variant)[:300]}")
            # the reverse costs only speed (jsonschema has the last word), but should not happen either
            assert fast_ok == slow_ok, json.dumps(variant)[:300]
    assert checked > 1000 and disagreements == 0


def test_the_fast_validator_leaves_the_message_as_it_came():
    from kiln_worker.protocol import _fast

    for msg in _corpus():
        seen = copy.deepcopy(msg)
        _fast("agent-to-worker", msg["type"])(seen)
        assert seen == msg  # no default filled in, nothing coerced
