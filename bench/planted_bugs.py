"""Each loop and metric test fails on the bug it guards against: plant one bug at a time in a copy of the
committed tree and run the test meant to catch it (docs/testing.md keeps the table).

    python bench/planted_bugs.py                 # every bug; a few minutes on 2 cores
    python bench/planted_bugs.py --only clip     # the bugs whose name contains "clip"

A bug is a literal replacement of one piece of library code (it must occur exactly once in its file); the
row says "caught" when the test run fails, "MISSED" when it passes. The copy (``git archive HEAD``) lives in
a temporary folder: the working tree is never touched. Not part of CI.
"""
from __future__ import annotations

import argparse
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
TRAINER, EVALUATE = "fd_ref/engine/trainer.py", "fd_ref/eval/evaluate.py"
LOOP = "tests/test_loop.py"

# name, file, original, replacement, tests that must fail
BUGS: list[tuple[str, str, str, str, str]] = [
    ("accum: micro-batch loss not divided by accum_steps", TRAINER,
     "loss = self.job.step_fn(batch) / accum", "loss = self.job.step_fn(batch)",
     f"{LOOP}::test_accumulation_equals_the_combined_batch"),
    ("accum: an optimiser step after every micro-batch", TRAINER,
     "last_micro = (self.batch_in_epoch + 1) % accum == 0", "last_micro = True",
     f"{LOOP}::test_accumulation_equals_the_combined_batch"),
    ("accum: the step after micro-batch 1, 1+k, ... (right for k = 2 only)", TRAINER,
     "last_micro = (self.batch_in_epoch + 1) % accum == 0", "last_micro = (self.batch_in_epoch - 1) % accum == 0",
     f"{LOOP}::test_accumulation_equals_the_combined_batch"),
    ("accum: resume starts at micro-batch `step`, not `batch_in_epoch`", TRAINER,
     "self.sampler.set_epoch(self.epoch, start=self.batch_in_epoch)", "self.sampler.set_epoch(self.epoch, start=self.step)",
     f"{LOOP}::test_stop_inside_an_accumulation_resumes_to_the_same_weights"),
    ("accum: an epoch's leftover micro-batch used (its gradient leaks into the next step)", TRAINER,
     "if self.batch_in_epoch >= self.steps_per_epoch * accum:\n                    break",
     "if self.batch_in_epoch > self.steps_per_epoch * accum:\n                    break",
     f"{LOOP}::test_accumulation_leaves_an_odd_micro_batch_out"),
    ("clip: max norm infinite", TRAINER,
     'max_norm = run.clip_grad if run.clip_grad > 0 else float("inf")', 'max_norm = float("inf")',
     f"{LOOP}::test_clipping_hands_the_optimiser_the_hand_clipped_gradient"),
    ("clip: --clip-grad 0 clips at 1", TRAINER,
     'max_norm = run.clip_grad if run.clip_grad > 0 else float("inf")', "max_norm = run.clip_grad if run.clip_grad > 0 else 1.0",
     f"{LOOP}::test_clip_grad_0_clips_nothing"),
    ("eval: top-5 computed as top-1", EVALUATE,
     "totals[1] += (top5 == labels[:, None]).any(1).sum()", "totals[1] += (top5[:, 0] == labels).sum()",
     f"{LOOP}::test_evaluate_matches_a_hand_count_on_logits_with_ties"),
    ("eval: loss averaged per batch, not per image", EVALUATE,
     'F.cross_entropy(logits.float(), labels, reduction="sum")',
     'F.cross_entropy(logits.float(), labels) * 16',
     f"{LOOP}::test_evaluate_matches_a_hand_count_on_logits_with_ties"),
    ("eval: top-5 as top-4", EVALUATE,
     "logits.float().topk(min(5, logits.shape[1]), dim=1)", "logits.float().topk(min(4, logits.shape[1]), dim=1)",
     f"{LOOP}::test_evaluate_matches_a_hand_count_on_logits_with_ties"),
    ("eval: the forward left in the run's autocast (bf16)", EVALUATE,
     "with torch.autocast(device.type, enabled=False):", "with torch.autocast(device.type, enabled=True):",
     f"{LOOP}::test_evaluate_matches_a_hand_count_on_logits_with_ties"),
    ("eval: no all-reduce over ranks", EVALUATE,
     "torch.distributed.all_reduce(totals)", "pass",
     f"{LOOP}::test_two_ranks_evaluate_an_uneven_validation_set_as_one_process"),
    ("eval: skipped images not summed over ranks", EVALUATE,
     "torch.distributed.all_reduce(totals)", "torch.distributed.all_reduce(totals[:4])",
     f"{LOOP}::test_two_ranks_evaluate_an_uneven_validation_set_as_one_process"),
    ("sampler: the last short step dropped without drop_last", "fd_ref/data/sampler.py",
     "return -(-self.num_samples // global_batch)", "return self.num_samples // global_batch",
     f"{LOOP}::test_two_ranks_evaluate_an_uneven_validation_set_as_one_process "
     "tests/test_sampler.py::test_every_world_size_and_drop_last"),
    ("sampler: ranks interleaved instead of contiguous", "fd_ref/data/sampler.py",
     "mine = chunk[self.rank * self.batch_size:(self.rank + 1) * self.batch_size]",
     "mine = chunk[self.rank::self.world_size]",
     "tests/test_sampler.py::test_every_world_size_and_drop_last"),
    ("--train-subset ignored", "fd_ref/data/splits.py",
     "if 0 < train_subset < len(train):", "if False:",
     f"{LOOP}::test_train_subset_trains_on_the_subset_only"),
    ("fine-tuning: labels shifted by one sample", "finetune.py",
     "targets = batch[1].to(info.device, non_blocking=True)",
     "targets = batch[1].roll(1).to(info.device, non_blocking=True)",
     f"{LOOP}::test_fine_tuning_learns_a_separable_task"),
    ("landscape: alpha doubled", "fd_ref/analysis/diagnostics.py",
     "p.add_(dirs[0][name], alpha=alpha)", "p.add_(dirs[0][name], alpha=2 * alpha)",
     "tests/test_analysis.py::test_1d_landscape_off_centre_equals_a_hand_computation "
     "tests/test_analysis.py::test_2d_landscape_off_centre_equals_a_hand_computation"),
    ("landscape: second direction = first", "fd_ref/analysis/diagnostics.py",
     "p.add_(dirs[1][name], alpha=beta)", "p.add_(dirs[0][name], alpha=beta)",
     "tests/test_analysis.py::test_2d_landscape_off_centre_equals_a_hand_computation"),
    ("crop: torchvision's retrying crop", "fd_ref/data/transforms.py",
     '        """Draw ``(top, left, h, w)`` for an image of ``height x width`` pixels."""\n',
     '        """Draw ``(top, left, h, w)`` for an image of ``height x width`` pixels."""\n'
     "        import torchvision.transforms as T\n"
     "        return tuple(T.RandomResizedCrop.get_params(torch.empty(1, height, width), list(self.scale),"
     " list(self.ratio)))\n",
     "tests/test_transforms.py::test_single_draw_crop_draws_once"),
    ("crop: scale range's upper end ignored", "fd_ref/data/transforms.py",
     "uniform_(*self.scale)", "uniform_(self.scale[0], 1.0)",
     "tests/test_transforms.py::test_single_draw_crop_box tests/test_transforms.py::test_single_draw_crop_box_distribution"),
    ("grid: resized with corners aligned", "fd_ref/method/distill.py",
     'mode="bilinear", align_corners=False)', 'mode="bilinear", align_corners=True)',
     "tests/test_timm_backbone.py::test_match_token_grid_rule"),
    ("probe: avg pool over the class token too", "fd_ref/models/probe.py",
     "pooled = tokens[:, self.backbone.num_prefix_tokens:].mean(1)", "pooled = tokens.mean(1)",
     "tests/test_finetune.py::test_linear_probe_features_are_the_published_models"),
    ("images: a file that cannot be opened is not counted", "fd_ref/data/images.py",
     "                self._bad_flags[index] = 1\n", "                pass\n",
     "tests/test_broken_images.py::test_a_file_without_read_permission_is_skipped_even_under_root"),
]


