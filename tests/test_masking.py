"""Spec tests of masked feature distillation (fd_ref.method.masking, train.py --mask-ratio): every image has
exactly round(r * N) masked patches; block masks are unions of rectangles within BEiT's limits, topped up at
random; the masked loss equals its hand formula and gives exactly zero gradient to the unmasked predictions,
for every loss, target normalisation and several teachers; the student ignores the pixels of masked patches;
r = 0 is FD itself, step for step; the mask token stays out of student.pt; a resumed run draws the same
masks; a student without a mask-token interface is refused."""
from __future__ import annotations

import math

import pytest
import torch
from hypothesis import given, settings, strategies as st

import train
from fd_ref.errors import UserError
from fd_ref.method.distill import FeatureDistillation
from fd_ref.method.loss_options import LOSSES
from fd_ref.method.masking import (MIN_ASPECT, MIN_BLOCK, PatchMasking, block_mask, block_rectangles, mask_count,
                                   masked_distill_loss, random_mask)
from fd_ref.method.multi_teacher import MultiTeacherDistillation
from fd_ref.method.target_norm import TARGET_NORMS
from fd_ref.models.from_file import build_model, read_model_file
from fd_ref.models.teachers import Teacher
from fd_ref.models.vit import VisionTransformer

from test_train import TINY, read_log, student_state

grids = st.tuples(st.integers(1, 16), st.integers(1, 16))
ratios = st.floats(0.0, 1.0, allow_nan=False)


@settings(max_examples=60, deadline=None)
@given(grid=grids, ratio=ratios, batch=st.integers(1, 3), seed=st.integers(0, 2**31 - 1),
       style=st.sampled_from(["block", "random"]))
def test_every_image_has_exactly_round_r_n_masked_patches(grid, ratio, batch, seed, style):
    n = grid[0] * grid[1]
    count = mask_count(ratio, n)
    assert count == round(ratio * n)
    draw = block_mask if style == "block" else random_mask
    mask = draw(batch, grid, count, torch.Generator().manual_seed(seed))
    assert mask.shape == (batch, n) and mask.dtype == torch.bool
    assert mask.sum(dim=1).tolist() == [count] * batch


@settings(max_examples=60, deadline=None)
@given(grid=grids, ratio=ratios, seed=st.integers(0, 2**31 - 1))
def test_block_masks_are_rectangles_within_the_limits_then_random_positions(grid, ratio, seed):
    """The rectangle phase: each rectangle lies strictly inside the grid (h < H, w < W), covers at least
    MIN_BLOCK patches with h / w in [0.3, 1 / 0.3], their union is that phase's mask, never above the count;
    the final mask (same stream) contains it and only adds the missing positions."""
    count = mask_count(ratio, grid[0] * grid[1])
    phase, rectangles = block_rectangles(grid, count, torch.Generator().manual_seed(seed))
    union = torch.zeros(grid, dtype=torch.bool)
    for top, left, h, w in rectangles:
        assert 0 <= top and top + h <= grid[0] and 0 <= left and left + w <= grid[1]
        assert h < grid[0] and w < grid[1] and h * w >= MIN_BLOCK
        assert MIN_ASPECT <= h / w <= 1 / MIN_ASPECT
        union[top:top + h, left:left + w] = True
    assert torch.equal(union, phase) and int(phase.sum()) <= count
    final = block_mask(1, grid, count, torch.Generator().manual_seed(seed))[0]
    assert torch.equal(final | phase.flatten(), final) and int(final.sum()) == count


def _documented_rectangles(grid, count, g):
    """The rectangle phase as the module docstring states it, cell by cell (BEiT's 16 patches at least, aspect
    0.3 to 1 / 0.3, 10 tries per rectangle; a rectangle must add 1 to ``room`` new patches; the phase ends at
    ``count`` or after 10 failed tries): the masked cells and the rectangles, drawing 4 uniforms per try."""
    height, width = grid
    cells, rectangles = set(), []
    while len(cells) < count:
        room, placed = count - len(cells), False
        for _ in range(10):
            u_area, u_aspect, u_top, u_left = torch.rand(4, generator=g).tolist()
            area = 16 + u_area * max(0, room - 16)
            aspect = math.exp(math.log(0.3) + u_aspect * 2 * math.log(1 / 0.3))
            h, w = round(math.sqrt(area * aspect)), round(math.sqrt(area / aspect))
            if h >= height or w >= width or h * w < 16 or not 0.3 <= h / w <= 1 / 0.3:
                continue
            top, left = int(u_top * (height - h + 1)), int(u_left * (width - w + 1))
            new = {(i, j) for i in range(top, top + h) for j in range(left, left + w)} - cells
            if 0 < len(new) <= room:
                cells |= new
                rectangles.append((top, left, h, w))
                placed = True
                break
        if not placed:
            break
    return cells, rectangles


