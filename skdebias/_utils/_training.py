"""Guards of a training run: stop one that diverges instead of returning it as fitted."""

from __future__ import annotations

import copy
import warnings

import torch
from skorch.callbacks import Callback
from skorch.dataset import unpack_data

from ..exceptions import ChanceLevelWarning, DivergenceError, UntrainedNetworkWarning
from ._modules import preserve_mode

__all__ = ["DivergenceGuard", "GuardLastMixin"]


class DivergenceGuard(Callback):
    """skorch callback that raises :class:`~skdebias.exceptions.DivergenceError` when training
    runs away.

    Checked after every training batch: the loss is finite. After every epoch: the weights
    are finite, and on up to ``baseline_samples`` training samples (eval mode) the network
    keeps at least ``keep`` of the accuracy it had above always predicting the most frequent
    class (a network at 0.98 with a majority class of 0.12 must stay above 0.335 for
    ``keep=0.25``); not checked for a network that was near that level before training.
    ``advice`` (e.g. ``"lower lr (now 0.01) or penalty (now 1e7)"``) ends the message. The
    weights of the last healthy epoch are put back before raising, so the net never holds the
    diverged ones.

    Parameters
    ----------
    advice : str
        What to change, with the current values; ``{net}`` stands for the net
        (e.g. ``"lower lr (now {net.lr})"``).
    keep : float, default=0.25
    baseline_samples : int, default=512
        Training samples scored before training and after every epoch (eval mode, no
        gradients).
    warn_untrained : str or None, default=None
        For a network that should arrive trained (a corrector's): what it is called in the
        :class:`~skdebias.exceptions.UntrainedNetworkWarning` issued when, before training, it
        is within 0.1 of always predicting the most frequent class. ``None``: no warning (a
        network trained from scratch starts there).
    warn_chance_end : str or None, default=None
        What to change (``{net}`` stands for the net) when the network *ends* training within
        0.1 of always predicting the most frequent class on the same samples, or has kept less
        than ``keep`` of the accuracy above that level that its best epoch reached: a
        :class:`~skdebias.exceptions.ChanceLevelWarning` ending with it. ``None``: not checked.
    """

    def __init__(self, advice="", keep=0.25, baseline_samples=512, warn_untrained=None,
                 warn_chance_end=None):
        self.advice = advice
        self.keep = keep
        self.baseline_samples = baseline_samples
        self.warn_untrained = warn_untrained
        self.warn_chance_end = warn_chance_end

    def initialize(self):
        self.good_state_ = None
        self.probe_ = None
        self.majority_ = 1.0
        self.baseline_ = 0.0
        self.baseline_ok_ = False
        self.best_ = (0.0, 0)  # (accuracy, epoch) of the best epoch on the probe
        return self

    def _accuracy(self, net):
        """Accuracy on the probe samples, in eval mode without gradients."""
        correct = seen = 0
        with preserve_mode(net.module_, train=False), torch.no_grad():
            for batch in self.probe_:
                Xi, yi = unpack_data(batch)
                pred = net.infer(Xi).argmax(dim=1).cpu()
                correct += int((pred == torch.as_tensor(yi).cpu()).sum())
                seen += len(pred)
        return correct / max(seen, 1)

    def _near_chance(self, accuracy):
        """Within 0.1 of always predicting the most frequent class of the probe."""
        return accuracy <= self.majority_ + 0.1

    def on_train_begin(self, net, X=None, y=None, **kwargs):
        self.good_state_ = copy.deepcopy(net.module_.state_dict())
        # a fixed probe of training samples: the original network's accuracy on it tells a
        # collapse caused by training from a network that never separated the classes
        dataset = net.get_dataset(X, y)
        n = min(len(dataset), int(self.baseline_samples))
        probe = torch.utils.data.Subset(dataset, range(n))
        # its own generator: a DataLoader draws a seed when iterated, which must not move the
        # global RNG that the training run's shuffling and initialisation may use
        self.probe_ = torch.utils.data.DataLoader(probe, batch_size=net.batch_size,
                                                  generator=torch.Generator().manual_seed(0))
        labels = torch.cat([torch.as_tensor(unpack_data(b)[1]).cpu().long()
                            for b in self.probe_]) if n else torch.zeros(0, dtype=torch.long)
        self.majority_ = float(torch.bincount(labels).max()) / n if n else 1.0
        self.baseline_ = self._accuracy(net) if n else 0.0
        self.baseline_ok_ = n > 0 and not self._near_chance(self.baseline_)
        self.best_ = (self.baseline_, 0)
        if n > 0 and not self.baseline_ok_ and self.warn_untrained:
            warnings.warn(
                f"{self.warn_untrained} predicts {self.baseline_:.3f} of {n} training samples "
                f"correctly, within 0.1 of always predicting the most frequent class "
                f"({self.majority_:.3f}): it is not trained on these labels, so what the "
                f"correction does cannot be judged (and a collapse to chance level cannot be "
                f"told from where it started). Train the network first, e.g. with more "
                f"max_epochs, and check that y holds the labels it was trained on.",
                UntrainedNetworkWarning, stacklevel=2)

    def on_batch_end(self, net, batch=None, training=None, loss=None, **kwargs):
        if training and loss is not None:
            loss = torch.as_tensor(loss).detach()
            if not bool(torch.isfinite(loss).all()):
                self._fail(net, f"the training loss became {float(loss)}")

    def on_epoch_end(self, net, **kwargs):
        for name, p in net.module_.named_parameters():
            if not bool(torch.isfinite(p).all()):
                self._fail(net, f"the weights of {name!r} became non-finite")
        if self.baseline_ok_ or self._checks_end():
            accuracy = self._accuracy(net)
            if self.baseline_ok_ and accuracy < self._floor(self.baseline_):
                self._fail(net, f"the training accuracy collapsed from {self.baseline_:.3f} to "
                                f"{accuracy:.3f} (always predicting the most frequent class "
                                f"gives {self.majority_:.3f})")
            if accuracy > self.best_[0]:
                self.best_ = (accuracy, len(net.history))
        self.good_state_ = copy.deepcopy(net.module_.state_dict())

    def _checks_end(self):
        """Whether the end of training is checked (``warn_chance_end`` and a probe to check on)."""
        return bool(self.warn_chance_end) and self.probe_ is not None and len(self.probe_.dataset)

    def _floor(self, reference):
        """The accuracy a run must keep: ``keep`` of ``reference``'s margin above the majority."""
        return self.majority_ + self.keep * (reference - self.majority_)

    def _fail(self, net, what):
        epoch = len(net.history)
        if self.good_state_ is not None:
            net.module_.load_state_dict(self.good_state_)
        advice = f": {self.advice.format(net=net)}" if self.advice else ""
        raise DivergenceError(f"Training diverged in epoch {epoch}: {what}{advice}.")

    def on_train_end(self, net, **kwargs):
        if self._checks_end():
            accuracy = self._accuracy(net)
            head = (f"{type(net).__name__} ends its training predicting {accuracy:.3f} of "
                    f"{len(self.probe_.dataset)} training samples correctly")
            (best, epoch), advice = self.best_, self.warn_chance_end.format(net=net)
            if self._near_chance(accuracy):
                warnings.warn(
                    f"{head}, within 0.1 of always predicting the most frequent class "
                    f"({self.majority_:.3f}): the fitted network does not classify these "
                    f"labels; {advice}.", ChanceLevelWarning, stacklevel=2)
            elif not self._near_chance(best) and accuracy < self._floor(best):
                warnings.warn(
                    f"{head}, less than {self.keep:g} of what its best epoch (epoch {epoch}: "
                    f"{best:.3f}) had above always predicting the most frequent class "
                    f"({self.majority_:.3f}): the fitted network has lost most of what it "
                    f"learnt; {advice}.", ChanceLevelWarning, stacklevel=2)
        self.good_state_ = self.probe_ = None  # memory, and a net that pickles

    def __getstate__(self):
        state = self.__dict__.copy()
        state.pop("good_state_", None)
        state.pop("probe_", None)
        return state



class GuardLastMixin:
    """skorch net mixin: :class:`DivergenceGuard` callbacks run after every other callback.

    The guard then judges the network the other callbacks leave: at the end of training one
    that loads other weights (``Checkpoint(load_best=True)`` puts back the best validation
    epoch) is checked for chance level as it is returned, and at the start the baseline is
    taken after a callback has loaded initial weights (``LoadInitState``). The other
    callbacks keep their order.
    """

    def initialize_callbacks(self):
        super().initialize_callbacks()
        # sorted is stable: only the guards move, to the end
        self.callbacks_ = sorted(self.callbacks_,
                                 key=lambda item: isinstance(item[1], DivergenceGuard))
        return self