def run(name: str, path: str, old: str, new: str, tests: str, tree: Path) -> tuple[str, float]:
    target = tree / path
    original = target.read_text()
    if original.count(old) != 1:
        return f"NOT PLANTED ({original.count(old)} matches)", 0.0
    target.write_text(original.replace(old, new))
    try:
        t = time.perf_counter()
        proc = subprocess.run([sys.executable, "-m", "pytest", "-x", "-q", "-p", "no:cacheprovider", *tests.split()],
                              cwd=tree, capture_output=True, text=True)
        seconds = time.perf_counter() - t
    finally:
        target.write_text(original)
    if proc.returncode == 0:
        return "MISSED", seconds
    failed = [line for line in proc.stdout.splitlines() if line.startswith(("FAILED", "ERROR"))]
    return "caught: " + (failed[0].split(" - ")[0] if failed else f"exit {proc.returncode}"), seconds


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--only", nargs="*", help="bugs whose name contains one of these")
    args = p.parse_args(argv)
    bugs = [b for b in BUGS if not args.only or any(o in b[0] for o in args.only)]
    commit = subprocess.run(["git", "-C", str(ROOT), "rev-parse", "--short", "HEAD"], capture_output=True,
                            text=True, check=True).stdout.strip()
    missed = 0
    with tempfile.TemporaryDirectory() as tmp:
        tree = Path(tmp)
        archive = subprocess.run(["git", "-C", str(ROOT), "archive", "HEAD"], check=True, capture_output=True).stdout
        subprocess.run(["tar", "-x", "-C", str(tree), "--exclude=bench/results"], input=archive, check=True)
        print(f"planted bugs at {commit}\n\n| bug | file | test result |\n| --- | --- | --- |", flush=True)
        for name, path, old, new, tests in bugs:
            result, seconds = run(name, path, old, new, tests, tree)
            missed += not result.startswith("caught")
            print(f"| {name} | {path} | {result} ({seconds:.0f} s) |", flush=True)
    return 1 if missed else 0


if __name__ == "__main__":
    raise SystemExit(main())