@settings(max_examples=60, deadline=None)
@given(grid=st.tuples(st.integers(4, 16), st.integers(4, 16)), ratio=ratios, seed=st.integers(0, 2**31 - 1))
def test_block_rectangles_follow_the_documented_procedure(grid, ratio, seed):
    """The same rectangles, mask and random stream (the generator's state afterwards) as the procedure written
    out cell by cell, at every grid, ratio and seed; and a 4 x 4 block, the smallest BEiT allows, is drawn."""
    count = mask_count(ratio, grid[0] * grid[1])
    g, g_ref = torch.Generator().manual_seed(seed), torch.Generator().manual_seed(seed)
    mask, rectangles = block_rectangles(grid, count, g)
    cells, expected = _documented_rectangles(grid, count, g_ref)
    assert rectangles == expected
    assert {(i, j) for i, j in mask.nonzero().tolist()} == cells
    assert torch.equal(g.get_state(), g_ref.get_state())
    # block_mask = that phase, then the missing positions: the first of a random permutation of the free ones
    # (in row-major order), drawn only when some are missing
    g = torch.Generator().manual_seed(seed)
    final = block_mask(1, grid, count, g)[0]
    expected_final = torch.zeros(grid[0] * grid[1], dtype=torch.bool)
    expected_final[[i * grid[1] + j for i, j in cells]] = True
    short = count - len(cells)
    if short > 0:
        free = (~expected_final).nonzero().squeeze(1)
        expected_final[free[torch.randperm(free.numel(), generator=g_ref)[:short]]] = True
    assert torch.equal(final, expected_final) and torch.equal(g.get_state(), g_ref.get_state())


@pytest.mark.parametrize("seed,shape", [(143, (3, 10)), (138, (10, 3))])
def test_rectangles_at_the_aspect_limits_are_kept(seed, shape):
    """h / w exactly 0.3 or 1 / 0.3 (3 x 10 and 10 x 3, 30 patches) lies within the limits: with these seeds
    (30 patches on 14 x 14) the procedure draws such a rectangle and keeps it, as the written-out one does."""
    rectangles = block_rectangles((14, 14), 30, torch.Generator().manual_seed(seed))[1]
    assert rectangles == _documented_rectangles((14, 14), 30, torch.Generator().manual_seed(seed))[1]
    assert shape in [(h, w) for _, _, h, w in rectangles]


def test_the_smallest_block_is_16_patches():
    """With exactly 16 patches to mask on a 14 x 14 grid, a 4 x 4 block is the only rectangle that fits, and
    the rectangle phase finds one for most images (about 9 in 10: an aspect within [0.77, 1.27] in 10 tries)."""
    g = torch.Generator().manual_seed(0)
    found = [block_rectangles((14, 14), 16, g)[1] for _ in range(50)]
    assert all(r == [] or [(h, w) for _, _, h, w in r] == [(4, 4)] for r in found)
    assert sum(r != [] for r in found) >= 35


def test_the_mask_token_starts_as_beit_s_small_normal():
    """BEiT's initialisation: a truncated normal of std 0.02 (its +-2 cut-off is 100 std away: in effect a
    normal), so over 16 tokens of width 256 (4,096 entries) the spread is 0.02 within sampling error."""
    torch.manual_seed(0)
    student = VisionTransformer(img_size=32, patch_size=8, embed_dim=256, depth=1, num_heads=1)
    token = torch.cat([PatchMasking(student, 0.5).mask_token.detach() for _ in range(16)])
    assert token.std().item() == pytest.approx(0.02, rel=0.05) and abs(token.mean().item()) < 0.002


