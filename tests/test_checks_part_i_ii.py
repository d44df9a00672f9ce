"""The assignments of chapters 1 to 6 (and the interlude 5b): realistic wrong answers fail with their hints.

tests/test_checks.py already runs every check on its right answer (visible and
hidden inputs) and on a NotImplementedError; here each check of these chapters
meets at least two wrong answers a student could write, and the checks with
parts give partial credit part by part.
"""

import pytest
import torch

from minilib import checks
from minilib.adaln import modulate
from minilib.checks import ExerciseError


def fails_with(check, fn, *fragments, hidden=False):
    """Run ``check(fn)``, expect an ExerciseError whose message contains every fragment; return the message."""
    with pytest.raises(ExerciseError) as info:
        check(fn, hidden=hidden)
    message = str(info.value)
    for fragment in fragments:
        assert fragment in message, f"{fragment!r} not in the message:\n{message}"
    return message


def parts_passed(check, fn):
    """{part name: passed} of ``grade(check, fn)`` with the hidden inputs."""
    return {part.name: part.passed for part in checks.grade(check, fn).parts}


# --- chapter 3: the adaLN-Zero block ----------------------------------------------------------


def dit_block(order=(0, 1, 2, 3, 4, 5), gates=True, second_reads_input=False):
    """A DiTBlock.forward written by hand, with optional mistakes."""
    def forward(block, x, c):
        six = block.adaLN_modulation(c).chunk(6, dim=1)
        shift1, scale1, gate1, shift2, scale2, gate2 = (six[k] for k in order)
        g1, g2 = (gate1.unsqueeze(1), gate2.unsqueeze(1)) if gates else (1, 1)
        h = x + g1 * block.attn(modulate(block.norm1(x), shift1, scale1))
        return h + g2 * block.mlp(modulate(block.norm2(x if second_reads_input else h), shift2, scale2))
    return forward


def test_dit_block_by_hand_passes_and_its_mistakes_get_their_hints():
    checks.check_dit_block(dit_block(), hidden=True)
    message = fails_with(checks.check_dit_block, dit_block(gates=False), "multiply each residual branch by its gate",
                         "✗ adaLN-Zero at initialisation")
    assert "✗ random blocks" in message
    fails_with(checks.check_dit_block, dit_block(order=(1, 0, 2, 4, 3, 5)), "shift_msa, scale_msa, gate_msa")
    fails_with(checks.check_dit_block, dit_block(second_reads_input=True), "norm2 is applied to the updated x")


def test_dit_block_gates_without_a_token_axis_crash_with_a_hint_and_scale_only_mistakes_score_partially():
    def no_unsqueeze(block, x, c):
        shift1, scale1, gate1, shift2, scale2, gate2 = block.adaLN_modulation(c).chunk(6, dim=1)
        x = x + gate1 * block.attn(modulate(block.norm1(x), shift1, scale1))
        return x + gate2 * block.mlp(modulate(block.norm2(x), shift2, scale2))

    fails_with(checks.check_dit_block, no_unsqueeze, "raised RuntimeError", "gate.unsqueeze(1)")
    # swapping shift and scale goes unnoticed where both are zero: the block as built still earns its point
    assert parts_passed(checks.check_dit_block, dit_block(order=(1, 0, 2, 4, 3, 5))) == {
        "random blocks": False, "adaLN-Zero at initialisation: the identity": True, "hidden inputs": False}
