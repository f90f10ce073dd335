"""The pairs file of `gbsd eval` (gbsd_core/cli/pairs.py): the shipped pairs parse; every malformed line is
refused with exit 2 and a message naming the line, before any image is made."""
from __future__ import annotations

import pytest
from _cli import EVAL_ARGS
from PIL import Image

from gbsd_core.cli.main import main as cli_main
from gbsd_core.cli.pairs import DEFAULT_PAIRS, read_pairs


def test_shipped_pairs_parse():
    pairs = read_pairs(DEFAULT_PAIRS)
    assert len(pairs) >= 24 and len({p.id for p in pairs}) == len(pairs)
    for p in pairs:  # the focus object is one of the global prompt's objects
        assert p.focus.split(" ", 1)[1] in p.prompt


@pytest.mark.parametrize("lines, match", [
    (['{"prompt": "a", "focus": "b", "seed": 1}', '{not json'], "line 2: not valid JSON"),
    (['{"prompt": "a", "focus": "b"}'], "line 1: missing field 'seed'"),
    (['{"prompt": "a", "focus": "b", "seed": "7"}'], "'seed' must be an integer"),
    (['{"prompt": "a", "focus": "", "seed": 1}'], "'focus' must be a non-empty string"),
    (['{"prompt": "a", "focsu": "b", "seed": 1}'], "unknown field(s) focsu"),
    (['{"prompt": "a", "focus": "b", "seed": 1, "box": [1, 2, 3]}'], "'box' must be [x0, y0, x1, y1]"),
    (['{"prompt": "a", "focus": "b", "seed": 1, "mask": "m.png", "box": [0, 0, 4, 4]}'], "not both"),
    (['{"prompt": "a", "focus": "b", "seed": 1, "mask": "nope.png"}'], "nope.png: no such file"),
    (['{"prompt": "a", "focus": "b", "seed": 1, "id": "x"}', '{"prompt": "c", "focus": "d", "seed": 1, "id": "x"}'],
     "line 2: id 'x' is used twice"),
    ([], "no pairs"),
    (['{"prompt": "a", "focus": "b", "seed": 1, "mask": "small.png"}'], "small.png is 32x32 (W x H) but the images are 64x64"),
    (['{"prompt": "a", "focus": "b", "seed": 1, "box": [70, 0, 90, 10]}'], "lies outside"),
])
def test_bad_input_exits_2_with_a_clear_message(lines, match, amp_ckpt, tmp_path, capsys):
    Image.new("L", (64, 64), 255).save(tmp_path / "m.png")
    Image.new("L", (32, 32), 255).save(tmp_path / "small.png")
    path = tmp_path / "pairs.jsonl"
    path.write_text("".join(line + "\n" for line in lines))
    rc = cli_main(["eval", str(path), "-o", str(tmp_path / "out"), "--weights", str(amp_ckpt), *EVAL_ARGS])
    err = capsys.readouterr().err
    assert rc == 2, err
    assert match in err.strip().splitlines()[-1], err  # the error is one line (after any progress line)
    assert not (tmp_path / "out" / "pairs").exists() or not any((tmp_path / "out" / "pairs").iterdir())
