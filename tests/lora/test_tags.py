"""A1111's prompt tags (gbsd_core/lora/tags.py): `<lora:NAME:WEIGHT>` taken out of the text (read by the prompt
parser, gbsd_core/prompts/parser.py), NAME looked up inside one folder by plain name only."""
from __future__ import annotations

import pytest

from gbsd_core.lora import find_lora, split_lora_tags


def test_tags_are_taken_out_of_the_text_in_order():
    text, tags = split_lora_tags("a bunny <lora:style:0.8>, a carrot<lora:detail> <lyco:old:-1.5>")
    assert text == "a bunny , a carrot "
    assert [(t.name, t.weight, t.text) for t in tags] == [("style", 0.8, "<lora:style:0.8>"),
                                                          ("detail", 1.0, "<lora:detail>"),
                                                          ("old", -1.5, "<lyco:old:-1.5>")]
    assert split_lora_tags("no tags <here>, 3:2 <x:y>") == ("no tags <here>, 3:2 <x:y>", [])
    assert split_lora_tags("<lora: spaced name : 0.5 >")[1][0].name == "spaced name"


def test_tags_are_read_by_the_prompt_parser_as_a1111_reads_them():
    # A1111's re_extra_net reads "<hypernet:<lora:x:1>" as ONE tag of kind hypernet (its args run to the first '>'),
    # so no LoRA is applied; a reader of <lora:...> alone found a LoRA inside the other tag.
    assert split_lora_tags("a <hypernet:<lora:x:1> cat") == ("a <hypernet:<lora:x:1> cat", [])
    text, tags = split_lora_tags("a \\<lora:x:0.5> (cat <lyco:y:2>:1.2)")  # no escape or bracket protects a tag
    assert text == "a \\ (cat :1.2)" and [(t.name, t.weight) for t in tags] == [("x", 0.5), ("y", 2.0)]


@pytest.mark.parametrize("prompt, message", [
    ("a <lora::0.5>", r"names no LoRA"),
    ("a <lora: :0.5>", r"names no LoRA"),
    ("a <lora:x:strong>", r"weight 'strong' is not a number"),
    ("a <lora:x:nan>", r"not a finite number"),
    ("a <lora:x:0.5:0.7>", r"NAME:WEIGHT> only"),
    ("a <lora:x:te=0.5>", r"NAME:WEIGHT> only"),
])
def test_bad_tags_are_refused(prompt, message):
    with pytest.raises(ValueError, match=message):
        split_lora_tags(prompt)


def test_names_are_looked_up_inside_the_folder_only(tmp_path):
    folder = tmp_path / "loras"
    folder.mkdir()
    (folder / "style.safetensors").write_bytes(b"x")
    (folder / "old.pt").write_bytes(b"x")
    (tmp_path / "outside.safetensors").write_bytes(b"x")
    assert find_lora("style", folder) == folder / "style.safetensors"
    assert find_lora("style.safetensors", folder) == folder / "style.safetensors"
    assert find_lora("old", folder) == folder / "old.pt"
    for name in ("../outside", "sub/style", "/etc/passwd", "..", ""):
        with pytest.raises(ValueError, match="not a plain file name"):
            find_lora(name, folder)
    with pytest.raises(ValueError, match=r"no LoRA named 'missing' in .*loras \(looked for missing.safetensors"):
        find_lora("missing", folder)
