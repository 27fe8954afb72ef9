"""megatron-core 0.16.1's distributed optimizer with PyTorch's Adam: loading its state.

Why: without Apex or Transformer Engine megatron-core's ``DistributedOptimizer`` runs
``torch.optim.Adam``, whose per-parameter state holds ``step`` beside ``exp_avg`` and
``exp_avg_sq``. Loading a checkpoint, ``DistributedOptimizer.load_state_dict`` sets that
``step`` itself (``distrib_optimizer.py:820-826``) and the loaders of the parameter
state (``load_parameter_state_from_fully_reshardable`` and ``..._fs_model_space``,
``distrib_optimizer.py:1819,2099``) leave it out of what they pass on, but
``_set_main_param_and_optimizer_states`` (``distrib_optimizer.py:937-940``) copies every
key of the live state from what it is given: ``KeyError: 'step'``, on CPU and GPU
alike, whenever neither Apex nor Transformer Engine is installed. And the step that
``load_state_dict`` sets is one tensor shared by every parameter's state
(``distrib_optimizer.py:826``), which ``torch.optim.Adam`` increments in place once per
parameter: after one step the bias correction would use step + number of parameters.
:func:`fix_step_state` gives each parameter its own copy of that step and hands it to
``_set_main_param_and_optimizer_states``, which copies it onto itself and everything
else as megatron-core does. Nothing changes where Apex or
Transformer Engine is installed (their Adam keeps no per-parameter step).
"""

from __future__ import annotations

_FIXED = False


def fix_step_state() -> bool:
    """Apply the fix once (see the module doc); returns whether it is in place."""
    global _FIXED
    from megatron.core.optimizer import distrib_optimizer

    if distrib_optimizer.HAVE_APEX_OR_TE:
        return False
    if _FIXED:
        return True
    cls = distrib_optimizer.DistributedOptimizer
    original = cls._set_main_param_and_optimizer_states

    def set_states(self, model_param, tensors):
        if "step" not in tensors and not self.config.use_precision_aware_optimizer_no_fp8_or_ds_fp8:
            group_index, group_order = self.model_param_group_index_map[model_param]
            main_param = self.optimizer.param_groups[group_index]["params"][group_order]
            state = self.optimizer.state[main_param]
            if "step" in state:
                # a tensor of its own: load_state_dict gives every parameter the same one
                # (distrib_optimizer.py:826), which torch's Adam then increments in place
                # once per parameter and step
                state["step"] = state["step"].clone()
                tensors = {**tensors, "step": state["step"]}
        return original(self, model_param, tensors)

    cls._set_main_param_and_optimizer_states = set_states
    _FIXED = True
    return True