def test_block_masks_are_mostly_blocks():
    """At the study's 8x8 grid and 40% (and at ViT-B/16's 14x14), rectangles cover most of the count: the
    top-up is a remainder, not the mask; over many draws every rectangle keeps the limits (rounding h and w
    alone would give e.g. 2 x 8, aspect 0.25)."""
    g = torch.Generator().manual_seed(0)
    for grid, ratio in (((8, 8), 0.4), ((14, 14), 0.4), ((16, 16), 0.1)):
        count = mask_count(ratio, grid[0] * grid[1])
        draws = [block_rectangles(grid, count, g) for _ in range(300)]
        assert sum(int(m.sum()) for m, _ in draws) / len(draws) > 0.8 * count
        shapes = {(h, w) for _, rects in draws for _, _, h, w in rects}
        assert all(h * w >= MIN_BLOCK and MIN_ASPECT <= h / w <= 1 / MIN_ASPECT for h, w in shapes), shapes
        assert len(shapes) > 3  # several shapes, not one
        random = random_mask(200, grid, count, g).view(200, *grid)
        # blocks are compact: far more masked neighbours (right or below) than uniform positions have
        blocks = block_mask(200, grid, count, g).view(200, *grid)

        def neighbours(m):
            return int((m[:, :, 1:] & m[:, :, :-1]).sum() + (m[:, 1:] & m[:, :-1]).sum())
        assert neighbours(blocks) > 1.5 * neighbours(random)


# -- the loss over masked positions ----------------------------------------------------------------------
def _hand_loss(name, pred, target, keep, beta):
    """Independent formula: per-element (or per-token) losses summed over the kept tokens, divided by their
    number (times C for the element-wise losses)."""
    d = pred.double() - target.double()
    if name == "smooth_l1":
        per = torch.where(d.abs() <= beta, 0.5 * d ** 2 / beta, d.abs() - 0.5 * beta).sum(-1)
    elif name == "mse":
        per = (d ** 2).sum(-1)
    else:
        p, t = pred.double(), target.double()
        per = 1 - (p * t).sum(-1) / (p.norm(dim=-1) * t.norm(dim=-1))
    per = per * keep
    return per.sum() / (keep.sum() * (1 if name == "cosine" else pred.shape[-1]))


@settings(max_examples=40, deadline=None)
@given(name=st.sampled_from(LOSSES), seed=st.integers(0, 10_000), batch=st.integers(1, 3), n=st.integers(1, 12),
       c=st.integers(1, 6), beta=st.floats(0.25, 4.0))
def test_masked_loss_is_the_mean_over_masked_tokens_and_gives_zero_gradient_elsewhere(name, seed, batch, n, c, beta):
    g = torch.Generator().manual_seed(seed)
    pred = (3 * torch.randn(batch, 1 + n, c, generator=g)).requires_grad_()
    target = 3 * torch.randn(batch, 1 + n, c, generator=g)
    mask = torch.rand(batch, n, generator=g) < 0.5
    mask[0, 0] = True  # at least one masked patch
    keep = torch.cat([torch.zeros(batch, 1, dtype=torch.bool), mask], dim=1)
    loss = masked_distill_loss(name, pred, target, mask, "masked", beta)
    assert torch.allclose(loss.double(), _hand_loss(name, pred.detach(), target, keep, beta), rtol=1e-5, atol=1e-6)
    loss.backward()
    assert torch.all(pred.grad[~keep] == 0)  # exactly zero: the class token and every unmasked patch
    everything = masked_distill_loss(name, pred, target, mask, "all", beta)
    assert torch.allclose(everything.double(), _hand_loss(name, pred.detach(), target, torch.ones_like(keep), beta),
                          rtol=1e-5, atol=1e-6)


def _vit_teacher(seed, dim, patch=8):
    torch.manual_seed(seed)
    net = VisionTransformer(img_size=32, patch_size=patch, embed_dim=dim, depth=1, num_heads=2)
    return Teacher(net, dim, net.grid, 1, name=f"vit{dim}")


def _student(seed=0, drop_path=0.0, pos_embed="shared_rpb"):
    torch.manual_seed(seed)
    return VisionTransformer(img_size=32, patch_size=8, embed_dim=16, depth=2, num_heads=2,
                             drop_path_rate=drop_path, pos_embed=pos_embed)


