"""Probes and probe managers: what Probing feeds activations to."""

from __future__ import annotations

import functools
import re
from collections.abc import Callable, Iterable, Sequence
from typing import Any

import torch
from tensordict import TensorDict

from ...errors import InvalidInputError, ProbingError
from ._step import StepType, default_preprocess, require_labels, run_step

__all__ = ["BilinearProbe", "BilinearProbeManager", "Probe", "ProbeManager", "StepType"]


def _metric_tensor(value: Any, key: str, metric: str) -> torch.Tensor:
    try:
        return torch.as_tensor(value)
    except (TypeError, ValueError, RuntimeError):
        raise InvalidInputError(
            f"Metric {metric!r} of probe {key!r} is a {type(value).__name__} ({value!r:.40}), not a number or a tensor; "
            "return numbers (or tensors) from compute_metrics to read them in results."
        ) from None


class _EstimatorStep:
    """What both probes share: one estimator, its callbacks, the preprocessing, the input checks."""

    def __init__(
        self,
        estimator: Any,
        predict_callback: Callable[[Any, Any], Any],
        fit_callback: Callable[[Any, Any], Any] | None = None,
        data_preprocess_callback: Callable[[Any], Any] | None = None,
        *,
        check_finite: bool = True,
    ) -> None:
        self.estimator = estimator
        self._predict_callback = predict_callback
        self._fit_callback = fit_callback
        self._preprocess = data_preprocess_callback or default_preprocess
        self._check_finite = check_finite

    def _run(self, data: tuple[Any, ...], labels: Any, step_type: Any) -> None:
        step = StepType.parse(step_type)
        require_labels(labels, step)
        xs = tuple(self._preprocess(d) for d in data)
        run_step(
            self.estimator, step, xs, labels, self._fit_callback, self._predict_callback, self._check_finite
        )


class Probe(_EstimatorStep):
    """Fit or evaluate one estimator on the activations it is given.

    Args:
        estimator: An object with ``fit(X, y)`` and ``predict(X)`` (scikit-learn style).
        predict_callback: ``(predictions, labels) -> None`` called on "predict" steps.
        fit_callback: ``(predictions, labels) -> None`` called after fitting, on the training data.
        data_preprocess_callback: ``data -> X``; defaults to detach + flatten(1).
        check_finite: Refuse NaN/Inf activations (and, when fitting, labels) with
            :class:`~tdhook.errors.NonFiniteInputError` before the estimator sees them. Set it
            to False for an estimator that handles missing values itself. An empty batch is
            always refused (:class:`~tdhook.errors.InsufficientSamplesError`).
    """

    def step(self, data: Any, **kwargs: Any) -> None:
        """Fit (``step_type="fit"``), update (``"partial_fit"``) or predict (``"predict"``) on ``data``.

        ``"partial_fit"`` trains a streaming estimator on one more batch and records no metric;
        evaluate with a ``"predict"`` step afterwards.
        """
        self._run((data,), kwargs.get("labels"), kwargs.get("step_type"))


