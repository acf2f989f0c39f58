"""Import every module that registers objectives, attacks or report renderers.

The CLI imports this once; library users import the modules they need directly."""
# ruff: noqa: F401
import attacks  # fgsm, pgd, apgd-*, eot-*, smoothadv, autoattack*, torchattacks:<Name>
import certify.report  # "certification" report renderer
import defenses.gaussian  # "gaussian" objective (Gaussian-augmentation training, sigma)
import defenses.single_step  # fgsm, fgsm_rs, n_fgsm, rs_aaer, n_aaer, aaer objectives
import defenses.training_report  # "training" report renderer (CO-monitor curves)
