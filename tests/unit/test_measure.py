import torch

from autoplan.runtime.timing import AllocationTracker, measure_training


def test_tracker_peak_equals_hand_arithmetic():
    existing = torch.zeros(250)  # 1,000 bytes, counted only once tracked
    with AllocationTracker() as tracker:
        tracker.track(existing)
        a = torch.empty(1000)  # 1,000 + 4,000 = 5,000
        view = a[:10].view(2, 5)  # a view: no new storage
        b = torch.ones(500, dtype=torch.float64)  # + 4,000 = 9,000 (peak so far)
        del a, view  # - 4,000 = 5,000
        c = torch.empty(1500)  # + 6,000 = 11,000 (the peak)
        b.add_(1)  # in place: no new storage
        c.untyped_storage().resize_(0)  # FSDP-style free: - 6,000 = 5,000
        d = torch.empty(100)  # + 400 = 5,400
        assert tracker.current_bytes == 5_400
    assert tracker.peak_bytes == 11_000
    del b, c, d


class _PlainModel:
    """A single-process model with the ParallelModel training interface."""

    def __init__(self, module: torch.nn.Module):
        self.module = module

    def train_step(self, inputs, targets=None):
        inputs = inputs if isinstance(inputs, tuple) else (inputs,)
        loss = torch.nn.functional.mse_loss(self.module(*inputs), targets)
        loss.backward()
        return loss.item()

    def parameters(self):
        return self.module.parameters()


def test_measure_training_counts_params_grads_and_adam_states():
    torch.manual_seed(0)
    module = torch.nn.Linear(256, 256, bias=False)
    model = _PlainModel(module)
    batch = ((torch.randn(8, 256),), torch.randn(8, 256))
    measurement = measure_training(model, [batch], steps=3, warmup=1)
    param_bytes = 256 * 256 * 4
    # Inside the AdamW step the weight, its gradient and AdamW's exp_avg and exp_avg_sq (4 P)
    # are all alive, so the peak is at least 4 P. On top, the step holds temporaries whose
    # number is the optimizer implementation's choice: torch 2.13 on CPU (single-tensor path)
    # holds two P-sized ones at once, sqrt(exp_avg_sq) and its quotient by the bias correction,
    # plus a 4-byte step counter (6 P + 4); the foreach and fused paths and other versions
    # hold a few P-sized ones at most. Every other tensor (8 x 256 activations and their
    # gradients, 8 KiB each) is far below P, so the peak lies in [4 P, 8 P] on any machine
    # and torch version.
    assert 4 * param_bytes <= measurement.peak_memory_bytes <= 8 * param_bytes
    assert len(measurement.step_times_s) == 3 and measurement.median_step_s > 0
    assert len(measurement.losses) == 2 + 3  # MEMORY_STEPS warm-up steps + timed steps
    assert measurement.losses[-1] < measurement.losses[0]