class _ManagerBase:
    """What both probe managers share: estimator creation, metric tables, reset and reduce."""

    def __init__(
        self,
        estimator_class: Callable[..., Any],
        estimator_kwargs: dict[str, Any],
        compute_metrics: Callable[[Any, Any], dict[str, Any]],
        allow_overwrite: bool = False,
        data_preprocess_callback: Callable[[Any], Any] | None = None,
        *,
        reuse_probes: bool = False,
        overwrite_results: bool | None = None,
        check_finite: bool = True,
    ) -> None:
        self._estimator_class = estimator_class
        self._estimator_kwargs = dict(estimator_kwargs or {})
        self._compute_metrics = compute_metrics
        self._allow_overwrite = allow_overwrite
        self._overwrite_results = allow_overwrite if overwrite_results is None else overwrite_results
        self._reuse_probes = reuse_probes
        self._preprocess = data_preprocess_callback
        self._check_finite = check_finite
        self._estimators: dict[str, Any] = {}
        self._probes: dict[str, Any] = {}
        self._fit_metrics: dict[str, Any] = {}
        self._predict_metrics: dict[str, Any] = {}

    @property
    def estimators(self) -> dict[str, Any]:
        return self._estimators

    @property
    def fit_metrics(self) -> dict[str, Any]:
        return self._fit_metrics

    @property
    def predict_metrics(self) -> dict[str, Any]:
        return self._predict_metrics

    @property
    def results(self) -> TensorDict:
        """Every recorded metric in one TensorDict: ``results["fit" | "predict"][probe_key][metric]``.

        Built on access from ``fit_metrics`` and ``predict_metrics`` (a snapshot); each metric is
        a tensor (``results["fit"]["0_fwd"]["r2"]`` is 0-d for a scalar). Both phases are always
        present, possibly empty.

        Raises:
            InvalidInputError: If ``compute_metrics`` returned something else than a dict, or a
                metric that is not a number or a tensor (a ``TypeError``).
        """
        phases = {}
        for phase, table in ((StepType.FIT, self._fit_metrics), (StepType.PREDICT, self._predict_metrics)):
            entries = {}
            for key, metrics in table.items():
                if not isinstance(metrics, dict):
                    raise InvalidInputError(
                        f"compute_metrics returned a {type(metrics).__name__} for probe {key!r} ({phase.value}); "
                        "results needs a dict of metrics, e.g. lambda preds, y: {'r2': r2_score(y, preds)}."
                    )
                entries[key] = TensorDict(
                    {m: _metric_tensor(v, key, m) for m, v in metrics.items()}, batch_size=[]
                )
            phases[phase.value] = TensorDict(entries, batch_size=[])
        return TensorDict(phases, batch_size=[])

    def reset_estimators(self) -> None:
        """Forget every estimator (and, with ``reuse_probes``, every probe)."""
        self._estimators = {}
        self._probes = {}

    def reset_metrics(self) -> None:
        self._fit_metrics = {}
        self._predict_metrics = {}

    def reset_results(self) -> None:
        """Forget every recorded metric (``results``, ``fit_metrics``, ``predict_metrics``); keep the estimators."""
        self.reset_metrics()

    def all_reduce(self, group: Any = None) -> None:
        """Sum every streaming estimator's statistics across processes (``torch.distributed``).

        Call it on every rank after the ``partial_fit`` steps and before predicting, so each rank
        holds the fit on the union of all ranks' data.

        Raises:
            ProbingError: If an estimator cannot be reduced (no ``all_reduce`` method).
        """
        for name, estimator in self._estimators.items():
            if not hasattr(estimator, "all_reduce"):
                raise ProbingError(
                    f"Estimator {name} ({type(estimator).__name__}) has no all_reduce; use a streaming estimator "
                    "from tdhook.latent.stats to train across processes."
                )
            estimator.all_reduce(group)

    def _new_estimator(self, name: str) -> Any:
        if name in self._estimators and not self._allow_overwrite:
            raise ProbingError(
                f"Probe {name} already exists, call reset_estimators() to reset the estimators or use "
                "allow_overwrite=True to overwrite the existing estimators"
            )
        estimator = self._estimator_class(**self._estimator_kwargs)
        self._estimators[name] = estimator
        return estimator

    def _store(self, kind: StepType, name: str, predictions: Any, labels: Any) -> None:
        table = self._fit_metrics if kind is StepType.FIT else self._predict_metrics
        if name in table and not self._overwrite_results:
            raise ProbingError(
                f"Metrics for {name} already exist, call reset_metrics() or use allow_overwrite=True to "
                "overwrite them."
            )
        table[name] = self._compute_metrics(predictions, labels)

    def _callbacks(self, name: str) -> dict[str, Any]:
        return {
            "predict_callback": functools.partial(self._store, StepType.PREDICT, name),
            "fit_callback": functools.partial(self._store, StepType.FIT, name),
            "data_preprocess_callback": self._preprocess,
            "check_finite": self._check_finite,
        }


