"""Part V's second assignments (chapters 14-16): a hand-written right answer passes, realistic wrong ones get
the hint written for their mistake."""

import torch

from minilib import checks

from check_helpers import fails_with


# chapter 14: the few-step MeanFlow sampler

def few_steps(model, noise, steps, order="rt", sign=-1.0, scaled=True):
    times = torch.linspace(1, 0, steps + 1)
    z, ones = noise, torch.ones(len(noise))
    for t, r in zip(times[:-1], times[1:]):
        first, second = (r, t) if order == "rt" else (t, r) if order == "tr" else (t, t)
        u = model(z, first * ones, second * ones)
        z = z + sign * ((t - r) if scaled else 1.0) * u
    return z


def test_few_step_sampler_by_hand_passes(capsys):
    checks.check_few_step_sampler(few_steps)
    assert capsys.readouterr().out.startswith("✓ ")
    assert checks.grade(checks.check_few_step_sampler, few_steps).passed


def test_few_step_sampler_with_the_instantaneous_velocity_is_told_it_took_euler_steps():
    fails_with(checks.check_few_step_sampler, lambda m, z, n: few_steps(m, z, n, order="tt"),
               "INSTANTANEOUS velocity", "input 1 of 4")


def test_few_step_sampler_with_swapped_times_or_a_plus_sign_gets_its_hint():
    fails_with(checks.check_few_step_sampler, lambda m, z, n: few_steps(m, z, n, order="tr"), "r first")
    fails_with(checks.check_few_step_sampler, lambda m, z, n: few_steps(m, z, n, sign=1.0), "a minus sign")
    fails_with(checks.check_few_step_sampler, lambda m, z, n: few_steps(m, z, n, scaled=False), "length of the jump")


def test_few_step_sampler_with_python_floats_for_the_times_is_told_to_pass_tensors():
    def floats(model, noise, steps):
        return noise - model(noise, 0.0, 1.0)

    fails_with(checks.check_few_step_sampler, floats, "(B,) tensors")


# chapter 15: the hidden states after block k, without a hook

def tokens_after(model, depth, x, t, y, scale=1000.0, blocks=None, positions=True):
    tokens = model.x_embedder(x) + (model.pos_embed if positions else 0)
    c = model.t_embedder(t * scale) + model.y_embedder(y)
    for block in model.blocks[:depth if blocks is None else blocks]:
        tokens = block(tokens, c)
    return tokens


def test_block_hidden_states_by_hand_passes(capsys):
    checks.check_block_hidden_states(tokens_after)
    assert capsys.readouterr().out.startswith("✓ ")
    assert checks.grade(checks.check_block_hidden_states, tokens_after).passed


def test_block_hidden_states_with_t_not_scaled_to_1000_gets_the_hint():
    fails_with(checks.check_block_hidden_states, lambda *a: tokens_after(*a, scale=1.0), "t * 1000")


def test_block_hidden_states_off_by_one_block_gets_the_hint():
    fails_with(checks.check_block_hidden_states, lambda m, k, *a: tokens_after(m, k, *a, blocks=k + 1),
               "not depth + 1")
    fails_with(checks.check_block_hidden_states, lambda *a: tokens_after(*a, positions=False), "model.pos_embed")


def test_block_hidden_states_through_the_whole_model_is_explained():
    fails_with(checks.check_block_hidden_states, lambda model, depth, x, t, y: model(x, t, y), "input 1 of 3")


# chapter 16: the ids of [text; image]

def sequence_ids(batch_size, text_length, height, width, text_first=True, row_first=True):
    rows, cols = torch.meshgrid(torch.arange(height), torch.arange(width), indexing="ij")
    image = torch.stack([torch.zeros_like(rows), rows, cols] if row_first else [torch.zeros_like(rows), cols, rows],
                        dim=-1).reshape(1, -1, 3).float().expand(batch_size, -1, -1)
    text = torch.zeros(batch_size, text_length, 3)
    return torch.cat([text, image] if text_first else [image, text], dim=1)


def test_sequence_ids_by_hand_pass(capsys):
    checks.check_sequence_ids(sequence_ids)
    assert capsys.readouterr().out.startswith("✓ ")
    assert checks.grade(checks.check_sequence_ids, sequence_ids).passed


def test_sequence_ids_with_the_image_first_or_columns_first_get_their_hints():
    fails_with(checks.check_sequence_ids, lambda *a: sequence_ids(*a, text_first=False), "text ids come FIRST")
    fails_with(checks.check_sequence_ids, lambda *a: sequence_ids(*a, row_first=False), "ROW, COLUMN")


def test_sequence_ids_that_number_the_text_tokens_are_told_flux_does_not():
    def numbered(batch_size, text_length, height, width):
        ids = sequence_ids(batch_size, text_length, height, width).clone()
        ids[:, :text_length, 2] = torch.arange(text_length).float()
        return ids

    fails_with(checks.check_sequence_ids, numbered, "(0, 0, 0)")
