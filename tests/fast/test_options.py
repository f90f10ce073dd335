"""FastOptions (gbsd_core/fast/options.py): the combinations it refuses, each with a message that names the fix."""
from __future__ import annotations

import pytest
import torch

from gbsd_core.fast import FastOptions
from gbsd_core.fast.options import COMPILE_MODES, CUDAGRAPH_COMPILE_MODES


@pytest.mark.parametrize("mode", ["reduce-overhead", "max-autotune"])
def test_compile_modes_with_inductor_cudagraphs_are_refused_with_our_cuda_graphs(mode):
    """Those modes turn on inductor's own CUDA graphs: a graph replayed inside our capture. The message names the
    variant that works (max-autotune-no-cudagraphs) or the other way (drop cuda_graphs)."""
    with pytest.raises(ValueError, match="CUDA graphs") as err:
        FastOptions(compile=mode, cuda_graphs=True)
    assert "cuda_graphs=True" in str(err.value)
    if mode == "max-autotune":
        assert "max-autotune-no-cudagraphs" in str(err.value)
    FastOptions(compile=mode)  # alone it is fine
    assert FastOptions(compile="max-autotune-no-cudagraphs", cuda_graphs=True).cuda_graphs


def test_cudagraph_mode_table_matches_inductor():
    """The table of modes that bring inductor's CUDA graphs is ours (no torch._inductor import when options are
    made); it must agree with what inductor itself says each mode switches on."""
    import torch._inductor

    for mode in COMPILE_MODES:
        uses = bool(torch._inductor.list_mode_options(mode).get("triton.cudagraphs", False))
        assert uses == (mode in CUDAGRAPH_COMPILE_MODES), mode


def test_bad_values_name_the_field():
    with pytest.raises(ValueError, match="compile"):
        FastOptions(compile="fastest")
    with pytest.raises(ValueError, match="triton"):
        FastOptions(triton="yes")
    with pytest.raises(ValueError, match="dtype"):
        FastOptions(dtype=torch.int8)