@pytest.mark.parametrize("target_norm", TARGET_NORMS)
@pytest.mark.parametrize("loss", LOSSES)
def test_masked_objective_with_two_teachers_trains_only_on_masked_predictions(target_norm, loss):
    """The whole objective (student, two teachers of other widths and grids, each its projection and
    normalisation): the gradient w.r.t. every branch's predictions is exactly zero at the class token and
    the unmasked patches, nonzero at the masked ones; the mask token gets a gradient."""
    x = torch.randn(3, 3, 32, 32)
    teachers = [_vit_teacher(1, 16), _vit_teacher(2, 32, patch=16)]
    student = _student()
    masking = PatchMasking(student, 0.5, "random", "masked")
    multi = MultiTeacherDistillation(student, teachers, [1.0, 0.5], target_norm=target_norm, loss=loss,
                                     masking=masking)
    if target_norm == "phi_s":
        for branch in multi.branches:
            branch.target_norm.fit([branch.teacher_tokens(torch.randn(8, 3, 32, 32))])
    preds = []

    def keep_prediction(module, inputs, out):  # the projected student tokens, with their gradient kept
        out.retain_grad()
        preds.append(out)
    for branch in multi.branches:
        branch.projection.register_forward_hook(keep_prediction)
    mask = masking.draw(3, torch.Generator().manual_seed(0))
    multi(x, mask).backward()
    keep = torch.cat([torch.zeros(3, 1, dtype=torch.bool), mask], dim=1)
    assert len(preds) == 2
    for pred in preds:
        assert torch.all(pred.grad[~keep] == 0) and pred.grad[keep].abs().sum() > 0
    assert masking.mask_token.grad is not None and masking.mask_token.grad.abs().sum() > 0


@pytest.mark.parametrize("pos_embed", ["shared_rpb", "abs"])
def test_the_student_sees_the_mask_token_not_the_masked_pixels(pos_embed):
    """Changing the pixels of masked patches changes nothing; changing an unmasked patch does; an all-False
    mask is the unmasked forward bit for bit."""
    student = _student(pos_embed=pos_embed).eval()
    token = torch.randn(16)
    x = torch.randn(2, 3, 32, 32)
    mask = torch.zeros(2, 16, dtype=torch.bool)
    mask[:, [0, 5, 6]] = True  # patch 5: row 1, column 1 of the 4x4 grid
    y = x.clone()
    y[:, :, 8:16, 8:16] = torch.randn(2, 3, 8, 8)  # inside masked patch 5
    a = student.forward_features(x, mask=mask, mask_token=token)
    assert torch.equal(a, student.forward_features(y, mask=mask, mask_token=token))
    z = x.clone()
    z[:, :, 8:16, 24:32] += 1.0  # patch 7, unmasked
    assert not torch.allclose(a, student.forward_features(z, mask=mask, mask_token=token))
    none = torch.zeros_like(mask)
    assert torch.equal(student.forward_features(x, mask=none, mask_token=token), student.forward_features(x))


def test_masked_loss_defaults_to_beta_two_and_names_its_choices():
    pred, target = torch.tensor([[[0.0], [3.0], [1.0]]]), torch.zeros(1, 3, 1)  # class token, two patches
    mask = torch.tensor([[True, False]])
    assert float(masked_distill_loss("smooth_l1", pred, target, mask, "masked")) == pytest.approx(3.0 - 1.0)
    with pytest.raises(ValueError, match=r"^mask loss must be one of masked, all, got 'some'$"):
        masked_distill_loss("smooth_l1", pred, target, mask, "some")


def test_the_mask_style_picks_the_drawing_and_a_ratio_of_one_masks_every_patch():
    """``draw`` gives random_mask's masks for "random" and block_mask's for "block" (same generator state);
    r = 1 is allowed (every patch masked); the module's repr names its settings."""
    student = _student()
    for style, draw in (("random", random_mask), ("block", block_mask)):
        masking = PatchMasking(student, 0.5, style)
        got = masking.draw(3, torch.Generator().manual_seed(4))
        assert torch.equal(got, draw(3, masking.grid, masking.count, torch.Generator().manual_seed(4)))
    full = PatchMasking(student, 1.0, "random")
    assert full.count == full.grid[0] * full.grid[1] and bool(full.draw(2).all())
    assert repr(PatchMasking(student, 0.5)).endswith(
        f"(ratio=0.5, count={full.count // 2}, grid={full.grid}, style=block, loss=masked)")


