"""The fine-tuning methods. Each module registers its method once (`hf_deelbo.registry.register_method`),
and importing this package imports them all, so that the shared layers (config entries, model
cards) know every method. Adding one: a module or folder here, and its import below
(docs/adding_a_method.md)."""

from . import l2sp, t1t2, tpgm  # noqa: F401 - importing a method's module registers it
from .deelbo import trainer  # noqa: F401 - registers DE ELBO (its config entry)
