"""Automatic checks for the book's assignments.

Every chapter ends with an assignment: write one piece of a model yourself
(``modulate``, the timestep embedding, one Euler step, ...) in the cell the
chapter gives you, then run the cell below it, which calls a check from this
package::

    from minilib.checks import check_modulate
    check_modulate(my_modulate)

A check calls your function on several inputs, random ones and edge cases (a
single token, an odd width, the last step, ...), and compares each answer with
minilib's own implementation. If all agree it prints one line starting with
``✓``. Otherwise it raises an :class:`ExerciseError` that says which input
failed, the expected and the actual shape, the first entries that differ and,
where it recognises a common mistake, what that mistake is. A function that
still raises ``NotImplementedError`` is reported as "not implemented yet".

The checks run on the CPU with small inputs, take well under a second, and
leave the global random number generators untouched.

The package has one module per chapter (``ch01`` .. ``ch16``, ``ch05b`` for the
interlude) and the machinery they share in :mod:`minilib.checks.runner`: how a
check compares and reports, hints for typical mistakes, named parts with
points (partial credit), hidden inputs that only ``check(fn, hidden=True)``
runs, and :func:`~minilib.checks.runner.grade`, which the autograder
(``tools/autograder.py``) calls instead of letting the check print or raise.
To add an assignment to a chapter, write its check in that chapter's module
with :func:`~minilib.checks.runner.run_check` and export it here.
"""

from .ch01 import check_patchify, check_sincos_embedding
from .ch02 import check_label_dropout, check_timestep_embedding
from .ch03 import check_dit_block, check_modulate
from .ch04 import check_kl, check_reparameterise, check_vae_loss
from .ch05 import check_ddim_step, check_guided_eps, check_q_sample
from .ch05b import check_ddim_eta_step, check_velocity_from_eps
from .ch06 import check_euler_step, check_gaussian_velocity, check_sampling_schedule, check_to_d
from .ch07 import check_block_mixing, check_guided_denoiser
from .ch08 import check_leave_one_out, check_lsa_attention
from .ch09 import check_codebook_rescue, check_nearest_code, check_straight_through
from .ch10 import check_block_causal_mask, check_next_scale_input
from .ch11 import check_mae_routing, check_mask_schedule
from .ch12 import _reference_ddpm_step, _unmapped_step, check_ddpm_step, check_mixture_eps
from .ch13 import check_compare_state_dicts, check_dit_parameter_count
from .ch14 import check_few_step_sampler, check_meanflow_target
from .ch15 import check_alignment_loss, check_block_hidden_states
from .ch16 import check_apply_rope, check_sequence_ids
from .runner import ExerciseError, Part, Report, grade

__all__ = [
    "ExerciseError",
    "check_patchify", "check_sincos_embedding", "check_timestep_embedding", "check_label_dropout", "check_modulate", "check_dit_block",
    "check_reparameterise", "check_kl", "check_vae_loss", "check_q_sample", "check_ddim_step", "check_guided_eps", "check_velocity_from_eps", "check_ddim_eta_step", "check_to_d",
    "check_euler_step", "check_gaussian_velocity", "check_sampling_schedule", "check_block_mixing", "check_leave_one_out", "check_nearest_code",
    "check_block_causal_mask", "check_mask_schedule", "check_ddpm_step", "check_compare_state_dicts",
    "check_meanflow_target", "check_alignment_loss", "check_apply_rope",
    "check_guided_denoiser", "check_lsa_attention", "check_straight_through", "check_codebook_rescue",
    "check_next_scale_input", "check_mae_routing", "check_mixture_eps", "check_dit_parameter_count",
    "check_few_step_sampler", "check_block_hidden_states", "check_sequence_ids",
]