def test_refusal_messages():
    student = _student()
    grid = tuple(student.grid)
    timm_like = torch.nn.Linear(2, 2)
    timm_like.forward_features = lambda x: x
    for build, message in (
            (lambda: PatchMasking(timm_like, 0.4),
             "masking 0.4 of the patches needs fd-ref's ViT student (its forward_features takes a mask and a mask "
             "token); Linear has no mask-token interface"),
            (lambda: PatchMasking(student, 0.4, "grid", "some"),
             "the mask style must be one of block, random and the mask loss one of masked, all, got 'grid' and "
             "'some'"),
            (lambda: PatchMasking(student, 1.5),
             f"the mask ratio must be in (0, 1] and mask at least one of the {grid[0]}x{grid[1]} patches, got 1.5")):
        with pytest.raises(ValueError) as error:
            build()
        assert str(error.value) == message


def test_refusals_in_one_line():
    student = _student()
    timm_like = torch.nn.Linear(2, 2)
    timm_like.forward_features = lambda x: x  # a backbone whose forward_features takes no mask
    for build, words in ((lambda: PatchMasking(timm_like, 0.4), "no mask-token interface"),
                         (lambda: PatchMasking(student, 0.01), "at least one"),
                         (lambda: PatchMasking(student, 1.5), "(0, 1]"),
                         (lambda: PatchMasking(student, 0.4, "grid"), "mask style must be one of"),
                         (lambda: FeatureDistillation(student, _vit_teacher(1, 16), target="cls",
                                                      masking=PatchMasking(student, 0.4)), "full feature map")):
        with pytest.raises(ValueError, match=words.replace("(", r"\(").replace(")", r"\)").replace("]", r"\]")) as e:
            build()
        assert "\n" not in str(e.value)


def test_train_refuses_a_timm_student_with_a_mask(tmp_path):
    with pytest.raises(UserError, match="no mask-token interface") as e:
        train.main(TINY + ["--model", "timm:resnet18", "--model-kwargs", "layers=[1,1,1,1],channels=[8,8,16,16]",
                           "--mask-ratio", "0.4", "--max-steps", "1", "--output", str(tmp_path / "x")])
    assert "\n" not in str(e.value)


# -- train.py: r = 0 is FD, the mask token outside student.pt, exact resume ---------------------------------
RUN = TINY + ["--depth", "2", "--batch-size", "16", "--epochs", "2", "--drop-path", "0.2", "--lr", "0.05",
              "--seed", "3"]
MASKED = ["--mask-ratio", "0.5", "--mask-style", "block"]


@pytest.mark.parametrize("loss", LOSSES)
def test_an_empty_mask_is_fd_bit_for_bit(loss):
    """The masked objective's path (mask token in the student's forward, loss over every token) with no
    patch masked gives FD's loss and gradients exactly: the mask path adds nothing but the masking."""
    x = torch.randn(3, 3, 32, 32)
    teacher = _vit_teacher(1, 16)
    fd = FeatureDistillation(_student(), teacher, loss=loss)
    masked = FeatureDistillation(_student(), teacher, loss=loss, masking=PatchMasking(_student(), 0.5, over="all"))
    masked.projection.load_state_dict(fd.projection.state_dict())
    a, b = fd(x), masked(x, torch.zeros(3, 16, dtype=torch.bool))
    a.backward()
    b.backward()
    assert torch.equal(a, b)
    ga, gb = dict(fd.named_parameters()), dict(masked.named_parameters())
    assert all(torch.equal(ga[k].grad, gb[k].grad) for k in ga if ga[k].grad is not None)
    assert torch.all(masked.masking.mask_token.grad == 0)


