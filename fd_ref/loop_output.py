"""The training loop's output (fd_ref.engine.Trainer): log.jsonl records (rank 0), progress lines or a bar,
and the one-line notes on skipped images and steps."""
from __future__ import annotations

import json

import torch

from .distributed import all_reduce_ints
from .errors import UserError
from .files import write_text_atomic


class LoopOutput:
    """The Trainer's logging methods (a mixin: the attributes are set by ``Trainer.__init__``)."""

    def _trim_log(self) -> None:
        """Drop log lines past the resumed step (written after the last checkpoint, then lost)."""
        log = self.out / "log.jsonl"
        if not log.exists():
            return
        kept = [line for line in log.read_text().splitlines()
                if line.strip() and json.loads(line).get("step", 0) <= self.step]
        write_text_atomic(log, "".join(line + "\n" for line in kept))

    # -- output --------------------------------------------------------------------------------------
    def _print(self, msg: str) -> None:
        if self.info.is_main:
            if self._bar is not None:
                self._bar.write(msg)
            else:
                print(msg, flush=True)

    def _log(self, record: dict) -> None:
        self.history.append(record)
        if self.info.is_main:
            try:
                with open(self.out / "log.jsonl", "a") as f:
                    f.write(json.dumps(record) + "\n")
            except OSError as e:
                raise UserError(f"could not append to {self.out / 'log.jsonl'} ({e.strerror or e}) at step "
                                f"{self.step}; last complete checkpoint: {self._last_checkpoint()}; free space "
                                f"or make {self.out} writable, then run the same command again") from None
            if self.on_log is not None:
                self.on_log(record)

    def _report_skips(self) -> None:
        """One line on what was skipped: unreadable images (all ranks) and non-finite steps."""
        parts = []
        bad_images = all_reduce_ints([skipped_images(self.loader)])[0]
        if bad_images:
            where = " over all ranks" if self.info.world_size > 1 else ""
            parts.append(f"{bad_images} unreadable image(s) skipped{where} (named in the warnings above)")
        if self.skipped:
            parts.append(f"{self.skipped} step(s) skipped for a non-finite loss (--nan-policy skip)")
        if parts:
            self._print("note: " + "; ".join(parts))

    def _log_step(self, step_loss: torch.Tensor, grad_norm: float, img_per_s: float) -> None:
        bad_images = skipped_images(self.loader)
        if self.info.world_size > 1:  # one collective: the loss (mean over ranks) and the skips (sum)
            both = torch.stack([step_loss.detach().float().reshape(()),
                                torch.tensor(float(bad_images), device=step_loss.device)])
            both = _all_reduce_sum(both)
            loss, bad_images = float(both[0]) / self.info.world_size, int(both[1])
        else:
            loss = float(step_loss)
        # the base lr: the group at lr_scale 1 (the head under layer decay), not a decayed layer's
        groups = self.optimizer.param_groups
        lr = next((g["lr"] for g in groups if g.get("lr_scale", 1.0) == 1.0), max(g["lr"] for g in groups))
        record = {"step": self.step, "epoch": self.epoch, "loss": loss, "lr": lr, "grad_norm": grad_norm,
                  "img_per_s": img_per_s, "world_size": self.info.world_size}
        if self.flops_per_image and self.peak:
            # every rank runs the same step, so the machine's peak is world_size * one device's peak
            record["mfu"] = self.flops_per_image * img_per_s / (self.peak * self.info.world_size)
        if self.log_extra is not None:
            record.update(self.log_extra())
        if self.skipped:
            record["skipped_steps"] = self.skipped
        if bad_images:
            record["skipped_images"] = bad_images
        self._log(record)
        if self._bar is not None:
            self._bar.set_postfix(loss=f"{loss:.4f}", lr=f"{lr:.2e}", img_s=f"{img_per_s:.1f}",
                                  refresh=False)
        else:
            mfu = f" | mfu {record['mfu'] * 100:.1f}%" if "mfu" in record else ""
            self._print(f"step {self.step}/{self.total_steps} | epoch {self.epoch} | loss {loss:.4f} | "
                        f"lr {lr:.2e} | grad {grad_norm:.3f} | {img_per_s:.1f} img/s{mfu}")


def skipped_images(loader) -> int:
    """Unreadable files skipped so far by the dataset behind ``loader`` (its ``num_skipped``, looked up
    through wrappers such as SeededDataset and Subset); 0 for datasets that never skip."""
    dataset = getattr(loader, "dataset", None)
    for _ in range(8):
        if dataset is None:
            break
        count = getattr(dataset, "num_skipped", None)
        if count is not None:
            return int(count)
        dataset = getattr(dataset, "dataset", None)
    return 0


def _all_reduce_sum(tensor: torch.Tensor) -> torch.Tensor:
    """Sum over ranks of a float tensor (moved to the communication device under NCCL and back)."""
    import torch.distributed as dist
    comm = tensor
    if dist.get_backend() == "nccl" and not tensor.is_cuda:
        comm = tensor.to(torch.device("cuda", torch.cuda.current_device()))
    dist.all_reduce(comm, op=dist.ReduceOp.SUM)
    return comm.to(tensor.device)
