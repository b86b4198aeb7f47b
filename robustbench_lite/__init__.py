"""robustbench_lite: how robust is this model, trained this way, against these attacks?

The public API lives here, so one import line is enough::

    from robustbench_lite import create_attack, create_defense, evaluate, load, train_or_load, ModelSpec

and ``benchmark(model, dataset=..., threat_model="Linf", eps=...)`` evaluates a model of your own;
``results(workdir)`` gives a results folder's wide and long tables as pandas DataFrames.

Plugins (attacks, defenses, models, datasets, cell kinds) import their bases and helpers from this
module too: ``EvasionAttack``, ``Defense``, ``setting``, ``register_attack``, ``ops``, ``Norm``, ...

The package is grouped by responsibility: ``core`` (registries, threat models and norm geometry,
settings, tensor ops, data, models, devices, attack bases), ``training`` (the defense base and the
trained-model cache), ``certify`` (verifiers), ``eval`` (evaluation of each kind of attack, flags,
adaptive wrappers), ``harness`` (plans, presets, cell kinds, runs, the results store) and
``report`` (leaderboard CSVs and the HTML report).
"""

from ._version import __version__ as __version__
from .certify import Verifier, create_verifier, list_verifiers, register_verifier  # noqa: E402
from .core import ops  # noqa: E402
from .core.access import Access, LabelOnly, ScoresOnly  # noqa: E402
from .core.attack import (  # noqa: E402
    AttackOutput,
    EvasionAttack,
    LossFn,
    PoisoningAttack,
    UniversalAttack,
    UniversalOutput,
    apply_delta,
)
from .core.config import setting  # noqa: E402
from .core.data import Data, DatasetNotFoundError, DataSplit, default_eps, list_datasets, load  # noqa: E402
from .core.device import DevicePolicy, make_policy  # noqa: E402
from .core.models import ModelSpec, Normalize, accuracy, create_model, predict, split_head  # noqa: E402
from .core.registry import (  # noqa: E402
    create_attack,
    create_defense,
    list_attacks,
    list_defenses,
    list_models,
    load_plugin_file,
    register_attack,
    register_dataset,
    register_defense,
    register_model,
)
from .core.threat import Geometry, Norm, ThreatModel, geometry  # noqa: E402
from .eval.evasion import evaluate  # noqa: E402
from .harness.benchmark import benchmark  # noqa: E402
from .harness.kinds import CellKind, Group, list_kinds, register_kind  # noqa: E402
from .report.export import Results, results  # noqa: E402
from .training.cache import ModelCache, TrainedModel, train_or_load  # noqa: E402
from .training.defense import Defense, EpochRecord, TrainLog, TrainState  # noqa: E402

__all__ = [
    "Access",
    "AttackOutput",
    "CellKind",
    "Data",
    "DataSplit",
    "default_eps",
    "DatasetNotFoundError",
    "Defense",
    "DevicePolicy",
    "EpochRecord",
    "EvasionAttack",
    "Geometry",
    "Group",
    "LabelOnly",
    "LossFn",
    "ModelCache",
    "ModelSpec",
    "Norm",
    "Normalize",
    "PoisoningAttack",
    "Results",
    "ScoresOnly",
    "ThreatModel",
    "TrainLog",
    "TrainState",
    "TrainedModel",
    "UniversalAttack",
    "UniversalOutput",
    "Verifier",
    "accuracy",
    "apply_delta",
    "benchmark",
    "create_attack",
    "create_defense",
    "create_model",
    "create_verifier",
    "evaluate",
    "geometry",
    "list_attacks",
    "list_datasets",
    "list_defenses",
    "list_kinds",
    "list_models",
    "list_verifiers",
    "load",
    "load_plugin_file",
    "make_policy",
    "ops",
    "predict",
    "register_attack",
    "register_dataset",
    "register_defense",
    "register_kind",
    "register_model",
    "register_verifier",
    "results",
    "setting",
    "split_head",
    "train_or_load",
]
