"""On-device training: training bundles run by plain onnxruntime.

The public names are importable from here (``from edge_sdk.training import ModelSession``); each is
loaded from its module on first use, so importing one submodule does not load onnxruntime::

    session = ModelSession.open("bundle", threads=2)
    state = TrainingState(session)
    data = prepare_dataset(session.manifest, *load_dataset_npz("train.npz"))
    train_local(state, data, TrainConfig(epochs=5, batch_size=32, lr=0.05))
    print(evaluate(state, data).accuracy)
"""

from __future__ import annotations

from edge_sdk.facade import lazy_facade

_EXPORTS = {
    "bundle": ("Bundle", "BundleError", "BundleIntegrityError", "Manifest", "load_bundle", "load_params_npz",
               "save_params_npz"),
    "data": ("DataError", "Dataset", "load_dataset_npz", "prepare_dataset"),
    "loop": ("EpochReport", "Evaluation", "TrainConfig", "evaluate", "train_local"),
    "session": ("ModelSession", "SessionError", "SessionOptions"),
    "state": ("NonFiniteLossError", "ParameterError", "TrainingState"),
}
__all__, __getattr__, __dir__ = lazy_facade(__name__, globals(), _EXPORTS)
