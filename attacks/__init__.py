"""attacks: every adversary behind one interface.

    from attacks import create_attack, list_attacks
    atk = create_attack("apgd-ce", "linf:8/255", steps=50)
    x_adv = atk(model, x, y)              # same shape/dtype/device as x, inside the threat model

Native attacks (fgsm, pgd, pgd-margin, pgd-dlr, apgd-ce, apgd-dlr, apgd-t, eot-pgd, eot-apgd,
eot-apgd-dlr, smoothadv; square, autoattack-native; minimum-norm: fmn-linf, fmn-l2, fmn-l1,
fmn-l0, ddn, cw-l2, deepfool, fab, fab-t), adapters (autoattack, autoattack-rand, autoattack-plus,
torchattacks:<Name>), composite objectives (`attacks.adaptive`) and the evaluator probe
(`attacks.evaluation.AttackProbe`).
"""

from attacks import adapters as _adapters  # noqa: F401  (registers autoattack, torchattacks:<Name>)
from attacks import adaptive as _adaptive  # noqa: F401  (registers smoothadv)
from attacks import autoattack_native as _aa_native  # noqa: F401  (registers autoattack-native)
from attacks import fab as _fab  # noqa: F401  (registers fab, fab-t)
from attacks import minimum_norm as _minimum_norm  # noqa: F401  (registers fmn-*, ddn, cw-l2, deepfool)
from attacks import native as _native  # noqa: F401  (registers the native attacks)
from attacks import square as _square  # noqa: F401  (registers square)
from attacks.base import (
    Attack,
    AttackConfig,
    AttackError,
    AttackResult,
    attack_doc,
    create_attack,
    is_attack,
    list_attacks,
    register_attack,
    register_attack_prefix,
)
from attacks.evaluation import AttackProbe, sanity_flags
from attacks.objectives import LossObjective, Objective, ObjectiveOutput

__all__ = [
    "Attack", "AttackConfig", "AttackError", "AttackProbe", "AttackResult", "LossObjective", "Objective",
    "ObjectiveOutput", "attack_doc", "create_attack", "is_attack", "list_attacks", "register_attack",
    "register_attack_prefix", "sanity_flags",
]
