"""python -m bench.lora (bench/lora.py): a smoke run on the tiny stand-ins."""
from __future__ import annotations


def test_lora_bench_smoke(tmp_path, capsys):
    """`python -m bench.lora` on the tiny stand-ins: the merge rounds and the interleaved step timing run and say
    what they measured (the full-size figures are in bench/RESULTS.md)."""
    import json

    from bench import lora

    for argv in (["merge", "--arch", "sdxl", "--rank", "4", "--repeat", "2"],
                 ["step", "--arch", "sd15", "--path", "fast", "--size", "64", "--rounds", "2", "--calls", "1"]):
        out = tmp_path / f"{argv[0]}.json"
        assert lora.main([*argv, "--tiny", "--threads", "1", "--json", str(out)]) == 0
        rec = json.loads(out.read_text())
        assert rec["tiny"] and rec["cpu"] and rec["peak_rss_gb"] > 0
        if argv[0] == "merge":
            assert len(rec["rounds"]) == 2 and rec["lora_modules"] > 0
            assert all(r["written"] > 0 and r["merge_s"] > 0 and r["restore_s"] > 0 for r in rec["rounds"])
        else:
            assert set(rec["step_ms_median"]) == {"plain weights", "LoRA merged"} and rec["after_over_before"] > 0
