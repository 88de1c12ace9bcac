"""The demo's default regime: students get part of the labels, the distilled one also the teacher's answers to the rest."""

from __future__ import annotations

import json
import math

import pytest

from llavadi import demo


def _results(teacher, sft, distilled):
    out = {"teacher": {"metrics": {"accuracy": teacher}}}
    out.update({f"student_sft-s{s}": {"metrics": {"accuracy": a}} for s, a in enumerate(sft)})
    out.update({f"student_distilled-s{s}": {"metrics": {"accuracy": a}} for s, a in enumerate(distilled)})
    return out


def test_verdict_by_hand():
    v = demo.verdict(_results(70.0, [40.0, 50.0, 45.0], [60.0, 62.0, 58.0]), seeds=3)
    # gaps 30, 20, 25 closed by 20, 12, 13
    assert v["gap_closed"] == pytest.approx([20 / 30, 12 / 20, 13 / 25])
    # gains 20, 12, 13: mean 15, sample std √((25 + 9 + 4) / 2) = √19
    assert v["gain"]["mean"] == pytest.approx(15.0) and v["gain"]["std"] == pytest.approx(math.sqrt(19))
    assert v["half_gap_every_seed"] and v["gain_over_2_std"] and v["clearly_pays"]
    lines = demo.verdict_lines(v)
    assert "+15.0 ± 4.4" in lines[0] and "67%, 60%, 52%" in lines[1] and "clearly pays" in lines[2]

    # one seed closes less than half its gap (13 of 30): the bar is not met
    v = demo.verdict(_results(70.0, [40.0, 50.0, 45.0], [53.0, 62.0, 58.0]), seeds=3)
    assert not v["half_gap_every_seed"] and v["gain_over_2_std"] and not v["clearly_pays"]
    # every seed at least half, but gains 30, 12, 12.5: mean 18.2 < 2 x sample std 10.2, within noise
    v = demo.verdict(_results(70.0, [40.0, 50.0, 45.0], [70.0, 62.0, 45.0 + 12.5]), seeds=3)
    assert v["half_gap_every_seed"] and not v["gain_over_2_std"]
    # one seed: no spread to compare against
    v = demo.verdict(_results(70.0, [40.0], [60.0]), seeds=1)
    assert v["half_gap_every_seed"] and not v["gain_over_2_std"] and len(demo.verdict_lines(v)) == 2


def test_students_data_split_and_the_teacher_answered_rest(tmp_path, monkeypatch):
    import llavadi.teacher.regenerate as regenerate_module

    records = [{"id": f"s{i}", "conversations": [{"from": "human", "value": f"q{i}"}, {"from": "gpt", "value": f"a{i}"}]}
               for i in range(20)]
    instruct = tmp_path / "instruct.json"
    instruct.write_text(json.dumps(records))
    calls = []

    def fake_regenerate(teacher_dir, data, images, out, **kwargs):
        calls.append((teacher_dir, data, kwargs))
        rows = json.loads(open(data).read())
        for r in rows:
            r["conversations"][1]["value"] = "" if r["id"] == "s7" else "teacher says " + r["id"]
        open(out, "w").write(json.dumps(rows))
        return {"samples_out": len(rows), "n_cut_at_max_new_tokens": 0, "report": out + ".report.json"}

    monkeypatch.setattr(regenerate_module, "regenerate", fake_regenerate)
    paths = {"instruct": str(instruct), "image_dir": str(tmp_path / "images")}
    data = demo._student_data(str(tmp_path), paths, "T", 0.25, distill=True, teacher_answers=True, fresh=False)
    (sft_path, sft_tag), (kd_path, kd_tag) = data["student_sft"], data["student_distilled"]
    assert sft_tag == "-f0.25" and kd_tag == "-f0.25-ta"
    sft = json.loads(open(sft_path).read())
    kd = json.loads(open(kd_path).read())
    assert sft == records[:5]  # the labelled quarter, answers untouched
    # an empty teacher answer teaches nothing: that sample stays out
    assert kd[:5] == records[:5] and [r["id"] for r in kd] == [r["id"] for r in records if r["id"] != "s7"]
    assert all(r["conversations"][1]["value"] == "teacher says " + r["id"] for r in kd[5:])
    assert calls[0][0] == "T" and calls[0][2]["keep_original"] is False
    # cached: a second call does not ask the teacher again
    demo._student_data(str(tmp_path), paths, "T", 0.25, distill=True, teacher_answers=True, fresh=False)
    assert len(calls) == 1
    # without teacher answers both students see the labelled quarter only; with every label nobody asks
    only = demo._student_data(str(tmp_path), paths, "T", 0.25, distill=True, teacher_answers=False, fresh=False)
    assert only["student_distilled"] == (sft_path, "-f0.25")
    full = demo._student_data(str(tmp_path), paths, "T", 1.0, distill=True, teacher_answers=True, fresh=False)
    assert full == {"student_sft": (str(instruct), ""), "student_distilled": (str(instruct), "")}
    assert len(calls) == 1