class ProbeManager(_ManagerBase):
    """Create one estimator per probed module and collect the metrics of every probe.

    Args:
        estimator_class: Estimator type, instantiated with ``estimator_kwargs`` per probe.
        estimator_kwargs: Constructor keyword arguments.
        compute_metrics: ``(predictions, labels) -> dict`` of metrics.
        allow_overwrite: Allow re-creating a probe or re-storing metrics under the same key.
        data_preprocess_callback: Passed to every :class:`Probe`.
        reuse_probes: Return the *same* probe (and fitted estimator) for the same key, so that a
            probe fitted in one ``with`` block predicts in a later one; ``reset_estimators()``
            starts over. False keeps tdhook 0.1's behaviour: a second ``probe_factory`` call for
            a key (e.g. entering a ``Probing`` context again) raises, or with
            ``allow_overwrite=True`` creates a fresh, unfitted estimator.
        overwrite_results: Allow recording the metrics of a phase and probe twice (the last one
            is kept); defaults to ``allow_overwrite``.
        check_finite: Passed to every :class:`Probe`: refuse NaN/Inf activations and labels
            before the estimator (default), or let them through (False).

    Examples:
        >>> from sklearn.linear_model import LinearRegression
        >>> manager = ProbeManager(LinearRegression, {}, lambda p, y: {"n": len(p)})
        >>> probe = manager.probe_factory("layer", "fwd")
        >>> sorted(manager.estimators)
        ['layer_fwd']
    """

    def probe_factory(self, key: str, direction: str) -> Probe:
        """Create the probe for ``key`` at ``direction`` (its metrics go under ``f"{key}_{direction}"``)."""
        name = f"{key}_{direction}"
        if self._reuse_probes:
            probe = self._probes.get(name)
            if probe is None:
                probe = self._probes[name] = Probe(self._new_estimator(name), **self._callbacks(name))
            return probe
        return Probe(self._new_estimator(name), **self._callbacks(name))


class BilinearProbe(_EstimatorStep):
    """A probe on a pair of activations ``(h1, h2)``, possibly from two modules.

    ``step(data, key, labels, step_type)`` collects the activation of ``h1_key`` and of
    ``h2_key``; once both are present the estimator is fitted on (or predicts from) the pair.

    Args:
        h1_key: Name of the first module.
        h2_key: Name of the second module (may equal ``h1_key``).
        estimator: An object with ``fit(h1, h2, y=...)`` and ``predict(h1, h2)``.
        predict_callback: ``(predictions, labels) -> None``.
        fit_callback: ``(predictions, labels) -> None`` after fitting.
        data_preprocess_callback: ``data -> X`` (default: detach + flatten).
        check_finite: As for :class:`Probe`.
    """

    def __init__(
        self,
        h1_key: str,
        h2_key: str,
        estimator: Any,
        predict_callback: Callable[[Any, Any], Any],
        fit_callback: Callable[[Any, Any], Any] | None = None,
        data_preprocess_callback: Callable[[Any], Any] | None = None,
        *,
        check_finite: bool = True,
    ) -> None:
        super().__init__(
            estimator, predict_callback, fit_callback, data_preprocess_callback, check_finite=check_finite
        )
        self.h1_key = h1_key
        self.h2_key = h2_key
        self._cache: dict[str, Any] = {}

    @property
    def is_waiting(self) -> bool:
        return bool(self._cache)

    def before_all(self) -> None:
        self._cache = {}

    def after_all(self) -> list[tuple[str, str]]:
        waiting = [(self.h1_key, self.h2_key)] if self._cache else []
        self._cache = {}
        return waiting

    def step(self, data: Any, key: str, labels: Any = None, step_type: Any = None, **kwargs: Any) -> None:
        if self.h1_key == self.h2_key:
            if key == self.h1_key:
                self._run((data, data), labels, step_type)
            return
        if key not in (self.h1_key, self.h2_key):
            return
        self._cache[key] = data
        if self.h1_key in self._cache and self.h2_key in self._cache:
            h1, h2 = self._cache.pop(self.h1_key), self._cache.pop(self.h2_key)
            self._run((h1, h2), labels, step_type)


class _Dispatcher:
    """Forward one module's activations to every pair probe that contains that module."""

    __slots__ = ("key", "probes")

    def __init__(self, key: str, probes: list[BilinearProbe]) -> None:
        self.key = key
        self.probes = probes

    def step(self, data: Any, **kwargs: Any) -> None:
        for probe in self.probes:
            probe.step(data, key=self.key, **kwargs)


