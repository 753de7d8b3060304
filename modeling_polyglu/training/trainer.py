"""The trainer of `polyglu sft`: TRL's SFTTrainer with router hygiene.

Trainer only exempts norms and biases from weight decay, so α ([d_ff, K]) and router weights would be decayed — the
reference's own bug. :class:`PolyGLUSFTTrainer` never weight-decays router parameters.
"""

from trl import SFTTrainer

from .engines import RoutersSavedInFp32Mixin, is_router_parameter


class RouterNoDecayMixin:
    """For any Trainer subclass: the optimizer never applies weight decay to router parameters."""

    def get_decay_parameter_names(self, model) -> list[str]:
        return [name for name in super().get_decay_parameter_names(model) if not is_router_parameter(name)]


class PolyGLUSFTTrainer(RouterNoDecayMixin, RoutersSavedInFp32Mixin, SFTTrainer):
    """SFTTrainer whose optimizer never applies weight decay to router parameters, and which saves them in fp32."""
