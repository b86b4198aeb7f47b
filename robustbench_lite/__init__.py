"""robustbench_lite: how robust is this model, trained this way, against these attacks?

Python API in brief::

    from robustbench_lite import create_attack, load, evaluate
    data = load("digits")
    pgd = create_attack("pgd", norm="linf", eps=0.1, steps=20)
    x_adv = pgd.perturb(model, data.test.x[:100], data.test.y[:100])
    ev = evaluate(model, [pgd], data.test, n=100)
"""

__version__ = "0.1.0"

from .attack import AttackOutput, EvasionAttack  # noqa: E402
from .config import setting  # noqa: E402
from .data import Data, DatasetNotFoundError, DataSplit, load  # noqa: E402
from .defense import Defense, accuracy  # noqa: E402
from .evaluate import evaluate  # noqa: E402
from .models import create_model  # noqa: E402
from .registry import (  # noqa: E402
    create_attack,
    create_defense,
    list_attacks,
    list_defenses,
    list_models,
    load_plugin_file,
    register_attack,
    register_defense,
    register_model,
)
from .threat import AttackKind, Norm, ThreatModel  # noqa: E402

__all__ = [
    "AttackKind",
    "AttackOutput",
    "Data",
    "DataSplit",
    "DatasetNotFoundError",
    "Defense",
    "EvasionAttack",
    "Norm",
    "ThreatModel",
    "accuracy",
    "create_attack",
    "create_defense",
    "create_model",
    "evaluate",
    "list_attacks",
    "list_defenses",
    "list_models",
    "load",
    "load_plugin_file",
    "register_attack",
    "register_defense",
    "register_model",
    "setting",
]