def test_ratio_zero_is_fd_step_for_step(tmp_path, monkeypatch):
    """With --mask-ratio 0 the other mask flags change nothing: no mask token built, nothing drawn (drop path
    draws the same), the same losses, gradient norms and weights as plain FD."""
    train.main(RUN + ["--max-steps", "4", "--output", str(tmp_path / "fd")])

    def refuse(*args, **kwargs):
        raise AssertionError("masking built or drawn at --mask-ratio 0")
    monkeypatch.setattr(PatchMasking, "__init__", refuse)
    monkeypatch.setattr(PatchMasking, "draw", refuse)
    train.main(RUN + ["--max-steps", "4", "--mask-ratio", "0", "--mask-style", "random", "--mask-loss", "all",
                      "--output", str(tmp_path / "r0")])
    a, b = read_log(tmp_path / "fd"), read_log(tmp_path / "r0")
    assert [(r["loss"], r["grad_norm"]) for r in a] == [(r["loss"], r["grad_norm"]) for r in b] and len(a) == 4
    sa, sb = student_state(tmp_path / "fd"), student_state(tmp_path / "r0")
    assert sa.keys() == sb.keys() and all(torch.equal(sa[k], sb[k]) for k in sa)
    ckpt = torch.load(tmp_path / "r0" / "checkpoint.pt", weights_only=True)
    assert not any("mask" in k for k in ckpt["model"])


@pytest.fixture(scope="module")
def masked_run(tmp_path_factory):
    """An uninterrupted masked run (8 steps), recording the masks it draws."""
    out = tmp_path_factory.mktemp("masked")
    initial, init = [], PatchMasking.__init__

    def recording_init(self, *args, **kwargs):
        init(self, *args, **kwargs)
        initial.append(self.mask_token.detach().clone())
    PatchMasking.__init__ = recording_init
    try:
        masks = _record_masks(lambda: train.main(RUN + MASKED + ["--output", str(out)]))
    finally:
        PatchMasking.__init__ = init
    return out, masks, initial[0]


def _record_masks(run) -> list[torch.Tensor]:
    drawn, draw = [], PatchMasking.draw

    def recording(self, batch, generator=None):
        drawn.append(draw(self, batch, generator))
        return drawn[-1]
    PatchMasking.draw = recording
    try:
        run()
    finally:
        PatchMasking.draw = draw
    return drawn


def test_masks_are_identical_after_a_resume(masked_run, tmp_path):
    """Stop after 3 of 8 steps (mid-epoch), rerun: steps 4-8 draw the uninterrupted run's masks, and the
    losses and final weights are the same bit for bit."""
    full, full_masks, _ = masked_run
    out = tmp_path / "b"
    first = _record_masks(lambda: train.main(RUN + MASKED + ["--output", str(out), "--max-steps", "3"]))
    rest = _record_masks(lambda: train.main(RUN + MASKED + ["--output", str(out)]))
    # one draw per step (the MFU's FLOP count runs on the meta device and draws nothing)
    assert len(full_masks) == 8 and len(first) == 3 and len(rest) == 5
    assert all(torch.equal(a, b) for a, b in zip(full_masks, first + rest))
    assert not torch.equal(full_masks[3], full_masks[4])  # the masks do change from step to step
    assert [r["loss"] for r in read_log(full)] == [r["loss"] for r in read_log(out)]
    sa, sb = student_state(full), student_state(out)
    assert all(torch.equal(sa[k], sb[k]) for k in sa)


def test_the_mask_token_is_trained_and_checkpointed_but_not_in_student_pt(masked_run, tmp_path):
    """student.pt of a masked run has exactly the keys of an FD run's and loads the same way
    (read_model_file / build_model: what fine-tuning, export, analysis and --knn read); checkpoint.pt keeps
    the mask token, trained away from its initial value."""
    out, masks, initial = masked_run
    assert all(m.sum(1).eq(mask_count(0.5, 16)).all() for m in masks)
    train.main(RUN + ["--max-steps", "1", "--output", str(tmp_path / "fd")])
    masked_file, fd_file = read_model_file(out / "student.pt"), read_model_file(tmp_path / "fd" / "student.pt")
    assert masked_file.state.keys() == fd_file.state.keys() and masked_file.config == fd_file.config
    assert not masked_file.missing and not any("mask" in k for k in masked_file.state)
    net = build_model(masked_file)
    assert all(torch.equal(v, masked_file.state[k]) for k, v in net.state_dict().items())
    ckpt = torch.load(out / "checkpoint.pt", weights_only=True)
    token = ckpt["model"]["masking.mask_token"]
    assert token.shape == initial.shape == (32,) and math.isfinite(float(token.norm()))
    assert not torch.equal(token, initial)
    log = read_log(out)
    assert len(log) == 8 and all(math.isfinite(r["loss"]) for r in log)
