import io
import json
import math

import speechtune
from speechtune.protocol import MAX_LINE_BYTES, parse_line


def test_report_prints_one_flushed_json_line():
    out = io.StringIO()
    speechtune.report(step=3, wer=0.21, cer=0.08, file=out)
    line = json.loads(out.getvalue())
    assert line["speechtune"] == 1 and line["step"] == 3 and line["wer"] == 0.21 and line["cer"] == 0.08
    assert out.getvalue().count("\n") == 1


def test_report_round_trips_through_the_parser():
    out = io.StringIO()
    speechtune.report(step=2, wer=0.5, file=out)
    speechtune.report(final=True, wer=0.4, file=out)
    first, last = (parse_line(line) for line in out.getvalue().splitlines())
    assert (first.step, first.metrics["wer"], first.final) == (2, 0.5, False)
    assert (last.step, last.metrics["wer"], last.final) == (None, 0.4, True)
    assert first.time is not None


def test_nan_is_parsed_so_the_engine_can_fail_the_trial():
    line = parse_line(b'{"speechtune": 1, "step": 1, "wer": NaN}')
    assert math.isnan(line.metrics["wer"])


def test_everything_else_is_ignored():
    junk = [
        b"",
        b"epoch 3 done",
        b"\xff\xfe\x00binary",
        b'{"loss": 0.1, "step": 1}',
        b'{"speechtune": 2, "step": 1, "wer": 0.1}',
        b'{"speechtune": 1, "step": "three", "wer": 0.1}',
        b'{"speechtune": 1, "step": -1, "wer": 0.1}',
        b'{"speechtune": 1, "wer": 0.1}',
        b'{"speechtune": 1, "step": 1, "wer": 0.1',
        b"[1, 2, 3]",
        b'{"speechtune": 1, "step": 1, "pad": "' + b"x" * MAX_LINE_BYTES + b'"}',
    ]
    assert [parse_line(line) for line in junk] == [None] * len(junk)


def test_non_numeric_fields_are_kept_apart_from_metrics():
    line = parse_line('{"speechtune": 1, "step": 4, "wer": 0.3, "note": "ok", "ok": true}')
    assert line.metrics == {"wer": 0.3}
    assert line.extra == {"note": "ok", "ok": True}


def test_numbers_no_float_or_database_column_can_hold_are_not_metrics_or_steps():
    huge = "9" * 400
    line = parse_line(f'{{"speechtune": 1, "step": 2, "wer": {huge}, "cer": 0.1, "time": {huge}}}')
    assert line.metrics == {"cer": 0.1} and line.time is None and line.extra["wer"] == int(huge)
    assert parse_line('{"speechtune": 1, "step": 100000000000000000000, "wer": 0.1}') is None
    assert parse_line('{"speechtune": 1, "step": 2147483647, "wer": 0.1}').step == 2**31 - 1
    assert parse_line('{"speechtune": 1, "step": 3, "wer": 0.2, "wer": 0.3}').metrics == {"wer": 0.3}  # JSON's last wins
    assert parse_line('{"speechtune": 1, "step": 3, "wer": {"nested": 1}}').metrics == {}