class BilinearProbeManager(_ManagerBase):
    """Probe pairs of modules with a bilinear estimator (metric keys ``f"{h1}_{h2}_{direction}"``).

    Pair keys are module names as given; with ``Probing(relative=False)`` the hooked names are
    absolute (``td_module.…``) and a pair key matches the name it ends with, so the same pairs
    work in both modes.

    Args:
        pairs: ``[(h1, h2), ...]`` module names.
        estimator_class: Estimator type with ``fit(h1, h2, y=...)`` and ``predict(h1, h2)``.
        estimator_kwargs: Constructor keyword arguments.
        compute_metrics: ``(predictions, labels) -> dict``.
        allow_overwrite: Allow re-creating probes or metrics.
        data_preprocess_callback: Passed to every :class:`BilinearProbe`.
        check_finite: Passed to every :class:`BilinearProbe` (see :class:`Probe`).
    """

    def __init__(
        self,
        pairs: Sequence[tuple[str, str]],
        estimator_class: Callable[..., Any],
        estimator_kwargs: dict[str, Any],
        compute_metrics: Callable[[Any, Any], dict[str, Any]],
        allow_overwrite: bool = False,
        data_preprocess_callback: Callable[[Any], Any] | None = None,
        *,
        check_finite: bool = True,
    ) -> None:
        super().__init__(
            estimator_class,
            estimator_kwargs,
            compute_metrics,
            allow_overwrite,
            data_preprocess_callback,
            check_finite=check_finite,
        )
        self._pairs = [tuple(p) for p in pairs]
        for pair in self._pairs:
            if len(pair) != 2 or not all(isinstance(k, str) for k in pair):
                raise ProbingError(f"Each pair must be two module names (h1, h2), got {pair!r}.")
        self._pair_probes: dict[tuple[str, str, str], BilinearProbe] = {}

    @property
    def key_pattern(self) -> str:
        """Pattern matching every pair key, as a relative name or as the end of an absolute one."""
        keys = sorted({k for pair in self._pairs for k in pair})
        return "|".join(rf"(?:.*\.)?{re.escape(k)}$" for k in keys)

    def reset_estimators(self) -> None:
        super().reset_estimators()
        self._pair_probes = {}

    def _pair_key(self, name: str) -> str | None:
        keys = {k for pair in self._pairs for k in pair}
        if name in keys:
            return name
        for k in sorted(keys, key=len, reverse=True):
            if name.endswith("." + k):
                return k
        return None

    def check_probed(self, names: Sequence[str]) -> None:
        """Refuse pairs naming a module that ``names`` (the modules a Probing context probes) lacks.

        :class:`Probing` calls it at enter, before creating probes.

        Raises:
            ProbingError: Naming the pair, the missing key and the probed names.
        """
        probed = {self._pair_key(name) for name in names}
        for pair in self._pairs:
            missing = [k for k in pair if k not in probed]
            if missing:
                raise ProbingError(
                    f"Bilinear pair {pair!r} names {missing}, which this Probing context does not probe (probed "
                    f"modules: {sorted(names)[:10]}); the pair would never be fitted. Use module names of the "
                    "model in pairs, and key_pattern=manager.key_pattern."
                )

    def probe_factory(self, key: str, direction: str) -> _Dispatcher:
        """Return the dispatcher for module ``key``; pair probes are created on first use."""
        pair_key = self._pair_key(key)
        probes = []
        for h1, h2 in self._pairs:
            if pair_key not in (h1, h2):
                continue
            ident = (h1, h2, direction)
            if ident not in self._pair_probes:
                name = f"{h1}_{h2}_{direction}"
                self._pair_probes[ident] = BilinearProbe(
                    h1, h2, self._new_estimator(name), **self._callbacks(name)
                )
            probes.append(self._pair_probes[ident])
        return _Dispatcher(pair_key or key, probes)

    def before_all(self) -> None:
        for probe in self._pair_probes.values():
            probe.before_all()

    def after_all(self) -> None:
        waiting = [p.after_all() for p in self._pair_probes.values()]
        unresolved = [pair for w in waiting for pair in w]
        if unresolved:
            keys = sorted({k for pair in unresolved for k in pair})
            raise ProbingError(
                f"Bilinear probes still waiting on keys: {keys}. Unresolved pairs: {unresolved}"
            )

    def iter_probes(self) -> Iterable[BilinearProbe]:
        return iter(self._pair_probes.values())
